"""Images from a pipeline's UNets for the quality suite: the same initial noise per prompt in
every row (`prompt_noise`), DDIM sampling with classifier-free guidance (`generate_images`),
and PNG grids of the results (`save_grid`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from aptp.errors import ConfigError

__all__ = ["generate_images", "prompt_noise", "save_grid"]


def prompt_noise(num_prompts: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Initial latents per prompt; prompt i's noise depends only on (seed, i), so every row shares it."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                        for i in range(num_prompts)])


@torch.no_grad()
def generate_images(
    components: Any,
    prompts: Sequence[str],
    unets: dict[int, nn.Module] | nn.Module,
    codes: Sequence[int] | None = None,
    *,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    batch_size: int = 32,
    scheduler: Any = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample one image per prompt with DDIM and classifier-free guidance; (N, 3, R, R) in [0, 1].

    Args:
        components: `aptp.train.models.DiffusionComponents` (text encoder, tokenizer, VAE).
        prompts: the prompts.
        unets: one UNet, or experts by code (each prompt uses ``unets[codes[i]]``).
        codes: the code of each prompt (required with a dict of experts).
        seed: selects the initial noise (see `prompt_noise`).
        steps, guidance: DDIM steps and guidance scale.
        scheduler: a diffusers scheduler; default: DDIM from the pipeline's scheduler config.
    """
    from diffusers import DDIMScheduler

    if isinstance(unets, nn.Module):
        unets, codes = {0: unets}, [0] * len(prompts)
    if codes is None or len(codes) != len(prompts):
        raise ConfigError("generate_images needs one code per prompt when given several experts")
    if scheduler is None:
        scheduler = DDIMScheduler.from_config(components.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    any_unet = next(iter(unets.values()))
    side = any_unet.config.sample_size
    noise = prompt_noise(len(prompts), (any_unet.config.in_channels, side, side), seed)
    uncond = components.encode_prompts([""], "cpu")
    out = torch.zeros(len(prompts), 3, side * components.vae_scale_factor, side * components.vae_scale_factor)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, code in enumerate(codes):
        groups[int(code)].append(i)
    batches = [(code, idx[s : s + batch_size]) for code, idx in sorted(groups.items()) for s in range(0, len(idx), batch_size)]
    for code, index in tqdm(batches, desc="sampling", disable=not progress, leave=False):
        unet = unets[code]
        context = components.encode_prompts([prompts[i] for i in index], "cpu")
        context = torch.cat([uncond.expand(len(index), -1, -1), context])
        latents = noise[index] * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps_uncond, eps_text = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(eps_uncond + guidance * (eps_text - eps_uncond), t, latents).prev_sample
        images = components.vae.decode(latents / components.vae.config.scaling_factor).sample
        out[index] = (images * 0.5 + 0.5).clamp(0, 1)
    return out


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 8, captions: Sequence[str] | None = None) -> Path:
    """Save a PNG grid of (N, 3, R, R) [0, 1] images (captions, if given, go to a .txt beside it)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.ones(3, rows * (h + 2), columns * (w + 2))
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = images[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).resize((array.shape[1] * 2, array.shape[0] * 2), Image.Resampling.NEAREST).save(path)
    if captions is not None:
        path.with_suffix(".txt").write_text("".join(f"{i}: {c}\n" for i, c in enumerate(captions)))
    return path
