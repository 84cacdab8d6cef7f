"""Image preprocessing shared by every dataset: RGB, resize shorter side, center crop, [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from aptp.errors import ConfigError, DatasetError

__all__ = ["check_resolution", "image_to_tensor", "load_image", "resize_center_crop", "tensor_to_image"]

# Transparent pixels are composited on white: most captioned web images with alpha are logos or
# clip art drawn for a white page, and dropping alpha would expose arbitrary hidden colours.
_MATTE = (255, 255, 255)


def check_resolution(resolution: int) -> int:
    """Return `resolution` if it is a positive int, else raise `ConfigError`."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ConfigError(f"resolution must be a positive integer (pixels per side), got {resolution!r}")
    return resolution


def load_image(path: str | Path, *, min_size: int | None = None) -> Image.Image:
    """Open an image file as RGB, upright (EXIF orientation applied), alpha composited on white.

    Args:
        path: the image file.
        min_size: when given, JPEG decoding may be reduced (`Image.draft`) to any scale that
            keeps both sides at least this large: much faster for large photos.

    Raises:
        DatasetError: the file is missing or not a readable image; the message names it.
    """
    try:
        image = Image.open(path)
        if min_size is not None:
            image.draft("RGB", (min_size, min_size))
        image = ImageOps.exif_transpose(image)
        image.load()
    except FileNotFoundError as err:
        raise DatasetError(f"image {str(path)!r} does not exist (was it deleted after the dataset was indexed?)") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(
            f"image {str(path)!r} cannot be decoded ({err}); remove it, or build the dataset with "
            "check_images=True to skip unreadable images"
        ) from err
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        matte = Image.new("RGBA", rgba.size, _MATTE + (255,))
        return Image.alpha_composite(matte, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize (bilinear) so the shorter side is `resolution`, then crop the central square."""
    width, height = image.size
    if (width, height) != (resolution, resolution):
        scale = resolution / min(width, height)
        # max() guards the shorter side against rounding below the crop size.
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        left = (image.width - resolution) // 2
        top = (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) with values in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor.div_(127.5).sub_(1.0)


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """Inverse of `image_to_tensor` (for previews and tests): (3, H, W) in [-1, 1] -> RGB image."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())
