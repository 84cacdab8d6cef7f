"""int8 UNets (`aptp.export.quantize`) and the runtime's ``precision="int8"``, on the tiny export."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aptp.errors import ArtifactError, RuntimeInputError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    """A copy of the tiny export (files linked, manifest copied) with int8 UNets added."""
    from aptp.export.quantize import quantize_export
    from runtime_fixtures import shallow_copy, tiny_export

    export = tiny_export(tmp_path_factory.getbasetemp() / "runtime")
    copy = shallow_copy(export, tmp_path_factory.mktemp("int8") / "export")
    quantize_export(copy, "int8", threads=1, calibration_prompts=2)
    return copy


def test_int8_unets_are_listed_hashed_and_measured(quantized):
    from aptp.export.manifest import file_sha256, read_manifest

    manifest = read_manifest(quantized, verify=True)  # every listed file, int8 included, matches its sha256
    entries = [*manifest["experts"], manifest["dense"]]
    for entry in entries:
        q = entry["int8"]
        path = quantized / q["unet"]
        assert path.is_file() and q["unet"] in manifest["files"]
        assert q["sha256"] == file_sha256(path) == manifest["files"][q["unet"]]
        assert entry["sha256"] == manifest["files"][entry["unet"]]
        files = [path] + ([quantized / q["external_data"]] if q.get("external_data") else [])
        assert all(p.relative_to(quantized).as_posix() in manifest["files"] for p in files)
        assert q["bytes"] == sum(p.stat().st_size for p in files) and 0 < q["bytes"] < entry["bytes"]
        assert q["method"] == "static-qdq"
        assert q["quantized_ops"].get("Conv", 0) > 0 and q["quantized_ops"].get("MatMul", 0) > 0
        assert q["calibration"]["unet_calls"] > 0
        err = q["error"]
        for name in ("latents_mean_abs", "latents_max_abs", "pixels_mean_abs"):
            assert math.isfinite(err[name]) and err[name] >= 0
        assert err["prompts"] == 4 and 0 <= err["pixels_max_abs"] <= 255
    assert manifest["quantization"]["int8"]["format"] == "QDQ"


def test_runtime_runs_int8_and_its_error_matches_the_manifest(quantized):
    from aptp.export.quantize import ERROR_PROMPTS
    from aptp.runtime import AptpPipeline

    int8 = AptpPipeline.from_export(quantized, threads=1, precision="int8")
    fp32 = AptpPipeline.from_export(quantized, threads=1)
    assert int8.unet_file(0).onnx.name == "unet.int8.onnx" and fp32.unet_file(0).onnx.name == "unet.onnx"
    a = fp32(list(ERROR_PROMPTS), seeds=0, expert=0)
    b = int8(list(ERROR_PROMPTS), seeds=0, expert=0)
    pixels = np.abs(np.stack([r.image for r in a]).astype(int) - np.stack([r.image for r in b]).astype(int)).mean()
    recorded = json.loads((quantized / "manifest.json").read_text())["experts"][0]["int8"]["error"]
    assert pixels == pytest.approx(recorded["pixels_mean_abs"])
    assert not np.array_equal(a[0].latents, b[0].latents)  # the int8 graph really ran
    # int8 under a memory budget of one int8 UNet: same results as without a budget
    tight = AptpPipeline.from_export(quantized, threads=1, precision="int8",
                                     memory_budget=2 * int8.residency.record(0).file_bytes)
    c = tight(list(ERROR_PROMPTS), seeds=0, expert=0)
    assert all(np.array_equal(x.latents, y.latents) for x, y in zip(b, c))


def test_a_tampered_int8_file_is_refused(quantized, tmp_path):
    from aptp.runtime import AptpPipeline
    from runtime_fixtures import shallow_copy

    manifest = json.loads((quantized / "manifest.json").read_text())
    rel = manifest["experts"][1]["int8"]["unet"]
    copy = shallow_copy(quantized, tmp_path / "tampered", copy=(rel,))
    with open(copy / rel, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        AptpPipeline.from_export(copy, precision="int8")


def test_precision_errors_are_clear(quantized):
    from aptp.runtime import AptpPipeline
    from runtime_fixtures import tiny_export

    plain = tiny_export(quantized.parent)  # the shared export, without int8 files
    with pytest.raises(ArtifactError, match="no int8 UNet .* --quantize int8"):
        AptpPipeline.from_export(plain, precision="int8")
    with pytest.raises(RuntimeInputError, match="holds fp32 UNets, not fp16"):
        AptpPipeline.from_export(quantized, precision="fp16")
    with pytest.raises(RuntimeInputError, match="precision must be one of"):
        AptpPipeline.from_export(quantized, precision="int4")


def test_quantize_with_fp16_is_one_line_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aptp.export.cli", "--checkpoint", str(tmp_path), "--output",
                           str(tmp_path / "out"), "--precision", "fp16", "--quantize", "int8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aptp-export: error: --quantize int8 starts from fp32"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_quantizing_a_hard_linked_graph_writes_ordinary_files_and_nothing_else(tmp_path):
    """Pipeline folders hard-link the export's weights (onnx refuses to load external data with
    several links) and onnxruntime writes an "-inferred" graph beside its input: the int8 graph
    is made from a private copy, and lands with the modes of the fp32 files."""
    import os

    from aptp.export.quantize import quantize_unet
    from runtime_fixtures import external_weights_graph

    external_weights_graph(tmp_path, "m.onnx.data")
    os.link(tmp_path / "m.onnx.data", tmp_path / "linked.data")  # what --pipeline-dirs does
    old_umask = os.umask(0o022)
    try:
        feeds = [{"x": np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)} for i in range(4)]
        quantize_unet(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", feeds, external_data=True)
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linked.data", "m.int8.onnx", "m.int8.onnx.data",
                                                          "m.onnx", "m.onnx.data"]
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.glob("m.int8.*")} == {"0o644"}
