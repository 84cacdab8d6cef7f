"""GenerationServer shutdown never hangs: with or without waiting, from any thread.

A fake pipeline (no export needed) whose batches can be held open by a gate stands in for
`AptpPipeline`. Every wait in these tests is bounded: a regression fails them, it does not
hang the suite (`_bounded` runs a call in a daemon thread and gives up after its timeout).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from aptp.errors import ArtifactError
from aptp.runtime import GenerationServer, ServerClosedError
from aptp.runtime.pipeline import GenerationOptions, GenerationResult

LIMIT = 20.0  # seconds any single step may take before the test fails


class FakePipeline:
    """What the server needs of `AptpPipeline`; ``gate`` holds every batch until set."""

    max_batch = 2

    def __init__(self, fail_route_on: str | None = None):
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[str]] = []
        self.fail_route_on = fail_route_on

    def options(self, *, expert=None, output_type="np", **_):
        return GenerationOptions(7.5, 4, 32, 32, expert, output_type)

    def check_negative_prompts(self, negative, count):
        return None

    def check_seeds(self, seeds, count):
        return [0] * count if seeds is None else list(seeds)

    def route(self, prompts):
        if self.fail_route_on in prompts:
            raise ArtifactError(f"simulated router failure on {self.fail_route_on!r}")
        return np.zeros(len(prompts), dtype=np.int64)

    def generate(self, prompts, seeds, options, codes=None, negative_prompts=None):
        self.entered.set()
        assert self.gate.wait(timeout=LIMIT), "test gate never opened"
        self.batches.append(list(prompts))
        return [GenerationResult(p, s, options.expert or 0, np.zeros((4, 4, 4), np.float32)) for p, s in zip(prompts, seeds)]


def _bounded(fn, timeout: float = LIMIT):
    """``fn()`` in a daemon thread; fails the test if it has not returned after `timeout` s."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {timeout} s (hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _held_server(fake: FakePipeline, waiting: int) -> tuple[GenerationServer, Future, list[Future]]:
    """A server whose worker is inside a held batch, with `waiting` more requests queued."""
    fake.gate.clear()
    server = GenerationServer(fake, max_batch=1, max_wait=0.0, max_queue=16)
    running = server.submit("running", seed=1)
    assert fake.entered.wait(LIMIT)
    queued = [server.submit(f"waiting {i}", seed=2 + i) for i in range(waiting)]
    return server, running, queued


def test_close_with_waiting_requests_runs_them_and_returns():
    fake = FakePipeline()
    server, running, queued = _held_server(fake, waiting=3)
    threading.Timer(0.2, fake.gate.set).start()
    assert _bounded(server.close) is True
    assert not server._worker.is_alive()
    assert [f.result(0).prompt for f in (running, *queued)] == ["running", "waiting 0", "waiting 1", "waiting 2"]
    assert server.waiting == 0


def test_close_without_waiting_fails_the_waiting_and_ends_the_worker():
    fake = FakePipeline()
    server, running, queued = _held_server(fake, waiting=3)
    clock = time.monotonic()
    assert _bounded(lambda: server.close(wait=False)) is False  # the held batch is still running
    assert time.monotonic() - clock < LIMIT
    for future in queued:
        with pytest.raises(ServerClosedError, match="closed before this request ran"):
            future.result(timeout=LIMIT)
    assert server.waiting == 0
    fake.gate.set()
    assert running.result(timeout=LIMIT).prompt == "running"  # a running batch completes
    server._worker.join(LIMIT)
    assert not server._worker.is_alive()
    assert fake.batches == [["running"]]
    with pytest.raises(ServerClosedError):
        server.submit("late")


def test_close_without_waiting_fails_requests_the_worker_already_holds():
    fake = FakePipeline()
    # A long max_wait keeps a request pending inside the worker (taken, routed, not run).
    server = GenerationServer(fake, max_batch=4, max_wait=60.0)
    pending = server.submit("pending", seed=1)
    deadline = time.monotonic() + LIMIT
    while server._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    _bounded(lambda: server.close(wait=False))
    with pytest.raises(ServerClosedError):
        pending.result(timeout=LIMIT)
    server._worker.join(LIMIT)
    assert not server._worker.is_alive() and fake.batches == []


@pytest.mark.parametrize("wait", [True, False])
def test_close_from_a_done_callback_ends_the_worker(wait):
    fake = FakePipeline()
    server = GenerationServer(fake, max_batch=1, max_wait=0.0)
    seen: dict = {}

    def callback(future: Future) -> None:
        try:
            seen["returned"] = server.close(wait=wait)
        except BaseException as err:  # noqa: BLE001 - recorded: Future would only log it
            seen["error"] = err

    fake.gate.clear()
    first = server.submit("first", seed=1)
    assert fake.entered.wait(LIMIT)
    later = server.submit("later", seed=2)
    first.add_done_callback(callback)
    fake.gate.set()
    assert first.result(timeout=LIMIT).prompt == "first"
    server._worker.join(LIMIT)
    assert not server._worker.is_alive()
    assert "error" not in seen, seen.get("error")
    assert seen["returned"] is False  # the worker cannot join itself; it stopped instead
    if wait:
        assert later.result(timeout=0).prompt == "later"
    else:
        with pytest.raises(ServerClosedError):
            later.result(timeout=0)


def test_with_block_exits_with_requests_still_waiting():
    fake = FakePipeline()

    def program():
        fake.gate.clear()
        with GenerationServer(fake, max_batch=1, max_wait=0.0) as server:
            futures = [server.submit(f"p{i}", seed=i) for i in range(4)]
            threading.Timer(0.2, fake.gate.set).start()
        return server, futures

    server, futures = _bounded(program)
    assert not server._worker.is_alive()
    assert [f.result(0).prompt for f in futures] == ["p0", "p1", "p2", "p3"]


def test_close_is_repeatable_and_can_stop_waiting_midway():
    fake = FakePipeline()
    server, running, queued = _held_server(fake, waiting=2)
    assert _bounded(lambda: server.close(timeout=0.1)) is False  # timed out waiting: still running
    assert _bounded(lambda: server.close(wait=False)) is False  # escalate: drop what waits
    for future in queued:
        with pytest.raises(ServerClosedError):
            future.result(timeout=LIMIT)
    fake.gate.set()
    assert _bounded(server.close) is True
    assert running.result(0).prompt == "running"


def test_bad_request_then_good_one_keeps_serving():
    fake = FakePipeline(fail_route_on="poison")
    with GenerationServer(fake, max_batch=2, max_wait=0.0) as server:
        bad = server.submit("poison", seed=1)
        with pytest.raises(ArtifactError, match="simulated router failure"):
            bad.result(timeout=LIMIT)
        assert server.generate("fine", seed=2, timeout=LIMIT).prompt == "fine"
    assert not server._worker.is_alive()


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_queue": 0}, {"max_wait": -1.0},
                                    {"max_wait": float("inf")}, {"max_wait": float("nan")}, {"max_queue": 2.5}])
def test_bad_server_arguments_are_typed_errors(kwargs):
    from aptp.errors import RuntimeInputError

    with pytest.raises(RuntimeInputError, match=next(iter(kwargs))):
        GenerationServer(FakePipeline(), **kwargs)
