"""Contained, hashed-on-read, range-checked artifacts (issue 9, runtime half).

Uses the tiny export of `runtime_fixtures` (shared with test_runtime.py when both run in one
session). Each test edits a private copy (`shallow_copy`: hard links plus a real manifest).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from aptp.errors import ArtifactError
from aptp.runtime import AptpPipeline, load_artifacts
from aptp.runtime.engine import OnnxRuntimeEngine
from runtime_fixtures import FOOD_PROMPTS, VEHICLE_PROMPTS, shallow_copy, tiny_export

EXPERT_1 = "experts/expert_1/unet.onnx"


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("runtime"))


def _edit_manifest(copy: Path, edit) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))


# ---- containment -----------------------------------------------------------------------------

def test_symlink_out_of_the_export_is_refused(export_dir, tmp_path):
    copy = shallow_copy(export_dir, tmp_path / "export")
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(export_dir / EXPERT_1, outside)  # same bytes: the hash alone would pass it
    (copy / EXPERT_1).unlink()
    (copy / EXPERT_1).symlink_to(outside)
    with pytest.raises(ArtifactError, match=rf"files\['{EXPERT_1}'\].*resolves to .*outside the export"):
        load_artifacts(copy)
    with pytest.raises(ArtifactError, match="outside the export"):
        load_artifacts(copy, verify=False)


def test_symlink_inside_the_export_is_allowed(export_dir, tmp_path):
    copy = shallow_copy(export_dir, tmp_path / "export")
    (copy / "spare.onnx").write_bytes((copy / EXPERT_1).read_bytes())
    (copy / EXPERT_1).unlink()
    (copy / EXPERT_1).symlink_to(copy / "spare.onnx")
    assert load_artifacts(copy).experts[1].onnx == copy / EXPERT_1


@pytest.mark.parametrize("rel", ["../outside.onnx", "/etc/hostname", "experts/../../outside.onnx", "a\\b.onnx", ""])
def test_paths_leaving_the_export_are_refused(export_dir, tmp_path, rel):
    copy = shallow_copy(export_dir, tmp_path / "export")
    (tmp_path / "outside.onnx").write_bytes(b"x")

    def edit(m):
        m["files"][rel] = m["files"][EXPERT_1]
        m["experts"][1]["unet"] = rel

    _edit_manifest(copy, edit)
    with pytest.raises(ArtifactError, match=r"points outside the export|not a relative POSIX path"):
        load_artifacts(copy, verify=False)


def test_manifest_symlinked_from_outside_is_refused(export_dir, tmp_path):
    copy = shallow_copy(export_dir, tmp_path / "export")
    outside = tmp_path / "manifest.json"
    shutil.move(copy / "manifest.json", outside)
    (copy / "manifest.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match="manifest.json.*outside the export"):
        load_artifacts(copy)


# ---- hash on read ----------------------------------------------------------------------------

def test_file_swapped_after_verification_is_refused_at_load(export_dir, tmp_path):
    copy = shallow_copy(export_dir, tmp_path / "export", copy=(EXPERT_1,))
    pipe = AptpPipeline.from_export(copy, threads=1)  # verifies every hash; experts load lazily
    # Swap in another valid graph with the same inputs (the dense UNet) by rename, as an attacker would.
    staged = copy / "experts" / "expert_1" / "swap.onnx"
    shutil.copyfile(copy / "dense" / "unet.onnx", staged)
    os.replace(staged, copy / EXPERT_1)
    with pytest.raises(ArtifactError, match=rf"{EXPERT_1} does not match its sha256.*refusing to load it"):
        pipe([FOOD_PROMPTS[0]], seeds=[1], expert=1, output_type="latent")
    # The pipeline keeps serving what is intact.
    good = pipe([VEHICLE_PROMPTS[0]], seeds=[1], expert=0, output_type="latent")[0]
    assert good.expert == 0 and np.isfinite(good.latents).all()
    with pytest.raises(ArtifactError, match="does not match its sha256"):  # still refused, not cached
        pipe.unet(1)


def test_no_verify_still_hashes_what_it_loads(export_dir, tmp_path):
    copy = shallow_copy(export_dir, tmp_path / "export", copy=(EXPERT_1,))
    data = bytearray((copy / EXPERT_1).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / EXPERT_1).write_bytes(bytes(data))
    pipe = AptpPipeline.from_export(copy, threads=1, verify=False)  # existence only, up front
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        pipe.unet(1)


def test_tokenizer_is_parsed_from_the_hashed_bytes(export_dir, tmp_path):
    copy = shallow_copy(export_dir, tmp_path / "export", copy=("tokenizer/tokenizer.json",))
    artifacts = load_artifacts(copy)
    (copy / "tokenizer" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": None}))
    with pytest.raises(ArtifactError, match="tokenizer/tokenizer.json does not match its sha256"):
        AptpPipeline(artifacts, threads=1)


def test_unreadable_file_is_one_clear_error(export_dir, tmp_path, monkeypatch):
    copy = shallow_copy(export_dir, tmp_path / "export")
    pipe = AptpPipeline.from_export(copy, threads=1)
    real_open = open

    def deny(path, *args, **kwargs):  # what a file without read permission gives (tests run as root)
        if str(path).endswith(EXPERT_1):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(ArtifactError, match=rf"cannot read ONNX graph .*{EXPERT_1}: Permission denied"):
        pipe.unet(1)
    with pytest.raises(ArtifactError, match=rf"cannot read .*{EXPERT_1}: Permission denied"):
        load_artifacts(copy)


def test_external_weights_are_hashed_and_given_from_memory(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx", reason="building a graph with external data needs the onnx package")
    from onnx import TensorProto, helper, numpy_helper

    from aptp.export.manifest import file_sha256

    weight = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx_data", size_threshold=0)
    graph_sha, data_sha = file_sha256(tmp_path / "m.onnx"), file_sha256(tmp_path / "m.onnx_data")
    x = np.ones((1, 64), np.float32)

    engine = OnnxRuntimeEngine(tmp_path / "m.onnx", threads=1, sha256=graph_sha,
                               external_data=[(tmp_path / "m.onnx_data", data_sha)])
    np.testing.assert_array_equal(engine.infer({"x": x})["y"], x @ numpy_helper.to_array(weight))

    # Without the external file given, onnxruntime must not read one from disk by itself (here:
    # from the working directory, where a planted copy waits).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match="onnxruntime cannot load"):
        OnnxRuntimeEngine(tmp_path / "m.onnx", threads=1, sha256=graph_sha).load()

    (tmp_path / "m.onnx_data").write_bytes(np.zeros(64 * 64, np.float32).tobytes())
    swapped = OnnxRuntimeEngine(tmp_path / "m.onnx", threads=1, sha256=graph_sha,
                                external_data=[(tmp_path / "m.onnx_data", data_sha)])
    with pytest.raises(ArtifactError, match="ONNX external data .*m.onnx_data does not match its sha256"):
        swapped.load()


# ---- ranges ----------------------------------------------------------------------------------

def _set(path: str, value):
    def edit(m):
        node = m
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        last = keys[-1]
        node[int(last) if last.isdigit() else last] = value
    return edit


@pytest.mark.parametrize("path, value, message", [
    ("num_codes", 10**12, r"num_codes must be an integer in \[1, 1024\]"),
    ("image.height", 10**6, r"image.height must be an integer in \[8, 8192\]"),
    ("image.min_size", 0, r"image.min_size must be an integer in \[8, 8192\]"),
    ("latent.channels", 10**9, r"latent.channels must be an integer in \[1, 64\]"),
    ("latent.height", 17, r"latent.height is 17: times vae.scale_factor=4 it must equal image.height=64"),
    ("tokenizer.max_length", 10**12, r"tokenizer.max_length must be an integer in \[1, 8192\]"),
    ("router.encoder.max_length", -1, r"router.encoder.max_length must be an integer"),
    ("tokenizer.pad_token_id", 2**40, r"tokenizer.pad_token_id must be an integer in \[0, "),
    ("scheduler.coef_model.0", 1e300, r"scheduler.coef_model\[0\] is 1e\+300, outside"),
    ("scheduler.init_noise_sigma", 1e30, r"scheduler.init_noise_sigma must be in"),
    ("vae.scaling_factor", 5e-324, r"vae.scaling_factor must be a normal float"),
    ("vae.scaling_factor", 1e9, r"vae.scaling_factor must be in \[0.0001, 10000\]"),
    ("guidance_scale", 1e308, r"guidance_scale must be in \[0, 100\]"),
    ("max_batch", 10**9, r"max_batch must be an integer in \[1, 1024\]"),
    ("experts.0.share", 7.0, r"experts\[0\].share must be in \[0, 1\]"),
    ("experts.0.macs_ratio", -1.0, r"experts\[0\].macs_ratio must be > 0"),
    ("text_encoder.hidden_size", "64", r"text_encoder.hidden_size must be an integer"),
])
def test_out_of_range_manifest_value_is_refused(export_dir, tmp_path, path, value, message):
    copy = shallow_copy(export_dir, tmp_path / "export")
    _edit_manifest(copy, _set(path, value))
    with pytest.raises(ArtifactError, match=message) as info:
        load_artifacts(copy, verify=False)
    assert "\n" not in str(info.value) and "manifest.json" in str(info.value)


@pytest.mark.parametrize("text, message", [
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nests JSON deeper than 16 levels"),
    ('{"a": ' * 17 + "1" + "}" * 17, "nests JSON deeper than 16 levels"),
    ('{"format": "aptp-export", "x": NaN}', "NaN is not a valid number"),
    ('{"format": "aptp-export", "x": 1e999}', "overflows a float"),
    ("[", "is not valid JSON"),
])
def test_hostile_manifest_json_is_one_error(export_dir, tmp_path, text, message):
    copy = shallow_copy(export_dir, tmp_path / "export")
    (copy / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match=message):
        load_artifacts(copy, verify=False)
