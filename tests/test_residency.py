"""The memory budget of the runtime's UNet sessions (`aptp.runtime.residency`).

The manager is tested with fake engines whose load adds a known number of bytes to a fake
probe, so the accounting is exact; the pipeline parts run on the tiny export.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from aptp.errors import RuntimeInputError
from aptp.runtime.residency import ResidencyManager, format_bytes, parse_memory_budget
from runtime_fixtures import aptp_stderr_lines, hang_guard

MiB = 1024**2


class FakeProbe:
    """RSS = the bytes of the fake engines loaded now (plus a constant baseline); `peak` is the
    kernel's high-water mark (reset by `reset_peak`), `highest` the highest RSS ever seen."""

    def __init__(self):
        self.bytes = 100 * MiB
        self.peak = self.highest = self.bytes

    def rss(self) -> int:
        return self.bytes

    def device_used(self) -> None:
        return None

    def reset_peak(self) -> bool:
        self.peak = self.bytes
        return True

    def peak_rss(self) -> int:
        return self.peak

    def touch(self) -> None:
        self.peak, self.highest = max(self.peak, self.bytes), max(self.highest, self.bytes)


class FakeEngine:
    """Loading adds `size` bytes; the first `run` adds `work` more (onnxruntime's arena, which
    keeps its high-water mark until the session is dropped)."""

    def __init__(self, key, size: int, probe: FakeProbe, log: list, work: int = 0, transient: int = 0):
        self.key, self.size, self.probe, self.log, self.work = key, size, probe, log, work
        self.transient = transient  # held only while loading (the verified bytes, parsing copies)
        self.kept = 0  # bytes that stay in the process after unload (heap the allocator keeps)
        self.loaded = False
        self.ran = False

    def run(self) -> None:
        assert self.loaded
        if not self.ran:
            self.ran = True
            self.probe.bytes += self.work
            self.probe.touch()

    def load(self) -> None:
        assert not self.loaded
        self.loaded = True
        self.probe.bytes += self.size + self.transient
        self.probe.touch()
        self.probe.bytes -= self.transient
        self.log.append(("load", self.key))

    def unload(self) -> None:
        if self.loaded:
            self.loaded = False
            self.probe.bytes -= self.size + (self.work if self.ran else 0) - self.kept
            self.ran = False
            self.log.append(("unload", self.key))


def make_manager(budget, sizes, file_sizes=None, work=None, transient=None):
    probe, log, engines = FakeProbe(), [], {}

    def factory(key):
        engines[key] = FakeEngine(key, sizes[key], probe, log, (work or {}).get(key, 0), (transient or {}).get(key, 0))
        return engines[key]

    files = file_sizes or sizes
    manager = ResidencyManager(budget, factory, lambda k: files[k], probe=probe, describe=lambda k: f"expert {k}")
    return manager, probe, log, engines


# ---- budgets ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("512MiB", 512 * MiB), ("3GiB", 3 * 1024**3), ("2GB", 2 * 1000**3), ("1.5G", int(1.5 * 1024**3)),
    ("1000", 1000), (4096, 4096), ("64 mib", 64 * MiB), (None, None), ("unlimited", None),
])
def test_budgets_parse(text, expected):
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize("bad", ["-1", "lots", 0, "0", -5, "3 parsecs", "", True, 2.5, "GiB"])
def test_bad_budgets_raise_one_clear_error(bad):
    with pytest.raises(RuntimeInputError, match="memory_budget must be a positive size such as '3GiB'"):
        parse_memory_budget(bad)


@pytest.mark.parametrize("bad", ["-1", "lots", "0"])
def test_bad_budgets_give_one_line_on_the_command_line(bad, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aptp.runtime.cli", "--artifacts", str(tmp_path), "--prompt", "x",
                           "--output", str(tmp_path / "o.png"), f"--memory-budget={bad}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aptp-generate: error: ")
    # the budget is checked before the export: a bad budget is named even for a missing export
    assert "--memory-budget must be a positive size such as '3GiB'" in lines[0], lines[0]


# ---- the manager --------------------------------------------------------------------------


def test_eviction_is_least_recently_used():
    sizes = {k: 10 * MiB for k in range(4)}
    manager, _, log, _ = make_manager(30 * MiB, sizes)
    for key in (0, 1, 2):
        with manager.use(key):
            pass
    with manager.use(0):  # 0 becomes the most recently used: 1 is now the oldest
        pass
    with manager.use(3):
        pass
    assert ("unload", 1) in log and ("unload", 0) not in log and ("unload", 2) not in log
    assert manager.resident_keys == [2, 0, 3]
    with manager.use(1):  # the oldest now is 2
        pass
    assert [e for e in log if e[0] == "unload"] == [("unload", 1), ("unload", 2)]
    report = manager.report()
    assert report["loads"] == 5 and report["evictions"] == 2
    assert report["sessions"]["1"]["loads"] == 2 and report["sessions"]["1"]["measured_bytes"] == 10 * MiB


def test_budget_is_never_exceeded_under_random_use():
    rng = np.random.default_rng(0)
    sizes = {k: int(s) * MiB for k, s in enumerate(rng.integers(5, 40, size=8))}
    budget = 70 * MiB
    manager, probe, _, _ = make_manager(budget, sizes)
    baseline = probe.bytes
    for key in rng.integers(0, 8, size=300).tolist():
        with manager.use(key) as engine:
            assert engine.loaded
            assert probe.bytes - baseline <= budget  # what is really loaded
            assert manager.resident_bytes <= budget  # what is charged
    assert manager.report()["peak_resident_bytes"] <= budget
    assert manager.report()["overshoots"] == 0
    assert manager.evictions > 0


def test_measured_cost_is_charged_not_the_file_size():
    # Files of 10 MiB whose sessions take 25 MiB (weights prepacked, say): after the first load
    # the manager charges what it measured and estimates the others with that ratio.
    sizes = {k: 25 * MiB for k in range(3)}
    manager, probe, _, _ = make_manager(60 * MiB, sizes, file_sizes={k: 10 * MiB for k in range(3)})
    assert manager.estimate(0) == 10 * MiB
    with manager.use(0):
        pass
    assert manager.record(0).measured_bytes == 25 * MiB
    assert manager.estimate(1) == 25 * MiB  # file size x the measured ratio 2.5
    for key in (1, 2, 0, 2):
        with manager.use(key):
            assert probe.bytes - 100 * MiB <= 60 * MiB
    assert manager.report()["overshoots"] == 0


def test_working_memory_is_charged_and_the_real_total_stays_in_the_budget():
    # 10 MiB of weights and 6 MiB of activations each: charging weights alone would keep five
    # sessions (80 MiB really held) in a 50 MiB budget; with working memory it keeps three.
    rng = np.random.default_rng(1)
    keys = range(8)
    manager, probe, _, _ = make_manager(50 * MiB, {k: 10 * MiB for k in keys}, work={k: 6 * MiB for k in keys})
    baseline = probe.bytes
    for key in rng.integers(0, 8, size=200).tolist():
        with manager.use(key) as engine:
            engine.run()
            assert probe.bytes - baseline <= 50 * MiB
        assert manager.resident_bytes == probe.bytes - baseline  # charged == really held
    record = manager.record(0)
    assert record.run_bytes == 6 * MiB and record.measured_bytes == 16 * MiB
    assert manager.estimate(7) == 16 * MiB
    assert len(manager.resident_keys) == 3 and manager.evictions > 0
    assert manager.report()["overshoots"] == 0


def test_an_unseen_session_is_estimated_with_the_largest_working_memory_not_a_scaled_one():
    # Working memory (activations) does not shrink with the weights (int8 files are 3-4x
    # smaller): scaling it by file size would undercount a small expert that runs as wide.
    manager, _, _, _ = make_manager(None, {0: 30 * MiB, 1: 10 * MiB}, work={0: 20 * MiB, 1: 20 * MiB})
    with manager.use(0) as engine:
        engine.run()
    assert manager.estimate(1) == 10 * MiB + 20 * MiB  # files x load ratio 1.0, plus 20 MiB
    with manager.use(1):
        pass  # loaded, not run yet: the largest working memory measured stands in for its own
    assert manager.estimate(1) == 30 * MiB


def test_working_memory_is_not_counted_twice_on_a_reload():
    manager, probe, _, _ = make_manager(20 * MiB, {0: 10 * MiB, 1: 10 * MiB}, work={0: 6 * MiB, 1: 6 * MiB})
    for key in (0, 1, 0, 1, 0):  # room for one at a time: every use reloads
        with manager.use(key) as engine:
            engine.run()
    assert manager.loads == 5
    assert manager.record(0).run_bytes == 6 * MiB and manager.record(0).measured_bytes == 16 * MiB
    assert manager.resident_bytes == 16 * MiB == probe.bytes - 100 * MiB


def test_a_load_reserves_room_for_its_measured_peak():
    # Sessions keep 10 MiB but need 30 MiB while loading: after the first load is measured,
    # every later one evicts enough first, so the real RSS never passes the budget.
    keys = range(6)
    manager, probe, _, _ = make_manager(40 * MiB, {k: 10 * MiB for k in keys}, transient={k: 20 * MiB for k in keys})
    with manager.use(0):
        pass
    assert manager.record(0).load_peak_bytes == 30 * MiB and manager.record(0).measured_bytes == 10 * MiB
    probe.highest = probe.bytes
    for key in [1, 2, 3, 4, 5, 0, 2, 1, 5, 3]:
        with manager.use(key):
            pass
    assert probe.highest - 100 * MiB <= 40 * MiB
    assert manager.report()["sessions"]["3"]["load_peak_bytes"] == 30 * MiB
    # without the reservation the third session would have loaded beside the first two: 50 MiB


def test_memory_an_eviction_leaves_behind_is_counted_against_the_budget():
    # Expert 0's session leaves 8 MiB in the process when evicted (fragmented heap): no charge
    # covers it, so the manager counts it from RSS and keeps the real total within the budget.
    keys = range(5)
    manager, probe, _, engines = make_manager(30 * MiB, {k: 10 * MiB for k in keys})
    floor = probe.bytes
    with manager.use(0):
        engines[0].kept = 8 * MiB
    for key in [1, 2, 3, 4, 1, 2, 3, 4, 2]:
        with manager.use(key):
            assert probe.bytes - floor <= 30 * MiB
    report = manager.report()
    assert report["unattributed_bytes"] == 8 * MiB and report["floor_rss_bytes"] == floor
    assert len(manager.resident_keys) == 2  # one slot of three went to the leftover heap
    assert report["overshoots"] == 0


def test_only_the_first_uses_of_a_residence_measure_working_memory():
    # Later growth (a leak elsewhere, a bigger batch) is not pinned on the session in use: it is
    # left to the RSS reconciliation.
    from aptp.runtime.residency import MEASURED_USES

    manager, probe, _, _ = make_manager(None, {0: 10 * MiB})
    for use in range(MEASURED_USES + 3):
        with manager.use(0):
            probe.bytes += 1 * MiB  # something in the process grows by 1 MiB on every call
    assert manager.record(0).run_bytes == MEASURED_USES * MiB


def test_overlapping_uses_do_not_measure_working_memory():
    # Another session in use at the same time: an RSS delta could be either's, so none is taken.
    manager, _, _, _ = make_manager(None, {0: 10 * MiB, 1: 10 * MiB}, work={0: 6 * MiB, 1: 6 * MiB})
    with manager.use(0) as first:
        with manager.use(1) as second:
            second.run()
        first.run()
    assert manager.record(0).run_bytes is None and manager.record(1).run_bytes is None


def test_an_evicted_engine_refuses_to_reload_outside_the_budget(tmp_path):
    from aptp.runtime.engine import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(tmp_path / "unet.onnx")
    engine.retire("expert 2 was evicted under the memory budget")
    with pytest.raises(RuntimeInputError, match=r"expert 2 was evicted .* `pipe\.residency\.use\(key\)`"):
        engine.load()


def test_an_expert_that_cannot_fit_alone_is_named_with_its_size_and_the_budget():
    manager, _, log, _ = make_manager(30 * MiB, {0: 10 * MiB, 1: 40 * MiB})
    with pytest.raises(RuntimeInputError) as err:
        with manager.use(1):
            pass
    message = str(err.value)
    assert "expert 1" in message and format_bytes(40 * MiB) in message and format_bytes(30 * MiB) in message
    assert "lower bound" in message
    assert log == []  # nothing was loaded


def test_a_session_measured_above_the_budget_runs_alone_and_is_reported():
    # Its file (the lower bound) fits, its measured session does not: it is served alone and
    # the overshoot is counted, rather than refused on a noisy measurement.
    manager, probe, log, _ = make_manager(30 * MiB, {0: 10 * MiB, 1: 40 * MiB}, file_sizes={0: 10 * MiB, 1: 20 * MiB})
    with manager.use(0):
        pass
    for _ in range(2):
        with manager.use(1):
            assert manager.resident_keys == [1]
        with manager.use(0):
            assert manager.resident_keys == [0]
    report = manager.report()
    assert report["overshoots"] == 2 and report["max_overshoot_bytes"] == 10 * MiB


def test_unlimited_keeps_every_session():
    manager, _, log, _ = make_manager(None, {k: 10 * MiB for k in range(5)})
    for key in [0, 1, 2, 3, 4, 0, 1]:
        with manager.use(key):
            pass
    assert manager.loads == 5 and manager.evictions == 0 and len(manager.resident_keys) == 5


def test_a_pinned_session_is_never_evicted_under_threads():
    """4 threads x 10 uses each over 6 experts with room for 2: a pinned engine is never
    unloaded while in use, and the budget holds throughout."""
    sizes = {k: 10 * MiB for k in range(6)}
    budget = 20 * MiB
    manager, probe, _, _ = make_manager(budget, sizes)
    violations: list[str] = []
    lock = threading.Lock()

    def work(thread: int) -> None:
        rng = np.random.default_rng(thread)
        for key in rng.integers(0, 6, size=10).tolist():
            with manager.use(key) as engine:
                for _ in range(20):
                    if not engine.loaded:
                        violations.append(f"expert {key} evicted while pinned")
                    with lock:
                        if manager.resident_bytes > budget:
                            violations.append(f"charged {manager.resident_bytes} > {budget}")
                    threading.Event().wait(0.0005)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert violations == []
    assert probe.bytes == 100 * MiB + manager.resident_bytes
    assert manager.report()["peak_resident_bytes"] <= budget


# ---- the pipeline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from runtime_fixtures import tiny_export

    return tiny_export(tmp_path_factory.getbasetemp() / "runtime")


@pytest.mark.slow
def test_results_are_bitwise_identical_with_and_without_a_budget(export):
    from aptp.runtime import AptpPipeline
    from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS

    prompts = [*VEHICLE_PROMPTS, *FOOD_PROMPTS]
    free = AptpPipeline.from_export(export, threads=1)
    reference = free(prompts, seeds=11)
    dense = free(prompts[:2], seeds=3, expert="dense")
    # Room for any one UNet session but never two (each is charged at least its files' size).
    files = sorted(session["file_bytes"] for session in free.memory_report()["sessions"].values())
    assert files[0] + files[1] > files[-1], "the export's UNets cannot be budgeted one at a time"
    tight = AptpPipeline.from_export(export, threads=1, memory_budget=files[0] + files[1] - 1)
    for _ in range(2):
        got = tight(prompts, seeds=11)
        got_dense = tight(prompts[:2], seeds=3, expert="dense")
        for a, b in zip(reference + dense, got + got_dense):
            assert a.expert == b.expert
            assert np.array_equal(a.latents, b.latents) and np.array_equal(a.image, b.image)
    report = tight.memory_report()
    assert report["evictions"] > 0 and report["peak_resident_bytes"] <= report["budget_bytes"] + \
        report["max_overshoot_bytes"]
    assert report["process_rss_bytes"] > 0
    for key in ("0", "1", "dense"):
        assert report["sessions"][key]["rss_bytes"] is not None
    assert free.memory_report()["evictions"] == 0


@pytest.mark.slow
def test_too_small_a_budget_fails_at_construction_naming_the_expert(export, tmp_path):
    from aptp.runtime import AptpPipeline

    with pytest.raises(RuntimeInputError, match=r"expert \d's UNet needs at least .* but the memory budget is 1.00 KiB"):
        AptpPipeline.from_export(export, memory_budget="1KiB")
    proc = subprocess.run([sys.executable, "-m", "aptp.runtime.cli", "--artifacts", str(export), "--prompt", "x",
                           "--output", str(tmp_path / "o.png"), "--memory-budget", "1KiB"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(aptp_stderr_lines(proc.stderr)) == 1, proc.stderr
    assert "cannot fit even alone" in proc.stderr
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_server_under_a_budget_four_threads_ten_requests_each(export):
    """A GenerationServer on a pipeline with room for one UNet: 4 client threads x 10 routed
    requests; every result equals its single run without a budget, the running group's session
    is never evicted under it (results would differ or fail), and stats count the swaps."""
    from aptp.runtime import AptpPipeline, GenerationServer
    from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS

    prompts = [*VEHICLE_PROMPTS, *FOOD_PROMPTS]
    free = AptpPipeline.from_export(export, threads=1)
    free(prompts[:1], seeds=0, expert=0)
    free(prompts[:1], seeds=0, expert=1)
    # Room for either expert alone but never both: a session is charged at least its files' size,
    # so a budget one byte under the two files together forces a swap (a budget derived from
    # measured RSS let both fit when a second load reused freed heap).
    files = [free.memory_report()["sessions"][str(k)]["file_bytes"] for k in (0, 1)]
    pipe = AptpPipeline.from_export(export, threads=1, memory_budget=sum(files) - 1)
    unloads_while_pinned: list[str] = []
    original_evict = pipe.residency._evict

    def checked_evict(key):
        if pipe.residency._pins[key]:
            unloads_while_pinned.append(str(key))
        original_evict(key)

    pipe.residency._evict = checked_evict
    jobs = [(t, i, prompts[(t * 10 + i) % len(prompts)], 1000 * t + i) for t in range(4) for i in range(10)]
    expected = {(t, i): free([p], seeds=[s], output_type="latent")[0].latents for t, i, p, s in jobs}
    with GenerationServer(pipe, max_batch=4, max_wait=0.02, max_wait_s=2.0, max_queue=64) as server:
        def client(t):
            futures = [(i, server.submit(p, seed=s, output_type="latent")) for tt, i, p, s in jobs if tt == t]
            return [(t, i, f.result(timeout=hang_guard(600))) for i, f in futures]

        with ThreadPoolExecutor(4) as pool:
            results = [r for chunk in pool.map(client, range(4)) for r in chunk]
        stats = server.stats()
    assert len(results) == 40
    for t, i, result in results:
        assert np.array_equal(result.latents, expected[(t, i)])
    assert unloads_while_pinned == []
    assert stats["requests"] == 40 and stats["batches"] >= 10
    assert stats["loads"] >= 2 and stats["evictions"] >= 1
    assert stats["queue_wait_s"]["p95"] is not None and sum(stats["batches_per_expert"].values()) == stats["batches"]


def test_an_overshoot_is_reported_with_the_memory_that_made_it(caplog):
    """Memory the process kept after an eviction (unattributed) plus a session that grows while
    running can pass the budget while the charges alone do not: the warning and the report give
    the real, positive excess (they said "exceeded by -12.00 MiB")."""
    manager, probe, _, engines = make_manager(30 * MiB, {0: 10 * MiB, 1: 20 * MiB}, work={0: 8 * MiB})
    with manager.use(1):
        engines[1].kept = 15 * MiB  # the allocator keeps these after the session is dropped
    with manager.use(0) as engine:  # evicts expert 1, which leaves its 15 MiB behind
        engine.run()  # grows to 18 MiB: 18 charged + 15 unattributed = 33 MiB in a 30 MiB budget
    report = manager.report()
    assert report["max_overshoot_bytes"] > 0
    warnings = [r.getMessage() for r in caplog.records if "exceeded by" in r.getMessage()]
    assert warnings and all("exceeded by -" not in w for w in warnings), warnings


def test_a_change_in_bytes_carries_one_sign():
    from aptp.runtime.residency import signed_bytes

    assert signed_bytes(-37.36 * MiB) == "-37.36 MiB"  # a load can free heap: never "+-37.36 MiB"
    assert signed_bytes(MiB) == "+1.00 MiB" and signed_bytes(None) == "unknown"
