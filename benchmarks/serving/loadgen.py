"""An open-loop load generator: seeded Poisson arrivals, bounded in count and time.

    arrivals = poisson_arrivals(rate=2.0, count=40, seed=0, max_seconds=30)
    outcomes = run_open_loop(lambda i: server.submit(prompts[i], seed=i), arrivals, drain_s=60)
    stats = summarize_load(outcomes, rate=2.0, slo_s=5.0)

Open loop: request ``i`` is sent at its scheduled arrival whatever happened to the earlier
ones, so a server that falls behind builds a queue and its latency grows, as under real
traffic (a closed loop would slow its own arrivals and hide that). Latency is measured from the
scheduled arrival to the completion, so a late send counts against the server too. `send`
returns a `concurrent.futures.Future` whose result is a mapping with the request's ``expert``
and ``batch_size`` (where known). Nothing here opens a socket: the caller's `send` decides the
transport (the serving suite uses 127.0.0.1 only).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Outcome", "interleaved_times", "poisson_arrivals", "run_open_loop", "summarize_load"]


def poisson_arrivals(rate: float, count: int, seed: int, max_seconds: float) -> np.ndarray:
    """Arrival times (seconds from the start) of a Poisson process at `rate` per second: at most
    `count` arrivals, none at or after `max_seconds`; the first at 0."""
    if not rate > 0 or count < 1 or not max_seconds > 0:
        raise ValueError(f"need rate > 0, count >= 1, max_seconds > 0; got {rate}, {count}, {max_seconds}")
    gaps = np.random.Generator(np.random.PCG64(seed)).exponential(1.0 / rate, count)
    times = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    return times[times < max_seconds]


@dataclass
class Outcome:
    """One request: scheduled and actual send times, completion time (monotonic seconds)."""

    index: int
    scheduled: float
    sent: float
    done: float | None = None
    error: str | None = None
    expert: Any = None
    batch_size: int | None = None

    @property
    def ok(self) -> bool:
        return self.done is not None and self.error is None

    @property
    def latency(self) -> float | None:
        return None if self.done is None else self.done - self.scheduled


def run_open_loop(send: Callable[[int], Future], arrivals: Sequence[float], drain_s: float) -> list[Outcome]:
    """Send request ``i`` at ``arrivals[i]``; wait at most `drain_s` after the last send.

    A request still running at the deadline is recorded with error ``"timeout"``; one whose
    `send` raises (e.g. a full queue) with that error.
    """
    outcomes: list[Outcome] = []
    futures: list[Future | None] = []
    lock = threading.Lock()
    start = time.monotonic()

    def finished(outcome: Outcome, future: Future) -> None:
        now = time.monotonic()
        with lock:
            try:
                result = future.result()
            except BaseException as err:  # noqa: BLE001 - any failure is this request's outcome
                outcome.error = f"{type(err).__name__}: {err}"
            else:
                outcome.expert = result.get("expert")
                outcome.batch_size = result.get("batch_size")
            outcome.done = now

    for i, at in enumerate(arrivals):
        delay = start + float(at) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        outcome = Outcome(index=i, scheduled=start + float(at), sent=time.monotonic())
        outcomes.append(outcome)
        try:
            future = send(i)
        except Exception as err:  # noqa: BLE001 - refused at once (queue full, bad request)
            outcome.error, outcome.done = f"{type(err).__name__}: {err}", time.monotonic()
            futures.append(None)
            continue
        futures.append(future)
        future.add_done_callback(lambda f, o=outcome: finished(o, f))
    deadline = time.monotonic() + drain_s
    for future in futures:
        if future is not None:
            try:
                future.exception(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a timeout here is recorded below
                pass
    with lock:
        for outcome in outcomes:
            if outcome.done is None:
                outcome.error = "timeout"
        return [Outcome(**vars(o)) for o in outcomes]


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize_load(outcomes: Sequence[Outcome], rate: float, slo_s: float) -> dict[str, Any]:
    """Throughput, latency percentiles, errors and batches per expert of one run at `rate`.

    ``sustained`` is true when every request completed and the p95 latency is within `slo_s`.
    Batches per expert are counted from each request's batch size (a request in a batch of
    ``b`` is ``1/b`` of a batch), so ``mean_batch`` = requests / batches.
    """
    ok = [o for o in outcomes if o.ok]
    latencies = [o.latency for o in ok]
    span = (max(o.done for o in ok) - min(o.scheduled for o in outcomes)) if ok else None
    per_expert: dict[str, dict[str, float]] = {}
    for o in ok:
        if o.batch_size:
            entry = per_expert.setdefault(str(o.expert), {"requests": 0, "batches": 0.0})
            entry["requests"] += 1
            entry["batches"] += 1.0 / o.batch_size
    for entry in per_expert.values():
        entry["mean_batch"] = entry["requests"] / entry["batches"]
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            key = (o.error or "").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    p95 = _percentile(latencies, 95)
    return {
        "offered_rate": float(rate), "requests": len(outcomes), "completed": len(ok), "errors": errors,
        "arrival_span_s": float(outcomes[-1].scheduled - outcomes[0].scheduled) if outcomes else 0.0,
        "throughput": (len(ok) / span) if span else None,
        "p50_s": _percentile(latencies, 50), "p95_s": p95, "p99_s": _percentile(latencies, 99),
        "mean_s": float(np.mean(latencies)) if latencies else None,
        "batches": per_expert,
        "mean_batch": (sum(e["requests"] for e in per_expert.values())
                       / sum(e["batches"] for e in per_expert.values())) if per_expert else None,
        "sustained": len(ok) == len(outcomes) and p95 is not None and p95 <= slo_s,
    }


def highest_sustained(runs: Sequence[Mapping[str, Any]]) -> float | None:
    """The highest offered rate sustained with every lower rate sustained too."""
    best = None
    for run in sorted(runs, key=lambda r: r["offered_rate"]):
        if not run["sustained"]:
            break
        best = run["offered_rate"]
    return best


def interleaved_times(first: Callable[[int], Any], second: Callable[[int], Any], n: int
                      ) -> tuple[list[float], list[float]]:
    """Seconds of ``first(i)`` and ``second(i)`` for i in 0..n, one after the other, their order
    alternating so load drift hits both alike; round 0 warms both up and is dropped."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(n + 1):
        for k in ((0, 1) if i % 2 else (1, 0)):
            clock = time.perf_counter()
            (first, second)[k](i)
            times[k].append(time.perf_counter() - clock)
    return times[0][1:], times[1][1:]
