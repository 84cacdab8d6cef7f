"""The one HTTP app of ``aptp-serve``: every route, for the local server and the Ray router alike.

    POST /                     aptp's own contract (`aptp.runtime.serve_http`): PNG or JSON
    GET  /                     the page (`aptp/runtime/web/page.html`, with page.js and page.css)
    POST /sdapi/v1/txt2img     the AUTOMATIC1111 API subset (`aptp.runtime.a1111`)
    POST /sdapi/v1/img2img     its img2img and inpainting (`aptp.runtime.a1111_img2img`; local mode)
    GET  /sdapi/v1/samplers, /sdapi/v1/sd-models, /sdapi/v1/options, /sdapi/v1/progress, /sdapi/v1/scripts
    POST /sdapi/v1/options, /sdapi/v1/interrupt

A mode supplies a `Service`: the pipeline used for checks and for what the export holds, and
a coroutine that generates one image (the local mode through `GenerationServer`, the Ray mode
through its expert deployments). `dispatch` answers one Starlette request with it, so both modes
share the request handling; `build_app` wraps it in a Starlette app for uvicorn.

Pages are sent with ``Content-Security-Policy: default-src 'self'`` (images also from ``data:``):
the page loads its script and style from this server only, nothing inline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aptp.errors import AptpError

from . import a1111
from .pipeline import AptpPipeline, GenerationOptions
from .progress import GenerationInterrupted, ProgressBoard
from .serve_http import HttpError, parse_request, response_format, result_json

__all__ = ["CSP", "Generate", "Service", "build_app", "dispatch"]

logger = logging.getLogger(__name__)

#: ``generate(prompt, seed, options, negative_prompt, callback) -> result dict`` (`a1111.result_dict`).
Generate = Callable[[str, int, GenerationOptions, "str | None", "ProgressCallback | None"], Awaitable[dict[str, Any]]]

CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
WEB = Path(__file__).with_name("web")
STATIC = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/page.css": ("page.css", "text/css; charset=utf-8")}


def default_status(err: BaseException) -> tuple[int, str]:
    """HTTP status and one-line message of a failed generation (local mode)."""
    from .serving import QueueFullError, ServerClosedError

    if isinstance(err, HttpError):
        return err.status, str(err)
    if isinstance(err, (QueueFullError, ServerClosedError)):
        return 503, str(err)
    if isinstance(err, GenerationInterrupted):
        return 409, str(err)
    if isinstance(err, AptpError):
        return (400 if isinstance(err, ValueError) else 500), str(err)
    return 500, f"{type(err).__name__}: {err}"


@dataclass
class Service:
    """What a serving mode gives the app.

    Args:
        pipe: checks requests and describes the export (never generates here).
        generate: one image, as `Generate`.
        status_of: HTTP status and message of an exception `generate` raised.
        step_progress: whether `generate` passes the step callback to the sampling loop
            (local mode); otherwise progress counts finished images.
        img2img: whether `generate` takes an ``image=`` (`img2img.ImageRequest`) keyword
            (local mode); otherwise img2img requests are refused in one line.
    """

    pipe: AptpPipeline
    generate: Generate
    status_of: Callable[[BaseException], tuple[int, str]] = default_status
    step_progress: bool = True
    board: ProgressBoard = field(default_factory=ProgressBoard)
    img2img: bool = False


def _json(body: Any, status: int = 200) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _a1111_error(status: int, message: str) -> Any:
    from http import HTTPStatus

    message = " ".join(message.split())
    return _json({"error": HTTPStatus(status).phrase, "detail": message}, status)


async def dispatch(request: Any, service: Service) -> Any:
    """The response to one Starlette `request`."""
    path, method = request.url.path.rstrip("/") or "/", request.method
    if path.startswith("/sdapi/v1/"):
        return await _a1111(request, path[len("/sdapi/v1/"):], method, service)
    if path in STATIC and method in ("GET", "HEAD"):
        return _static(path)
    if path == "/" and method == "POST":
        return await _native(request, service)
    if path == "/":
        return _json({"error": f"use POST with a JSON body (or GET for the page), not {method}"}, 405)
    return _json({"error": f"no route {path}; see the README for aptp-serve's routes"}, 404)


def _static(path: str) -> Any:
    from starlette.responses import Response

    name, media = STATIC[path]
    return Response((WEB / name).read_bytes(), media_type=media,
                    headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                             "Cache-Control": "no-cache"})


async def _native(request: Any, service: Service) -> Any:
    from starlette.responses import Response

    clock = time.perf_counter()
    try:
        fmt = response_format(request.query_params, request.headers.get("accept"))
        parsed = parse_request(await request.body())
        image, height, width, strength, inpaint = native_image(parsed, service)
        opts = service.pipe.options(guidance_scale=parsed.guidance_scale, num_inference_steps=parsed.steps,
                                    expert=parsed.expert, height=height, width=width, strength=strength,
                                    inpaint=inpaint)
        (seed,) = service.pipe.check_seeds(None if parsed.seed is None else [parsed.seed], 1)
    except HttpError as err:
        return _json({"error": str(err)}, err.status)
    except AptpError as err:
        return _json({"error": str(err)}, 400)
    try:
        extra = {} if image is None else {"image": image}
        result = await service.generate(parsed.prompt, seed, opts, None, None, **extra)
    except Exception as err:  # noqa: BLE001 - one request fails; the server keeps serving
        status, message = service.status_of(err)
        logger.warning("request failed (%d): %s", status, message)
        return _json({"error": message}, status)
    result["timings"]["serve_total"] = time.perf_counter() - clock
    if fmt == "json":
        return Response(result_json(result), media_type="application/json")
    return Response(result["png"], media_type="image/png",
                    headers={"X-Aptp-Expert": str(result["expert"]), "X-Aptp-Seed": str(result["seed"]),
                             "X-Aptp-Batch-Size": str(result["batch_size"])})


_GET = {"samplers": a1111.samplers, "sd-models": a1111.sd_models, "options": a1111.options}


async def _a1111(request: Any, route: str, method: str, service: Service) -> Any:
    pipe = service.pipe
    try:
        if route in ("txt2img", "img2img") and method == "POST":
            return await _txt2img(await request.body(), service, route)
        if route in _GET and method == "GET":
            return _json(_GET[route](pipe))
        if route == "scripts" and method == "GET":
            return _json({"txt2img": [], "img2img": []})  # clients probe for extensions; aptp has none
        if route == "options" and method == "POST":
            a1111.set_options(await request.body(), pipe)
            return _json(None)
        if route == "progress" and method == "GET":
            return _json(service.board.snapshot())
        if route == "interrupt" and method == "POST":
            service.board.interrupt()
            return _json(None)
        known = {"txt2img", "img2img", "scripts", "progress", "interrupt", *_GET}
        if route in known:
            return _a1111_error(405, f"{method} is not allowed on /sdapi/v1/{route}")
        return _a1111_error(404, f"/sdapi/v1/{route} is not part of the A1111 API subset aptp-serve supports: "
                            f"{sorted(known)}")
    except HttpError as err:
        return _a1111_error(err.status, str(err))


def native_image(parsed: Any, service: Service) -> tuple[Any, Any, Any, float | None, bool]:
    """``(image, height, width, strength, inpaint)`` of a native request (image None: text-to-image)."""
    from .img2img import image_arguments
    from .serve_http import decode_base64_image

    if parsed.init_image is None and parsed.mask is None and parsed.strength is None and parsed.mask_blur is None:
        return None, parsed.height, parsed.width, None, False
    if not service.img2img:
        raise HttpError(400, "img2img and inpainting are served by aptp-serve's local mode only (not --ray)")
    init = None if parsed.init_image is None else decode_base64_image(parsed.init_image, "init_image")
    mask = None if parsed.mask is None else decode_base64_image(parsed.mask, "mask")
    images, height, width, strength, inpaint = image_arguments(service.pipe.artifacts, init, mask, parsed.mask_blur,
                                                               parsed.strength, 1, parsed.height, parsed.width)
    return images[0], height, width, strength, inpaint


async def _txt2img(body: bytes, service: Service, route: str = "txt2img") -> Any:
    clock = time.perf_counter()
    extra: dict[str, Any] = {}
    if route == "img2img":
        from .a1111_img2img import parse_img2img

        if not service.img2img:
            raise HttpError(501, "img2img is served by aptp-serve's local mode only (not --ray)")
        req, opts, extra["image"] = parse_img2img(body, service.pipe)
    else:
        req, opts = a1111.parse_txt2img(body, service.pipe)
    job = service.board.start(req.images, req.steps)

    async def one(index: int, seed: int) -> dict[str, Any]:
        if job.interrupted:
            raise GenerationInterrupted("interrupted before it started")
        callback = job.callback(index) if service.step_progress else None
        try:
            return await service.generate(req.prompt, seed, opts, req.negative_prompt or None, callback, **extra)
        finally:
            job.image_done(index)

    try:
        outcomes = await asyncio.gather(*(one(i, s) for i, s in enumerate(req.seeds())), return_exceptions=True)
    finally:
        service.board.finish(job)
    failures = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, GenerationInterrupted)]
    if failures:
        status, message = service.status_of(failures[0])
        logger.warning("%s failed (%d): %s", route, status, message)
        return _a1111_error(422 if status == 400 else status, message)
    results = [o for o in outcomes if not isinstance(o, BaseException)]
    interrupted = len(outcomes) - len(results)
    return _json(a1111.txt2img_response(req, service.pipe, results, interrupted, time.perf_counter() - clock))


def build_app(service: Service) -> Any:
    """A Starlette app answering every route through `dispatch`."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    async def endpoint(request: Any) -> Any:
        return await dispatch(request, service)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])
