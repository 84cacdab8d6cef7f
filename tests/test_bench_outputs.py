"""Every benchmark command writes only to a folder it may claim (`aptp.outputs`): a user's own
folder is refused before any work, with one line, and nothing in it is deleted or replaced.
The int8 runs of the memory suite quantize a copy of the export, never the export itself."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_fixtures import tiny_export


def _user_folder(tmp_path: Path, *files: str) -> Path:
    folder = tmp_path / "mine"
    for name in files:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"the user's own {name}\n")
    return folder


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aptp.benchmarks.cli", *argv], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("runtime"))


@pytest.mark.parametrize("command, files", [
    (["quality", "--rows", "aptp", "--train-only"], ["rows/aptp/notes.txt"]),
    (["gpu-check", "--dry-run"], ["summary.md", "gpu_check.json"]),
    (["memory", "--precisions", "fp32"], ["memory.md"]),
    (["serve"], ["serve.md"]),
])
def test_a_users_folder_is_refused_and_kept(tmp_path, export_dir, command, files):
    folder = _user_folder(tmp_path, *files)
    before = _tree(folder)
    artifacts = [] if command[0] in ("quality", "gpu-check") else ["--artifacts", str(export_dir)]
    proc = _bench(*command, *artifacts, "--output-dir", str(folder))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "already holds files that are not aptp-bench" in lines[0], proc.stderr[-2000:]
    assert _tree(folder) == before


def test_make_synthetic_keeps_a_users_folder_where_its_pipeline_would_go(tmp_path):
    folder = _user_folder(tmp_path, "model_index.json")
    folder.rename(tmp_path / "exp-pipeline")
    before = _tree(tmp_path / "exp-pipeline")
    proc = _bench("make-synthetic", "--unet-config", "sd21_narrow", "--output", str(tmp_path / "exp"))
    assert proc.returncode == 2 and "exp-pipeline already holds files" in proc.stderr, proc.stderr[-2000:]
    assert _tree(tmp_path / "exp-pipeline") == before and not (tmp_path / "exp").exists()


def test_a_row_folder_aptp_did_not_write_is_not_deleted(tmp_path):
    from aptp.benchmarks.quality.rows import RowSpec, train_row
    from aptp.errors import OutputError

    row = _user_folder(tmp_path, "notes.txt")
    with pytest.raises(OutputError, match="already holds files that are not an aptp pruning run"):
        train_row(RowSpec("aptp", 2, []), row, reuse=False)
    assert (row / "notes.txt").is_file()


def test_int8_runs_quantize_a_copy_and_leave_the_export_as_it_was(tmp_path, export_dir):
    from aptp.benchmarks.memory.suite import INT8_COPY, MemoryOptions, int8_export
    from aptp.export.manifest import read_manifest

    before = _tree(export_dir)
    out = tmp_path / "memory"
    out.mkdir()
    root, manifest = int8_export(export_dir, out, MemoryOptions(threads=1, calibration_prompts=1))
    assert root == out / INT8_COPY and all(e.get("int8") for e in manifest["experts"])
    assert _tree(export_dir) == before  # nothing added, changed or left behind in the user's export
    assert read_manifest(root, verify=True)["experts"][0]["int8"]
    stamp = (root / "manifest.json").stat().st_mtime_ns
    again, _ = int8_export(export_dir, out, MemoryOptions(threads=1, calibration_prompts=1))
    assert again == root and (root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not redone


def test_the_gpu_check_script_refuses_a_users_folder_before_writing_its_logs(tmp_path):
    folder = _user_folder(tmp_path, "summary.md", "gpu_check.log")
    before = _tree(folder)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check" / "run.sh"
    proc = subprocess.run(["bash", str(script), str(folder), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already holds files that are not aptp-bench gpu-check" in proc.stderr
    assert _tree(folder) == before
