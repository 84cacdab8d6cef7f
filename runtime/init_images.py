"""Init images and masks for img2img and inpainting: read, check, convert; one line per refusal.

An init image may be an ``(H, W, 3)`` uint8 array, a PIL image, PNG/JPEG/... bytes, or a path.
Conversions, all lossless:

* grayscale (``(H, W)`` arrays, PIL modes ``L``/``1``/``P``/``I;16``...) becomes RGB by
  repeating the channel, as PIL's ``convert("RGB")`` does;
* RGBA whose alpha is 255 everywhere drops the alpha channel.

Refused, each with one `RuntimeInputError` line: an unreadable or empty file, an RGBA image
with any transparent pixel (what lies under it is undefined: flatten it onto a background
first), another array dtype or shape. Masks are read the same way and reduced to grayscale
(``convert("L")``, diffusers' mask processor does the same); white marks what is repainted.

Pixels become diffusers' ``VaeImageProcessor.preprocess`` values: ``uint8 / 255 * 2 - 1`` in
float32, ``(3, H, W)``. Masks follow ``StableDiffusionInpaintPipeline``'s 4-channel path:
optional Gaussian blur (``VaeImageProcessor.blur``: PIL ``GaussianBlur(radius)``), values
``/ 255`` binarised at 0.5, then the latent mask is the nearest pixel of each latent cell
(``F.interpolate(mode="nearest")`` picks pixel ``(f*i, f*j)`` for a factor ``f``).

``sha256`` of an input is the hash of its file bytes when it came as a path or bytes (what
``sha256sum`` prints for the file), else of its ``(H, W, 3)`` uint8 pixels (masks: ``(H, W)``).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aptp.errors import RuntimeInputError, shown
from aptp.readers import read_user_file

__all__ = ["MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "ImageInput", "latent_mask", "read_image", "read_mask",
           "resize_rgb", "to_model_pixels"]

#: Largest image file read (bytes) and decoded (pixels): far above what an export generates.
MAX_IMAGE_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ImageInput:
    """One checked image: ``pixels`` ``(H, W, 3)`` uint8 (masks: ``(H, W)`` uint8) and its sha256."""

    pixels: np.ndarray
    sha256: str

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def _decode(data: bytes, what: str) -> Any:
    from PIL import Image

    if not data:
        raise RuntimeInputError(f"{what} is empty; pass a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RuntimeInputError(f"{what} is {image.width}x{image.height} pixels, more than this runtime "
                                        f"reads ({MAX_IMAGE_PIXELS}); pass a smaller image")
            image.load()
    except RuntimeInputError:
        raise
    except Exception as err:  # PIL raises many types for damaged or foreign files
        raise RuntimeInputError(f"{what} is not an image PIL can read ({type(err).__name__}: "
                                f"{shown(str(err), 80)}); pass a PNG or JPEG") from None
    return image


def _load(source: Any, what: str) -> tuple[Any, str | None]:
    """A PIL image or array from `source`, and the sha256 of its bytes where it had bytes."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        data = read_user_file(Path(source).expanduser(), what, MAX_IMAGE_BYTES, error=RuntimeInputError)
        return _decode(data, f"{what} {source}"), hashlib.sha256(data).hexdigest()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > MAX_IMAGE_BYTES:
            raise RuntimeInputError(f"{what} is larger than {MAX_IMAGE_BYTES} bytes; pass a smaller image")
        return _decode(data, what), hashlib.sha256(data).hexdigest()
    if isinstance(source, (Image.Image, np.ndarray)):
        return source, None
    raise RuntimeInputError(f"{what} must be an (H, W, 3) uint8 array, a PIL image, image bytes or a path, "
                            f"got {shown(source)}")


def _rgb_array(image: Any, what: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        image = np.asarray(image)
    if image.dtype != np.uint8:
        raise RuntimeInputError(f"{what} must hold uint8 pixels (0-255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)  # grayscale: the channel, three times
    if image.ndim != 3 or image.shape[2] not in (3, 4) or 0 in image.shape:
        raise RuntimeInputError(f"{what} must be (H, W, 3) RGB, (H, W, 4) opaque RGBA or (H, W) grayscale, "
                                f"got shape {image.shape}")
    if image.shape[2] == 4:
        if np.any(image[:, :, 3] != 255):
            raise RuntimeInputError(f"{what} has transparent pixels (RGBA with alpha < 255): what lies under them "
                                    "is undefined; flatten it onto a background or save it as RGB")
        image = image[:, :, :3]
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise RuntimeInputError(f"{what} has {image.shape[0] * image.shape[1]} pixels, more than this runtime "
                                f"reads ({MAX_IMAGE_PIXELS}); pass a smaller image")
    return np.ascontiguousarray(image)


def read_image(source: Any, what: str = "init image") -> ImageInput:
    """`source` as RGB uint8 pixels and their sha256 (see the module docstring).

    Raises:
        RuntimeInputError: unreadable, empty, too large, transparent, or of another type or shape.
    """
    if isinstance(source, ImageInput):  # read already (the CLI reads before loading the export)
        return source
    image, digest = _load(source, what)
    pixels = _rgb_array(image, what)
    return ImageInput(pixels, digest or hashlib.sha256(pixels.tobytes()).hexdigest())


def read_mask(source: Any, what: str = "mask") -> ImageInput:
    """`source` as a grayscale uint8 mask (white = repaint) and its sha256.

    Raises:
        RuntimeInputError: as `read_image`.
    """
    if isinstance(source, ImageInput):
        return source
    image, digest = _load(source, what)
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_:
            image = image.astype(np.uint8) * 255
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or 0 in image.shape \
                or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise RuntimeInputError(f"{what} must be an (H, W) uint8 or bool array (white or True = repaint), "
                                    f"got dtype {image.dtype}, shape {image.shape}")
        if image.ndim == 3:
            from PIL import Image

            mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[2]]
            image = Image.fromarray(np.ascontiguousarray(image if mode != "L" else image[:, :, 0]), mode)
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("L"))
    pixels = np.ascontiguousarray(image)
    return ImageInput(pixels, digest or hashlib.sha256(pixels.tobytes()).hexdigest())


def resize_rgb(image: ImageInput, height: int, width: int) -> ImageInput:
    """`image` (RGB or a mask) at ``height x width`` (Lanczos, diffusers' default resample); the
    hash stays the input's (it names what the user gave)."""
    from PIL import Image

    if image.size == (height, width):
        return image
    resized = Image.fromarray(image.pixels).resize((width, height), resample=Image.Resampling.LANCZOS)
    return ImageInput(np.ascontiguousarray(np.asarray(resized)), image.sha256)


def to_model_pixels(images: list[ImageInput]) -> np.ndarray:
    """``(B, 3, H, W)`` float32 in [-1, 1]: diffusers' ``uint8 / 255 * 2 - 1`` in float32."""
    x = np.stack([i.pixels for i in images]).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((np.float32(2.0) * x - np.float32(1.0)).transpose(0, 3, 1, 2))


def latent_mask(mask: ImageInput, factor: int, blur: float = 0.0) -> np.ndarray:
    """``(h, w)`` float32 of 0 (keep) and 1 (repaint) at latent resolution (see the module docstring)."""
    pixels = mask.pixels
    if blur > 0:
        from PIL import Image, ImageFilter

        pixels = np.asarray(Image.fromarray(pixels, "L").filter(ImageFilter.GaussianBlur(blur)))
    values = pixels.astype(np.float32) / np.float32(255.0)
    binary = (values >= 0.5).astype(np.float32)
    return np.ascontiguousarray(binary[::factor, ::factor][: pixels.shape[0] // factor, : pixels.shape[1] // factor])


def pixel_mask(mask: ImageInput, blur: float = 0.0) -> np.ndarray:
    """``(H, W)`` float32 in [0, 1]: how much of each output pixel is the repainted image (1)
    rather than the init image (0); soft only where `blur` softens the mask's edge."""
    pixels = mask.pixels
    if blur > 0:
        from PIL import Image, ImageFilter

        pixels = np.asarray(Image.fromarray(pixels, "L").filter(ImageFilter.GaussianBlur(blur)))
    return pixels.astype(np.float32) / np.float32(255.0)
