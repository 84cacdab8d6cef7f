"""img2img and inpainting with any expert UNet: strength cuts, the noised start, the mask blend.

Reproduces diffusers' ``StableDiffusionImg2ImgPipeline`` and, for inpainting with an ordinary
(4-channel) UNet, ``StableDiffusionInpaintPipeline``'s blending path, in numpy:

* **strength**: ``get_timesteps`` keeps the last ``min(int(steps * strength), steps)`` steps;
  the sampler's table is rebuilt from ``t_start = steps - kept`` on
  (`aptp.runtime.samplers.build_table` with ``start``), so multistep samplers restart their
  history as diffusers' do (DPM++ 2M's first kept step is first order; PLMS's counter restarts
  and its repeated-timestep step falls on the second kept call).
* **start latents**: the VAE encoder's posterior (``latent_mean``, ``latent_std``, scaled) is
  sampled as ``mean + std * eps_vae`` and noised at the first kept timestep with the
  scheduler's ``add_noise`` weights (`aptp.runtime.samplers.add_noise_levels`):
  ``sqrt(a) x0 + sqrt(1 - a) eps`` (DDIM, PLMS), ``alpha_t x0 + sigma_t eps`` (DPM++),
  ``x0 + sigma eps`` (Euler). Inpainting at strength 1 starts from pure noise times
  ``init_noise_sigma``, as diffusers' inpaint pipeline does (``is_strength_max``).
* **randomness**: ``Generator(PCG64(seed))`` draws ``eps`` first (the same array as that seed's
  text-to-image noise, `aptp.runtime.pipeline.initial_noise`), then ``eps_vae``.
* **inpainting**: after model call ``i`` the known region (mask 0) is replaced by the init
  latents noised at call ``i + 1``'s timestep, and by the clean init latents after the last
  call: ``x = (1 - m) * known_i + m * x``. diffusers' older ``StableDiffusionInpaintPipelineLegacy``
  noised at call ``i``'s own timestep (one step too noisy); this follows the current pipeline.

Requests with different options (strength, masked or not) never share a UNet batch; equal
options do, each row with its own image, mask and seed. See ``docs/img2img.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aptp.errors import ArtifactError, RuntimeInputError, shown

from .init_images import (MAX_IMAGE_PIXELS, ImageInput, latent_mask, pixel_mask, read_image, read_mask, resize_rgb,
                          to_model_pixels)
from .samplers import add_noise_levels, build_table
from .sampler_library import SamplerLibrary, canonical_sampler
from .scheduler import SchedulerTable

__all__ = ["DEFAULT_STRENGTH", "ImageRequest", "ImageStart", "StrengthSchedule", "check_image_requests",
           "check_mask_blur", "check_strength", "image_arguments", "keep_unmasked_pixels", "request_noise",
           "strength_schedule", "t_start"]

#: diffusers' defaults: img2img 0.8, inpainting 1.0.
DEFAULT_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 1.0
MAX_MASK_BLUR = 256.0

#: ``blend(call_index, x)`` after each model call: updates the latents in place.
Blend = Callable[[int, np.ndarray], None]


@dataclass(frozen=True)
class ImageRequest:
    """One request's init image (RGB at the request's size), optional mask (white = repaint,
    same size) and the mask blur radius in pixels."""

    image: ImageInput
    mask: ImageInput | None = None
    mask_blur: float = 0.0


def check_strength(value: Any) -> float:
    """`value` as a float in (0, 1].

    Raises:
        RuntimeInputError: not a finite number in (0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or not 0.0 < float(value) <= 1.0:
        raise RuntimeInputError(f"strength must be a number in (0, 1] (how much of the init image is repainted; "
                                f"diffusers' default is 0.8), got {shown(value)}")
    return float(value)


def check_mask_blur(value: Any) -> float:
    """`value` as a radius in pixels, ``[0, MAX_MASK_BLUR]``."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= MAX_MASK_BLUR:
        raise RuntimeInputError(f"mask_blur must be a radius in pixels in [0, {MAX_MASK_BLUR:g}], got {shown(value)}")
    return float(value)


def t_start(steps: int, strength: float) -> int:
    """diffusers' ``get_timesteps``: the index of the first step kept at `strength`.

    Raises:
        RuntimeInputError: `strength` keeps no step at `steps` (diffusers refuses it too).
    """
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise RuntimeInputError(f"strength {strength:g} at {steps} steps keeps no step (int({steps} * {strength:g}) = 0); "
                                f"raise strength to at least {1 / steps:.3g} or raise the steps")
    return max(steps - kept, 0)


@dataclass(frozen=True)
class StrengthSchedule:
    """The sampler cut at a strength: the kept rows' table, where it starts in the full
    schedule, and per kept call the ``(signal, noise)`` weights of ``add_noise`` there."""

    table: SchedulerTable
    steps: int
    start: int
    levels: np.ndarray
    strength: float


def strength_schedule(samplers: SamplerLibrary, name: str, steps: int, strength: float) -> StrengthSchedule:
    """The `StrengthSchedule` of sampler `name` at `steps` and `strength`.

    Raises:
        RuntimeInputError: the strength keeps no step, or the export stores no sampler config
            (made before per-request samplers) to rebuild the cut table from.
    """
    key, steps = samplers.check(name, steps)
    start = t_start(steps, strength)
    spec = samplers.specs.get(key)
    if spec is None:
        raise RuntimeInputError(f"this export stores no {key} sampler config to cut at a strength (it was made "
                                "before per-request samplers); re-export it with this aptp version for img2img")
    try:
        table = build_table(key, spec["config"], spec["alphas_cumprod"], steps, start=start)
        levels = add_noise_levels(key, spec["config"], spec["alphas_cumprod"], steps, start=start)
    except ValueError as err:
        raise RuntimeInputError(f"{key} at {steps} steps and strength {strength:g}: {err}") from err
    if levels.shape[0] != table.num_calls:
        raise ArtifactError(f"{key}: {levels.shape[0]} noise levels for {table.num_calls} calls")  # a bug, not input
    return StrengthSchedule(table, steps, start, levels, strength)


def request_noise(seed: int, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(eps, eps_vae)`` of one request: two standard normal draws of `shape` from ``PCG64(seed)``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.standard_normal(tuple(shape), dtype=np.float32), rng.standard_normal(tuple(shape), dtype=np.float32)


@dataclass
class ImageStart:
    """A batch's start: latents to sample from, the clean init latents, the noise, the masks."""

    latents: np.ndarray
    known: np.ndarray
    noise: np.ndarray
    masks: np.ndarray | None
    levels: np.ndarray

    @classmethod
    def encode(cls, encoder: Any, requests: Sequence[ImageRequest], seeds: Sequence[int],
               schedule: StrengthSchedule, latent_shape: Sequence[int], factor: int,
               inpaint: bool) -> ImageStart:
        """Encode every init image (one encoder call), sample its posterior and noise it."""
        draws = [request_noise(seed, latent_shape) for seed in seeds]
        noise = np.stack([d[0] for d in draws])
        eps_vae = np.stack([d[1] for d in draws])
        out = encoder.infer({"sample": to_model_pixels([r.image for r in requests])})
        mean = np.asarray(out["latent_mean"], dtype=np.float32)
        std = np.asarray(out["latent_std"], dtype=np.float32)
        if mean.shape != noise.shape or std.shape != noise.shape:
            raise ArtifactError(f"the VAE encoder returned latents of shape {mean.shape}, expected {noise.shape}")
        known = np.ascontiguousarray(mean + std * eps_vae)
        masks = None
        if inpaint:  # a request without a mask repaints everything: m = 1 leaves its rows as they are
            masks = np.stack([latent_mask(r.mask, factor, r.mask_blur) if r.mask is not None
                              else np.ones(latent_shape[1:], dtype=np.float32) for r in requests])[:, None]
        if inpaint and schedule.strength == 1.0:  # diffusers' inpaint: is_strength_max starts from noise
            latents = schedule.table.initial_latents(noise)
        else:
            signal, sigma = (np.float32(v) for v in schedule.levels[0])
            latents = signal * known + sigma * noise
        return cls(np.ascontiguousarray(latents, dtype=np.float32), known, noise, masks, schedule.levels)

    def blender(self, rows: np.ndarray) -> Blend | None:
        """The per-call blend of the batch rows `rows` (None without masks)."""
        if self.masks is None:
            return None
        known, noise, mask = self.known[rows], self.noise[rows], self.masks[rows]
        keep = np.float32(1.0) - mask
        levels = self.levels

        def blend(i: int, x: np.ndarray) -> None:
            if i + 1 < levels.shape[0]:
                signal, sigma = (np.float32(v) for v in levels[i + 1])
                proper = signal * known + sigma * noise
            else:
                proper = known
            x[...] = keep * proper + mask * x

        return blend


def keep_unmasked_pixels(pixels: np.ndarray, requests: Sequence[ImageRequest]) -> None:
    """Put each inpainted row's init pixels back where its mask keeps them, in place.

    `pixels` are decoded ``(B, 3, H, W)`` in [-1, 1]. The known latents are exact after the last
    step, but the VAE decoder lets every latent reach every pixel (its mid-block attention), so
    without this the kept region moves with the repaint (13/255 on average on the tiny VAE).
    A1111 composites the same way; diffusers' pipeline does not unless asked (``keep_unmasked=False``
    reproduces it).
    """
    for row, request in enumerate(requests):
        if request.mask is None:
            continue
        repaint = pixel_mask(request.mask, request.mask_blur)
        init = to_model_pixels([request.image])[0]
        pixels[row] = repaint * pixels[row] + (np.float32(1.0) - repaint) * init


def check_image_requests(init_image: Any, mask_image: Any, mask_blur: Any, count: int, height: int | None,
                         width: int | None) -> tuple[list[ImageRequest], int, int]:
    """One `ImageRequest` per prompt, all of one size, and that size ``(height, width)``.

    `init_image` and `mask_image` are one input for every prompt or a list of one per prompt
    (masks: ``None`` entries for prompts that are not inpainted). Without `height`/`width` the
    init image's own size is used; with them, image and mask are resized (Lanczos) to it.

    Raises:
        RuntimeInputError: a mask without an init image, an unreadable input, a list of the
            wrong length, a mask whose size differs from its image's, images of several sizes.
    """
    if init_image is None:
        raise RuntimeInputError("mask_image needs an init_image (the picture whose masked part is repainted)")
    images = _per_prompt(init_image, count, "init_image")
    masks = _per_prompt(mask_image, count, "mask_image") if mask_image is not None else [None] * count
    blur = check_mask_blur(mask_blur)
    cache: dict[int, ImageInput] = {}

    def read(source: Any, reader: Callable[[Any, str], ImageInput], what: str) -> ImageInput:
        if id(source) not in cache:  # one image for every prompt is read once
            cache[id(source)] = reader(source, what)
        return cache[id(source)]

    read_images = [read(src, read_image, "init_image" if count == 1 else f"init_image[{i}]")
                   for i, src in enumerate(images)]
    read_masks = [None if src is None else read(src, read_mask, "mask_image" if count == 1 else f"mask_image[{i}]")
                  for i, src in enumerate(masks)]
    for i, (image, mask) in enumerate(zip(read_images, read_masks)):
        if mask is not None and mask.size != image.size:
            raise RuntimeInputError(f"mask_image is {mask.size[1]}x{mask.size[0]} pixels, its init image "
                                    f"{image.size[1]}x{image.size[0]}; pass a mask of the image's size")
    sizes = {image.size for image in read_images}
    if len(sizes) > 1 and (height is None or width is None):
        raise RuntimeInputError(f"the init images have several sizes {sorted(sizes)}; pass height and width to "
                                "resize them to one")
    h0, w0 = read_images[0].size
    for name, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0):
            raise RuntimeInputError(f"{name} must be a positive number of pixels, got {shown(value)}")
    height, width = int(height or h0), int(width or w0)
    if height * width > MAX_IMAGE_PIXELS:  # before resizing: the export's size check comes later
        raise RuntimeInputError(f"{width}x{height} is more pixels than this runtime reads ({MAX_IMAGE_PIXELS})")
    out = [ImageRequest(resize_rgb(image, height, width),
                        None if mask is None else resize_rgb(mask, height, width), blur)
           for image, mask in zip(read_images, read_masks)]
    return out, height, width


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise RuntimeInputError(f"{name} must be one image or a list of {count} (one per prompt), "
                                    f"got a list of {len(value)}")
        return list(value)
    return [value] * count


def image_arguments(artifacts: Any, init_image: Any, mask_image: Any, mask_blur: Any, strength: Any, count: int,
                    height: int | None, width: int | None
                    ) -> tuple[list[ImageRequest] | None, int | None, int | None, float | None, bool]:
    """The img2img arguments of one call: ``(requests, height, width, strength, inpaint)``;
    ``(None, height, width, None, False)`` for text-to-image.

    Raises:
        RuntimeInputError: strength or mask_blur without an init image, an export without a VAE
            encoder, a bad strength, or an input `check_image_requests` refuses.
    """
    if init_image is None and mask_image is None:
        if strength is not None or mask_blur is not None:
            raise RuntimeInputError("strength and mask_blur apply to an init_image; pass one (or leave them out)")
        return None, height, width, None, False
    if getattr(artifacts, "vae_encoder", None) is None:
        raise RuntimeInputError(f"export {artifacts.root} has no VAE encoder (it was made before img2img): re-export "
                                "it with this aptp version for init images and masks; text-to-image runs as it is")
    inpaint = mask_image is not None
    strength = check_strength((DEFAULT_INPAINT_STRENGTH if inpaint else DEFAULT_STRENGTH)
                              if strength is None else strength)
    requests, height, width = check_image_requests(init_image, mask_image, mask_blur, count, height, width)
    return requests, height, width, strength, inpaint


def sampler_name(options: Any, default: str) -> str:
    """The canonical sampler of `options` (its own, else `default`)."""
    return canonical_sampler(options.scheduler or default)
