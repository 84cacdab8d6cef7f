"""Uniform static masks: the same fraction of every gate site kept, chosen by importance.

They are the simplest pruning at a MACs budget, with no training: the premise of prompt
routing is measured with them (`aptp.benchmarks.quality.premise`), and the prompt-sensitivity
prior of pruning (`aptp.train.prompt_sensitivity`) measures each prompt against one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from aptp.errors import ConfigError

from .gates import GateLayout, apply_gates
from .losses import denoising_loss
from .macs import MacsModel

__all__ = ["gate_importance", "uniform_mask"]


def gate_importance(components: Any, layout: GateLayout, batches: int = 4, batch_size: int = 16, seed: int = 0,
                    dataset: Any = None) -> torch.Tensor:
    """(N,) first-order importance of every gate: mean |d denoising loss / d gate| at gates = 1,
    over the first ``batches * batch_size`` items of `dataset` (default: procedural renderings,
    seed `seed`)."""
    if dataset is None:
        from .data import ProceduralCaptions

        dataset = ProceduralCaptions(batches * batch_size, 64, seed=seed)
    if len(dataset) < batches * batch_size:
        raise ConfigError(f"gate importance needs {batches * batch_size} samples, the dataset has {len(dataset)}")
    unet, scheduler = components.unet, components.noise_scheduler
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    total = torch.zeros(layout.num_gates, device=device)
    for b in range(batches):
        items = [dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)]
        pixels = torch.stack([it["pixel_values"] for it in items])
        with torch.no_grad():
            latents = components.vae.encode(pixels.to(device)).latent_dist.sample(generator=generator) * components.vae.config.scaling_factor
            context = components.encode_prompts([it["text"] for it in items], device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        gates = torch.ones(batch_size, layout.num_gates, requires_grad=True, device=device)
        with apply_gates(unet, layout, gates):
            pred = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = denoising_loss(pred, noise, latents, timesteps, scheduler)
        (grad,) = torch.autograd.grad(loss, gates)
        total += grad.abs().sum(0)
    return (total / (batches * batch_size)).cpu()


def uniform_mask(layout: GateLayout, macs: MacsModel, importance: torch.Tensor, target: float, iterations: int = 40) -> tuple[torch.Tensor, float]:
    """A (N,) 0/1 mask keeping the same fraction of every site (its most important units, at least
    one) whose MACs ratio is as close to `target` as the sites' granularity allows."""
    sites = [(layout.site_slice(site), site) for site in layout.sites]

    def mask_for(fraction: float) -> torch.Tensor:
        mask = torch.zeros(layout.num_gates)
        for span, _ in sites:
            scores = importance[span]
            keep = max(1, math.ceil(fraction * scores.numel() - 1e-9))
            idx = torch.argsort(scores, descending=True, stable=True)[:keep] + span.start
            mask[idx] = 1.0
        return mask

    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        if float(macs.ratio(mask_for(mid).to(macs.coefs.device))) > target:
            high = mid
        else:
            low = mid
    candidates = [mask_for(low), mask_for(high)]
    best = min(candidates, key=lambda m: abs(float(macs.ratio(m.to(macs.coefs.device))) - target))
    return best, float(macs.ratio(best.to(macs.coefs.device)))
