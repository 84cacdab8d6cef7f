"""A procedural captioned image set: coloured shapes and rendered words, drawn with Pillow.

Needs no files, so the whole training pipeline can run and be tested anywhere. Each sample is a
pure function of `(seed, index)`: any item can be drawn in any order, in any worker process,
and is identical every time. The structured attributes behind each caption are exposed too, so
that an attribute classifier can score generated images ("text prompts versus shape-only
prompts").

Examples of captions: "two red circles on the left", "there is a blue square at the top",
"the word SUN in green", "a yellow sign that says CAT at the bottom".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from aptp.errors import ConfigError

from .transforms import check_resolution, image_to_tensor

__all__ = [
    "ATTRIBUTE_VALUES",
    "COLOURS",
    "COUNT_WORDS",
    "FAMILIES",
    "POSITIONS",
    "POSITION_PHRASES",
    "SHAPES",
    "WORDS",
    "ProceduralCaptions",
    "procedural_prompts",
    "sample_family",
]

SHAPES = ("circle", "square", "triangle", "star")
# Saturated colours far from the grey backgrounds, so every named colour stays recognisable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
POSITIONS = ("left", "right", "top", "bottom", "center")
TEXT_POSITIONS = ("top", "center", "bottom")
# Short words that are neither shape, colour nor number words, so captions stay unambiguous.
WORDS = ("CAT", "DOG", "SUN", "SKY", "MOON", "TREE", "STOP", "FISH", "BOOK", "HOME", "RAIN", "BIRD")
COUNT_WORDS = ("one", "two", "three", "four")
ATTRIBUTE_VALUES: dict[str, tuple] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "position": POSITIONS,
    "count": (1, 2, 3, 4),
    "word": WORDS,
}

# Prompt families of graded difficulty, recorded per prompt (`ProceduralCaptions.attributes`):
# one shape (one object, one colour and place: little to get right), several small shapes (their
# count and layout must come out too), and rendered words (fine glyph detail the teacher draws
# least well). They partition the existing distribution, so every seed draws the same images.
FAMILIES = ("easy", "medium", "hard")
FAMILY_DESCRIPTIONS = {
    "easy": "one shape",
    "medium": "two to four small shapes (count and layout)",
    "hard": "a rendered word",
}

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Regions in unit coordinates (x0, y0, x1, y1) and how many shapes go on each row of a region.
_REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    "center": (0.2, 0.2, 0.8, 0.8),
}
_ROWS = {
    "left": {1: (1,), 2: (1, 1), 3: (1, 1, 1), 4: (2, 2)},
    "top": {1: (1,), 2: (2,), 3: (3,), 4: (4,)},
    "center": {1: (1,), 2: (2,), 3: (2, 1), 4: (2, 2)},
}
_ROWS["right"], _ROWS["bottom"] = _ROWS["left"], _ROWS["top"]
_TEXT_BOXES = {"top": (0.04, 0.06, 0.96, 0.44), "center": (0.04, 0.3, 0.96, 0.7), "bottom": (0.04, 0.56, 0.96, 0.94)}
_SUPERSAMPLE = 2  # drawn at twice the size and box-filtered down: smooth edges, exact interiors
_FONT_SIZE = 64  # glyphs are rasterised large once, then scaled to fit their box


@dataclass(frozen=True)
class _Sample:
    """Everything that determines one procedural sample (drawn from its private RNG)."""

    is_text: bool
    colour: str
    position: str
    count: int
    shape: str | None
    word: str | None
    style: str  # "shapes", "word" or "sign"
    background: int  # grey level
    caption: str
    # Per drawn item: (size, x offset, y offset, rotation), each uniform in [0, 1).
    jitter: tuple[tuple[float, float, float, float], ...]


def _draw_sample(seed: int, index: int, text_fraction: float) -> _Sample:
    # A string seed is hashed with SHA-512 by `random`: stable across runs, platforms and
    # PYTHONHASHSEED, and independent for neighbouring (seed, index) pairs.
    rng = random.Random(f"aptp.procedural:{seed}:{index}")
    is_text = rng.random() < text_fraction
    background = rng.randint(96, 160)
    colour = rng.choice(tuple(COLOURS))
    template = rng.random()
    if is_text:
        word, position, style = rng.choice(WORDS), rng.choice(TEXT_POSITIONS), rng.choice(("word", "sign"))
        jitter = ((rng.random(), rng.random(), rng.random(), 0.0),)
        caption = _text_caption(word, colour, position, style, template)
        return _Sample(True, colour, position, 1, None, word, style, background, caption, jitter)
    shape, position, count = rng.choice(SHAPES), rng.choice(POSITIONS), rng.randint(1, 4)
    article = rng.random() < 0.75
    jitter = tuple((rng.random(), rng.random(), rng.random(), rng.random()) for _ in range(count))
    caption = _shape_caption(shape, colour, position, count, template, article)
    return _Sample(False, colour, position, count, shape, None, "shapes", background, caption, jitter)


def sample_family(is_text: bool, count: int) -> str:
    """The difficulty family of a sample: ``"hard"`` (a word), ``"easy"`` (one shape) or ``"medium"``."""
    if is_text:
        return "hard"
    return "easy" if count == 1 else "medium"


def _shape_caption(shape: str, colour: str, position: str, count: int, template: float, article: bool) -> str:
    if count == 1:
        number = ("an" if colour[0] in "aeiou" else "a") if article else "one"
        noun = shape
    else:
        number, noun = COUNT_WORDS[count - 1], shape + "s"
    phrase = f"{number} {colour} {noun} {POSITION_PHRASES[position]}"
    if template < 0.3:
        return f"there {'is' if count == 1 else 'are'} {phrase}"
    return phrase


def _text_caption(word: str, colour: str, position: str, style: str, template: float) -> str:
    if style == "sign":
        article = "an" if colour[0] in "aeiou" else "a"
        caption = f"{article} {colour} sign that says {word}" if template < 0.6 else f"{article} {colour} sign with the word {word}"
    else:
        caption = f"the word {word} in {colour}" if template < 0.6 else f"{word} written in {colour} letters"
    # The center is where a word goes by default, so only the other positions are mentioned.
    return caption if position == "center" else f"{caption} {POSITION_PHRASES[position]}"


def _shape_placements(sample: _Sample) -> list[tuple[float, float, float, float]]:
    """`(cx, cy, radius, rotation_degrees)` per shape, in unit coordinates; shapes never touch."""
    x0, y0, x1, y1 = _REGIONS[sample.position]
    rows = _ROWS[sample.position][sample.count]
    cell_w, cell_h = (x1 - x0) / max(rows), (y1 - y0) / len(rows)
    cell = min(cell_w, cell_h)
    placements, item = [], 0
    for row, in_row in enumerate(rows):
        left = x0 + ((x1 - x0) - in_row * cell_w) / 2
        for column in range(in_row):
            size, dx, dy, rot = sample.jitter[item]
            item += 1
            radius = cell / 2 * (0.6 + 0.2 * size)
            # Half of the free margin may be used for the offset: neighbours keep a gap >= 10% of a cell.
            free = (cell / 2 - radius) * 0.5
            cx = left + (column + 0.5) * cell_w + (2 * dx - 1) * free
            cy = y0 + (row + 0.5) * cell_h + (2 * dy - 1) * free
            placements.append((cx, cy, radius, (2 * rot - 1) * 15.0))
    return placements


def _polygon(cx: float, cy: float, radii: list[float], start_degrees: float) -> list[tuple[float, float]]:
    step = 360.0 / len(radii)
    return [
        (cx + r * math.cos(math.radians(start_degrees + k * step)), cy + r * math.sin(math.radians(start_degrees + k * step)))
        for k, r in enumerate(radii)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rotation: float, fill: tuple) -> None:
    # Every shape is inscribed in the circle of radius r, so rotation never leaves its cell.
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, 45 + rotation), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, -90 + rotation), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.45 * r] * 5, -90 + rotation), fill=fill)
    else:  # pragma: no cover - SHAPES and this function change together
        raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=None)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font, scaled up below
        return ImageFont.load_default()


@lru_cache(maxsize=len(WORDS) * 2)
def _word_mask(word: str) -> Image.Image:
    """The word rasterised with PIL's default font, cropped to its ink."""
    font = _font()
    left, top, right, bottom = font.getbbox(word)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), word, font=font, fill=255)
    return mask


def _draw_word(image: Image.Image, sample: _Sample) -> None:
    size = image.width
    bx0, by0, bx1, by1 = (v * size for v in _TEXT_BOXES[sample.position])
    box_w, box_h = bx1 - bx0, by1 - by0
    scale, jx, jy, _ = sample.jitter[0]
    scale = 0.85 + 0.15 * scale
    mask = _word_mask(sample.word)
    aspect = mask.width / mask.height
    colour = COLOURS[sample.colour]
    if sample.style == "sign":
        # Plate = text plus padding (0.25 of the text height sideways, 0.3 above and below).
        text_h = min(box_w * scale / (aspect + 0.5), box_h * scale / 1.6)
        plate_w, plate_h = aspect * text_h + 0.5 * text_h, 1.6 * text_h
    else:
        text_h = min(box_w * scale / aspect, box_h * scale)
        plate_w, plate_h = aspect * text_h, text_h
    px = bx0 + (box_w - plate_w) * jx
    py = by0 + (box_h - plate_h) * jy
    if sample.style == "sign":
        ImageDraw.Draw(image).rounded_rectangle((px, py, px + plate_w, py + plate_h), radius=0.2 * text_h, fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (15, 15, 15) if luminance > 140 else (245, 245, 245)
        tx, ty = px + 0.25 * text_h, py + 0.3 * text_h
    else:
        ink, tx, ty = colour, px, py
    glyphs = mask.resize((max(1, round(aspect * text_h)), max(1, round(text_h))), Image.Resampling.BILINEAR)
    x, y = round(tx), round(ty)
    image.paste(ink, (x, y, x + glyphs.width, y + glyphs.height), glyphs)


def _render(sample: _Sample, resolution: int) -> Image.Image:
    size = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (size, size), (sample.background,) * 3)
    if sample.is_text:
        _draw_word(image, sample)
    else:
        draw = ImageDraw.Draw(image)
        for cx, cy, radius, rotation in _shape_placements(sample):
            _draw_shape(draw, sample.shape, cx * size, cy * size, radius * size, rotation, COLOURS[sample.colour])
    return image.reduce(_SUPERSAMPLE)


class ProceduralCaptions(Dataset):
    """Captioned images of coloured shapes and words, generated on the fly and reproducibly.

    Shape samples show one to four identical shapes (circle, square, triangle, star) of one
    named colour in one region (left, right, top, bottom, center); text samples show a word in
    PIL's default font, either as coloured letters or on a coloured sign. Items follow the common
    sample format `{"pixel_values": (3, R, R) in [-1, 1], "text": caption}`.

    Args:
        num_samples: the dataset length.
        resolution: side of the square images.
        seed: selects the dataset; item i depends only on (seed, i).
        text_fraction: probability that a sample is a text sample.
    """

    format_name = "procedural"

    def __init__(self, num_samples: int, resolution: int = 64, seed: int = 0, text_fraction: float = 0.25) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if not isinstance(text_fraction, (int, float)) or not 0.0 <= text_fraction <= 1.0:
            raise ConfigError(f"text_fraction must be a number in [0, 1], got {text_fraction!r}")
        self.num_samples = num_samples
        self.resolution = check_resolution(resolution)
        self.seed = seed
        self.text_fraction = float(text_fraction)
        # Same counters as the file-backed datasets, so callers can log them uniformly.
        self.skipped = 0
        self.missing = 0

    def __len__(self) -> int:
        return self.num_samples

    def _sample(self, index: int) -> _Sample:
        if not isinstance(index, int) or not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index!r} out of range for a dataset of {self.num_samples} samples")
        return _draw_sample(self.seed, index % self.num_samples, self.text_fraction)

    def caption(self, index: int) -> str:
        """The caption of sample `index` (cheap: nothing is drawn)."""
        return self._sample(index).caption

    def attributes(self, index: int) -> dict[str, Any]:
        """What sample `index` shows: shape, colour, position, count, word and is_text.

        Shape samples have `word=None`; text samples have `shape=None` and `count=1`, and their
        colour is the colour of the letters (or of the sign). `family` is the prompt's difficulty
        family (see `FAMILIES`).
        """
        sample = self._sample(index)
        return {
            "family": sample_family(sample.is_text, sample.count),
            "shape": sample.shape,
            "colour": sample.colour,
            "position": sample.position,
            "count": sample.count,
            "word": sample.word,
            "is_text": sample.is_text,
        }

    def image(self, index: int) -> Image.Image:
        """Sample `index` as an RGB PIL image of size resolution x resolution."""
        return _render(self._sample(index), self.resolution)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self._sample(index)
        return {"pixel_values": image_to_tensor(_render(sample, self.resolution)), "text": sample.caption}

    def __repr__(self) -> str:
        return (
            f"ProceduralCaptions(num_samples={self.num_samples}, resolution={self.resolution}, seed={self.seed}, "
            f"text_fraction={self.text_fraction})"
        )


def procedural_prompts(n: int, seed: int = 0, text_fraction: float = 0.25) -> list[str]:
    """The captions of `ProceduralCaptions(n, seed=seed, text_fraction=text_fraction)`, without drawing."""
    dataset = ProceduralCaptions(n, seed=seed, text_fraction=text_fraction)
    return [dataset.caption(i) for i in range(n)]
