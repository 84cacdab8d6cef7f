"""Prompt-to-code assignment: balanced (Sinkhorn-Knopp) while training, argmax at inference.

Training solves an entropic optimal-transport problem between the prompts of the *global*
batch (uniform mass) and the K codes (uniform mass) with cost ``-score``, so that every code
receives prompts even when all prompts prefer the same code. The plan is a target: no gradient
flows through it. Inference routes each prompt to its most similar code.
"""

from __future__ import annotations

import logging
from typing import Any

import ot
import torch
from torch import Tensor

from aptp.errors import ConfigError

__all__ = ["sinkhorn_plan", "balanced_assignment", "global_balanced_assignment", "route_argmax"]

logger = logging.getLogger(__name__)


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ConfigError(f"scores must be a non-empty (batch, codes) matrix, got shape {tuple(scores.shape)}.")
    if not bool(torch.isfinite(scores).all()):
        raise ConfigError("scores hold NaN or infinite values; check the router outputs and the code logits.")


def sinkhorn_plan(scores: Tensor, epsilon: float = 0.05, num_iters: int = 3) -> Tensor:
    """Balanced entropic OT plan ``(B, K)`` between B prompts and K codes, uniform marginals.

    Solved with POT's log-domain Sinkhorn (``ot.sinkhorn(method="sinkhorn_log")``, stable for
    small ``epsilon`` and large scores) in float64 with cost ``-scores``, for exactly
    ``num_iters`` iterations. Each iteration rescales columns then rows, so the row sums are
    exactly ``1/B`` and the column sums approach ``1/K`` with more iterations.

    Args:
        scores: ``(B, K)`` similarities (higher is better); detached, never differentiated.
        epsilon: entropic regularisation (smaller: closer to a hard assignment).
        num_iters: Sinkhorn iterations.

    Returns:
        ``(B, K)`` plan in ``scores``' dtype and device, summing to 1.
    """
    _check_scores(scores)
    if epsilon <= 0:
        raise ConfigError(f"Sinkhorn epsilon must be > 0, got {epsilon}.")
    if num_iters < 1:
        raise ConfigError(f"Sinkhorn num_iters must be >= 1, got {num_iters}.")
    with torch.no_grad():
        cost = -scores.detach().double()
        batch, codes = cost.shape
        row_mass = torch.full((batch,), 1.0 / batch, dtype=cost.dtype, device=cost.device)
        col_mass = torch.full((codes,), 1.0 / codes, dtype=cost.dtype, device=cost.device)
        # stopThr=0: always run num_iters iterations; warn=False: few iterations are intended.
        plan = ot.sinkhorn(
            row_mass, col_mass, cost, epsilon, method="sinkhorn_log", numItermax=num_iters, stopThr=0.0, warn=False
        )
    return plan.to(scores.dtype)


def balanced_assignment(scores: Tensor, epsilon: float = 0.05, num_iters: int = 3) -> Tensor:
    """``(B,)`` code index per prompt: the argmax of each row of the Sinkhorn plan."""
    return sinkhorn_plan(scores, epsilon, num_iters).argmax(dim=1)


def global_balanced_assignment(
    local_scores: Tensor,
    accelerator: Any | None = None,
    epsilon: float = 0.05,
    num_iters: int = 3,
) -> Tensor:
    """Balanced assignment solved once on the global batch, returned for this process's rows.

    With several processes the scores of all processes are gathered (``accelerator.gather``, in
    process order), the plan is solved on the whole batch (identically on every process), and
    this process's slice is returned. Local batch sizes may differ (e.g. the last batch of an
    epoch): they are exchanged first and the scores padded to the largest before the gather.

    Args:
        local_scores: ``(b, K)`` this process's similarities.
        accelerator: an ``accelerate.Accelerator`` (anything with ``num_processes``,
            ``process_index``, ``gather`` and ``pad_across_processes``) or ``None`` (single process).
        epsilon, num_iters: see `sinkhorn_plan`.

    Returns:
        ``(b,)`` long tensor on ``local_scores``' device.
    """
    _check_scores(local_scores)
    if accelerator is None or int(getattr(accelerator, "num_processes", 1)) <= 1:
        return balanced_assignment(local_scores, epsilon, num_iters)

    scores = local_scores.detach().contiguous()
    local_batch = scores.shape[0]
    sizes = accelerator.gather(torch.tensor([local_batch], device=scores.device, dtype=torch.long)).tolist()
    if len(set(sizes)) > 1:
        scores = accelerator.pad_across_processes(scores, dim=0)
    gathered = accelerator.gather(scores)
    padded = max(sizes)
    rows = [gathered[rank * padded : rank * padded + size] for rank, size in enumerate(sizes)]
    global_scores = torch.cat(rows, dim=0)

    assignment = balanced_assignment(global_scores, epsilon, num_iters)
    start = sum(sizes[: accelerator.process_index])
    return assignment[start : start + local_batch]


def route_argmax(scores: Tensor) -> Tensor:
    """Inference routing: ``(B,)`` index of the most similar code per prompt."""
    _check_scores(scores)
    return scores.argmax(dim=-1)
