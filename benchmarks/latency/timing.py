"""One timing discipline: warm up, then interleave repetitions round-robin with a rotating order;
medians with quartiles. What machine the figures came from is `aptp.benchmarks.machine`."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

from ..machine import machine_info, now_iso  # noqa: F401  (re-exported: the latency suite's names)


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, IQR, min and max of timing samples (seconds), and the samples."""
    values = sorted(float(s) for s in samples)
    if not values:
        raise ValueError("no samples")
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median_s": statistics.median(values), "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1,
            "min_s": values[0], "max_s": values[-1], "n": len(values), "samples_s": list(samples)}


def interleaved(calls: Mapping[str, Callable[[], Any]], repeats: int, warmup: int, in_a_row: int = 1,
                first: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Warm every call up, then time `repeats` rounds, each round running every call in an order
    rotated by one per round.

    With ``in_a_row > 1`` each turn makes that many consecutive calls, as a sampling loop does
    on one UNet: the samples are the calls after the first, and the first call of each turn
    (the one right after another model ran) goes to ``first[name]`` when `first` is given."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            for i in range(in_a_row):
                start = time.perf_counter()
                calls[name]()
                elapsed = time.perf_counter() - start
                if i == 0 and in_a_row > 1:
                    if first is not None:
                        first.setdefault(name, []).append(elapsed)
                else:
                    samples[name].append(elapsed)
    return samples
