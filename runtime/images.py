"""Decoded images to 8-bit pixels and PNG files, without torch.

`to_uint8` rounds exactly as diffusers' ``VaeImageProcessor.postprocess`` + ``numpy_to_pil``
do (``[-1, 1] -> [0, 1]``, clip, ``round(255 * v)``), so an image matches the diffusers
pipeline's pixel for pixel when the decoder outputs match. PNGs are written with Pillow.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from aptp.errors import RuntimeInputError

__all__ = ["numbered_paths", "save_png", "to_uint8"]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``(B, 3, H, W)`` decoder output in ``[-1, 1]`` -> ``(B, H, W, 3)`` uint8."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected decoder output (B, C, H, W), got shape {images.shape}")
    unit = np.clip(images / 2 + 0.5, 0.0, 1.0)
    return np.round(unit.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one ``(H, W, 3)`` (or ``(H, W)``) uint8 image as PNG; creates parent folders.

    The file is written beside `path` under a temporary name and renamed into place, so an
    existing file is never left half-written.

    Raises:
        RuntimeInputError: the file or its folder cannot be written (the OS error's reason).
    """
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"save_png takes an (H, W, 3) or (H, W) uint8 image, got {image.dtype} {image.shape}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # our own temporary file, if it got that far
            tmp.unlink()
        raise RuntimeInputError(f"cannot write {path}: {err.strerror or err}") from err
    return path


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
