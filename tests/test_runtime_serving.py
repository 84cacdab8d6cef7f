"""GenerationServer under load: per-expert batches, equal-to-alone results, a bounded queue.

Uses the tiny export of `runtime_fixtures` (shared with test_runtime.py when both run in one
session); vehicle prompts route to code 0, food prompts to code 1.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from aptp.errors import ArtifactError, RuntimeInputError
from aptp.runtime import AptpPipeline, GenerationServer, QueueFullError, ServerClosedError
from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS, hang_guard, tiny_export


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def pipe(export_dir) -> AptpPipeline:
    return AptpPipeline.from_export(export_dir, threads=1)


class RecordingPipeline:
    """Delegates to a pipeline; records every batch the server runs and can hold or fail it."""

    def __init__(self, pipe: AptpPipeline, fail_on: str | None = None):
        self._pipe = pipe
        self.batches: list[tuple[list[str], object]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate(self, prompts, seeds, options, codes=None):
        self.entered.set()
        self.gate.wait(timeout=hang_guard(60))
        self.batches.append((list(prompts), options.expert))
        if self.fail_on is not None and self.fail_on in prompts:
            raise ArtifactError(f"simulated engine failure on {self.fail_on!r}")
        return self._pipe.generate(prompts, seeds, options, codes)


def test_four_threads_ten_requests_each_equal_their_single_runs(pipe):
    unique = [(prompt, 500 + i) for i, prompt in enumerate((*VEHICLE_PROMPTS, *FOOD_PROMPTS, "a blue bicycle",
                                                             "a hamburger with fries", "a green apple", "logo"))]
    recorder = RecordingPipeline(pipe)
    server = GenerationServer(recorder, max_batch=4, max_wait=0.05, max_queue=64)

    def client(t: int):
        # Every thread sends the ten requests in its own order: batches mix threads and seeds.
        order = unique[t * 3:] + unique[:t * 3]
        futures = [(p, s, server.submit(p, seed=s, output_type="latent")) for p, s in order]
        return [(p, s, f.result(timeout=hang_guard(300))) for p, s, f in futures]

    with ThreadPoolExecutor(4) as pool:
        served = [item for chunk in pool.map(client, range(4)) for item in chunk]
    server.close()
    assert len(served) == 40
    alone = {(p, s): pipe([p], seeds=[s], output_type="latent")[0] for p, s in unique}
    for prompt, seed, result in served:
        want = alone[(prompt, seed)]
        assert (result.prompt, result.seed, result.expert) == (prompt, seed, want.expert)
        np.testing.assert_allclose(result.latents, want.latents, rtol=0, atol=1e-5)
    assert {want.expert for want in alone.values()} == {0, 1}
    sizes = [len(prompts) for prompts, _ in recorder.batches]
    assert sum(sizes) == 40 and max(sizes) <= 4 and max(sizes) > 1
    expert_of = {p: alone[(p, s)].expert for p, s in unique}
    for prompts, expert in recorder.batches:  # one expert per batch, the one the router picks alone
        assert all(expert_of[p] == expert for p in prompts)


def test_full_queue_refuses_work_then_recovers(pipe):
    recorder = RecordingPipeline(pipe)
    recorder.gate.clear()
    server = GenerationServer(recorder, max_batch=1, max_wait=0.0, max_queue=2)
    try:
        running = server.submit(VEHICLE_PROMPTS[0], seed=1, output_type="latent")
        assert recorder.entered.wait(timeout=hang_guard(60))  # the worker holds it: it no longer waits
        waiting = [server.submit(FOOD_PROMPTS[0], seed=2, output_type="latent"),
                   server.submit(FOOD_PROMPTS[1], seed=3, output_type="latent")]
        with pytest.raises(QueueFullError, match="max_queue"):
            server.submit(FOOD_PROMPTS[2], seed=4)
        assert server.waiting == 2
        recorder.gate.set()
        for future in (running, *waiting):
            assert future.result(timeout=hang_guard(120)).latents.shape == (4, 16, 16)
        assert server.generate(FOOD_PROMPTS[2], seed=4, output_type="latent", timeout=hang_guard(120)).expert == 1
    finally:
        recorder.gate.set()
        server.close()


def test_bad_requests_are_refused_at_submit_and_serving_goes_on(pipe):
    with GenerationServer(pipe, max_batch=2, max_wait=0.0) as server:
        for prompt, options, message in [
            ("", {}, "0 characters"),
            ("a cat", {"num_inference_steps": 0}, "positive integer"),
            ("a cat", {"num_inference_steps": -2}, "positive integer"),
            ("a cat", {"guidance_scale": "high"}, "finite number"),
            ("a cat", {"seed": -5}, "seeds"),
            ("a cat", {"expert": "sparse"}, "expert must be one of"),
            ("a red \ud800 car", {}, "lone surrogate U\\+D800 at character 6"),
            ("a cat", {"negative_prompt": "blurry \udcff"}, "negative_prompt\\[0\\] is not valid Unicode"),
            ("a cat", {"seed": 10**5000}, "an integer of 16610 bits"),
            ("a cat", {"guidance_scale": float("inf")}, "finite number"),
            ("a cat", {"guidance_scale": float("nan")}, "finite number"),
        ]:
            with pytest.raises(RuntimeInputError, match=message):
                server.submit(prompt, **options)
        assert server.waiting == 0
        result = server.generate(VEHICLE_PROMPTS[1], seed=3, output_type="latent", timeout=hang_guard(120))
        alone = pipe([VEHICLE_PROMPTS[1]], seeds=[3], output_type="latent")[0]
        np.testing.assert_array_equal(result.latents, alone.latents)
    with pytest.raises(ServerClosedError):
        server.submit("a cat")


def test_failing_batch_fails_only_its_requests(pipe):
    recorder = RecordingPipeline(pipe, fail_on="boom")
    with GenerationServer(recorder, max_batch=1, max_wait=0.0) as server:
        bad = server.submit("boom", seed=1, expert=0, output_type="latent")
        good = server.submit(FOOD_PROMPTS[0], seed=2, expert=1, output_type="latent")
        with pytest.raises(ArtifactError, match="simulated engine failure"):
            bad.result(timeout=hang_guard(120))
        assert good.result(timeout=hang_guard(120)).expert == 1
        forced = server.generate(FOOD_PROMPTS[0], seed=2, expert="dense", output_type="latent", timeout=hang_guard(120))
    assert forced.expert == "dense"
    assert [expert for _, expert in recorder.batches] == [0, 1, "dense"]


def test_server_arguments_are_checked(pipe):
    for kwargs in ({"max_batch": 0}, {"max_queue": 0}, {"max_wait": -1.0}):
        with pytest.raises(ValueError):
            GenerationServer(pipe, **kwargs)


@pytest.mark.parametrize("round_", range(2))
def test_one_bad_request_among_fifteen_good_fails_only_itself(pipe, round_):
    """A request that breaks its batch (here: one the engine fails on) is re-run alone, and so is
    every good request of that batch: all 15 good ones get their own correct result."""
    recorder = RecordingPipeline(pipe, fail_on="poison")
    recorder.gate.clear()  # hold the worker so all 16 requests form one batch
    prompts = [(VEHICLE_PROMPTS + FOOD_PROMPTS)[i % 6] for i in range(15)]
    with GenerationServer(recorder, max_batch=16, max_wait=5.0, max_queue=32) as server:
        good = [server.submit(p, seed=100 * round_ + i, expert=0, output_type="latent") for i, p in enumerate(prompts)]
        bad = server.submit("poison", seed=7, expert=0, output_type="latent")
        # The lone surrogate never gets that far: refused at the door, nothing queued for it.
        with pytest.raises(RuntimeInputError, match="lone surrogate"):
            server.submit("a red \ud800 car", seed=1, expert=0)
        recorder.gate.set()
        with pytest.raises(ArtifactError, match="simulated engine failure"):
            bad.result(timeout=hang_guard(300))
        results = [f.result(timeout=hang_guard(300)) for f in good]
    assert len(recorder.batches[0][0]) == 16  # they were batched together, and that batch failed
    alone = pipe(prompts, seeds=[100 * round_ + i for i in range(15)], expert=0, output_type="latent")
    for result, reference in zip(results, alone):
        np.testing.assert_allclose(result.latents, reference.latents, rtol=0, atol=1e-5)
