"""Which UNet runs a request needs, and running them one after another or several at once.

A routed request is grouped by expert code; each group runs its whole sampling loop on its
expert's UNet, in chunks of at most ``max_batch`` prompts (`plan_runs`). Rows are independent
through the loop, so the runs are too, and `run_all` can execute them concurrently.

Why concurrent runs (measured 2026-12-06 on 2 cores, narrow SD 2.1 UNets at 128 px, 4 experts
with 2 prompts each, 4 steps, docs/performance-log.md): one UNet call spread over both cores by
onnxruntime's intra-op threads ran only 1.3-1.7x faster than on one core, while two runs on one
thread each, side by side, scale almost perfectly; four expert groups took 1.11-1.49x less time
as two concurrent runs of one thread each than one after another with two threads (the spread
is the machine's, between runs). A request with fewer runs than workers (one prompt, or every
prompt on one expert) would leave workers idle, so each of its UNet calls is split by rows
between them (`RowSplitEngine`), which ran as fast as one call with every thread or slightly
faster (1.05-1.07x).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from aptp.errors import RuntimeInputError

__all__ = ["MAX_WORKERS", "RowSplitEngine", "RunPool", "RunCancelled", "UnetRun", "check_workers", "plan_runs",
           "parse_workers", "resolve_workers", "row_parts", "row_slices", "run_all"]

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
        raise RuntimeInputError(f"{name} must be an integer in [1, {MAX_WORKERS}] or 'auto' (UNet runs at once; "
                                f"1 runs expert groups one after another), got {value!r}")
    return int(value)


def parse_workers(text: str | None, name: str = "--workers") -> int | str:
    """A command line's workers value: ``"auto"`` (also for ``None``) or a checked integer.

    Raises:
        RuntimeInputError: anything else, naming `name` and what it accepts.
    """
    if text is None or text == "auto":
        return "auto"
    try:
        value: object = int(text)
    except ValueError:
        value = text
    return check_workers(value, name)


def resolve_workers(value: object, device: str, threads: int, name: str = "workers") -> int:
    """``"auto"``: 2 on CPU with at least 2 threads (what this module's measurements favour),
    else 1; an integer is checked by `check_workers`."""
    if value == "auto":
        return 2 if device == "cpu" and threads >= 2 else 1
    return check_workers(value, name)


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
    """The threads of a pipeline's concurrent UNet work, created on first use (pipelines made
    by `with_scheduler` share them): `runs` executes whole runs (`run_all`), `parts` the row
    parts of one call (`RowSplitEngine`). Two pools, so that a run waiting for its parts never
    waits behind other runs (which would deadlock a full pool)."""

    def __init__(self, workers: int):
        self.workers = check_workers(workers)
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def _pool(self, kind: str, size: int) -> ThreadPoolExecutor | None:
        if size < 1:
            return None
        with self._lock:
            if kind not in self._pools:
                self._pools[kind] = ThreadPoolExecutor(size, thread_name_prefix=f"aptp-unet-{kind}")
            return self._pools[kind]

    def runs(self) -> ThreadPoolExecutor | None:
        return self._pool("runs", self.workers if self.workers > 1 else 0)

    def parts(self) -> ThreadPoolExecutor | None:
        return self._pool("parts", self.workers - 1)

    def shutdown(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True)


def row_parts(workers: int, runs: int) -> int:
    """Row slices each UNet call of a request with `runs` runs is split into: the idle workers'
    share (1 when every worker has a run)."""
    return max(1, workers // max(1, runs))


def row_slices(rows: int, parts: int) -> list[slice]:
    """`rows` cut into at most `parts` contiguous slices of near-equal size (larger first)."""
    parts = max(1, min(parts, rows))
    size, extra = divmod(rows, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class RowSplitEngine:
    """A UNet engine whose calls run as `parts` row slices at once: the idle workers of a
    request with fewer runs than workers (one prompt: its unconditional and conditional rows).

    Every input's first dimension is the batch (``sample``, ``timestep``,
    ``encoder_hidden_states``), and a row's output does not depend on the other rows, so the
    outputs are the slices' outputs stacked. The first slice runs in the calling thread.
    Measured on 2 cores (narrow SD 2.1 UNets, 128 px): two halves on one-thread sessions ran
    1.05-1.07x faster than one call with two threads, batch 2 and 8 alike.
    """

    def __init__(self, engine: Any, parts: int, pool: ThreadPoolExecutor):
        self.engine, self.parts, self.pool = engine, int(parts), pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def infer(self, feed: Mapping[str, Any], stream: Any = None) -> dict[str, Any]:
        pieces = row_slices(len(next(iter(feed.values()))), self.parts)
        if len(pieces) < 2:
            return self.engine.infer(feed)
        slices = [{name: value[piece] for name, value in feed.items()} for piece in pieces]
        others = [self.pool.submit(self.engine.infer, part) for part in slices[1:]]
        try:
            results = [self.engine.infer(slices[0])]
        finally:
            results += [future.result() for future in others]  # never leave a slice running
        return {name: np.concatenate([np.asarray(r[name]) for r in results]) for name in results[0]}


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
        while True:
            try:
                done.append(future.result())
            except RunCancelled:
                pass
            except BaseException as err:  # noqa: BLE001 - re-raised below, first one wins
                # A run failed, or the wait itself was interrupted (Ctrl-C): the runs stop at their
                # next step, and this one is waited for again until it has.
                cancel.set()
                error = error or err
                if not future.done():
                    continue
            break
    if error is not None:
        raise error
    return done
