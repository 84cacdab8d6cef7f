"""Which UNet runs a request needs, and running them one after another or several at once.

A routed request is grouped by expert code; each group runs its whole sampling loop on its
expert's UNet, in chunks of at most ``max_batch`` prompts (`plan_runs`). Rows are independent
through the loop, so the runs are too, and `run_all` can execute them concurrently.

Why concurrent runs (measured 2026-12-06 on 2 cores, narrow SD 2.1 UNets at 128 px, 4 experts
with 2 prompts each, 4 steps, docs/performance-log.md): one UNet call spread over both cores by
onnxruntime's intra-op threads ran only 1.3-1.7x faster than on one core, while two runs on one
thread each, side by side, scale almost perfectly; four expert groups took 1.11-1.49x less time
as two concurrent runs of one thread each than one after another with two threads (the spread
is the machine's, between runs). The price: a request that is one run (one prompt, or every
prompt on one expert) gets only ``threads // workers`` threads, so an interactive single-prompt
server keeps ``workers=1``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from aptp.errors import RuntimeInputError

__all__ = ["MAX_WORKERS", "RunPool", "RunCancelled", "UnetRun", "check_workers", "plan_runs", "run_all"]

#: Most concurrent UNet runs a pipeline may ask for.
MAX_WORKERS = 64

T = TypeVar("T")


class RunCancelled(Exception):
    """A concurrent run stopped at a step boundary because another run of its request failed."""


@dataclass(frozen=True)
class UnetRun:
    """One sampling loop: the prompts `rows` (indices into the request) on UNet `slot`
    (an expert code, or ``num_codes`` for the dense UNet)."""

    slot: int
    rows: np.ndarray

    @property
    def size(self) -> int:
        return int(self.rows.size)


def check_workers(value: object, name: str = "workers") -> int:
    """`value` as a count of concurrent UNet runs in ``[1, MAX_WORKERS]``.

    Raises:
        RuntimeInputError: not an integer in range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_WORKERS:
        raise RuntimeInputError(f"{name} must be an integer in [1, {MAX_WORKERS}] (UNet runs at once; 1 runs "
                                f"expert groups one after another), got {value!r}")
    return int(value)


def plan_runs(order: np.ndarray, offsets: np.ndarray, max_batch: int, workers: int = 1,
              cost: Callable[[int], float] | None = None) -> list[UnetRun]:
    """The runs of a request grouped by `kernels.group_by_code` (`order`, `offsets`).

    Each slot's prompts run in chunks of at most `max_batch`, in slot order. With ``workers > 1``
    and fewer runs than workers, the run with the most prompts is halved until every worker has
    one or no run has two prompts left; the runs are then ordered by estimated cost, largest
    first (rows times `cost(slot)`, e.g. the UNet's MACs ratio), so the longest starts first.
    """
    runs = []
    for slot in range(len(offsets) - 1):
        group = order[offsets[slot]:offsets[slot + 1]]
        runs += [UnetRun(slot, group[start:start + max_batch]) for start in range(0, group.size, max_batch)]
    if workers <= 1:
        return runs
    while len(runs) < workers:
        largest = max(range(len(runs)), key=lambda i: runs[i].size, default=None)
        if largest is None or runs[largest].size < 2:
            break
        run = runs.pop(largest)
        half = (run.size + 1) // 2
        runs[largest:largest] = [UnetRun(run.slot, run.rows[:half]), UnetRun(run.slot, run.rows[half:])]
    weight = cost or (lambda slot: 1.0)
    return sorted(runs, key=lambda r: -r.size * weight(r.slot))


class RunPool:
    """The threads that run a pipeline's UNet runs concurrently: none for one worker, else a
    `ThreadPoolExecutor` created on first use (pipelines made by `with_scheduler` share it)."""

    def __init__(self, workers: int):
        self.workers = check_workers(workers)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> ThreadPoolExecutor | None:
        if self.workers == 1:
            return None
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="aptp-unet-run")
            return self._executor

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


@dataclass
class Finished(Generic[T]):
    run: UnetRun
    value: T
    seconds: float


def run_all(runs: Sequence[UnetRun], execute: Callable[[UnetRun, threading.Event], T],
            executor: ThreadPoolExecutor | None = None) -> list[Finished[T]]:
    """``execute(run, cancel)`` for every run, in `runs`' order without an `executor`, else
    concurrently on it. The first exception is raised once every run has stopped; `cancel` is
    set when a run fails, and `execute` should stop at its next step boundary when it sees it
    (raising `RunCancelled`), so that a failed request does not keep the cores busy."""
    cancel = threading.Event()

    def timed(run: UnetRun) -> Finished[T]:
        start = time.perf_counter()
        try:
            value = execute(run, cancel)
        except BaseException:
            cancel.set()
            raise
        return Finished(run, value, time.perf_counter() - start)

    if executor is None or len(runs) <= 1:
        return [timed(run) for run in runs]
    futures = [executor.submit(timed, run) for run in runs]
    done: list[Finished[T]] = []
    error: BaseException | None = None
    for future in futures:  # wait for all: a run still on a session must not outlive the request
        try:
            done.append(future.result())
        except RunCancelled:
            pass
        except BaseException as err:  # noqa: BLE001 - re-raised below, first one wins
            error = error or err
    if error is not None:
        raise error
    return done
