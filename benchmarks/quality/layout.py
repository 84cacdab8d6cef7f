"""Does a teacher put objects where the prompt says, and where does its layout come from?

    python -m aptp.benchmarks.quality.layout PIPELINE [--output layout.json]

Two measurements, both on the chromatic pixels' centroid of decoded images (x right, y down, in [0, 1]):

- **placement**: one shape per prompt ("a red circle on the left"; 6 chromatic colours x 4 shapes
  per position), sampled like the quality table (DDIM, guidance, the same noise for prompt i of
  every position). Per position: the mean centroid and the share of images on the asked side.
  A teacher that ignores position words gives the same centroids for every position.
- **leak**: held-out renderings of one shape on the left or on the right are encoded, noised to a
  timestep with one shared noise tensor, and the UNet's x0 prediction is decoded, under the true
  prompt, the prompt with the side swapped and the empty prompt. Where the left and right images
  still give different centroids whatever the prompt says, the teacher reads the layout from the
  signal the schedule leaves in x_t rather than from the prompt (SD's ``scaled_linear`` schedule
  keeps sqrt(alpha_bar) = 0.068 at t=999; Lin et al. 2024). At sampling x_T is pure noise, so such a
  teacher places objects wherever the noise says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from aptp.errors import AptpError

#: Positions whose sides the leak probe swaps in the prompt.
SIDES = {"left": "right", "right": "left"}
# Colours the chromatic centroid can see (white and black are as grey as the backgrounds).
_UNSEEN_COLOURS = ("white", "black")
# A chromatic pixel: max minus min channel above this (the backgrounds are grey, white and black are skipped).
_CHROMA = 0.25


def chromatic_centroid(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (N, 3, H, W) in [0, 1]: the centroid (x, y) of its chromatic pixels, in [0, 1]."""
    chroma = images.max(1).values - images.min(1).values
    mask = (chroma > _CHROMA).float()
    height, width = mask.shape[1:]
    ys = torch.linspace(0, 1, height).view(1, height, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, width)
    area = mask.sum((1, 2)).clamp_min(1)
    return (mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area


def _on_asked_side(position: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return {"left": x < 0.5, "right": x > 0.5, "top": y < 0.5, "bottom": y > 0.5,
            "center": (x - 0.5).abs().lt(0.2) & (y - 0.5).abs().lt(0.2)}[position]


def _stats(values: torch.Tensor) -> float:
    return round(float(values.float().mean()), 3)


def placement(components: Any, *, seed: int = 0, steps: int = 20, guidance: float = 4.0) -> dict[str, dict[str, float]]:
    """Per position: mean centroid, its spread and the share of images on the asked side."""
    from aptp.train.data.procedural import COLOURS, POSITION_PHRASES, SHAPES

    from .sampling import generate_images

    colours = [c for c in COLOURS if c not in _UNSEEN_COLOURS]
    result = {}
    for position, phrase in POSITION_PHRASES.items():
        prompts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s} {phrase}" for c in colours for s in SHAPES]
        images = generate_images(components, prompts, components.unet, seed=seed, steps=steps, guidance=guidance,
                                 progress=False)
        x, y = chromatic_centroid(images)
        result[position] = {"n": len(prompts), "mean_x": _stats(x), "mean_y": _stats(y),
                            "std_x": round(float(x.std()), 3), "std_y": round(float(y.std()), 3),
                            "on_asked_side": _stats(_on_asked_side(position, x, y))}
    return result


def _x0_prediction(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    from aptp.runtime.samplers import prediction_terms

    from_noisy, from_output = prediction_terms(prediction_type, alpha_bar**0.5, (1 - alpha_bar) ** 0.5)
    return from_noisy * noisy + from_output * output


def _held_out_sides(dataset: Any, per_side: int) -> dict[str, list[int]]:
    """Indices of single chromatic shapes on the left and on the right."""
    picked: dict[str, list[int]] = {side: [] for side in SIDES}
    for index in range(len(dataset)):
        attributes = dataset.attributes(index)
        side = attributes["position"]
        if (side in picked and len(picked[side]) < per_side and not attributes["is_text"] and attributes["count"] == 1
                and attributes["colour"] not in _UNSEEN_COLOURS):
            picked[side].append(index)
    return picked


@torch.no_grad()
def leak(components: Any, timesteps: Sequence[int] = (951, 901, 801), *, per_side: int = 24) -> list[dict[str, Any]]:
    """Per timestep and side: the x0 prediction's centroid x under the true, swapped and empty prompts."""
    from aptp.train.data import ProceduralCaptions

    scheduler, vae, unet = components.noise_scheduler, components.vae, components.unet
    resolution = unet.config.sample_size * components.vae_scale_factor
    dataset = ProceduralCaptions(4000, resolution, seed=1)  # seed 1: the held-out prompts of the quality table
    scale = vae.config.scaling_factor
    # What does not depend on the timestep: each side's images, latents and prompt encodings.
    sides = {}
    for side, indices in _held_out_sides(dataset, per_side).items():
        images = torch.stack([dataset[i]["pixel_values"] for i in indices])
        captions = [dataset.caption(i) for i in indices]
        prompts = {"true": captions, "swapped": [c.replace(side, SIDES[side]) for c in captions],
                   "empty": [""] * len(captions)}
        sides[side] = {"images": images, "latents": vae.encode(images).latent_dist.mean * scale,
                       "contexts": {name: components.encode_prompts(texts, "cpu") for name, texts in prompts.items()}}
    rows = []
    for t in timesteps:
        alpha_bar = float(scheduler.alphas_cumprod[t])
        for side, held_out in sides.items():
            latents = held_out["latents"]
            noise = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(0)).expand_as(latents)
            noisy = alpha_bar**0.5 * latents + (1 - alpha_bar) ** 0.5 * noise
            row = {"timestep": int(t), "sqrt_alpha_bar": round(alpha_bar**0.5, 4), "side": side, "n": len(latents),
                   "real_x": _stats(chromatic_centroid(held_out["images"] * 0.5 + 0.5)[0])}
            for name, context in held_out["contexts"].items():
                output = unet(noisy, torch.full((len(latents),), int(t)), encoder_hidden_states=context).sample
                x0 = _x0_prediction(output, noisy, alpha_bar, scheduler.config.prediction_type)
                decoded = (vae.decode(x0 / scale).sample * 0.5 + 0.5).clamp(0, 1)
                row[f"{name}_x"] = _stats(chromatic_centroid(decoded)[0])
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", help="a pipeline directory (or 'tiny')")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[951, 901, 801], help="leak probe timesteps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from aptp.train.models import load_components

    try:
        components = load_components(args.pipeline)
        train_steps = components.noise_scheduler.config.num_train_timesteps
        bad = [t for t in args.timesteps if not 0 <= t < train_steps]
        if bad:
            raise AptpError(f"--timesteps {bad} outside [0, {train_steps})")
        result = {"pipeline": args.pipeline, "prediction_type": components.noise_scheduler.config.prediction_type,
                  "placement": placement(components), "leak": leak(components, args.timesteps)}
    except AptpError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output is not None:
        from aptp.train.slicing import write_json_atomic

        write_json_atomic(args.output, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
