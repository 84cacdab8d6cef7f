"""Decoded images to 8-bit pixels and PNG files that remember how they were made, without torch.

`to_uint8` rounds exactly as diffusers' ``VaeImageProcessor.postprocess`` + ``numpy_to_pil``
do (``[-1, 1] -> [0, 1]``, clip, ``round(255 * v)``), so an image matches the diffusers
pipeline's pixel for pixel when the decoder outputs match. PNGs are written with Pillow.

Every PNG that ``aptp-generate`` or ``GenerationResult.save`` writes carries its generation
parameters as PNG text chunks (one ``iTXt`` chunk per key, UTF-8): ``prompt``,
``negative_prompt``, ``seed``, ``steps``, ``sampler``, ``guidance_scale``, ``width``, ``height``,
``expert``, ``manifest_sha256`` (the sha256 of the export's ``manifest.json``) and
``generator`` (``aptp <version>``); an img2img or inpainting result adds ``strength``,
``init_image_sha256`` and, when masked, ``mask_sha256`` and ``mask_blur`` (see
``docs/img2img.md``). Read them back with `read_png_parameters`, with
``aptp-generate --show-params out.png``, or with Pillow alone::

    from PIL import Image
    with Image.open("out.png") as image:
        print(image.text["prompt"], image.text["seed"], image.text["sampler"])
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aptp.errors import RuntimeInputError
from aptp.readers import read_user_file

__all__ = [
    "IMAGE_PARAMETER_KEYS",
    "PARAMETER_KEYS",
    "contact_sheet",
    "generation_parameters",
    "numbered_paths",
    "read_png_parameters",
    "save_png",
    "to_uint8",
]

#: The text chunks a generated PNG carries, in the order they are written.
PARAMETER_KEYS = ("prompt", "negative_prompt", "seed", "steps", "sampler", "guidance_scale", "width", "height",
                  "expert", "manifest_sha256", "strength", "init_image_sha256", "mask_sha256", "mask_blur",
                  "generator")
#: Keys written only for img2img / inpainting results.
IMAGE_PARAMETER_KEYS = ("strength", "init_image_sha256", "mask_sha256", "mask_blur")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``(B, 3, H, W)`` decoder output in ``[-1, 1]`` -> ``(B, H, W, 3)`` uint8."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected decoder output (B, C, H, W), got shape {images.shape}")
    unit = np.clip(images / 2 + 0.5, 0.0, 1.0)
    return np.round(unit.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


def generation_parameters(result: Any) -> dict[str, str]:
    """The text chunks of one `GenerationResult` (every value a string; absent ones empty)."""
    from aptp import __version__

    params = {
        "prompt": result.prompt,
        "negative_prompt": result.negative_prompt or "",
        "seed": str(result.seed),
        "steps": str(result.num_inference_steps),
        "sampler": result.scheduler,
        "guidance_scale": repr(float(result.guidance_scale)),
        "width": str(result.width),
        "height": str(result.height),
        "expert": str(result.expert),
        "manifest_sha256": result.manifest_sha256,
    }
    init = getattr(result, "init_image", None)
    if init is not None:  # img2img / inpainting (`aptp.runtime.img2img.ImageRequest`)
        params["strength"] = repr(float(result.strength))
        params["init_image_sha256"] = init.image.sha256
        if init.mask is not None:
            params["mask_sha256"] = init.mask.sha256
            params["mask_blur"] = repr(float(init.mask_blur))
    params["generator"] = f"aptp {__version__}"
    return params


def save_png(image: np.ndarray, path: str | os.PathLike, parameters: Mapping[str, str] | None = None) -> Path:
    """Write one ``(H, W, 3)`` (or ``(H, W)``) uint8 image as PNG; creates parent folders.

    `parameters` become UTF-8 text chunks (``iTXt``). The file is written beside `path` under a
    temporary name and renamed into place, so an existing file is never left half-written.

    Raises:
        RuntimeInputError: the file or its folder cannot be written (the OS error's reason).
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"save_png takes an (H, W, 3) or (H, W) uint8 image, got {image.dtype} {image.shape}")
    path = Path(path)
    info = None
    if parameters:
        info = PngInfo()
        for key, value in parameters.items():
            info.add_itxt(str(key), str(value))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # our own temporary file, if it got that far
            tmp.unlink()
        raise RuntimeInputError(f"cannot write {path}: {err.strerror or err}") from err
    return path


#: Largest PNG whose parameters are read (aptp's own are kilobytes to a few MiB).
MAX_PNG_BYTES = 64 * 1024 * 1024


def read_png_parameters(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG (the generation parameters for one aptp wrote).

    Raises:
        RuntimeInputError: the file cannot be read, is not a regular file, is over
            `MAX_PNG_BYTES`, is not a PNG, or declares more pixels than Pillow's
            decompression-bomb limit.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    data = read_user_file(path, "", MAX_PNG_BYTES, RuntimeInputError)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise RuntimeInputError(f"{path} is a {image.format} image, not a PNG")
            image.load()  # text chunks after the image data are read only now
            return {str(k): str(v) for k, v in image.text.items()}
    except Image.DecompressionBombError as err:
        raise RuntimeInputError(f"{path} declares too many pixels to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise RuntimeInputError(f"{path} is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt chunks
        raise RuntimeInputError(f"{path} is not a readable PNG: {err}") from None


def printable(text: str) -> str:
    """`text` with control characters escaped (``\\x1b``, ``\\n``...), so printing a value from
    a file cannot move the cursor, recolour or clear the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def contact_sheet(images: Sequence[np.ndarray], columns: int | None = None, gap: int = 2) -> np.ndarray:
    """Tile ``(H, W, 3)`` uint8 images of one size row by row (``ceil(sqrt(n))`` columns by
    default) on a white background with `gap` pixels between them."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    first = np.asarray(images[0])
    if any(np.asarray(i).shape != first.shape for i in images):
        raise ValueError("contact_sheet needs images of one size")
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    h, w = first.shape[:2]
    sheet = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, *first.shape[2:]), 255,
                    dtype=np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        sheet[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = image
    return sheet


def numbered_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """``out.png`` for one image; ``out_0.png, out_1.png, ...`` for several.

    Raises:
        RuntimeInputError: `output` does not end in ``.png``.
    """
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise RuntimeInputError(f"--output {output} must end in .png (images are written as PNG)")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]
