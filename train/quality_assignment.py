"""Quality-aware assignment: tell the balanced (Sinkhorn) assignment what each code costs each prompt.

Plain APTP assigns prompts to codes by router similarity alone, so nothing ties a prompt's
sensitivity to pruning to the size of the code it gets: in issue 13's runs the largest expert
went to whichever family the sentence encoder happened to separate first. With a quality
weight, each prompt of the batch is also run through every code's hard mask (no gradient, on the
step's noisy latents) and the assignment maximises ``score - weight * log(relative distillation
error)``.

Why the logarithm of each error relative to the prompt's mean over codes: a prompt's errors
scale together with its timestep and noise (a noisy timestep is hard for every code). As a ratio
that scale cancels, and a balanced transport plan ignores per-prompt and per-code constants, so
what moves prompts is only how much *more* a small code hurts this prompt than the others. The
plan stays balanced, and the router learns to predict it from the prompt. What the ratio does not
remove is how the gap between codes changes with the timestep: on the tiny teacher that change
was as large as the differences between prompt families or (one seed in three) several times
larger, so one step's gap says much about which timestep a prompt drew (docs/quality-log.md,
question 4).

Why the floor on the ratio: a code still equal to the teacher has error 0, and log 0 would give
cost differences of tens of units against cosine scores in [-1, 1]; a few Sinkhorn iterations
then no longer balance the plan (a 40-step probe sent 0.75 of a batch to one code). Ratios
below ``RATIO_FLOOR`` count as ``RATIO_FLOOR``: the term lies in ``[log 0.1, log K]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aptp.errors import ConfigError

from .gates import GateLayout, apply_gates

__all__ = ["RATIO_FLOOR", "code_distillation_errors", "relative_errors", "quality_adjusted_scores"]

RATIO_FLOOR = 0.1


@torch.no_grad()
def code_distillation_errors(
    unet: nn.Module,
    layout: GateLayout,
    code_masks: Tensor,
    noisy: Tensor,
    timesteps: Tensor,
    context: Tensor,
    teacher_out: Tensor,
) -> Tensor:
    """``(B, K)`` mean squared error between each code's output and the dense teacher's, per prompt.

    Args:
        unet: the frozen UNet (gated through ``layout``).
        layout: its gate layout.
        code_masks: ``(K, N)`` hard keep-masks of the codes (bool or 0/1).
        noisy, timesteps, context: the step's UNet inputs for B prompts.
        teacher_out: ``(B, C, H, W)`` the dense UNet's output on those inputs.
    """
    if code_masks.dim() != 2 or code_masks.shape[1] != layout.num_gates:
        raise ConfigError(f"code_masks must be (codes, {layout.num_gates}), got shape {tuple(code_masks.shape)}")
    errors = []
    for mask in code_masks.to(teacher_out.device, torch.float32):
        with apply_gates(unet, layout, mask):
            out = unet(noisy, timesteps, encoder_hidden_states=context).sample
        errors.append((out.float() - teacher_out.float()).pow(2).flatten(1).mean(dim=1))
    return torch.stack(errors, dim=1)


def relative_errors(code_errors: Tensor) -> Tensor:
    """``(B, K)`` float64 ``e_ik / mean_k e_ik``: each code's error relative to the prompt's own
    level (1 for every code of a prompt whose errors are all 0)."""
    errors = code_errors.detach().to(torch.float64)
    level = errors.mean(dim=1, keepdim=True)
    return torch.where(level > 0, errors / level.clamp(min=torch.finfo(errors.dtype).tiny), torch.ones_like(errors))


def quality_adjusted_scores(scores: Tensor, code_errors: Tensor, weight: float) -> Tensor:
    """``scores - weight * log(max(e_ik / mean_k e_ik, RATIO_FLOOR))``: the assignment's
    similarity with the quality term (``e = code_errors``). A prompt whose errors are all 0 gets
    no quality term.

    Args:
        scores: ``(B, K)`` router similarities (detached).
        code_errors: ``(B, K)`` per-prompt distillation errors of each code (`code_distillation_errors`).
        weight: how many units of similarity a factor e in a prompt's relative error is worth;
            0 returns ``scores``.
    """
    if weight < 0:
        raise ConfigError(f"sinkhorn.quality_weight must be >= 0, got {weight}")
    if code_errors.shape != scores.shape:
        raise ConfigError(f"code_errors has shape {tuple(code_errors.shape)}, expected the scores' {tuple(scores.shape)}")
    if weight == 0:
        return scores
    if not bool(torch.isfinite(code_errors).all()) or bool((code_errors < 0).any()):
        raise ConfigError("code distillation errors must be finite and non-negative")
    penalty = torch.log(relative_errors(code_errors).clamp(min=RATIO_FLOOR)).to(scores.dtype)
    return scores.detach() - weight * penalty
