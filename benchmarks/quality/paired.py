"""Per-prompt scores and paired bootstrap intervals, overall and per prompt family.

Every row of a quality run renders the same prompts from the same noise, so rows are compared
prompt by prompt: a difference between two rows is bootstrapped over prompts (resampling the
same prompt indices for both), which removes the between-prompt variance an unpaired comparison
of two means would carry.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["per_prompt_alignment", "bootstrap_mean", "family_summary", "paired_family_difference"]


def per_prompt_alignment(predicted: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(n,) fraction of each prompt's attributes the classifier reads right (its mean over prompts
    is the table's "alignment mean")."""
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predictions for {len(targets)} prompts")
    return np.array([np.mean([p[name] == t[name] for name in t]) for p, t in zip(predicted, targets)], dtype=float)


def bootstrap_mean(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean and percentile 95% interval of the mean over `resamples` bootstrap draws."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    return {"mean": float(values.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "n": int(values.size)}


def family_summary(scores: np.ndarray, families: Sequence[str], resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """`bootstrap_mean` of per-prompt scores for every family and for all prompts (``"all"``)."""
    families = np.asarray(families)
    out = {name: bootstrap_mean(scores[families == name], resamples, seed) for name in sorted(set(families.tolist()))}
    out["all"] = bootstrap_mean(scores, resamples, seed)
    return out


def paired_family_difference(a: np.ndarray, b: np.ndarray, families: Sequence[str], resamples: int = 2000,
                             seed: int = 0) -> dict[str, dict[str, float]]:
    """Per family (and ``"all"``): mean of ``a - b`` over the same prompts, with a paired 95% interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same prompts: {a.shape} vs {b.shape}")
    return family_summary(a - b, families, resamples, seed)
