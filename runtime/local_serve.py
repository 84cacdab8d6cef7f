"""``aptp-serve``'s default mode: one process, no Ray, the in-process `GenerationServer` behind uvicorn.

    server = LocalServer.start("exports/tiny", port=0)       # in a thread (tests, notebooks)
    print(server.url); ...; server.stop()

    serve_forever("exports/tiny", host="127.0.0.1", port=8000)   # the CLI: until SIGINT/SIGTERM

Requests go through the app of `aptp.runtime.http_app` (the same one the Ray router answers
with) and are queued on a `GenerationServer`: batching per expert, its memory budget, its
bounded queue (full: 503). On SIGINT/SIGTERM the generation server is closed first, without
waiting: every queued request is answered 503 at once, the batch that is running finishes, and
then uvicorn stops. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

from aptp.errors import ConfigError, DependencyError

from .a1111 import result_dict
from .http_app import Service, build_app
from .pipeline import AptpPipeline, GenerationOptions, ProgressCallback
from .serve_http import encode_png

__all__ = ["LocalOptions", "LocalServer", "local_service", "require_uvicorn", "serve_forever"]

logger = logging.getLogger(__name__)


def require_uvicorn() -> Any:
    """`uvicorn`, or a `DependencyError` naming the extra to install."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise DependencyError(f"the local server needs starlette and uvicorn ({err}): pip install 'aptp[local]'"
                              ) from None
    return uvicorn


@dataclass(frozen=True)
class LocalOptions:
    """The pipeline and generation server of the local mode (see `GenerationServer`)."""

    max_batch: int | None = None
    max_wait: float = 0.02
    max_queue: int = 64
    max_wait_s: float = 5.0
    memory_budget: int | str | None = None
    threads: int | None = None
    device: str = "cpu"
    verify: bool = True
    workers: int | str = "auto"


def local_service(artifacts: str, options: LocalOptions = LocalOptions()) -> tuple[Service, Any]:
    """The app's `Service` over a new pipeline and `GenerationServer`; returns (service, server)."""
    from .serving import GenerationServer

    pipe = AptpPipeline.from_export(artifacts, verify=options.verify, threads=options.threads,
                                    device=options.device, max_batch=options.max_batch,
                                    memory_budget=options.memory_budget, workers=options.workers)
    server = GenerationServer(pipe, max_batch=options.max_batch, max_wait=options.max_wait,
                              max_queue=options.max_queue, max_wait_s=options.max_wait_s)

    async def generate(prompt: str, seed: int, opts: GenerationOptions, negative: str | None,
                       callback: ProgressCallback | None, image: Any = None) -> dict[str, Any]:
        edit = {} if image is None else {"init_image": image.image, "mask_image": image.mask,
                                         "mask_blur": image.mask_blur if image.mask is not None else None,
                                         "strength": opts.strength}
        future = server.submit(prompt, seed=seed, guidance_scale=opts.guidance_scale,
                               num_inference_steps=opts.num_inference_steps, expert=opts.expert,
                               height=opts.height, width=opts.width, scheduler=opts.scheduler,
                               negative_prompt=negative, callback=callback, **edit)
        result = await asyncio.wrap_future(future)
        return result_dict(result, await asyncio.to_thread(encode_png, result.image))

    return Service(pipe=pipe, generate=generate, img2img=True), server


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class LocalServer:
    """A running local server (uvicorn on its own socket)."""

    def __init__(self, service: Service, generation_server: Any, sock: socket.socket):
        uvicorn = require_uvicorn()
        self.service = service
        self.generation_server = generation_server
        self.socket = sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.port = port
        generation = generation_server

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                # Answer every queued request 503 now; uvicorn then waits for the running batch only.
                generation.close(wait=False)
                super().handle_exit(sig, frame)

        config = uvicorn.Config(build_app(service), log_level="warning", lifespan="off", timeout_graceful_shutdown=60,
                                access_log=False)
        self.uvicorn = _Server(config)
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, artifacts: str, host: str = "127.0.0.1", port: int = 0,
              options: LocalOptions = LocalOptions(), timeout: float = 60.0) -> LocalServer:
        """Serve in a background thread; returns once it accepts connections.

        Raises:
            ConfigError: the address cannot be bound; RuntimeError: not started within `timeout`.
        """
        require_uvicorn()
        service, generation = local_service(artifacts, options)
        server = cls(service, generation, _bind(host, port))
        server._thread = threading.Thread(target=server.uvicorn.run, kwargs={"sockets": [server.socket]},
                                          name="aptp-local-serve", daemon=True)
        server._thread.start()
        for _ in range(int(timeout / 0.02)):
            if server.uvicorn.started or not server._thread.is_alive():
                break
            server._thread.join(0.02)
        if not server.uvicorn.started:
            server.stop()
            raise RuntimeError(f"the local server did not start within {timeout:g} s")
        return server

    def stop(self, timeout: float = 60.0) -> bool:
        """Queued requests get 503, the running batch finishes, uvicorn stops; returns whether
        the server thread ended within `timeout`."""
        self.generation_server.close(wait=False)
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        ended = self._thread is None or not self._thread.is_alive()
        self.generation_server.close(wait=True, timeout=timeout)
        self.socket.close()
        return ended


def serve_forever(artifacts: str, host: str = "127.0.0.1", port: int = 8000,
                  options: LocalOptions = LocalOptions(), announce: Any = print) -> None:
    """Serve in this thread until SIGINT/SIGTERM (the CLI's local mode)."""
    require_uvicorn()
    sock = _bind(host, port)  # a busy port fails before the export loads
    service, generation = local_service(artifacts, options)
    server = LocalServer(service, generation, sock)
    announce(f"serving {artifacts} on {server.url}/ (page at /, A1111 API at /sdapi/v1/; Ctrl-C stops)")
    try:
        server.uvicorn.run(sockets=[sock])
    finally:
        generation.close(wait=True, timeout=60)
        sock.close()
