"""Pruning and fine-tuning losses. Each returns an unweighted scalar; the trainer applies weights.

- `denoising_loss`: diffusion MSE with min-SNR weighting, epsilon- or v-prediction from the
  scheduler config.
- `resource_loss`: keep the batch's expected MACs at the target, keep the codes' costs apart.
- `contrastive_loss`: router vectors reproduce the prompt-to-prompt similarity structure of the
  sentence embeddings.
- `assignment_loss`: the router's similarity logits predict the balanced (Sinkhorn) assignment.
- `distillation_loss`: output and block-output MSE to the dense teacher.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aptp.errors import ConfigError

__all__ = [
    "denoising_loss",
    "snr_from_scheduler",
    "resource_loss",
    "contrastive_loss",
    "assignment_loss",
    "distillation_loss",
]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def snr_from_scheduler(noise_scheduler: Any, timesteps: Tensor) -> Tensor:
    """``(B,)`` signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at ``timesteps`` (float32)."""
    alphas_cumprod = getattr(noise_scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ConfigError(
            f"{type(noise_scheduler).__name__} has no alphas_cumprod; min-SNR weighting needs a "
            "DDPM-style training scheduler (e.g. DDPMScheduler), or pass snr_gamma=None."
        )
    alpha_bar = torch.as_tensor(alphas_cumprod).to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    return alpha_bar / (1.0 - alpha_bar)


def denoising_loss(
    model_pred: Tensor,
    noise: Tensor,
    latents: Tensor,
    timesteps: Tensor,
    noise_scheduler: Any,
    snr_gamma: float | None = 5.0,
) -> Tensor:
    """Diffusion training loss with min-SNR-gamma weighting (Hang et al. 2023).

    The target follows ``noise_scheduler.config.prediction_type``: ``"epsilon"`` -> ``noise``;
    ``"v_prediction"`` -> ``noise_scheduler.get_velocity(latents, noise, timesteps)``;
    ``"sample"`` -> ``latents``. (The noisy latents are not needed: every target is a function
    of the clean latents, the noise and the timesteps.)

    Per-sample MSE is weighted by ``min(snr, gamma) / snr`` (epsilon), ``min(snr, gamma) /
    (snr + 1)`` (v) or ``min(snr, gamma)`` (sample), then averaged over the batch. A timestep
    with ``snr == 0`` (zero-terminal-SNR schedules) gets weight 1 under epsilon-prediction.

    Args:
        model_pred: ``(B, C, H, W)`` UNet output.
        noise: ``(B, C, H, W)`` the noise added to the latents.
        latents: ``(B, C, H, W)`` the clean latents.
        timesteps: ``(B,)`` integer timesteps.
        noise_scheduler: the training scheduler (diffusers ``DDPMScheduler`` or alike).
        snr_gamma: the min-SNR gamma; ``None`` gives the plain MSE.
    """
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ConfigError(
            f"Unknown scheduler prediction_type {prediction_type!r}; supported: {', '.join(_PREDICTION_TYPES)}. "
            "Fix the scheduler config of the base model."
        )
    if model_pred.shape != target.shape:
        raise ConfigError(f"model_pred has shape {tuple(model_pred.shape)} but the target has {tuple(target.shape)}.")

    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    if snr_gamma is None:
        return per_sample.mean()
    if snr_gamma <= 0:
        raise ConfigError(f"snr_gamma must be > 0 or None, got {snr_gamma}.")

    snr = snr_from_scheduler(noise_scheduler, timesteps).to(per_sample.device)
    clipped = snr.clamp(max=snr_gamma)
    if prediction_type == "epsilon":
        weight = torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    elif prediction_type == "v_prediction":
        weight = clipped / (snr + 1.0)
    else:
        weight = clipped
    return (per_sample * weight.detach()).mean()


def resource_loss(
    sample_macs_ratio: Tensor,
    code_macs_ratio: Tensor,
    target: float,
    spread_weight: float = 0.1,
    spread_margin: float = 0.1,
) -> Tensor:
    """Budget loss: ``|log(mean(sample_macs_ratio) / target)| + spread_weight * spread``.

    The spread term pushes the K codes' MACs ratios apart (so experts differ in cost) with a
    bounded hinge: ``spread = relu(1 - std(code_macs_ratio) / spread_margin)``. It lies in
    [0, 1], is 1 when all codes cost the same, and vanishes (with zero gradient) once the
    population standard deviation of the codes' ratios reaches ``spread_margin``: it cannot
    drive codes towards 0 or 1 without end, unlike an unbounded ``-std``. With one code the
    spread term is 0.

    Args:
        sample_macs_ratio: ``(B,)`` MACs ratio (pruned / dense) of each sample's relaxed mask.
        code_macs_ratio: ``(K,)`` MACs ratio of each code.
        target: target ratio of the batch mean, in (0, 1].
        spread_weight: weight of the spread term relative to the budget term.
        spread_margin: standard deviation of the codes' ratios beyond which the spread term stops.
    """
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"MACs target ratio must lie in (0, 1], got {target}.")
    if spread_margin <= 0:
        raise ConfigError(f"spread_margin must be > 0, got {spread_margin}.")
    if sample_macs_ratio.numel() == 0:
        raise ConfigError("resource_loss needs at least one sample MACs ratio.")
    mean_ratio = sample_macs_ratio.float().mean().clamp(min=1e-8)
    budget = torch.log(mean_ratio / target).abs()
    if code_macs_ratio.numel() < 2 or spread_weight == 0:
        return budget
    spread = F.relu(1.0 - code_macs_ratio.float().std(correction=0) / spread_margin)
    return budget + spread_weight * spread


def _offdiag_cosine_logits(vectors: Tensor, temperature: float) -> Tensor:
    normed = F.normalize(vectors.float(), dim=-1)
    logits = normed @ normed.T / temperature
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(eye, float("-inf"))


def contrastive_loss(
    router_vectors: Tensor,
    sentence_embeddings: Tensor,
    temperature: float = 0.03,
    unit_weights: Tensor | None = None,
) -> Tensor:
    """Match the prompt-to-prompt similarity structure of router vectors to the sentence embeddings'.

    For each prompt i, the target ``p_i = softmax_j(cos(e_i, e_j) / tau)`` over the other
    prompts j != i (sentence embeddings, no gradient) and the prediction
    ``log q_i = log_softmax_j(cos(r_i, r_j) / tau)`` (router vectors, optionally multiplied by
    ``unit_weights`` so every site counts equally, as in `group_weighted_cosine`) give the
    cross-entropy ``-sum_j p_ij log q_ij``, averaged over prompts. Its minimum (``q = p``) is
    the entropy of the target, not 0. A batch of one prompt has no pair: the loss is 0 (still
    connected to the graph).

    Args:
        router_vectors: ``(B, N)``.
        sentence_embeddings: ``(B, D)``.
        temperature: tau, shared by both sides.
        unit_weights: optional ``(N,)`` per-gate weights.
    """
    if temperature <= 0:
        raise ConfigError(f"contrastive temperature must be > 0, got {temperature}.")
    batch = router_vectors.shape[0]
    if sentence_embeddings.shape[0] != batch:
        raise ConfigError(
            f"contrastive_loss: {batch} router vectors but {sentence_embeddings.shape[0]} sentence embeddings."
        )
    if batch < 2:
        return router_vectors.sum() * 0.0
    if unit_weights is not None:
        router_vectors = router_vectors * unit_weights.to(router_vectors)
    with torch.no_grad():
        target = torch.softmax(_offdiag_cosine_logits(sentence_embeddings.detach(), temperature), dim=-1)
    log_pred = torch.log_softmax(_offdiag_cosine_logits(router_vectors, temperature), dim=-1)
    eye = torch.eye(batch, dtype=torch.bool, device=log_pred.device)
    # The diagonal holds 0 * -inf: zero it explicitly instead of letting it become NaN.
    terms = target * log_pred.masked_fill(eye, 0.0)
    return -terms.sum(dim=-1).mean()


def assignment_loss(scores: Tensor, assignment: Tensor, temperature: float = 0.1) -> Tensor:
    """Cross-entropy from the router's similarity logits ``scores / temperature`` to the assignment.

    Args:
        scores: ``(B, K)`` similarities (e.g. `group_weighted_cosine`), differentiable.
        assignment: ``(B,)`` target code per prompt (the Sinkhorn assignment; a constant).
        temperature: scales the cosine similarities into logits.
    """
    if temperature <= 0:
        raise ConfigError(f"assignment temperature must be > 0, got {temperature}.")
    if assignment.shape != scores.shape[:1]:
        raise ConfigError(f"assignment has shape {tuple(assignment.shape)}, expected ({scores.shape[0]},).")
    return F.cross_entropy(scores.float() / temperature, assignment.detach().long().to(scores.device))


def distillation_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    student_blocks: list[Tensor],
    teacher_blocks: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """Knowledge distillation from the dense teacher: ``(output_mse, block_mse)``.

    ``block_mse`` is the mean over blocks of each block output's MSE (0 when no block is given).
    Teacher tensors are detached.
    """
    if student_out.shape != teacher_out.shape:
        raise ConfigError(
            f"student output shape {tuple(student_out.shape)} differs from teacher {tuple(teacher_out.shape)}."
        )
    if len(student_blocks) != len(teacher_blocks):
        raise ConfigError(
            f"{len(student_blocks)} student block outputs but {len(teacher_blocks)} teacher block outputs; "
            "hook the same blocks on both models."
        )
    output_mse = F.mse_loss(student_out.float(), teacher_out.detach().float())
    if not student_blocks:
        return output_mse, student_out.new_zeros((), dtype=torch.float32)
    block_terms = []
    for index, (student, teacher) in enumerate(zip(student_blocks, teacher_blocks)):
        if student.shape != teacher.shape:
            raise ConfigError(
                f"block {index}: student output shape {tuple(student.shape)} differs from teacher {tuple(teacher.shape)}."
            )
        block_terms.append(F.mse_loss(student.float(), teacher.detach().float()))
    return output_mse, torch.stack(block_terms).mean()
