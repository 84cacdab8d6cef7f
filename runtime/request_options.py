"""What a request may ask for, checked: `GenerationOptions`, the argument checks behind
`AptpPipeline.options` and `AptpPipeline.__call__`, and the `GenerationResult` each prompt
gets back. Every check raises `RuntimeInputError` naming the argument and what it accepts,
before any model runs.
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aptp.errors import RuntimeInputError, shown

from .artifacts import ExportArtifacts
from .tokenize import check_text

__all__ = [
    "GUIDANCE_RANGE",
    "MAX_SEED",
    "OUTPUT_TYPES",
    "PRECISIONS",
    "GenerationOptions",
    "GenerationResult",
    "check_guidance",
    "check_negative_prompts",
    "check_precision",
    "check_seeds",
    "check_size",
    "check_steps",
]

OUTPUT_TYPES = ("np", "latent")
#: Accepted classifier-free guidance scales (inclusive); <= 1 runs the conditional model only.
GUIDANCE_RANGE = (0.0, 100.0)
#: Seeds are integers in ``[0, MAX_SEED)``.
MAX_SEED = 2**63


@dataclass(frozen=True)
class GenerationOptions:
    """Checked per-request options; requests with equal options can share a batch."""

    guidance_scale: float
    num_inference_steps: int
    height: int
    width: int
    expert: int | str | None = None
    output_type: str = "np"
    #: Sampler name (``"ddim"``, ``"euler"``, ``"dpmpp_2m"``, ``"pndm"``); requests with different samplers
    #: or step counts never share a batch.
    scheduler: str = ""
    #: img2img strength in (0, 1] (None: text-to-image); `inpaint`: masked requests (`aptp.runtime.img2img`).
    strength: float | None = None
    inpaint: bool = False


@dataclass
class GenerationResult:
    """One prompt's output.

    ``expert`` is the code the prompt ran on (or ``"dense"``); ``latents`` are the final
    latents ``(C, h, w)`` float32; ``image`` is ``(H, W, 3)`` uint8 (``None`` for
    ``output_type="latent"``); ``timings`` are seconds per stage (`STAGES`): tokenise, route,
    text_encode and decode for the whole batch, denoise for the prompt's expert group.
    The generation parameters (negative prompt, sampler, steps, guidance, size, and the sha256
    of the export's manifest) come along so that `save` can write them into the PNG.
    ``provider`` is what actually ran its UNet: the execution provider the onnxruntime session
    activated (e.g. ``"CPUExecutionProvider"``, ``"CUDAExecutionProvider"``) or ``"TensorRT"``.
    """

    prompt: str
    seed: int
    expert: int | str
    latents: np.ndarray
    image: np.ndarray | None = None
    truncated: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    negative_prompt: str | None = None
    scheduler: str = ""
    num_inference_steps: int = 0
    guidance_scale: float = 0.0
    height: int = 0
    width: int = 0
    manifest_sha256: str = ""
    provider: str | None = None
    #: Prompts that shared this prompt's UNet calls (its expert group's chunk).
    batch_size: int = 1
    #: img2img / inpainting: the strength and the init image, mask and blur (`img2img.ImageRequest`).
    strength: float | None = None
    init_image: Any = None

    def parameters(self) -> dict[str, str]:
        """What made this image, as the PNG text chunks `save` writes (`aptp.runtime.images`)."""
        from .images import generation_parameters

        return generation_parameters(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the image as PNG with `parameters` in its text chunks (temp file, then rename).

        Raises:
            RuntimeInputError: the result has no image (``output_type="latent"``), or `path`
                does not end in ``.png``.
        """
        from .images import save_png

        if self.image is None:
            raise RuntimeInputError("this result has no image (it was generated with output_type='latent')")
        if Path(path).suffix.lower() != ".png":
            raise RuntimeInputError(f"{path} must end in .png (images are saved as PNG)")
        return save_png(self.image, path, parameters=self.parameters())


def check_steps(value: Any, steps: Any, default: int) -> int:
    if steps is not None:  # `steps=` is the short spelling of diffusers' num_inference_steps=
        if value is not None and value != steps:
            raise RuntimeInputError(f"steps={shown(steps)} and num_inference_steps={shown(value)} disagree; pass one of them")
        value = steps
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RuntimeInputError(f"num_inference_steps must be a positive integer, got {shown(value)}")
    if value <= 0:
        raise RuntimeInputError(f"num_inference_steps must be a positive integer, got {value}")
    return int(value)


def check_negative_prompts(negative: Any, count: int) -> list[str | None] | None:
    """One negative prompt (or None) per prompt; ``None`` when no prompt has one."""
    if negative is None:
        return None
    if isinstance(negative, str):
        negative = [negative] * count
    if isinstance(negative, bytes) or not isinstance(negative, Sequence) or len(negative) != count:
        raise RuntimeInputError(f"negative_prompt must be a string or a list of {count} strings (one per prompt), "
                                f"got {shown(negative)}")
    for i, text in enumerate(negative):
        if text is not None:
            check_text(text, f"negative_prompt[{i}]", allow_blank=True)
    out = [text if text else None for text in negative]
    return out if any(out) else None


def check_guidance(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise RuntimeInputError(f"guidance_scale must be a finite number (e.g. 7.5), got {shown(value)}")
    low, high = GUIDANCE_RANGE
    if not low <= value <= high:
        # Negative guidance steers away from the prompt; huge values overflow the latents
        # (1e308 gave an all-black image).
        raise RuntimeInputError(f"guidance_scale must be in [{low:g}, {high:g}] (diffusers' default is 7.5), "
                                f"got {shown(value)}")
    return float(value)


def check_size(value: Any, name: str, default: int, artifacts: ExportArtifacts) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise RuntimeInputError(f"{name} must be a positive number of pixels, got {shown(value)}")
    multiple = artifacts.size_multiple
    if value % multiple:
        raise RuntimeInputError(f"{name} {value} is not a multiple of {multiple} (VAE factor x UNet downsampling); "
                                f"try {max(multiple, value // multiple * multiple)}")
    low = artifacts.min_size or min(artifacts.image_height, artifacts.image_width)
    high = artifacts.max_size or max(artifacts.image_height, artifacts.image_width)
    if not low <= value <= high:
        raise RuntimeInputError(f"{name} {value} is outside this export's range [{low}, {high}] pixels; re-export "
                                "with --min-resolution/--max-resolution to cover it")
    return int(value)


def check_seeds(seeds: Any, count: int) -> list[int]:
    if seeds is None:
        return [secrets.randbelow(MAX_SEED) for _ in range(count)]
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        seeds = [int(seeds) + i for i in range(count)]
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) != count:
        raise RuntimeInputError(f"seeds must be an integer or a list of {count} integers (one per prompt), "
                                f"got {shown(seeds)}")
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
            raise RuntimeInputError(f"seeds[{i}] must be an integer in [0, 2**63), got {shown(seed)}")
    return [int(s) for s in seeds]


PRECISIONS = ("fp32", "fp16", "int8")


def check_precision(precision: Any, artifacts: ExportArtifacts) -> str | None:
    """None (the export's UNets) or ``"int8"``; the export's own precision means None."""
    if precision is None or precision == artifacts.precision:
        return None
    if precision not in PRECISIONS:
        raise RuntimeInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "int8":
        raise RuntimeInputError(f"export {artifacts.root} holds {artifacts.precision} UNets, not {precision}: "
                                f"re-export with --precision {precision}, or pass precision=None")
    return "int8"
