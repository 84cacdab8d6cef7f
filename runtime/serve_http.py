"""The HTTP contract of ``aptp-serve``: request bodies in, PNG or JSON out; no Ray needed.

    POST /          {"prompt": "a red car", "seed": 7, "guidance_scale": 7.5, "steps": 4}
        -> 200 image/png           (headers X-Aptp-Expert, X-Aptp-Seed)
    POST /?format=json   (or Accept: application/json)
        -> 200 {"prompt", "seed", "expert", "batch_size", "truncated", "timings", "image_png_base64"}
    bad request -> 4xx {"error": "<one line naming what is wrong>"}

Optional fields: ``expert`` (a code or ``"dense"``: skip the router), ``height``, ``width``;
img2img: ``init_image`` (base64 PNG/JPEG, a ``data:`` URL too), ``strength``, and for inpainting
``mask`` (base64, white repaints) and ``mask_blur`` (see ``docs/img2img.md``).
``seed`` may be omitted (the server draws one and reports it). Numbers are checked by the
pipeline's own option checks, so HTTP clients get the same messages as Python callers.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from aptp.errors import RuntimeInputError

from .tokenize import check_text

__all__ = ["FIELDS", "MAX_BODY_BYTES", "MAX_IMAGE_BODY_BYTES", "HttpError", "ServeRequest", "decode_base64_image",
           "encode_png", "load_json", "parse_request", "response_format", "result_json"]

#: Fields a request may carry; anything else is refused (a typo must not be silently ignored).
FIELDS = ("prompt", "seed", "guidance_scale", "steps", "expert", "height", "width", "init_image", "strength", "mask",
          "mask_blur")
#: Largest request body accepted (a prompt is a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
#: Largest body of a request that may carry images (native POST /, A1111 img2img): base64 PNGs.
MAX_IMAGE_BODY_BYTES = 48 * 2**20
FORMATS = ("png", "json")


class HttpError(RuntimeInputError):
    """A request refused with an HTTP status (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeRequest:
    """One parsed request body (values not yet checked beyond their JSON type)."""

    prompt: str
    seed: Any = None
    guidance_scale: Any = None
    steps: Any = None
    expert: Any = None
    height: Any = None
    width: Any = None
    init_image: Any = None
    strength: Any = None
    mask: Any = None
    mask_blur: Any = None


def decode_base64_image(value: Any, field: str, status: int = 400) -> bytes:
    """The bytes of a base64 image field (a ``data:image/...;base64,`` prefix is accepted).

    Raises:
        HttpError: `status` for a value that is not a base64 string.
    """
    import binascii

    if not isinstance(value, str):
        raise HttpError(status, f"'{field}' must be a base64 string (PNG or JPEG), got a JSON {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(status, f"'{field}' is not valid base64; send the image file's bytes base64-encoded") from None


def load_json(body: bytes, status: int = 400, limit: int = MAX_BODY_BYTES) -> Any:
    """The JSON value of a request body (both contracts, native and A1111, read bodies here).

    Raises:
        HttpError: 413 for a body over `MAX_BODY_BYTES`; `status` for a body that is empty, not
            UTF-8 JSON, nested too deeply, or holding a number Python cannot read.
    """
    if len(body) > limit:
        raise HttpError(413, f"request body is {len(body)} bytes; the limit is {limit}")
    if not body.strip():
        raise HttpError(status, 'empty request body: send a JSON object such as {"prompt": "a red car", "seed": 0}')
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise HttpError(status, f"request body is not UTF-8 (byte {err.start}); send UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise HttpError(status, f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
                        ) from None
    except RecursionError:
        raise HttpError(status, "request body nests JSON arrays or objects too deeply; send a flat JSON object"
                        ) from None
    except ValueError as err:  # an integer of more than 4,300 digits
        raise HttpError(status, f"request body holds a number aptp cannot read ({err}); send numbers in range"
                        ) from None
    return data


def parse_request(body: bytes) -> ServeRequest:
    """The request in a JSON body.

    Raises:
        HttpError: 413 for a body over `MAX_BODY_BYTES`; 400 for a body that is not a UTF-8
            JSON object (or nests too deeply, or holds an unreadable number), an unknown field,
            or a missing ``prompt`` or one that is not valid text.
    """
    data = load_json(body, limit=MAX_IMAGE_BODY_BYTES)
    if not isinstance(data, dict):
        raise HttpError(400, f"request body must be a JSON object with a 'prompt', got a JSON {type(data).__name__}")
    if len(body) > MAX_BODY_BYTES and data.get("init_image") is None:
        raise HttpError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES} without an init_image")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise HttpError(400, f"unknown field(s) {unknown}; allowed: {list(FIELDS)}")
    if "prompt" not in data:
        raise HttpError(400, "missing field 'prompt' (the text to generate from)")
    prompt = data["prompt"]
    if not isinstance(prompt, str):
        raise HttpError(400, f"'prompt' must be a string, got a JSON {type(prompt).__name__}")
    if not prompt.strip():
        raise HttpError(400, "'prompt' is empty: every prompt needs some text to condition on")
    try:
        check_text(prompt, "'prompt'")  # at the door: a bad prompt must not reach a batch it would fail
    except RuntimeInputError as err:
        raise HttpError(400, str(err)) from None
    return ServeRequest(**data)


def response_format(query: Mapping[str, str], accept: str | None) -> str:
    """``"png"`` or ``"json"``: the ``format`` query parameter wins, else the Accept header.

    Raises:
        HttpError: 400 for an unknown ``format``.
    """
    fmt = query.get("format")
    if fmt is not None:
        if fmt not in FORMATS:
            raise HttpError(400, f"format must be one of {list(FORMATS)}, got {fmt!r}")
        return fmt
    return "json" if accept and "application/json" in accept and "image/png" not in accept else "png"


def encode_png(image: np.ndarray) -> bytes:
    """One ``(H, W, 3)`` uint8 image as PNG bytes (lossless: decoding gives the same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def result_json(result: Mapping[str, Any]) -> bytes:
    """The JSON response body of one generated result (the PNG base64-encoded)."""
    body = {key: result[key] for key in ("prompt", "seed", "expert", "batch_size", "truncated", "timings")}
    body["image_png_base64"] = base64.b64encode(result["png"]).decode("ascii")
    return json.dumps(body).encode("utf-8")
