"""Loaders for captioned image sets on disk (JSONL, CC3M, MS-COCO) and the `load_dataset` factory.

Every loader yields the common sample format of `base.CaptionedImageDataset`; each one only
knows how to turn its format into `(image path, caption)` pairs.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from aptp.errors import ConfigError, DatasetError

from .base import CaptionedImageDataset
from .procedural import ProceduralCaptions
from .reading import SkipLog, iter_text_lines, read_text_file, require_path

__all__ = ["CC3MCaptions", "CocoCaptions", "DATASET_FORMATS", "JsonlCaptions", "load_dataset"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class JsonlCaptions(CaptionedImageDataset):
    """A JSON-lines caption file: one `{"image": path, "text": caption}` object per line.

    Image paths are taken relative to the caption file's folder (absolute paths are kept).

    Args:
        path: the `.jsonl` file.
        resolution: side of the square output images.
        check_images: open every image header at construction and skip unreadable images.
    """

    format_name = "jsonl"

    def __init__(self, path: str | Path, resolution: int = 256, *, check_images: bool = False) -> None:
        super().__init__(resolution)
        file = require_path(path, "JSONL caption file", kind="file")
        skips = SkipLog(str(file), "malformed lines")
        candidates = []
        for lineno, text in iter_text_lines(file, skips):
            where = f"line {lineno}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                skips.add(where, f"not valid JSON ({err.msg})")
                continue
            if not isinstance(record, dict):
                skips.add(where, "not a JSON object")
                continue
            image, caption = record.get("image"), record.get("text")
            if not isinstance(image, str) or not image:
                skips.add(where, 'no "image" path string')
                continue
            if not isinstance(caption, str) or not caption.strip():
                skips.add(where, 'no non-empty "text" caption string')
                continue
            candidates.append((where, file.parent / image, caption.strip()))
        self._set_samples(file, candidates, skips, check_images=check_images)


class CC3MCaptions(CaptionedImageDataset):
    """Conceptual Captions (CC3M) as downloaded for training, in either common layout.

    * TSV layout: Google's caption file (`caption<TAB>url` per line, no header, e.g.
      `Train_GCC-training.tsv`) and the images named by the 0-based row index in an image
      folder: `images/<row>.jpg` (zero-padded names, other image extensions and sub-folders
      are fine too). A `caption<TAB>url` header line, if present, is not a row.
    * img2dataset layout: image files with a sidecar caption of the same name
      (`00000/000000123.jpg` + `00000/000000123.txt`), used when the folder holds no `.tsv`.

    Rows whose image was never downloaded are skipped and counted in `missing`; undecodable or
    malformed rows in `skipped`.

    Args:
        path: the dataset folder, or the TSV file itself (its images then sit next to it).
        resolution: side of the square output images.
        captions_file: the TSV inside `path` when the folder holds several.
        image_dir: the image folder of the TSV layout, relative to the TSV's folder.
        check_images: open every image header at construction and skip unreadable images.
    """

    format_name = "cc3m"
    DEFAULT_CAPTIONS_FILE = "Train_GCC-training.tsv"

    def __init__(
        self,
        path: str | Path,
        resolution: int = 256,
        *,
        captions_file: str | None = None,
        image_dir: str = "images",
        check_images: bool = False,
    ) -> None:
        super().__init__(resolution)
        root = require_path(path, "CC3M dataset")
        tsv = self._find_tsv(root, captions_file)
        if tsv is None:
            skips, candidates = self._read_sidecars(root)
        else:
            skips, candidates = self._read_tsv(tsv, tsv.parent / image_dir)
        self._set_samples(root, candidates, skips, check_images=check_images)

    @classmethod
    def _find_tsv(cls, root: Path, captions_file: str | None) -> Path | None:
        if root.is_file():
            return root
        if captions_file is not None:
            return require_path(root / captions_file, "CC3M caption file", kind="file")
        tsvs = sorted(root.glob("*.tsv"))
        if len(tsvs) <= 1:
            return tsvs[0] if tsvs else None
        names = [t.name for t in tsvs]
        if cls.DEFAULT_CAPTIONS_FILE in names:
            return root / cls.DEFAULT_CAPTIONS_FILE
        raise DatasetError(f"CC3M folder {str(root)!r} holds several caption files {names}; choose one with captions_file=")

    @staticmethod
    def _read_tsv(tsv: Path, image_dir: Path) -> tuple[SkipLog, list]:
        if not image_dir.is_dir():
            raise DatasetError(
                f"CC3M image folder {str(image_dir)!r} does not exist; download the images there as <row>.jpg "
                "or pass image_dir= (relative to the caption file's folder)"
            )
        images = _index_images_by_number(image_dir)
        skips = SkipLog(str(tsv), "malformed lines")
        candidates = []
        header = 0
        for lineno, text in iter_text_lines(tsv, skips):
            fields = text.split("\t")
            if lineno == 1 and [f.strip().lower() for f in fields[:2]] == ["caption", "url"]:
                header = 1
                continue
            where = f"line {lineno}"
            caption = fields[0].strip()
            if len(fields) < 2 or not caption:
                skips.add(where, "expected 'caption<TAB>url'")
                continue
            # Rows are numbered by their physical line, so blank or broken lines keep the numbering
            # of the download script that named the images.
            row = lineno - 1 - header
            candidates.append((f"row {row}", images.get(row, image_dir / f"{row}.jpg"), caption))
        return skips, candidates

    @staticmethod
    def _read_sidecars(root: Path) -> tuple[SkipLog, list]:
        skips = SkipLog(str(root), "unreadable or missing caption files")
        images: dict[Path, Path] = {}
        captions: list[Path] = []
        for folder, _, files in os.walk(root):
            for name in files:
                file = Path(folder, name)
                if file.suffix.lower() in IMAGE_EXTENSIONS:
                    images.setdefault(file.with_suffix(""), file)
                elif file.suffix == ".txt":
                    captions.append(file)
        if not images and not captions:
            raise DatasetError(
                f"CC3M folder {str(root)!r} holds neither a caption TSV nor image/caption (.jpg/.txt) pairs; "
                "point path at the folder of Train_GCC-training.tsv or of an img2dataset download"
            )
        candidates = []
        captioned = {c.with_suffix("") for c in captions}
        for stem, image in sorted(images.items()):
            if stem not in captioned:
                skips.add(f"file {image.relative_to(root)}", "image without a .txt caption")
        for caption_file in sorted(captions):
            where = f"file {caption_file.relative_to(root)}"
            try:
                caption = read_text_file(caption_file).strip()
            except UnicodeDecodeError as err:
                skips.add(where, f"not valid UTF-8 (byte {err.start})")
                continue
            if not caption:
                skips.add(where, "empty caption")
                continue
            candidates.append((where, images.get(caption_file.with_suffix("")), caption))
        return skips, candidates


class CocoCaptions(CaptionedImageDataset):
    """MS-COCO captions (2014 as in the paper; 2017 works the same with `split="train2017"`).

    Reads `captions_<split>.json` (`images`: id, file_name; `annotations`: image_id, caption)
    and the image folder `<split>/`. One sample per caption, or per image with its first caption.

    Args:
        path: the COCO root (holding `annotations/captions_<split>.json` and `<split>/`) or the
            annotation JSON itself (its images are looked for in `<split>/` beside the JSON or
            beside its folder).
        resolution: side of the square output images.
        split: the split name used in the default file and folder names.
        image_dir: the image folder, when it is not found by the rules above.
        one_per_image: one sample per image, with the first caption listed for it.
        check_images: open every image header at construction and skip unreadable images.
    """

    format_name = "coco"

    def __init__(
        self,
        path: str | Path,
        resolution: int = 256,
        *,
        split: str = "train2014",
        image_dir: str | Path | None = None,
        one_per_image: bool = False,
        check_images: bool = False,
    ) -> None:
        super().__init__(resolution)
        given = require_path(path, "COCO dataset")
        annotations = self._find_annotations(given, split)
        folder = self._find_image_dir(annotations, split, image_dir)
        document = self._read_json(annotations)
        skips = SkipLog(str(annotations), "malformed annotations")
        file_names = self._image_files(document, skips)
        candidates = []
        seen: set[Any] = set()
        for position, annotation in enumerate(document["annotations"]):
            where = f"annotation {position}"
            if not isinstance(annotation, dict):
                skips.add(where, "not a JSON object")
                continue
            image_id, caption = annotation.get("image_id"), annotation.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                skips.add(where, "no non-empty caption string")
                continue
            if not isinstance(image_id, (int, str)) or image_id not in file_names:
                skips.add(where, f"image_id {image_id!r} is not in the images list")
                continue
            if one_per_image:
                if image_id in seen:
                    continue
                seen.add(image_id)
            candidates.append((where, folder / file_names[image_id], caption.strip()))
        self._set_samples(annotations, candidates, skips, check_images=check_images)

    @staticmethod
    def _find_annotations(given: Path, split: str) -> Path:
        if given.is_file():
            return given
        name = f"captions_{split}.json"
        for candidate in (given / "annotations" / name, given / name):
            if candidate.is_file():
                return candidate
        raise DatasetError(
            f"no {name} in COCO folder {str(given)!r} or its annotations/ folder; pass the annotation JSON as path "
            "or set split= to match its name"
        )

    @staticmethod
    def _find_image_dir(annotations: Path, split: str, image_dir: str | Path | None) -> Path:
        if image_dir is not None:
            return require_path(image_dir, "COCO image folder", kind="dir")
        candidates = [annotations.parent / split, annotations.parent.parent / split]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        raise DatasetError(f"COCO image folder not found (looked for {[str(c) for c in candidates]}); pass image_dir=")

    @staticmethod
    def _read_json(file: Path) -> dict:
        try:
            document = json.loads(file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatasetError(f"COCO annotation file {str(file)!r} is not valid UTF-8 JSON ({err})") from err
        if not isinstance(document, dict) or not all(isinstance(document.get(k), list) for k in ("images", "annotations")):
            raise DatasetError(f"COCO annotation file {str(file)!r} needs 'images' and 'annotations' lists (is it a captions_*.json?)")
        return document

    @staticmethod
    def _image_files(document: dict, skips: SkipLog) -> dict[Any, str]:
        files = {}
        for position, image in enumerate(document["images"]):
            if isinstance(image, dict) and isinstance(image.get("id"), (int, str)) and isinstance(image.get("file_name"), str):
                files[image["id"]] = image["file_name"]
            else:
                skips.add(f"image entry {position}", "needs an id and a file_name")
        return files


def _index_images_by_number(folder: Path) -> dict[int, Path]:
    """Map the integer in each image file's name (`000123.jpg` -> 123) to the file, recursively."""
    index: dict[int, Path] = {}
    for parent, _, files in os.walk(folder):
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and stem.isdigit():
                index.setdefault(int(stem), Path(parent, name))
    return index


def _procedural(path: str | None, resolution: int, **options: Any) -> ProceduralCaptions:
    if path is not None:  # the training config documents path as unused here: say so, don't fail
        logger.warning("dataset format 'procedural' generates its images: ignoring path %r", str(path))
    return ProceduralCaptions(resolution=resolution, **options)


DATASET_FORMATS: dict[str, Callable[..., Dataset]] = {
    "jsonl": JsonlCaptions,
    "cc3m": CC3MCaptions,
    "coco": CocoCaptions,
    "procedural": _procedural,
}


def load_dataset(format: str, path: str | Path | None, resolution: int, **options: Any) -> Dataset:
    """Build a dataset of the common sample format from a format name.

    Args:
        format: one of `DATASET_FORMATS` ("jsonl", "cc3m", "coco", "procedural").
        path: the file or folder to read; None for "procedural".
        resolution: side of the square output images.
        **options: the format's keyword options (see each loader class), e.g. `one_per_image=True`
            for "coco" or `num_samples=1000, seed=0` for "procedural".

    Raises:
        DatasetError: unknown format, missing path or unusable data.
        ConfigError: an option the format does not take.
    """
    name = str(format).strip().lower()
    if name not in DATASET_FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; known formats: {', '.join(sorted(DATASET_FORMATS))}")
    builder = DATASET_FORMATS[name]
    target = ProceduralCaptions if name == "procedural" else builder
    accepted = [p for p in inspect.signature(target).parameters if p not in ("self", "path", "resolution")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"dataset format {name!r} does not take option(s) {unknown}; it takes {accepted}")
    if name != "procedural" and path is None:
        raise DatasetError(f"dataset format {name!r} needs a path to its files")
    required = [
        p.name
        for p in inspect.signature(target).parameters.values()
        if p.name in accepted and p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    ]
    left_out = [p for p in required if p not in options]
    if left_out:
        raise ConfigError(f"dataset format {name!r} needs option(s) {left_out}")
    return builder(path, resolution, **options)
