"""UNet runs of a request: planning (`plan_runs`), running one after another or concurrently
(`run_all`, `AptpPipeline(workers=N)`), and the session options that keep switches cheap."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from aptp.errors import RuntimeInputError
from aptp.runtime import AptpPipeline, kernels
from aptp.runtime.cli import main as cli_main
from aptp.runtime.dispatch import RunCancelled, UnetRun, check_workers, plan_runs, row_parts, row_slices, run_all
from aptp.runtime.engine import OnnxRuntimeEngine, import_onnxruntime
from runtime_fixtures import FOOD_PROMPTS, STEPS, VEHICLE_PROMPTS, tiny_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("dispatch"))


def _plan(codes, num_slots, max_batch, workers=1, cost=None):
    order, offsets = kernels.group_by_code(np.asarray(codes, dtype=np.int64), num_slots)
    return plan_runs(order, offsets, max_batch, workers, cost)


def test_runs_are_groups_in_chunks_of_max_batch_in_slot_order():
    runs = _plan([1, 0, 1, 1, 2, 1, 1], num_slots=3, max_batch=2)
    assert [(r.slot, r.rows.tolist()) for r in runs] == [(0, [1]), (1, [0, 2]), (1, [3, 5]), (1, [6]), (2, [4])]


def test_workers_halve_the_largest_run_until_each_worker_has_one():
    runs = _plan([0, 0, 0, 0, 0], num_slots=2, max_batch=8, workers=2)
    assert sorted(r.rows.tolist() for r in runs) == [[0, 1, 2], [3, 4]]
    runs = _plan([0, 0, 0, 0], num_slots=2, max_batch=8, workers=4)
    assert sorted(r.rows.tolist() for r in runs) == [[0], [1], [2], [3]]
    # One prompt cannot be split; rows stay whole and each appears exactly once.
    assert [r.rows.tolist() for r in _plan([1], num_slots=2, max_batch=8, workers=4)] == [[0]]
    runs = _plan([0, 1, 1, 1, 1, 1, 1], num_slots=2, max_batch=8, workers=3)
    assert sorted(np.concatenate([r.rows for r in runs]).tolist()) == list(range(7)) and len(runs) == 3


def test_concurrent_runs_start_with_the_costliest():
    # Rows times cost: slot 0 3 x 0.4 = 1.2, slot 1 2 x 1.0 = 2.0, slot 2 1 x 0.5 = 0.5.
    runs = _plan([0, 0, 0, 1, 1, 2], num_slots=3, max_batch=8, workers=2, cost=lambda slot: (0.4, 1.0, 0.5)[slot])
    assert [r.slot for r in runs] == [1, 0, 2]


def test_row_slices_cover_every_row_once_in_near_equal_parts():
    for rows in range(1, 12):
        for parts in range(1, 6):
            pieces = row_slices(rows, parts)
            assert [i for p in pieces for i in range(p.start, p.stop)] == list(range(rows))
            sizes = [p.stop - p.start for p in pieces]
            assert len(pieces) == min(rows, parts) and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)[::-1]
    assert (row_parts(2, 1), row_parts(2, 2), row_parts(2, 4), row_parts(4, 1), row_parts(1, 0)) == (2, 1, 1, 4, 1)


def test_bad_worker_counts_are_refused():
    for bad in (0, -1, 65, 1.5, "2", True, None):
        with pytest.raises(RuntimeInputError, match="workers must be an integer in .1, 64. or 'auto'"):
            check_workers(bad)
    assert check_workers(np.int64(3)) == 3


def test_run_all_raises_the_failure_and_cancels_the_other_runs():
    started, stopped_early = threading.Event(), []
    runs = [UnetRun(0, np.array([0])), UnetRun(1, np.array([1]))]

    def execute(run, cancel):
        if run.slot == 1:
            started.wait(5)
            raise ValueError("run 1 broke")
        started.set()
        for _ in range(500):  # a long run that checks for cancellation at each "step"
            if cancel.is_set():
                stopped_early.append(True)
                raise RunCancelled("stopped")
            time.sleep(0.01)
        return "finished"

    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(ValueError, match="run 1 broke"):
            run_all(runs, execute, pool)
    assert stopped_early == [True]
    done = run_all(runs[:1], lambda run, cancel: run.slot + 10)
    assert [(d.run.slot, d.value) for d in done] == [(0, 10)] and done[0].seconds >= 0


def test_concurrent_groups_give_the_same_images(export_dir):
    prompts = [VEHICLE_PROMPTS[0], FOOD_PROMPTS[0], VEHICLE_PROMPTS[1], FOOD_PROMPTS[1], FOOD_PROMPTS[2]]
    with AptpPipeline.from_export(export_dir, threads=2, workers=1) as serial, \
            AptpPipeline.from_export(export_dir, threads=2, workers=2) as concurrent:
        calls = []
        lock_free = threading.Lock()

        def progress(step, total, expert):
            assert lock_free.acquire(blocking=False), "progress callbacks overlapped"
            try:
                calls.append((step, total, expert))
                time.sleep(0.001)
            finally:
                lock_free.release()

        one = serial(prompts, seeds=range(5))
        two = concurrent(prompts, seeds=range(5), callback=progress)
        assert concurrent.unet(0).threads == 1 and serial.unet(0).threads == 2
    assert {r.expert for r in one} == {0, 1}
    for a, b in zip(one, two):
        assert (a.expert, a.seed) == (b.expert, b.seed)
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5)
        assert np.abs(a.image.astype(int) - b.image).max() <= 1
        assert set(b.timings) == set(a.timings)
    # Every run reported each of its steps, whichever thread ran it.
    assert len(calls) == 2 * STEPS and {c[2] for c in calls} == {0, 1}


def test_a_single_group_is_split_between_workers(export_dir):
    with AptpPipeline.from_export(export_dir, threads=2, workers=2) as pipe:
        results = pipe(list(FOOD_PROMPTS), seeds=[4, 5, 6], expert=1)
        alone = pipe([FOOD_PROMPTS[2]], seeds=[6], expert=1)
    assert sorted(r.batch_size for r in results) == [1, 2, 2]
    np.testing.assert_allclose(results[2].latents, alone[0].latents, rtol=0, atol=1e-5)


def test_one_prompt_splits_each_call_between_idle_workers(export_dir, monkeypatch):
    with AptpPipeline.from_export(export_dir, threads=2, workers=1) as serial, \
            AptpPipeline.from_export(export_dir, threads=2, workers=2) as split:
        want = serial([FOOD_PROMPTS[0]], seeds=[3], expert=1)[0]
        engine = split.unet(1)
        rows, threads = [], set()
        infer = type(engine).infer

        def spy(self, feed, stream=None):
            if self is engine:
                rows.append(len(feed["sample"]))
                threads.add(threading.current_thread().name)
            return infer(self, feed, stream)

        monkeypatch.setattr(type(engine), "infer", spy)
        got = split([FOOD_PROMPTS[0]], seeds=[3], expert=1)[0]
    # Guidance doubles the prompt's row; each call ran as two one-row calls in two threads.
    assert rows == [1] * (2 * STEPS) and len(threads) == 2
    np.testing.assert_allclose(got.latents, want.latents, rtol=0, atol=1e-5)
    assert np.abs(got.image.astype(int) - want.image).max() <= 1


def test_auto_workers_follow_the_device_and_threads(export_dir):
    for threads, want in ((1, 1), (2, 2), (4, 2)):
        with AptpPipeline.from_export(export_dir, threads=threads) as pipe:
            assert pipe.workers == want and pipe.unet_threads == max(1, threads // want), threads


def test_a_failing_progress_callback_fails_the_concurrent_request(export_dir):
    with AptpPipeline.from_export(export_dir, threads=2, workers=2) as pipe:
        def stop(step, total, expert):
            if expert == 1:
                raise KeyboardInterrupt("stop here")

        with pytest.raises(KeyboardInterrupt, match="stop here"):
            pipe([VEHICLE_PROMPTS[0], FOOD_PROMPTS[0]], seeds=[0, 1], callback=stop)
        # The pipeline still serves afterwards.
        assert pipe([VEHICLE_PROMPTS[0]], seeds=[0])[0].image is not None


def test_workers_are_refused_off_cpu_and_by_the_cli(export_dir, tmp_path, capsys):
    with pytest.raises(RuntimeInputError, match="on device 'cuda' use workers=1"):
        AptpPipeline.from_export(export_dir, device="cuda", workers=2)
    for bad in ("0", "two"):
        code = cli_main(["--artifacts", str(export_dir), "--prompt", "a red car", "--workers", bad,
                         "--output", str(tmp_path / "x.png")])
        assert code != 0 and "--workers must be an integer in [1, 64] or 'auto'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_sessions_stop_spinning_after_each_run(export_dir):
    # Idle sessions' spinning threads took the cores from the first call of the session that ran next.
    ort = import_onnxruntime()
    engine = OnnxRuntimeEngine(export_dir / "vae_decoder" / "model.onnx", threads=2)
    assert engine._session_options(ort).get_session_config_entry("session.force_spinning_stop") == "1"


def test_an_interrupted_wait_stops_every_run_before_returning(monkeypatch):
    # Ctrl-C arrives while the request waits for its runs: every run stops at its next step, and
    # run_all returns only once none of them is still on a session.
    import concurrent.futures

    steps = {0: 0, 1: 0}
    stopped = []

    def execute(run, cancel):
        for _ in range(300):
            if cancel.is_set():
                stopped.append(run.slot)
                raise RunCancelled("stopped")
            steps[run.slot] += 1
            time.sleep(0.01)
        return run.slot

    real_result = concurrent.futures.Future.result
    interrupted = []

    def result(self, timeout=None):
        if not interrupted:
            interrupted.append(True)
            time.sleep(0.05)
            raise KeyboardInterrupt
        return real_result(self, timeout)

    monkeypatch.setattr(concurrent.futures.Future, "result", result)
    runs = [UnetRun(0, np.array([0])), UnetRun(1, np.array([1]))]
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(KeyboardInterrupt):
            run_all(runs, execute, pool)
        assert sorted(stopped) == [0, 1] and max(steps.values()) < 300


def test_the_dispatch_probe_prints_each_comparison(export_dir, capsys):
    from aptp.benchmarks.latency import dispatch_probe

    dispatch_probe.main([str(export_dir), "--batch", "2", "--steps", "1", "--rounds", "1", "--pairs", "1"])
    out = capsys.readouterr().out
    assert "pair 1 spinning: expert_0 first" in out and "pair 1  stopped: expert_0 first" in out
    assert "groups: 2 experts x 1 calls of 2 rows: one after another" in out
    assert out.count("halves at once") == 4 and "split: dense, 2 rows" in out
