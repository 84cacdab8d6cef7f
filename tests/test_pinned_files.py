"""Verified external weights read by onnxruntime from pinned files (`aptp.runtime.pinned_files`)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from aptp.errors import ArtifactError
from aptp.runtime import pinned_files
from aptp.runtime.engine import OnnxRuntimeEngine
from aptp.runtime.pinned_files import pinned_weights
from runtime_fixtures import external_weights_graph


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "export" / "unet.onnx.data"
    path.parent.mkdir()
    path.write_bytes(np.arange(4096, dtype=np.float32).tobytes())
    return path


def test_a_pinned_folder_holds_the_same_file_and_is_removed(weights):
    with pinned_weights([(weights, _sha(weights))]) as folder:
        assert folder is not None and folder != weights.parent
        pinned = folder / weights.name
        assert pinned.read_bytes() == weights.read_bytes()
        assert os.stat(pinned).st_ino == os.stat(weights).st_ino  # the same file, not a copy
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert not folder.exists() and weights.is_file()


def test_a_wrong_hash_is_refused_before_onnxruntime_reads(weights):
    with pytest.raises(ArtifactError, match="ONNX external data .*unet.onnx.data does not match its sha256"):
        with pinned_weights([(weights, "0" * 64)]):
            pytest.fail("the block must not run")


def test_a_write_while_loading_is_caught(weights):
    with pytest.raises(ArtifactError, match="changed while onnxruntime was loading it"):
        with pinned_weights([(weights, _sha(weights))]):
            with open(weights, "r+b") as f:  # in place: same inode, new bytes
                f.write(b"\1\2\3\4")


def test_a_rename_out_and_back_keeps_the_verified_bytes_and_is_accepted(weights):
    # The inode's ctime moves, but its bytes (hashed again) and the path's inode are the same:
    # onnxruntime read exactly what was verified.
    with pinned_weights([(weights, _sha(weights))]) as folder:
        moved = weights.with_name("elsewhere")
        os.rename(weights, moved)
        os.rename(moved, weights)
    assert folder is not None


def test_a_rename_away_during_a_load_is_refused(weights):
    with pytest.raises(ArtifactError, match="cannot read ONNX external data"):
        with pinned_weights([(weights, _sha(weights))]):
            os.rename(weights, weights.with_name("elsewhere"))


def test_a_path_swapped_between_open_and_link_is_refused(weights, monkeypatch):
    other = weights.with_name("other.data")
    other.write_bytes(weights.read_bytes())
    real_link = os.link
    monkeypatch.setattr(pinned_files.os, "link", lambda src, dst, **kw: real_link(other, dst, **kw))
    with pytest.raises(ArtifactError, match="was replaced while it was being opened"):
        with pinned_weights([(weights, _sha(weights))]):
            pytest.fail("the block must not run")


def test_where_no_hard_link_can_be_made_it_yields_none(weights, monkeypatch):
    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(pinned_files.os, "link", cross_device)
    with pinned_weights([(weights, _sha(weights))]) as folder:
        assert folder is None


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(ArtifactError, match=r"cannot read ONNX external data .*missing.data"):
        with pinned_weights([(tmp_path / "missing.data", None)]):
            pass


@pytest.mark.parametrize("pinned", [True, False])
def test_the_engine_runs_the_same_graph_pinned_or_from_memory(tmp_path, monkeypatch, pinned):
    pytest.importorskip("onnx", reason="building a graph with external data needs the onnx package")
    weight = external_weights_graph(tmp_path, "m.onnx.data")
    if not pinned:
        monkeypatch.setattr(pinned_files.os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no")))
    seen = []
    real = pinned_files.pinned_weights

    def spy(files):
        cm = real(files)
        folder = cm.__enter__()
        seen.append(folder)
        return _Reentered(cm, folder)

    monkeypatch.setattr("aptp.runtime.engine.pinned_weights", spy)
    data = tmp_path / "m.onnx.data"
    engine = OnnxRuntimeEngine(tmp_path / "m.onnx", threads=1, sha256=_sha(tmp_path / "m.onnx"),
                               external_data=[(data, _sha(data))])
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(engine.infer({"x": x})["y"], x @ weight, rtol=1e-6)
    assert (seen[0] is not None) == pinned


class _Reentered:
    """A context manager already entered (so the test can see what it yielded)."""

    def __init__(self, cm, value):
        self.cm, self.value = cm, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def test_a_symlink_inside_the_export_is_pinned_by_its_target(weights):
    link = weights.with_name("alias.data")
    link.symlink_to(weights.name)
    with pinned_weights([(link, _sha(weights))]) as folder:
        assert folder is not None
        assert os.stat(folder / "alias.data").st_ino == os.stat(weights).st_ino


_LOADER = """
import sys
from pathlib import Path
import numpy as np
from aptp.runtime.engine import OnnxRuntimeEngine
graph, data, graph_sha, data_sha, loads = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
failures = []
for _ in range(loads):
    try:
        engine = OnnxRuntimeEngine(graph, threads=1, sha256=graph_sha, external_data=[(data, data_sha)])
        engine.infer({"x": np.ones((1, 64), np.float32)})
    except Exception as err:
        failures.append(str(err))
print(f"{loads - len(failures)} of {loads} loads")
for failure in failures:
    print("FAILED:", failure)
sys.exit(1 if failures else 0)
"""


def test_many_processes_load_one_export_at_once(tmp_path):
    """Several processes (a server, a CLI, replicas, a benchmark) pinning the same weights link and
    unlink its inode, which moves its ctime: that must not look like a change of the file."""
    pytest.importorskip("onnx", reason="building a graph with external data needs the onnx package")
    import subprocess
    import sys

    external_weights_graph(tmp_path, "m.onnx.data")
    graph, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    processes, loads = 4, 10
    command = [sys.executable, "-c", _LOADER, str(graph), str(data), _sha(graph), _sha(data), str(loads)]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(processes)]
    outputs = [p.communicate(timeout=300)[0] for p in running]
    assert [p.returncode for p in running] == [0] * processes, "\n".join(outputs)
    assert all(f"{loads} of {loads} loads" in out for out in outputs)


def test_a_link_made_by_another_loader_is_not_a_change(weights):
    with pinned_weights([(weights, _sha(weights))]) as folder:
        assert folder is not None
        other = weights.with_name("another-loaders-link")
        os.link(weights, other)  # what a second process pinning the same file does: ctime moves
        os.unlink(other)


def test_a_file_swapped_in_at_the_path_during_a_load_is_refused(weights):
    with pytest.raises(ArtifactError, match="was replaced in the export while onnxruntime was loading it"):
        with pinned_weights([(weights, _sha(weights))]):
            swapped = weights.with_name("swapped")
            swapped.write_bytes(weights.read_bytes()[::-1])
            os.replace(swapped, weights)


def test_bytes_changed_with_the_old_mtime_restored_are_caught_by_the_hash(weights):
    with pytest.raises(ArtifactError, match="changed while onnxruntime was loading it"):
        with pinned_weights([(weights, _sha(weights))]):
            status = os.stat(weights)
            with open(weights, "r+b") as f:
                f.write(b"\1\2\3\4")
            os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))  # hide the write from mtime
