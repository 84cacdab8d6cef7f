"""Serving under load: a request queue and a worker thread that batches per expert.

    with GenerationServer(pipe, max_batch=4, max_wait=0.02) as server:
        future = server.submit("a red car", seed=7)
        result = future.result()              # a GenerationResult

`submit` checks the request at once (bad input raises there, in the caller's thread), draws
a seed when none is given, and returns a ``concurrent.futures.Future``. One worker thread
takes queued requests, routes every new arrival in one router call, and keeps them in one
pending list per (expert, options). A list is ready when it holds ``max_batch`` requests,
when its oldest request has waited ``max_wait`` seconds, or when the server is closing. A
request gives the same result batched or alone: its noise comes from its own seed (see
`aptp.runtime.pipeline`).

Which ready list runs next is expert-aware, because under a memory budget swapping an expert
in costs a session load (`aptp.runtime.residency`). Each ready list scores the age of its
oldest request, plus ``max_wait_s`` when its expert is the one that ran last or is resident;
the highest score runs, the expert that ran last winning ties. So an expert's queue is drained
before swapping and resident experts go first, yet a request is never passed over by a list
whose oldest request arrived more than ``max_wait_s`` after it: its wait beyond strict arrival
order is bounded and no expert starves. Without a budget every used expert stays resident and
the order is oldest first, draining the current expert. `stats` reports loads, evictions,
batch sizes, expert swaps and queue waits.

At most ``max_queue`` requests wait at any time (queued or pending, not yet running);
`submit` beyond that raises `QueueFullError` instead of letting latency grow without bound.
A failing batch is re-run one request at a time (`aptp.runtime.isolation`), so a request
that breaks its batch fails only its own future; the worker goes on with the next.

Shutdown always ends the worker. ``close()`` (and leaving a ``with`` block) runs every request
already submitted, then returns once the worker has ended; ``close(wait=False)`` returns at
once and fails every request that is not yet running with `ServerClosedError` (a running batch
still completes). Both work from any thread, the worker's own included (a future's
done-callback runs there): the worker cannot join itself, so there close only stops it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aptp.errors import AptpError, RuntimeInputError, shown

from .img2img import ImageRequest, image_arguments
from .isolation import run_isolated
from .pipeline import AptpPipeline, GenerationOptions, GenerationResult, ProgressCallback
from .tokenize import check_prompts

__all__ = ["GenerationServer", "QueueFullError", "ServerClosedError"]

logger = logging.getLogger(__name__)


class QueueFullError(AptpError):
    """The server already holds `max_queue` waiting requests: retry later or raise max_queue."""


class ServerClosedError(AptpError):
    """A request submitted to a server that is closing or closed."""


@dataclass
class _Request:
    prompt: str
    seed: int
    options: GenerationOptions
    future: Future
    arrived: float = field(default_factory=time.monotonic)
    expert: int | str | None = None
    route_time: float = 0.0
    negative_prompt: str | None = None
    callback: ProgressCallback | None = None
    image: ImageRequest | None = None  # img2img / inpainting


_STOP = object()
#: Longest batching wait accepted, in seconds (an hour; ``inf`` would hold requests forever).
MAX_WAIT = 3600.0


def _closed_error() -> ServerClosedError:
    return ServerClosedError("the generation server was closed before this request ran; submit it to a new server")


class GenerationServer:
    """A thread-safe front of an `AptpPipeline` that forms batches per expert.

    Args:
        pipeline: the pipeline to run (the server's worker is its only caller while serving;
            direct calls from other threads remain safe).
        max_batch: prompts per batch; default: the pipeline's ``max_batch`` (the export's).
        max_wait: seconds a request may wait for others to fill its batch.
        max_queue: requests that may wait at once; more are refused with `QueueFullError`.
        max_wait_s: the head start, in seconds of waiting, that the expert which ran last and
            resident experts get over others: a bound on how much longer than arrival order a
            request may wait for an expert swap.
    """

    def __init__(self, pipeline: AptpPipeline, *, max_batch: int | None = None, max_wait: float = 0.01,
                 max_queue: int = 64, max_wait_s: float = 5.0):
        max_batch = pipeline.max_batch if max_batch is None else max_batch
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise RuntimeInputError(f"max_batch must be an integer >= 1, got {shown(max_batch)}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise RuntimeInputError(f"max_queue must be an integer >= 1, got {shown(max_queue)}")
        if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or not 0 <= max_wait <= MAX_WAIT:
            raise RuntimeInputError(f"max_wait must be in [0, {MAX_WAIT:g}] seconds, got {shown(max_wait)}")
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or not 0 <= max_wait_s <= MAX_WAIT:
            raise RuntimeInputError(f"max_wait_s must be in [0, {MAX_WAIT:g}] seconds, got {shown(max_wait_s)}")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_wait = float(max_wait)
        self.max_queue = max_queue
        self.max_wait_s = float(max_wait_s)
        self._stats = _ServingStats(pipeline)
        self._last_expert: Any = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet running
        self._closing = False
        self._cancelled = False  # close(wait=False): fail what has not started
        self._worker = threading.Thread(target=self._run, name="aptp-generation-server", daemon=True)
        self._worker.start()

    # ---- client side ---------------------------------------------------------------------

    def submit(self, prompt: str, *, seed: int | None = None, guidance_scale: float | None = None,
               num_inference_steps: int | None = None, expert: int | str | None = None,
               output_type: str = "np", height: int | None = None, width: int | None = None,
               scheduler: str | None = None, steps: int | None = None,
               negative_prompt: str | None = None, callback: ProgressCallback | None = None,
               init_image: Any = None, strength: float | None = None, mask_image: Any = None,
               mask_blur: float | None = None) -> Future:
        """Queue one request; the future resolves to its `GenerationResult`.

        Options are `AptpPipeline.__call__`'s. `callback(step, total, expert)` reports this
        request's sampling steps from the worker thread; an exception it raises fails this
        request only (the others of its batch are re-run without it). Requests batch together only when every option
        (sampler and step count included) is equal; negative prompts may differ within a batch.
        img2img requests (`init_image`, `strength`, `mask_image`, `mask_blur` as in the pipeline)
        batch with requests of the same strength and masking, each with its own image.

        Raises:
            RuntimeInputError: a bad prompt or option (checked here, before queueing).
            QueueFullError: `max_queue` requests are already waiting.
            ServerClosedError: the server is closing.
        """
        (prompt,) = check_prompts([prompt])
        images, height, width, strength, inpaint = image_arguments(
            getattr(self.pipeline, "artifacts", None), init_image, mask_image, mask_blur, strength, 1, height, width)
        options = self.pipeline.options(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                        expert=expert, output_type=output_type, height=height, width=width,
                                        scheduler=scheduler, steps=steps, strength=strength, inpaint=inpaint)
        negatives = self.pipeline.check_negative_prompts(negative_prompt, 1)
        (seed,) = self.pipeline.check_seeds(None if seed is None else [seed], 1)
        if callback is not None and not callable(callback):
            raise RuntimeInputError(f"callback must be callable, got {shown(callback)}")
        request = _Request(prompt, seed, options, Future(), negative_prompt=None if negatives is None else negatives[0],
                           callback=callback, image=None if images is None else images[0])
        with self._lock:
            if self._closing:
                raise ServerClosedError("the generation server is closed; create a new one")
            if self._waiting >= self.max_queue:
                raise QueueFullError(f"the generation server already holds {self.max_queue} waiting requests "
                                     "(max_queue): retry later, or create it with a larger max_queue")
            self._waiting += 1
            self._queue.put(request)
        return request.future

    def generate(self, prompt: str, timeout: float | None = None, **options: Any) -> GenerationResult:
        """`submit` and wait for the result."""
        return self.submit(prompt, **options).result(timeout)

    def stats(self) -> dict[str, Any]:
        """Batches (count, sizes, per expert, expert swaps), queue waits (seconds from submit to
        the start of its batch: mean, p50, p95, max) and UNet session loads/evictions since the
        server started."""
        return self._stats.summary()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet running."""
        with self._lock:
            return self._waiting

    def close(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting requests and end the worker; safe from any thread, repeatable.

        Args:
            wait: ``True`` runs every request already submitted and waits for the worker to end.
                ``False`` fails every request not yet running with `ServerClosedError` and
                returns at once; the worker ends after the batch it is running, if any.
            timeout: with `wait`, the most seconds to wait for the worker (``None``: no limit).

        Returns:
            Whether the worker has ended. Called from the worker itself (a future's
            done-callback), close cannot wait for it and returns ``False``; the worker then ends
            as soon as that callback returns and the remaining work is done.
        """
        with self._lock:
            first = not self._closing
            self._closing = True
            if not wait:
                self._cancelled = True
            dropped = self._drain_queue() if not wait else []
            # Wakes the worker; also puts back a stop mark the drain took. Extra marks are harmless.
            self._queue.put(_STOP)
        if first:
            logger.debug("closing the generation server (wait=%s)", wait)
        self._fail(dropped, _closed_error())
        if threading.current_thread() is self._worker:
            return False  # joining itself would raise; the worker sees the stop mark next
        if wait:
            self._worker.join(timeout)
        return not self._worker.is_alive()

    def _drain_queue(self) -> list[_Request]:
        """Take every request still queued (the caller holds the lock and counts them as failed)."""
        drained: list[_Request] = []
        try:
            while True:
                item = self._queue.get_nowait()
                if item is not _STOP:
                    drained.append(item)
        except queue.Empty:
            pass
        return drained

    def __enter__(self) -> GenerationServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- worker side ---------------------------------------------------------------------

    def _run(self) -> None:
        pending: dict[tuple, deque[_Request]] = {}
        try:
            self._serve(pending)
        except BaseException:  # a bug in the loop: refuse new work instead of queueing it forever
            logger.exception("the generation server's worker failed; the server is closed")
            raise
        finally:
            with self._lock:
                self._closing = True
                left = [r for q in pending.values() for r in q] + self._drain_queue()
            self._fail(left, _closed_error())

    def _serve(self, pending: dict[tuple, deque[_Request]]) -> None:
        stopping = False
        while True:
            arrivals, stop = self._take(self._timeout(pending, stopping))
            stopping = stopping or stop
            if self._cancelled:
                self._fail(arrivals, _closed_error())
                return  # _run fails what is pending
            self._route(arrivals, pending)
            key = self._ready(pending, stopping)
            if key is not None:
                batch = [pending[key].popleft() for _ in range(min(self.max_batch, len(pending[key])))]
                if not pending[key]:
                    del pending[key]
                self._execute(batch)
            elif stopping and not pending:
                return

    def _timeout(self, pending: dict[tuple, deque[_Request]], stopping: bool) -> float | None:
        if stopping:
            return 0.0  # the stop mark is used up: never block on the queue again
        if not pending:
            return None  # sleep until a request (or the stop mark) arrives
        oldest = min(q[0].arrived for q in pending.values())
        return max(0.0, oldest + self.max_wait - time.monotonic())

    def _take(self, timeout: float | None) -> tuple[list[_Request], bool]:
        """Everything queued now, waiting up to `timeout` for the first item."""
        items: list[Any] = []
        try:
            items.append(self._queue.get(timeout=timeout) if timeout != 0.0 else self._queue.get_nowait())
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return [i for i in items if i is not _STOP], any(i is _STOP for i in items)

    def _route(self, arrivals: Sequence[_Request], pending: dict[tuple, deque[_Request]]) -> None:
        """Route new requests in one router call (one call each if it fails) and file them under
        (expert, options)."""
        to_route = [r for r in arrivals if r.options.expert is None]
        if to_route:
            clock = time.perf_counter()
            codes = run_isolated(lambda rs: self.pipeline.route([r.prompt for r in rs]).tolist(), to_route, "routing")
            per_request = (time.perf_counter() - clock) / len(to_route)
            for request, code in zip(to_route, codes):
                if isinstance(code, Exception):
                    self._fail([request], code)  # this request fails, the server goes on
                else:
                    request.expert, request.route_time = int(code), per_request
            arrivals = [r for r in arrivals if r.options.expert is not None or r.expert is not None]
        for request in arrivals:
            if request.expert is None:
                request.expert = request.options.expert
            pending.setdefault((request.expert, request.options), deque()).append(request)

    def _ready(self, pending: dict[tuple, deque[_Request]], stopping: bool) -> tuple | None:
        """The key of the list to run now (see the module docstring's order), or None to keep waiting."""
        now = time.monotonic()
        ready = [k for k, q in pending.items()
                 if stopping or len(q) >= self.max_batch or now - q[0].arrived >= self.max_wait]
        if not ready:
            return None

        residency = getattr(self.pipeline, "residency", None)

        def score(key: tuple) -> tuple[float, bool, float]:
            current = key[0] == self._last_expert
            warm = current or (residency is not None and residency.is_resident(_unet_key(key[0])))
            age = now - pending[key][0].arrived
            return (age + (self.max_wait_s if warm else 0.0), current, age)

        return max(ready, key=score)

    def _execute(self, batch: list[_Request]) -> None:
        with self._lock:
            self._waiting -= len(batch)
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not batch:
            return
        first = batch[0]
        options = dataclasses.replace(first.options, expert=first.expert)
        self._stats.batch(first.expert, [time.monotonic() - r.arrived for r in batch])
        self._last_expert = first.expert

        def run(requests: Sequence[_Request]) -> list[GenerationResult]:
            negatives = [r.negative_prompt for r in requests]
            # Only passed when used, so a pipeline wrapper without the argument still serves.
            extra: dict[str, Any] = {"negative_prompts": negatives} if any(negatives) else {}
            if options.strength is not None:  # equal options: every request of the batch has an image
                extra["init_images"] = [r.image for r in requests]
            callbacks = [r.callback for r in requests if r.callback is not None]
            if callbacks:
                extra["callback"] = _fan_out(callbacks)
            return self.pipeline.generate([r.prompt for r in requests], [r.seed for r in requests], options, **extra)

        for request, result in zip(batch, run_isolated(run, batch, f"batch on expert {first.expert}")):
            if isinstance(result, Exception):
                request.future.set_exception(result)
            else:
                result.timings["route"] = request.route_time
                request.future.set_result(result)

    def _fail(self, requests: Sequence[_Request], err: BaseException) -> None:
        """Fail requests that were waiting (not running); never called holding the lock, since
        done-callbacks run inside ``set_exception``."""
        if not requests:
            return
        with self._lock:
            self._waiting -= len(requests)
        for request in requests:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(err)


def _fan_out(callbacks: Sequence[ProgressCallback]) -> ProgressCallback:
    """One pipeline callback that reports a batch's step to each of its requests' callbacks."""
    def report(step: int, total: int, expert: Any) -> None:
        for callback in callbacks:
            callback(step, total, expert)
    return report


def _unet_key(expert: Any) -> Any:
    return expert if isinstance(expert, str) else int(expert)


class _ServingStats:
    """Counters behind `GenerationServer.stats` (updated by the worker, read by any thread)."""

    def __init__(self, pipeline: Any):
        self._lock = threading.Lock()
        self._residency = getattr(pipeline, "residency", None)
        self._base = self._counts()
        self.started = time.monotonic()
        self.sizes: list[int] = []
        self.waits: list[float] = []
        self.per_expert: dict[str, int] = {}
        self.swaps = 0
        self._last: Any = None

    def _counts(self) -> tuple[int, int]:
        r = self._residency
        return (r.loads, r.evictions) if r is not None else (0, 0)

    def batch(self, expert: Any, waits: Sequence[float]) -> None:
        with self._lock:
            self.sizes.append(len(waits))
            self.waits.extend(waits)
            self.per_expert[str(expert)] = self.per_expert.get(str(expert), 0) + 1
            if self._last is not None and expert != self._last:
                self.swaps += 1
            self._last = expert

    def summary(self) -> dict[str, Any]:
        with self._lock:
            loads, evictions = self._counts()
            waits = np.asarray(self.waits, dtype=np.float64)
            sizes = np.asarray(self.sizes, dtype=np.float64)

            def pct(q: float) -> float | None:
                return float(np.percentile(waits, q)) if waits.size else None

            return {
                "uptime_s": time.monotonic() - self.started,
                "requests": int(sizes.sum()),
                "batches": len(self.sizes),
                "batch_size_mean": float(sizes.mean()) if sizes.size else None,
                "batch_sizes": {str(int(k)): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))},
                "batches_per_expert": dict(self.per_expert),
                "expert_swaps": self.swaps,
                "queue_wait_s": {"mean": float(waits.mean()) if waits.size else None, "p50": pct(50), "p95": pct(95),
                                 "max": float(waits.max()) if waits.size else None},
                "loads": loads - self._base[0],
                "evictions": evictions - self._base[1],
            }
