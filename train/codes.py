"""Architecture codes: one trainable logit per gate, relaxed while training, hard when deployed.

A code is a flat vector over all N gates of a gate layout (every site, in the layout's fixed
traversal order). The keep probability of a gate is ``sigmoid(logit + base)``; the positive
``base`` (about 3) makes freshly initialised codes (logits near 0) keep almost everything.

Training samples a Gumbel-sigmoid relaxation ``sigmoid((logit + g + base) / T)`` with logistic
noise ``g`` drawn from an explicit ``torch.Generator`` so that a resumed run draws the same noise.
The deployed mask of a code is deterministic: ``sigmoid(logit + base) >= 0.5`` with no noise,
repaired so that no site that must stay non-empty ends up with every gate off.

Codes are data passed to calls (``relaxed``/``hard_masks`` return tensors); nothing here sets a
"current code" on a model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aptp.errors import ConfigError

__all__ = ["ArchitectureCodes", "relaxed_gates", "hard_gates", "enforce_nonempty_sites"]

# Keeps log(u) and log(1 - u) finite; the logistic noise is then bounded by about +-16.
_UNIFORM_EPS = 1e-7


def _logistic_noise(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Logistic noise ``log(u) - log(1 - u)``, ``u ~ U(0, 1)``, on ``like``'s device and dtype.

    With a generator the uniforms are drawn on the generator's device in float32 and moved
    afterwards: the noise then depends only on the generator state, not on where the logits live.
    """
    if generator is None:
        u = torch.rand(shape, device=like.device, dtype=torch.float32)
    else:
        u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    u = u.clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
    noise = torch.log(u) - torch.log1p(-u)
    return noise.to(device=like.device, dtype=like.dtype)


def _check_layout(num_gates: int, unit_site: Tensor, site_nonempty: Tensor) -> None:
    if unit_site.dim() != 1 or unit_site.numel() != num_gates:
        raise ConfigError(
            f"unit_site has shape {tuple(unit_site.shape)} but the codes have {num_gates} gates; "
            "pass the unit_site tensor of the gate layout the codes were built for."
        )
    if site_nonempty.dim() != 1:
        raise ConfigError(f"site_nonempty must be 1-D (one flag per site), got shape {tuple(site_nonempty.shape)}.")
    if num_gates and (int(unit_site.min()) < 0 or int(unit_site.max()) >= site_nonempty.numel()):
        raise ConfigError(
            f"unit_site holds site indices in [{int(unit_site.min())}, {int(unit_site.max())}] but "
            f"site_nonempty has only {site_nonempty.numel()} sites; both must come from the same gate layout."
        )


def enforce_nonempty_sites(
    mask: Tensor, scores: Tensor, unit_site: Tensor, site_nonempty: Tensor
) -> Tensor:
    """Switch on the highest-scoring gate of every non-empty site that has no gate on.

    Args:
        mask: ``(..., N)`` bool, the gates that are on.
        scores: ``(..., N)`` the ranking used to pick the gate to revive (ties: lowest index).
        unit_site: ``(N,)`` site index of each gate.
        site_nonempty: ``(S,)`` bool, sites that must keep at least one gate (False: depth gates).

    Returns:
        A new ``(..., N)`` bool mask; sites that already had a gate on are unchanged.
    """
    _check_layout(mask.shape[-1], unit_site, site_nonempty)
    num_gates, num_sites = mask.shape[-1], site_nonempty.numel()
    lead_shape = mask.shape[:-1]
    flat_mask = mask.reshape(-1, num_gates)
    flat_scores = scores.detach().reshape(-1, num_gates).float()
    rows = flat_mask.shape[0]
    device = mask.device
    site = unit_site.to(device).long().expand(rows, num_gates)
    nonempty = site_nonempty.to(device).bool()

    on_count = torch.zeros(rows, num_sites, device=device).scatter_add_(1, site, flat_mask.float())
    needs_gate = (on_count == 0) & nonempty  # (rows, S)
    if not bool(needs_gate.any()):
        return mask.clone()

    site_best = torch.full((rows, num_sites), float("-inf"), device=device)
    site_best = site_best.scatter_reduce(1, site, flat_scores, reduce="amax", include_self=True)
    is_best = flat_scores == site_best.gather(1, site)
    gate_index = torch.arange(num_gates, device=device).expand(rows, num_gates)
    # First (lowest-index) best gate of each site; `num_gates` marks sites without any gate.
    first_best = torch.full((rows, num_sites), num_gates, device=device, dtype=torch.long)
    first_best = first_best.scatter_reduce(
        1, site, torch.where(is_best, gate_index, num_gates), reduce="amin", include_self=True
    )
    revive = needs_gate & (first_best < num_gates)
    row_idx, site_idx = revive.nonzero(as_tuple=True)
    out = flat_mask.clone()
    out[row_idx, first_best[row_idx, site_idx]] = True
    return out.reshape(*lead_shape, num_gates)


def relaxed_gates(
    logits: Tensor,
    base: float,
    temperature: float,
    generator: torch.Generator | None,
    hard: bool = False,
    *,
    unit_site: Tensor | None = None,
    site_nonempty: Tensor | None = None,
) -> Tensor:
    """Gumbel-sigmoid relaxation of gates: ``sigmoid((logits + g + base) / T)``.

    Args:
        logits: ``(B, N)`` code logits (one row per sample).
        base: offset added to every logit (positive: start near "keep").
        temperature: ``T > 0``; lower is closer to hard 0/1.
        generator: source of the logistic noise ``g = log(u) - log(1 - u)``; the same generator
            state gives the same noise (resume determinism). ``None`` uses the global RNG.
        hard: return the straight-through estimator: forward is the 0/1 mask ``soft >= 0.5``,
            backward is the gradient of the soft relaxation.
        unit_site, site_nonempty: optional gate layout; with ``hard=True`` a site flagged
            non-empty whose sampled gates are all off gets its highest-sampled gate back on.

    Returns:
        ``(B, N)`` gate values in (0, 1) (soft) or {0, 1} (hard), differentiable w.r.t. logits.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}.")
    noise = _logistic_noise(logits.shape, generator, logits)
    soft = torch.sigmoid((logits + noise + base) / temperature)
    if not hard:
        return soft
    hard_mask = soft.detach() >= 0.5
    if unit_site is not None and site_nonempty is not None:
        hard_mask = enforce_nonempty_sites(hard_mask, soft.detach(), unit_site, site_nonempty)
    # Straight-through: value of the hard mask, gradient of the soft relaxation.
    return hard_mask.to(soft.dtype) - soft.detach() + soft


def hard_gates(logits: Tensor, base: float, unit_site: Tensor, site_nonempty: Tensor) -> Tensor:
    """Deterministic deployment mask ``sigmoid(logits + base) >= 0.5`` (no noise).

    Every site flagged in ``site_nonempty`` that would end with no gate on gets its
    highest-logit gate switched on; sites not flagged (depth gates) may be all off.

    Args:
        logits: ``(..., N)`` code logits.
        base: offset added to every logit.
        unit_site: ``(N,)`` site index of each gate.
        site_nonempty: ``(S,)`` bool.

    Returns:
        ``(..., N)`` bool mask.
    """
    with torch.no_grad():
        mask = torch.sigmoid(logits.detach() + base) >= 0.5
        return enforce_nonempty_sites(mask, logits, unit_site, site_nonempty)


class ArchitectureCodes(nn.Module):
    """K trainable architecture codes over N gates.

    Args:
        num_codes: K, number of codes (experts).
        num_gates: N, number of gates in the gate layout.
        base: offset added to the logits; about 3 starts every gate near "keep".
        temperature: Gumbel-sigmoid temperature of the training relaxation (may be annealed by
            assigning ``codes.temperature``).
        init_std: standard deviation of the normal initialisation of the logits around 0
            (breaks the symmetry between codes; uses the global RNG).
    """

    def __init__(
        self,
        num_codes: int,
        num_gates: int,
        base: float = 3.0,
        temperature: float = 0.4,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        if num_codes < 1:
            raise ConfigError(f"num_codes must be >= 1, got {num_codes}.")
        if num_gates < 1:
            raise ConfigError(f"num_gates must be >= 1, got {num_gates}; the gate layout has no gate to prune.")
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}.")
        if init_std < 0:
            raise ConfigError(f"init_std must be >= 0, got {init_std}.")
        self.num_codes = num_codes
        self.num_gates = num_gates
        self.base = float(base)
        self.temperature = float(temperature)
        self.logits = nn.Parameter(torch.randn(num_codes, num_gates) * init_std)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, num_gates={self.num_gates}, base={self.base}, temperature={self.temperature}"

    def relaxed(
        self,
        indices: Tensor,
        generator: torch.Generator | None,
        hard: bool = False,
        *,
        unit_site: Tensor | None = None,
        site_nonempty: Tensor | None = None,
    ) -> Tensor:
        """Relaxed gates ``(B, N)`` of the codes ``indices`` ``(B,)`` (see `relaxed_gates`)."""
        indices = indices.to(self.logits.device).long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ConfigError(f"code indices must lie in [0, {self.num_codes}), got {indices.tolist()}.")
        return relaxed_gates(
            self.logits[indices],
            self.base,
            self.temperature,
            generator,
            hard,
            unit_site=unit_site,
            site_nonempty=site_nonempty,
        )

    def hard_masks(self, unit_site: Tensor, site_nonempty: Tensor) -> Tensor:
        """Deterministic ``(K, N)`` bool masks of all codes (see `hard_gates`)."""
        return hard_gates(self.logits, self.base, unit_site, site_nonempty)

    def keep_probabilities(self) -> Tensor:
        """``(K, N)`` noise-free keep probabilities ``sigmoid(logits + base)``."""
        return torch.sigmoid(self.logits + self.base)
