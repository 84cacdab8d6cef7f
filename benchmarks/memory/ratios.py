"""The figures a memory run is judged by, shared by the suite's checks and its report: the RSS of
the pinned parts, the peak over the budget and the throughput against the reference budget."""

from __future__ import annotations

from typing import Any

__all__ = ["peak_over_budget", "pinned_rss", "throughput_vs_reference"]


def pinned_rss(run: dict[str, Any]) -> int:
    """RSS of the parts outside the budget (router, text encoder, VAE decoder) at work: sampled
    before the first UNet load, else (older results) right after they were loaded."""
    return run.get("pinned_working_rss_bytes") or run["baseline_rss_bytes"]


def peak_over_budget(run: dict[str, Any]) -> float | None:
    """(peak RSS - the pinned parts at work) / budget of a budgeted run; None when unlimited."""
    return None if run["budget_bytes"] is None else (run["peak_rss_bytes"] - pinned_rss(run)) / run["budget_bytes"]


def throughput_vs_reference(run: dict[str, Any], runs: list[dict[str, Any]]) -> float:
    """`run`'s throughput over its round's reference run (the first budget of its precision)."""
    same = [r for r in runs if r["precision"] == run["precision"] and r.get("round", 0) == run.get("round", 0)]
    return run["throughput_rps"] / same[0]["throughput_rps"]
