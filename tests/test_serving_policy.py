"""Expert-aware batch order of `GenerationServer` (drain the current expert, bounded by
``max_wait_s``), on a fake pipeline that records which expert each batch ran on."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from aptp.errors import RuntimeInputError

from aptp.runtime.pipeline import GenerationOptions, GenerationResult
from aptp.runtime.serving import GenerationServer


class FakePipeline:
    max_batch = 2

    def __init__(self):
        self.order: list[object] = []
        self.gate = threading.Event()
        self.first = threading.Event()

    def options(self, *, expert=None, **_):
        return GenerationOptions(7.5, 2, 64, 64, expert, "latent")

    def check_negative_prompts(self, negative, count):
        return None

    def check_seeds(self, seeds, count):
        return [0] * count if seeds is None else list(seeds)

    def route(self, prompts):
        return np.zeros(len(prompts), dtype=np.int64)

    def generate(self, prompts, seeds, options, codes=None, negative_prompts=None):
        self.order.append(options.expert)
        self.first.set()
        self.gate.wait(30)  # the first batch holds the worker while the backlog is submitted
        return [GenerationResult(p, s, options.expert, np.zeros((4, 8, 8), np.float32)) for p, s in zip(prompts, seeds)]


def _serve(max_wait_s: float) -> tuple[list[object], dict]:
    pipe = FakePipeline()
    with GenerationServer(pipe, max_batch=2, max_wait=0.0, max_wait_s=max_wait_s, max_queue=64) as server:
        blocker = server.submit("first", expert=2)
        assert pipe.first.wait(30)
        futures = [server.submit(f"p{i}", expert=i % 2, seed=i) for i in range(16)]  # 0, 1, 0, 1, ...
        pipe.gate.set()
        for f in [blocker, *futures]:
            f.result(timeout=30)
        stats = server.stats()
    return pipe.order[1:], stats


def test_the_current_expert_is_drained_before_swapping():
    order, stats = _serve(max_wait_s=60.0)
    assert order == [0, 0, 0, 0, 1, 1, 1, 1]
    assert stats["requests"] == 17 and stats["batches"] == 9 and stats["expert_swaps"] == 2
    assert stats["batch_sizes"] == {"1": 1, "2": 8}
    assert stats["batches_per_expert"] == {"2": 1, "0": 4, "1": 4}


def test_max_wait_s_zero_is_arrival_order():
    order, stats = _serve(max_wait_s=0.0)
    assert order == [0, 1, 0, 1, 0, 1, 0, 1]
    assert stats["expert_swaps"] == 8


def test_max_wait_s_is_checked():
    with pytest.raises(RuntimeInputError, match="max_wait_s"):
        GenerationServer(FakePipeline(), max_wait_s=-1)
