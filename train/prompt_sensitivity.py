"""A per-prompt sensitivity prior for the balanced assignment (``sinkhorn.sensitivity_weight``).

Why: the per-step quality term (`aptp.train.quality_assignment`) sees each prompt at one random
timestep, and on the tiny teacher the gap between codes moved with the timestep as much as it
differed between prompt families (docs/quality-log.md, question 4), so it mostly
sorted batches by timestep. Here every training prompt is measured once, before pruning, on
fixed timesteps and noise:

    s_i = mean_t log(e_it / mean_j e_jt)

with ``e_it`` the distillation error (MSE against the dense UNet) of one uniform static mask at
the budget (`aptp.train.uniform_masks`) on prompt i at timestep t. Taken relative to the mean
over prompts at the same timestep, so that the noisy timesteps' larger errors do not decide;
averaged over timesteps, so that no single draw does. The values are standardised over prompts
(``z_i``; prompts with the same caption share one value, as the router cannot tell them apart).

In the assignment the scores become ``score_ik + weight * z_i * rho_k``, with ``rho_k`` the codes'
current MACs ratios standardised over codes. A balanced plan ignores per-prompt and per-code
constants, so the term only moves the pairing: sensitive prompts towards the larger codes,
robust ones towards the smaller, and the router learns to predict that from the prompt.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from aptp.errors import ConfigError

from .gates import GateLayout
from .quality_assignment import code_distillation_errors

__all__ = ["SENSITIVITY_TIMESTEPS", "measure_prompt_errors", "standardised_sensitivity", "sensitivity_adjusted_scores"]

# Fractions of the scheduler's training timesteps at which every prompt is measured.
SENSITIVITY_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def measure_prompt_errors(components: Any, layout: GateLayout, mask: Tensor, dataset: Any,
                          timestep_fractions: Sequence[float] = SENSITIVITY_TIMESTEPS, seed: int = 0,
                          batch_size: int = 32, progress: bool = True) -> Tensor:
    """``(n, T)`` distillation error of `mask` on every item of `dataset` at each timestep, on
    fixed noise (item i's latent sample and noise depend only on ``seed`` and i's batch)."""
    unet, scheduler = components.unet, components.noise_scheduler
    device = next(unet.parameters()).device
    steps = scheduler.config.num_train_timesteps
    timesteps = [min(steps - 1, int(round(f * steps))) for f in timestep_fractions]
    mask = mask.to(device, torch.float32)
    out = []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="prompt sensitivity", disable=not progress, leave=False):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        pixels = torch.stack([it["pixel_values"] for it in items]).to(device)
        latents = components.vae.encode(pixels).latent_dist.sample(generator=generator) * components.vae.config.scaling_factor
        context = components.encode_prompts([it["text"] for it in items], device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        errors = []
        for t in timesteps:
            step = torch.full((len(items),), t, dtype=torch.long, device=device)
            noisy = scheduler.add_noise(latents, noise, step)
            teacher = unet(noisy, step, encoder_hidden_states=context).sample
            errors.append(code_distillation_errors(unet, layout, mask[None], noisy, step, context, teacher)[:, 0])
        out.append(torch.stack(errors, dim=1).cpu())
    return torch.cat(out)


def standardised_sensitivity(errors: Tensor, texts: Sequence[str]) -> dict[str, float]:
    """Caption -> z-scored ``mean_t log(e_it / mean_j e_jt)`` (see the module docstring)."""
    errors = errors.to(torch.float64)
    if errors.dim() != 2 or errors.shape[0] != len(texts) or errors.shape[0] < 2:
        raise ConfigError(f"need (prompts >= 2, timesteps) errors for {len(texts)} captions, got shape {tuple(errors.shape)}")
    if not bool(torch.isfinite(errors).all()) or bool((errors <= 0).any()):
        raise ConfigError("prompt sensitivity needs finite, positive errors (is the mask the dense model?)")
    score = torch.log(errors / errors.mean(dim=0, keepdim=True)).mean(dim=1)
    by_text: dict[str, list[float]] = defaultdict(list)
    for text, value in zip(texts, score.tolist()):
        by_text[text].append(value)
    per_text = {text: sum(v) / len(v) for text, v in by_text.items()}
    values = torch.tensor(list(per_text.values()), dtype=torch.float64)
    spread = float(values.std()) if len(values) > 1 else 0.0
    centre = float(values.mean())
    # Equal values (up to rounding) carry no ranking: all get 0 rather than amplified rounding noise.
    return {text: (v - centre) / spread if spread > 1e-9 else 0.0 for text, v in per_text.items()}


def sensitivity_adjusted_scores(scores: Tensor, sensitivity: Tensor, code_ratios: Tensor, weight: float) -> Tensor:
    """``scores + weight * z_i * rho_k``: the assignment's similarity with the sensitivity prior.

    Args:
        scores: ``(B, K)`` router similarities (detached).
        sensitivity: ``(B,)`` the prompts' standardised sensitivity ``z_i``.
        code_ratios: ``(K,)`` the codes' current MACs ratios; standardised here (all equal: no term).
        weight: units of similarity per standard deviation of both; 0 returns ``scores``.
    """
    if weight < 0:
        raise ConfigError(f"sinkhorn.sensitivity_weight must be >= 0, got {weight}")
    if sensitivity.shape != scores.shape[:1] or code_ratios.shape != scores.shape[1:]:
        raise ConfigError(f"sensitivity {tuple(sensitivity.shape)} and code ratios {tuple(code_ratios.shape)} do not "
                          f"match scores {tuple(scores.shape)}")
    if weight == 0:
        return scores
    ratios = code_ratios.detach().to(torch.float64)
    spread = ratios.std() if ratios.numel() > 1 else ratios.new_zeros(())
    rho = (ratios - ratios.mean()) / spread if float(spread) > 1e-9 else torch.zeros_like(ratios)
    term = weight * sensitivity.detach().to(torch.float64)[:, None] * rho[None, :]
    return scores.detach() + term.to(device=scores.device, dtype=scores.dtype)
