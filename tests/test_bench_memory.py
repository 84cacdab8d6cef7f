"""The memory suite's setup (`aptp.benchmarks.memory.suite`): budgets, workload, bad flags. The
serving runs themselves are what ``aptp-bench memory`` reports; nothing is timed here."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from aptp.benchmarks.memory.suite import MemoryOptions, build_workload, resolve_budgets
from aptp.errors import ConfigError


def _fake_export(root: Path, sizes: dict[str, int]) -> dict:
    manifest = {"experts": [], "dense": None}
    for name, size in sizes.items():
        path = root / name / "unet.onnx"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\0" * size)
        entry = {"unet": f"{name}/unet.onnx", "external_data": None}
        if name == "dense":
            manifest["dense"] = entry
        else:
            manifest["experts"].append({**entry, "code": len(manifest["experts"])})
    return manifest


def test_budgets_are_multiples_of_the_dense_unet(tmp_path):
    manifest = _fake_export(tmp_path, {"e0": 300, "e1": 500, "dense": 1000})
    budgets = resolve_budgets(manifest, tmp_path, ["unlimited", "2x", "1x", "0.5x", "3KiB"])
    assert [b["bytes"] for b in budgets] == [None, 2000, 1000, 500, 3072]
    assert budgets[0]["note"] is None  # 800 bytes of experts fit this machine


def test_an_unlimited_run_that_cannot_fit_becomes_the_largest_budget_that_fits(tmp_path, monkeypatch):
    import aptp.benchmarks.memory.suite as memory

    manifest = _fake_export(tmp_path, {"e0": 300, "dense": 1000})
    monkeypatch.setattr(memory, "_mem_available", lambda: 10 * memory.GiB)
    monkeypatch.setattr(memory, "_files_bytes", lambda root, entry: 9 * memory.GiB)
    (budget,) = resolve_budgets(manifest, tmp_path, ["unlimited"])
    assert budget["bytes"] == int(0.8 * 10 * memory.GiB - memory.GiB)
    assert "is the reference instead of unlimited" in budget["note"]


def test_workload_is_seeded_shuffled_and_follows_the_shares(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "synthetic.json").write_text('{"shares": [0.5, 0.25, 0.25]}')
    manifest = {"checkpoint": {"path": str(checkpoint)}}
    a, how = build_workload(manifest, tmp_path, 48, seed=0)
    b, _ = build_workload(manifest, tmp_path, 48, seed=0)
    c, _ = build_workload(manifest, tmp_path, 48, seed=1)
    assert a == b and a != c and how.startswith("synthetic")
    assert Counter(r["expert"] for r in a) == {0: 24, 1: 12, 2: 12}
    assert [r["index"] for r in a] != list(range(48)) and sorted(r["index"] for r in a) == list(range(48))
    assert len({r["prompt"] for r in a}) == 48


@pytest.mark.parametrize("budgets", [["lots"], ["-1"], ["0"], ["0x"]])
def test_bad_budgets_are_refused(budgets):
    with pytest.raises(ConfigError):
        MemoryOptions(budgets=budgets).check()


def test_bad_budget_on_the_command_line_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aptp.benchmarks.cli", "memory", "--artifacts", str(tmp_path),
                           "--budgets", "lots"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aptp-bench: error: ") and "lots" in lines[0], proc.stderr


def test_the_int8_op_profile_is_summed_over_unets_and_sorted():
    from aptp.benchmarks.memory.report import _op_profile_lines

    unets = [{"ops": {"fp32": {"Conv": 0.2, "MatMul": 0.1}, "int8": {"ConvInteger": 0.05, "QuantizeLinear": 0.3}}},
             {"ops": {"fp32": {"Conv": 0.4}, "int8": {"QuantizeLinear": 0.1, "Conv": 0.05}}},
             {"ops": None}]
    lines = _op_profile_lines(unets)
    assert "summed over 2 UNets" in lines[1] and "total 0.700 s fp32 vs 0.500 s int8" in lines[1]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| op type")]
    assert rows[0] == "| Conv | 0.6000 | 0.0500 | 0.08 |"
    assert rows[1] == "| QuantizeLinear | 0.0000 | 0.4000 | n/a |"
    assert _op_profile_lines([{"ops": None}]) == []


def test_pinned_parts_at_work_are_the_rss_before_the_first_unet_load():
    from aptp.benchmarks.memory.worker import _rss_before_first_load

    samples = [(0.0, 100), (0.5, 140), (1.0, 150), (1.5, 300), (2.0, 400)]
    # the first load ended at t = 2.2 (monotonic 12.2 - start 10) after 1.0 s: it began at 1.2
    events = [(12.2, "load", 3, 0), (13.0, "evict", 3, 0), (14.0, "load", 1, 0)]
    report = {"sessions": {"3": {"load_seconds": 1.0}, "1": {"load_seconds": 0.5}}}
    assert _rss_before_first_load(samples, 10.0, events, report) == 150
    assert _rss_before_first_load(samples, 10.0, [], report) is None
