"""A1111's ``POST /sdapi/v1/img2img`` for ``aptp-serve``: img2img and inpainting requests.

    {"prompt", ..., "init_images": ["<base64 PNG>"], "denoising_strength": 0.75,
     "mask": "<base64 PNG>", "mask_blur": 4, "inpainting_mask_invert": 0}
        -> {"images": [...], "parameters": {...}, "info": "<JSON string>"}   (as txt2img)

Every txt2img field works as in `aptp.runtime.a1111`. Defaults are A1111's: strength 0.75,
``mask_blur`` 4 pixels; the image's size unless ``width``/``height`` are given (then it is
resized, A1111's ``resize_mode`` 0). What aptp cannot honour is refused with 422, not dropped:
more than one init image, ``inpainting_fill`` other than 1 ("original": the blending keeps the
init image's latents), ``inpaint_full_res`` true (aptp repaints at the whole picture's
resolution), another ``resize_mode``. Unlike A1111, the blurred mask is binarised at 0.5 (as
diffusers' inpaint pipeline does) and the original pixels are not pasted back over the output.
"""

from __future__ import annotations

from dataclasses import dataclass

from aptp.errors import RuntimeInputError, shown

from .a1111 import UNSUPPORTED_FIELDS, Txt2ImgRequest, unprocessable, parse_fields
from .img2img import ImageRequest, image_arguments
from .pipeline import AptpPipeline, GenerationOptions
from .serve_http import MAX_IMAGE_BODY_BYTES, decode_base64_image, load_json

__all__ = ["A1111_MASK_BLUR", "A1111_STRENGTH", "Img2ImgRequest", "parse_img2img"]

A1111_STRENGTH = 0.75
A1111_MASK_BLUR = 4
#: img2img fields aptp cannot honour, with the values it accepts.
_IMG2IMG_FIXED = {"inpainting_fill": (1, None), "inpaint_full_res": (False, None), "resize_mode": (0, None)}
#: img2img fields that are read here, not by the txt2img parser.
_IMG2IMG_FIELDS = ("init_images", "denoising_strength", "mask", "mask_blur", "inpainting_mask_invert",
                   "include_init_images", *_IMG2IMG_FIXED)


@dataclass(frozen=True)
class Img2ImgRequest(Txt2ImgRequest):
    """A checked img2img request: the txt2img fields, the strength and the mask blur."""

    denoising_strength: float = A1111_STRENGTH
    mask_blur: float = 0.0


def parse_img2img(body: bytes, pipe: AptpPipeline) -> tuple[Img2ImgRequest, GenerationOptions, ImageRequest]:
    """The checked request, its options and its image (one for every image of the request).

    Raises:
        HttpError: 413 for a body over `MAX_IMAGE_BODY_BYTES`; 422 for anything else wrong.
    """
    data = load_json(body, status=422, limit=MAX_IMAGE_BODY_BYTES)
    if not isinstance(data, dict):
        raise unprocessable(f"request body must be a JSON object, got a JSON {type(data).__name__}")
    for key, accepted in _IMG2IMG_FIXED.items():
        if data.get(key) not in accepted:
            raise unprocessable(f"'{key}' {shown(data.get(key))} is not supported by aptp-serve (leave it out or "
                                 f"set it to {accepted[0]!r})")
    images = data.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise unprocessable("'init_images' must be a list of one base64 image (aptp-serve takes one init image "
                             "per request)")
    init = decode_base64_image(images[0], "init_images[0]", 422)
    mask = None if data.get("mask") is None else decode_base64_image(data["mask"], "mask", 422)
    invert = data.get("inpainting_mask_invert", 0)
    if invert not in (0, 1) or isinstance(invert, bool):
        raise unprocessable(f"'inpainting_mask_invert' must be 0 or 1, got {shown(invert)}")
    strength = data.get("denoising_strength", A1111_STRENGTH)
    blur = data.get("mask_blur", A1111_MASK_BLUR) if mask is not None else None
    try:
        (request,), height, width, strength, inpaint = image_arguments(
            pipe.artifacts, init, mask, blur, strength, 1, data.get("height"), data.get("width"))
    except RuntimeInputError as err:
        raise unprocessable(str(err)) from None
    if invert and request.mask is not None:
        from .init_images import ImageInput

        request = ImageRequest(request.image, ImageInput(255 - request.mask.pixels, request.mask.sha256),
                               request.mask_blur)
    rest = {k: v for k, v in data.items() if k not in _IMG2IMG_FIELDS}
    unsupported = {k: v for k, v in UNSUPPORTED_FIELDS.items() if k != "init_images"}
    req, opts = parse_fields({**rest, "height": height, "width": width}, pipe, unsupported, strength=strength,
                             inpaint=inpaint)
    fields = {k: getattr(req, k) for k in Txt2ImgRequest.__dataclass_fields__}
    return Img2ImgRequest(**fields, denoising_strength=strength, mask_blur=request.mask_blur), opts, request
