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
    pytest.importorskip("onnx", reason="building a graph with external data needs the onnx package")
    from aptp.export.manifest import file_sha256
    from runtime_fixtures import external_weights_graph

    weight = external_weights_graph(tmp_path, "m.onnx_data")
    graph_sha, data_sha = file_sha256(tmp_path / "m.onnx"), file_sha256(tmp_path / "m.onnx_data")
    x = np.ones((1, 64), np.float32)

    engine = OnnxRuntimeEngine(tmp_path / "m.onnx", threads=1, sha256=graph_sha,
                               external_data=[(tmp_path / "m.onnx_data", data_sha)])
    np.testing.assert_allclose(engine.infer({"x": x})["y"], x @ weight, rtol=1e-6)

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


def test_tensorrt_plan_is_deserialised_from_the_hashed_bytes(tmp_path, monkeypatch):
    import hashlib
    import sys
    import types

    seen: list[bytes] = []

    class Runtime:  # the part of TensorRT's API that TensorRTEngine.load uses
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            seen.append(bytes(data))
            return types.SimpleNamespace(create_execution_context=lambda: object())

    fake = types.SimpleNamespace(__version__="fake", Runtime=Runtime,
                                 Logger=type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None}))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    from aptp.runtime.engine import TensorRTEngine

    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"serialized plan")
    digest = hashlib.sha256(b"serialized plan").hexdigest()
    TensorRTEngine(plan, sha256=digest).load()
    assert seen == [b"serialized plan"]
    plan.write_bytes(b"another plan")
    with pytest.raises(ArtifactError, match="TensorRT plan .*unet.plan does not match its sha256"):
        TensorRTEngine(plan, sha256=digest).load()
    assert len(seen) == 1  # the swapped bytes never reached TensorRT


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


# ---- aptp-generate and the Python API: one clear line, and serving goes on ---------------------

def _cli(export_dir, tmp_path, *args, output=None):
    from aptp.runtime.cli import main

    argv = ["--artifacts", str(export_dir), "--prompt", "a red car", "--prompt", "soup",
            "--output", str(output or tmp_path / "out.png"), "--threads", "1", *args]
    return main(argv)


@pytest.mark.parametrize("args, message", [
    (["--threads", "100000"], r"--threads must be an integer in \[1, 256\], got '100000'"),
    (["--threads", "-1"], r"--threads must be an integer in \[1, 256\]"),
    (["--threads", "two"], r"--threads must be an integer"),
    (["--guidance-scale", "-5"], r"guidance_scale must be in \[0, 100\]"),
    (["--guidance-scale", "1e308"], r"guidance_scale must be in \[0, 100\]"),
    (["--guidance-scale", "nan"], r"--guidance-scale must be a finite number"),
    (["--seed", str(2**64)], r"--seed must be an integer in \[0, 2\*\*63 - 2\] for 2 prompt\(s\)"),
    (["--seed", str(2**63 - 1)], r"--seed must be an integer in \[0, 2\*\*63 - 2\]"),
    (["--seed", "-1"], r"--seed must be an integer"),
    # Bytes that are not UTF-8 on the command line reach Python as lone surrogates.
    (["--prompt", "a \udcff car"], r"prompt 2 is not valid Unicode text: it holds the lone surrogate U\+DCFF"),
    (["--seed", "9" * 5000], r"--seed"),
    (["--memory-budget", "9" * 400], r"--memory-budget"),
])
def test_cli_out_of_range_values_are_one_error_line(export_dir, tmp_path, capsys, args, message):
    assert _cli(export_dir, tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aptp-generate: error: "), err
    import re

    assert re.search(message, err[0]), err[0]
    assert not list(tmp_path.glob("*.png"))


def test_cli_output_path_problems_are_one_error_line(export_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_dir.png").mkdir()
    (tmp_path / "a_file").write_text("mine")
    cases = [(tmp_path / "a_dir.png", "is a directory"),
             (tmp_path / "a_file" / "out.png", "is not a directory"),
             (tmp_path / "a_file" / "deeper" / "out.png", "is not a directory")]
    for output, message in cases:
        from aptp.runtime.cli import main

        assert main(["--artifacts", str(export_dir), "--prompt", "a cat", "--output", str(output)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (tmp_path / "a_file").read_text() == "mine"
    # No write permission / read-only filesystem: what access(2) reports (tests run as root,
    # who may write anywhere, so the answer is simulated).
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("aptp.runtime.cli.tempfile.NamedTemporaryFile", read_only)
    assert _cli(export_dir, tmp_path, output=tmp_path / "out.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write into" in err[0] and "Read-only file system" in err[0], err
    monkeypatch.setattr("aptp.runtime.cli.os.access", lambda path, mode: False)
    assert _cli(export_dir, tmp_path, output=tmp_path / "out.png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write into" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir.png", "a_file"]  # no probe file left


def test_failed_png_write_is_typed_and_keeps_the_old_file(tmp_path, monkeypatch):
    from PIL import Image

    from aptp.errors import RuntimeInputError
    from aptp.runtime.images import save_png

    target = tmp_path / "out.png"
    target.write_bytes(b"the user's old image")

    def read_only(self, fp, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Image.Image, "save", read_only)
    with pytest.raises(RuntimeInputError, match="cannot write .*out.png: Read-only file system"):
        save_png(np.zeros((8, 8, 3), np.uint8), target)
    assert target.read_bytes() == b"the user's old image"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_cli_deeply_nested_manifest_is_one_error_line(export_dir, tmp_path, capsys):
    copy = shallow_copy(export_dir, tmp_path / "export")
    (copy / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    assert _cli(copy, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nests JSON deeper than" in err[0], err


def test_prompts_file_too_large_or_endless_is_one_error(tmp_path, monkeypatch):
    from aptp.errors import RuntimeInputError
    from aptp.runtime import cli

    monkeypatch.setattr(cli, "MAX_PROMPTS_FILE_BYTES", 1000)
    (tmp_path / "big.txt").write_text("a cat\n" * 1000)
    with pytest.raises(RuntimeInputError, match="larger than"):
        cli.read_prompts_file(tmp_path / "big.txt")
    if Path("/dev/zero").exists():  # a device that never ends is refused before it is read
        with pytest.raises(RuntimeInputError, match="is a device or socket, not a regular file"):
            cli.read_prompts_file("/dev/zero")


@pytest.mark.parametrize("reader, error", [
    ("prompts", "RuntimeInputError"), ("private_key", "ConfigError"), ("public_key", "ConfigError"),
    ("png", "RuntimeInputError")])
def test_a_fifo_or_directory_named_as_an_input_file_is_refused_without_waiting(tmp_path, reader, error):
    import aptp.errors
    from aptp.export import signing
    from aptp.runtime import cli, images

    read = {"prompts": cli.read_prompts_file, "private_key": signing.load_private_key,
            "public_key": signing.load_public_key, "png": images.read_png_parameters}[reader]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came: refused at once instead
    with pytest.raises(getattr(aptp.errors, error), match="is a FIFO, not a regular file"):
        read(fifo)
    with pytest.raises(getattr(aptp.errors, error), match="is a directory, not a regular file"):
        read(tmp_path)


def test_api_refuses_bad_values_and_keeps_serving(export_dir):
    from aptp.errors import RuntimeInputError

    for threads in (-1, 0, 100_000, 2.5, True):
        with pytest.raises(RuntimeInputError, match=r"threads must be an integer in \[1, 256\]"):
            AptpPipeline.from_export(export_dir, verify=False, threads=threads)
    pipe = AptpPipeline.from_export(export_dir, threads=1)
    for kwargs, message in [({"guidance_scale": -5.0}, r"guidance_scale must be in \[0, 100\]"),
                            ({"guidance_scale": 1e308}, r"guidance_scale must be in \[0, 100\]"),
                            ({"guidance_scale": float("inf")}, "finite number"),
                            ({"seeds": [2**64]}, r"seeds\[0\] must be an integer in \[0, 2\*\*63\)"),
                            ({"seeds": [-1]}, r"seeds\[0\] must be an integer")]:
        with pytest.raises(RuntimeInputError, match=message):
            pipe(["a red car"], output_type="latent", **kwargs)
    with pytest.raises(RuntimeInputError, match="at most 100000 are accepted"):
        pipe(["a" * 100_001], output_type="latent")
    result = pipe(["a red car " * 50], seeds=[3], guidance_scale=100.0, output_type="latent")[0]
    assert result.truncated and np.isfinite(result.latents).all()  # long text is truncated, as diffusers does


def test_cli_generates_long_prompt_lists_in_chunks_with_the_same_images(export_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from aptp.runtime import cli

    prompts = [VEHICLE_PROMPTS[0], FOOD_PROMPTS[0], VEHICLE_PROMPTS[1]]
    monkeypatch.setattr(cli, "CHUNK_PROMPTS", 2)
    argv = ["--artifacts", str(export_dir), "--output", str(tmp_path / "img.png"), "--threads", "1", "--seed", "5"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert cli.main(argv) == 0
    whole = AptpPipeline.from_export(export_dir, threads=1)(prompts, seeds=5)
    for i, result in enumerate(whole):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"img_{i}.png")), result.image)
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[::2]] == ["[0]", "[1]", "[2]"]


def test_show_params_escapes_control_characters_and_refuses_a_pixel_bomb(tmp_path, capsys, monkeypatch):
    from PIL import Image, PngImagePlugin

    from aptp.runtime import cli

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "a cat\x1b[2J\x07")
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png", pnginfo=info)
    assert cli.main(["--show-params", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "prompt: a cat\\x1b[2J\\x07" in out and "\x1b" not in out
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x8 = 64 pixels: over twice the limit
    assert cli.main(["--show-params", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "declares too many pixels to decode safely" in err[0], err
