"""The memory and serving suites write their reports through the shared report writer: re-render
the committed benchmark results and check the three files (JSON round trip, Markdown, PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the report plots need matplotlib (aptp[train])")

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _check(paths: dict, results: dict) -> None:
    assert set(paths) == {"json", "markdown", "plot"}
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
    assert paths["markdown"].read_text().strip()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(paths["json"].parent.glob("*.tmp"))


def test_memory_reports_render_from_committed_results(tmp_path: Path):
    from aptp.benchmarks.memory.report import write_memory_reports

    results = json.loads((RESULTS / "memory-tiny" / "memory.json").read_text())
    paths = write_memory_reports(results, tmp_path / "memory")
    assert [p.name for p in paths.values()] == ["memory.json", "memory.md", "memory.png"]
    _check(paths, results)


def test_serve_reports_render_from_committed_results(tmp_path: Path):
    from aptp.benchmarks.serving.report import write_reports

    results = json.loads((RESULTS / "serve-tiny" / "serve.json").read_text())
    paths = write_reports(results, tmp_path / "serve")
    assert [p.name for p in paths.values()] == ["serve.json", "serve.md", "serve_latency.png"]
    _check(paths, results)
    assert "load_average_after" in json.loads(paths["json"].read_text())["machine"]
