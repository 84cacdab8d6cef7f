"""The step-backend layer: one UNet step of one model on onnxruntime (CPU/CUDA), TensorRT or torch,
as a `Step` whose `prepare(batch, h, w)` returns the callable the timing loop runs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from aptp.errors import ConfigError

from .options import ALL_BACKENDS


def torch_status() -> tuple[bool, str | None]:
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
    except ImportError as err:
        return False, f"{err.name or 'torch'} is not installed"
    return True, None


def backend_status(name: str, manifest: Mapping[str, Any]) -> tuple[bool, str | None]:
    """Whether backend `name` can run here: ``(True, None)`` or ``(False, reason)``."""
    if name not in ALL_BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(ALL_BACKENDS)}")
    if name == "onnxruntime":
        return True, None
    if name == "onnxruntime-cuda":
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return False, f"onnxruntime {ort.__version__} has no CUDAExecutionProvider ({', '.join(providers)})"
        return True, None
    if name == "tensorrt":
        from aptp.runtime.engine import tensorrt_available

        ok, reason = tensorrt_available()
        if not ok:
            return False, reason
        missing = [e["code"] for e in manifest.get("experts", []) if not e.get("tensorrt")]
        if missing or not (manifest.get("dense") or {}).get("tensorrt"):
            return False, "the export has no TensorRT plans (re-export with --tensorrt on a GPU machine)"
        return True, None
    ok, reason = torch_status()
    if not ok:
        return False, reason
    if name in ("torch-cuda", "torch-cuda-graphs"):
        import torch

        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
    if name == "torch-compile":
        import torch

        if not hasattr(torch, "compile"):
            return False, "this torch has no torch.compile"
    return True, None


class Step:
    """One variant on one backend: `prepare(batch, h, w)` returns a callable running one UNet step;
    `provider` names what actually runs it (the onnxruntime provider the session activated,
    ``"TensorRT"``, or the torch device and dtype), for the reports. `memory` receives, per
    ``(batch, h, w)`` prepared, what the step measured of its sessions (onnxruntime on CPU:
    ``session_bytes``, RSS the session and its first call of that shape added;
    ``specialised_bytes`` and ``specialised_s``, what a session specialised to the shape added
    and took to create)."""

    def __init__(self, prepare: Callable[[int, int, int], Callable[[], Any]], close: Callable[[], None] | None = None,
                 provider: str | None = None):
        self.prepare = prepare
        self.close = close or (lambda: None)
        self.provider = provider
        self.memory: dict[tuple[int, int, int], dict[str, float]] = {}


def unet_inputs(batch: int, channels: int, height: int, width: int, text_length: int, hidden: int,
                seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, channels, height, width), dtype=np.float32),
        "timestep": np.full((batch,), 500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, text_length, hidden), dtype=np.float32),
    }


def ort_step(path: Path, shape: Mapping[str, int], threads: int, device: str, backend: str = "onnxruntime",
             fixed_shapes: bool = False) -> Step:
    """`backend` ``"tensorrt"`` asks for onnxruntime's TensorRT provider (an error if it does not
    activate). `fixed_shapes` (CPU): every call runs a session specialised to its shape
    (`aptp.runtime.shape_sessions.ShapeSessionEngine`), created in `prepare` so that no timed
    call pays for it; each shape's session stays until the step closes."""
    from aptp.runtime.engine import OnnxRuntimeEngine
    from aptp.runtime.residency import MemoryProbe
    from aptp.runtime.shape_sessions import ShapeSessionEngine

    # Our graphs keep large weights in `<graph>.data` beside them (exports, and the suite's own
    # graphs over the size threshold); benchmarks time, the runtime verifies, so no hash here.
    data = Path(path).with_name(Path(path).name + ".data")
    external = [(data, None)] if data.is_file() else ()
    if fixed_shapes:
        # One session per shape prepared, none evicted: a session created after an eviction reuses
        # the freed heap, and the RSS it adds would undercount it (7-61 MiB against 278-605 measured).
        engine: OnnxRuntimeEngine = ShapeSessionEngine(path, device=device, threads=threads, backend=backend,
                                                       external_data=external, max_sessions=64, min_calls=1)
    else:
        engine = OnnxRuntimeEngine(path, device=device, threads=threads, backend=backend, external_data=external)
    probe = MemoryProbe()
    _, held = probe.rss_added(engine.load)  # the weights; each new shape's first call adds its arena
    step = Step(lambda *_: (lambda: None), engine.unload, provider=engine.provider)

    def prepare(batch: int, height: int, width: int) -> Callable[[], Any]:
        nonlocal held
        feed = unet_inputs(batch, shape["channels"], height, width, shape["text_length"], shape["hidden"])
        feed = {name: value.astype(engine.input_dtype(name)) for name, value in feed.items()}
        key = (batch, height, width)
        if isinstance(engine, ShapeSessionEngine):
            before, held_before, created = engine.create_seconds, engine.extra_bytes, engine.created
            engine.warm([feed])
            if engine.created > created:  # a step held across pairs prepares its shapes again: keep the first
                step.memory[key] = {"specialised_bytes": engine.extra_bytes - held_before,
                                    "specialised_s": engine.create_seconds - before}
        elif device == "cpu" and key not in step.memory:
            held += probe.rss_added(lambda: engine.infer(feed))[1]
            step.memory[key] = {"session_bytes": held}
        return lambda: engine.infer(feed)

    step.prepare = prepare
    return step


def trt_step(plan: Path, shape: Mapping[str, int]) -> Step:
    from aptp.runtime.engine import TensorRTEngine

    engine = TensorRTEngine(plan)
    engine.load()

    def prepare(batch: int, height: int, width: int) -> Callable[[], Any]:
        feed = unet_inputs(batch, shape["channels"], height, width, shape["text_length"], shape["hidden"])
        feed = {name: value.astype(engine.input_dtype(name)) for name, value in feed.items()}
        engine.allocate_buffers({name: value.shape for name, value in feed.items()})

        def run() -> Any:
            out = engine.infer(feed)
            cuda_sync()
            return out

        return run

    return Step(prepare, engine.unload, provider=engine.provider)


def cuda_sync() -> None:
    with contextlib.suppress(Exception):
        import torch

        torch.cuda.synchronize()


def torch_step(unet: Any, shape: Mapping[str, int], backend: str, gates: Any = None, layout: Any = None) -> Step:
    """A torch UNet step; `gates` (one hard mask) runs the full UNet masked (apply_gates)."""
    import torch

    device = "cuda" if backend == "torch-cuda" else "cpu"
    unet = unet.to(device).eval()
    model = unet
    if backend == "torch-compile":
        model = torch.compile(unet)

    def prepare(batch: int, height: int, width: int) -> Callable[[], Any]:
        feed = {k: torch.from_numpy(v).to(device) for k, v in
                unet_inputs(batch, shape["channels"], height, width, shape["text_length"], shape["hidden"]).items()}
        mask = None if gates is None else gates.float().to(device)

        def run() -> Any:
            from aptp.train.gates import apply_gates

            with torch.inference_mode(), apply_gates(unet, layout, mask):
                out = model(feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"],
                            return_dict=False)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        return run

    return Step(prepare, provider=f"torch {device} float32" + (" (torch.compile)" if backend == "torch-compile" else ""))
