"""The common sample format: a dataset of (image, caption) pairs and its collate function.

Every image dataset of `aptp.train` yields `{"pixel_values": FloatTensor (3, R, R) in [-1, 1],
"text": str}` at a square `resolution` R, so the trainer never needs to know the format.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from aptp.errors import DatasetError

from .reading import SkipLog
from .transforms import check_resolution, image_to_tensor, load_image, resize_center_crop

__all__ = ["CaptionedImageDataset", "collate_captioned"]

logger = logging.getLogger(__name__)


class CaptionedImageDataset(Dataset):
    """Image files paired with captions, decoded and preprocessed on access.

    Subclasses parse their format in `__init__` and hand the result to `_set_samples`, which
    drops (and counts) the pairs whose image is missing and refuses an empty result.

    Attributes:
        resolution: side of the square output images.
        source: the path the dataset was read from.
        skipped: records dropped because they could not be decoded or parsed.
        missing: records dropped because their image file is absent (or unreadable, with
            `check_images=True`).
    """

    format_name: str = "images"

    def __init__(self, resolution: int) -> None:
        self.resolution = check_resolution(resolution)
        self.source = ""
        self.skipped = 0
        self.missing = 0
        self._paths: list[str] = []
        self._texts: list[str] = []

    def _set_samples(
        self,
        source: str | Path,
        candidates: Sequence[tuple[str, Path | None, str]],
        skips: SkipLog,
        *,
        check_images: bool = False,
    ) -> None:
        """Keep the candidates whose image exists; count and report the others.

        Args:
            source: the path the user gave, for messages.
            candidates: `(location, image_path or None, caption)`; `location` says where the
                record came from ("line 7", "row 12") and a `None` image means "known absent".
            skips: the malformed records already counted while parsing.
            check_images: also open every image header and drop the unreadable ones.
        """
        self.source = str(source)
        missing = SkipLog(self.source, "samples whose image is missing or unreadable")
        paths, texts = [], []
        for location, image_path, caption in candidates:
            if image_path is None or not image_path.is_file():
                missing.add(location, f"no image file {str(image_path)!r}" if image_path else "no image file")
                continue
            if check_images and not _is_readable_image(image_path):
                missing.add(location, f"image {str(image_path)!r} cannot be decoded")
                continue
            paths.append(str(image_path))
            texts.append(caption)
        skips.warn(logger)
        missing.warn(logger)
        self.skipped, self.missing = skips.count, missing.count
        if not paths:
            raise DatasetError(
                f"{self.format_name} dataset {self.source!r} has no usable samples "
                f"({skips.count} {skips.what}, {missing.count} missing or unreadable images); "
                "check that the path points at the right files and that the images were downloaded"
            )
        self._paths, self._texts = paths, texts

    def __len__(self) -> int:
        return len(self._paths)

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        return index % len(self)

    def caption(self, index: int) -> str:
        """The caption of sample `index`, without decoding its image."""
        return self._texts[self._check_index(index)]

    def image_path(self, index: int) -> str:
        """The image file of sample `index`."""
        return self._paths[self._check_index(index)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        image = load_image(self._paths[index], min_size=self.resolution)
        image = resize_center_crop(image, self.resolution)
        return {"pixel_values": image_to_tensor(image), "text": self._texts[index]}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, samples={len(self)}, resolution={self.resolution}, "
            f"skipped={self.skipped}, missing={self.missing})"
        )


def _is_readable_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # noqa: BLE001 - any decoder failure means "unreadable"
        return False
    return True


def collate_captioned(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of the common format into `{"pixel_values": (B, 3, R, R), "text": [str]}`.

    Keys other than these two (if a dataset adds any) are passed through as lists.
    """
    if len(batch) == 0:
        raise DatasetError("collate_captioned got an empty batch; the DataLoader should never produce one")
    shapes = {tuple(sample["pixel_values"].shape) for sample in batch}
    if len(shapes) > 1:
        raise DatasetError(
            f"cannot batch images of different shapes {sorted(shapes)}; build every dataset of a batch with the same resolution"
        )
    collated: dict[str, Any] = {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "text": [sample["text"] for sample in batch],
    }
    for key in batch[0]:
        if key not in collated:
            collated[key] = [sample[key] for sample in batch]
    return collated
