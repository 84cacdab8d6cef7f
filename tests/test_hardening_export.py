"""Issue 9, export side: aptp-export never deletes what it did not write, stays atomic on a full
disk, gives exports ordinary permissions, and reports bad or corrupt inputs in one line.

The checkpoint is the one the runtime tests export (`runtime_fixtures.tiny_export`, built once
per session); tests that change it work on a copy.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_fixtures import checkpoint_of_export, tiny_export  # noqa: E402

from aptp.errors import OutputError, StorageError  # noqa: E402
from aptp.export.manifest import read_manifest, write_manifest  # noqa: E402
from aptp.outputs import EXPORT, check_output_dir, staged_output  # noqa: E402


@pytest.fixture(scope="session")
def shared_export(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("runtime-export"))


@pytest.fixture(scope="session")
def shared_checkpoint(shared_export) -> Path:
    return checkpoint_of_export()


@pytest.fixture
def checkpoint_copy(shared_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(shared_checkpoint, tmp_path / "work" / "ckpt"))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_export(root: Path) -> Path:
    (root / "experts" / "expert_0").mkdir(parents=True)
    (root / "experts" / "expert_0" / "unet.onnx").write_bytes(b"graph bytes")
    write_manifest(root, {"num_codes": 1, "experts": [{"code": 0, "unet": "experts/expert_0/unet.onnx"}]})
    return root


def _cli(args, capsys) -> tuple[int, str]:
    from aptp.export.cli import main

    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("aptp-export")]
    assert "Traceback" not in err, err
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("aptp-export: error: "), err
    return rc, lines[0] if lines else ""


# -- item 1: nothing the export did not write is deleted --------------------------------------


def test_user_folder_with_a_file_survives(checkpoint_copy, tmp_path, capsys):
    folder = tmp_path / "my-photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    for extra in ([], ["--overwrite"]):
        rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", folder, *extra], capsys)
        assert rc == 2 and "not an aptp export" in line and str(folder) in line
        assert _tree(folder) == {"holiday.jpg": b"\xff\xd8 precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-photos", "work"]  # no staging left


def test_checkpoint_survives_output_equal_to_it_or_its_parent(checkpoint_copy, tmp_path, capsys):
    before = _tree(checkpoint_copy)
    link = tmp_path / "link-to-ckpt"
    link.symlink_to(checkpoint_copy)
    cases = [(checkpoint_copy, "is the checkpoint"), (checkpoint_copy.parent, "contains the checkpoint"),
             (checkpoint_copy / "export", "is inside the checkpoint"), (link, "is the checkpoint")]
    for output, relation in cases:
        for extra in ([], ["--overwrite"]):
            rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", output, *extra], capsys)
            assert rc == 2 and relation in line, line
    assert _tree(checkpoint_copy) == before
    assert sorted(p.name for p in checkpoint_copy.parent.iterdir()) == ["ckpt"]


def test_checkpoint_inside_an_old_export_is_protected(tmp_path):
    export = _fake_export(tmp_path / "A")
    (export / "ckpt").mkdir()
    with pytest.raises(OutputError, match="contains the checkpoint"):
        check_output_dir(export, EXPORT, allow_existing=True, inputs=[("checkpoint", export / "ckpt")])


def test_existing_export_needs_overwrite(checkpoint_copy, tmp_path, capsys):
    old = _fake_export(tmp_path / "A")
    before = _tree(old)
    rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", old], capsys)
    assert rc == 2 and "already holds an aptp export" in line and "--overwrite" in line
    assert _tree(old) == before
    # With --overwrite the check passes; the export then fails on its options and keeps the old one.
    rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", old, "--overwrite", "--resolution", "72"], capsys)
    assert rc == 2 and "multiple of" in line
    assert _tree(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "work"]


def test_output_that_is_or_sits_under_a_file(checkpoint_copy, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for output in (blocker, blocker / "A", blocker / "deeper" / "A"):
        rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", output], capsys)
        assert rc == 2 and "not a directory" in line, line
    assert blocker.read_text() == "keep me"


def test_empty_directory_and_new_path_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", EXPORT) is False
    assert check_output_dir(tmp_path / "new" / "deeper", EXPORT) is False
    assert check_output_dir(_fake_export(tmp_path / "A"), EXPORT, allow_existing=True) is True


def test_commit_keeps_files_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "A"
    with pytest.raises(OutputError, match="changed while aptp was writing"):
        with staged_output(target, EXPORT) as staging:
            _fake_export(staging)
            target.mkdir()
            (target / "mine.txt").write_text("mine")
    assert _tree(target) == {"mine.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]


# -- disk full, permission denied ------------------------------------------------------------


def test_disk_full_during_export_keeps_the_old_export(monkeypatch, checkpoint_copy, tmp_path, capsys):
    import aptp.train.experts as experts

    old = _fake_export(tmp_path / "A")
    before = _tree(old)
    writes = []

    def full_disk(tensors, filename, *args, **kwargs):
        writes.append(filename)
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(experts, "save_file", full_disk)
    rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", old, "--overwrite", "--no-dense"], capsys)
    assert writes, "the export never reached the expert weights"
    assert rc == 2 and "No space left on device" in line and "left as it was" in line
    assert _tree(old) == before
    read_manifest(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "work"]  # no staging folder behind
    # The Python API raises the typed error.
    from aptp.export import export_checkpoint

    with pytest.raises(StorageError, match="No space left"):
        export_checkpoint(checkpoint_copy, old, overwrite=True)
    assert _tree(old) == before


def test_unwritable_parent(monkeypatch, checkpoint_copy, tmp_path, capsys):
    import aptp.outputs as outputs

    def no_mkdir(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(outputs.Path, "mkdir", no_mkdir)
    rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", tmp_path / "A"], capsys)
    assert rc == 2 and "Permission denied" in line
    monkeypatch.undo()
    read_only = tmp_path / "ro"
    read_only.mkdir()
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)  # what EROFS/EACCES report
    rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", read_only / "A"], capsys)
    assert rc == 2 and "not writable" in line


# -- item 2: ordinary permissions -------------------------------------------------------------


def test_export_has_ordinary_permissions(shared_export):
    umask = os.umask(0)
    os.umask(umask)
    for path in [shared_export, *shared_export.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == want, (path, oct(mode), oct(want))


def test_staged_files_get_ordinary_permissions(tmp_path):
    import tempfile

    import torch
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        with staged_output(tmp_path / "A", EXPORT) as staging:
            save_file({"w": torch.zeros(2)}, str(staging / "w.safetensors"))  # safetensors: 0600
            fd, _ = tempfile.mkstemp(dir=staging)  # 0600
            os.close(fd)
            Path(tempfile.mkdtemp(dir=staging)).joinpath("x").write_text("x")  # dir 0700
            _fake_export(staging / "inner")
            write_manifest(staging, {"num_codes": 1})
    finally:
        os.umask(umask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "A").rglob("*") if p.is_file()}
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "A", *(tmp_path / "A").rglob("*")] if p.is_dir()}
    assert modes == {0o644} and dirs == {0o755}


# -- item 3: corrupt checkpoint files are one line naming the file ------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set_json(path: Path, value) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def _edit_json(name: str, key: str, value):
    def edit(ckpt: Path) -> None:
        data = json.loads((ckpt / name).read_text())
        data[key] = value
        _set_json(ckpt / name, data)
    return edit


CORRUPTIONS = {
    "codes-garbage": (lambda c: (c / "codes.safetensors").write_bytes(os.urandom(64)), "codes.safetensors"),
    "codes-truncated": (lambda c: _truncate(c / "codes.safetensors"), "codes.safetensors"),
    "checkpoint-list": (lambda c: _set_json(c / "checkpoint.json", [1, 2]), "checkpoint.json"),
    "checkpoint-invalid": (lambda c: _set_json(c / "checkpoint.json", '{"format": 1,'), "checkpoint.json"),
    "checkpoint-string-count": (_edit_json("checkpoint.json", "num_codes", "2"), "'num_codes'"),
    "checkpoint-ratios-strings": (_edit_json("checkpoint.json", "code_macs_ratio", ["a", "b"]), "'code_macs_ratio'"),
    "checkpoint-deep": (lambda c: _set_json(c / "checkpoint.json", "[" * 100000 + "]" * 100000), "checkpoint.json"),
    "layout-invalid": (lambda c: _set_json(c / "gate_layout.json", "{nope"), "gate_layout.json"),
    "layout-list": (lambda c: _set_json(c / "gate_layout.json", [1]), "gate_layout.json"),
    "layout-wrong-types": (_edit_json("gate_layout.json", "sites", "oops"), "gate_layout.json"),
    "routing-invalid": (lambda c: _set_json(c / "routing.json", "{"), "routing.json"),
    "routing-share-strings": (lambda c: _set_json(c / "routing.json", {"share": ["x", "y"]}), "routing.json"),
    "head-config-invalid": (lambda c: _set_json(c / "router_head" / "config.json", "[}"), "config.json"),
    "head-config-string-dim": (_edit_json("router_head/config.json", "embed_dim", "384"), "'embed_dim'"),
    "head-weights-truncated": (lambda c: [_truncate(p) for p in (c / "router_head").glob("*.safetensors")],
                               "router_head"),
    "expert-weights-truncated": (
        lambda c: _truncate(c / "experts" / "expert_0" / "diffusion_pytorch_model.safetensors"),
        "diffusion_pytorch_model.safetensors"),
    "expert-config-invalid": (lambda c: _set_json(c / "experts" / "expert_0" / "base_config.json", "{"),
                              "base_config.json"),
    "expert-info-list": (lambda c: _set_json(c / "experts" / "expert_0" / "expert.json", "[]"), "expert.json"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_file_is_one_line(case, checkpoint_copy, tmp_path, capsys):
    corrupt, named = CORRUPTIONS[case]
    corrupt(checkpoint_copy)
    rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", tmp_path / "A", "--no-dense"], capsys)
    assert rc == 2 and named in line, line
    assert not (tmp_path / "A").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_unreadable_json_is_an_artifact_error(monkeypatch, tmp_path):
    from aptp.errors import ArtifactError
    from aptp.readers import read_json

    path = tmp_path / "checkpoint.json"
    path.write_text("{}")

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ArtifactError, match="cannot read .*checkpoint.json: Permission denied"):
        read_json(path)
    monkeypatch.undo()
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ArtifactError, match="not a UTF-8"):
        read_json(tmp_path / "bin.json")
    with pytest.raises(ArtifactError, match="is a directory"):
        read_json(tmp_path)


# -- the same output rule for aptp-train and aptp-bench ----------------------------------------


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def _train(args, capsys) -> tuple[int, str]:
    from aptp.train.cli import main

    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("aptp-train")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("aptp-train: error: "), err
    return rc, lines[0]


def test_prune_output_dir_rules(tmp_path, capsys):
    folder = _user_folder(tmp_path / "docs")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [(folder, [], "not an aptp pruning run"), (folder, ["--resume"], "not an aptp pruning run"),
             (blocker, [], "not a directory"), (blocker / "run", [], "not a directory"),
             (tmp_path / "nothing", ["--resume"], "holds no pruning run to resume")]
    for output, extra, message in cases:
        rc, line = _train(["prune", "--config", "tiny", "--output-dir", output, *extra], capsys)
        assert rc == 2 and message in line, line
    assert (folder / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in folder.iterdir()) == [
        "thesis.tex"]
    assert blocker.read_text() == "x" and not (tmp_path / "nothing").exists()


def test_seed_beyond_64_bits_is_one_line(tmp_path, capsys):
    rc, line = _train(["prune", "--config", "tiny", "--output-dir", tmp_path / "run", "--set",
                       f"seed={2**64}"], capsys)
    assert rc == 2 and "seed must be an integer in [0, 2**63)" in line
    rc, line = _train(["pretrain", "--output-dir", tmp_path / "p", "--set", f"seed={2**64}"], capsys)
    assert rc == 2 and "seed must be an integer" in line


def test_pretrain_never_wipes_a_user_folder(tmp_path, capsys):
    folder = _user_folder(tmp_path / "docs")
    for extra in ([], ["--overwrite"]):
        rc, line = _train(["pretrain", "--output-dir", folder, *extra], capsys)
        assert rc == 2 and "not a pipeline written by aptp-train pretrain" in line, line
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def test_bench_output_dir_rules(shared_export, tmp_path, capsys):
    from aptp.benchmarks.cli import main

    folder = _user_folder(tmp_path / "docs")
    for output, message in ((folder, "not aptp-bench results"), (shared_export, "is the export"),
                            (shared_export / "bench", "is inside the export")):
        assert main(["latency", "--artifacts", str(shared_export), "--output-dir", str(output)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"aptp-bench: error: --output-dir {output}" in err and message in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    assert not (shared_export / "bench").exists()


@pytest.mark.parametrize("argv", [["aptp.train.cli", "prune", "--config", "tiny", "--output-dir", "{tmp}/run"],
                                  ["aptp.export.cli", "--checkpoint", "{tmp}/ckpt", "--output", "{tmp}/A"],
                                  ["aptp.benchmarks.cli", "make-synthetic", "--output", "{tmp}/S"]])
def test_missing_training_extra_names_it(argv, tmp_path):
    import subprocess

    module, *args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = ("import sys\n"
            "for name in ('torch', 'diffusers', 'transformers'):\n"
            "    sys.modules[name] = None  # as after `pip install aptp` without extras\n"
            f"from {module} import main\n"
            f"sys.exit(main({args!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "needs the 'torch' package" in lines[0] and "pip install 'aptp[train]'" in lines[0]


# -- item 5: SDXL-style UNets are refused at load, naming the key ------------------------------


def _sdxl_style_pipeline(root: Path) -> Path:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    unet.save_pretrained(str(root / "unet"))
    (root / "model_index.json").write_text("{}")
    return root


def test_sdxl_style_unet_is_refused_at_load(tmp_path, capsys):
    from aptp.errors import ConfigError
    from aptp.train.models import load_components

    pipeline = _sdxl_style_pipeline(tmp_path / "sdxl")
    with pytest.raises(ConfigError, match="addition_embed_type='text_time'"):
        load_components(str(pipeline))
    rc, line = _train(["prune", "--config", "tiny", "--output-dir", tmp_path / "run",
                       "--set", f"model.pretrained={pipeline}", "--set", "data.num_samples=4"], capsys)
    assert rc == 2 and "addition_embed_type='text_time'" in line and "does not support" in line


def test_sdxl_style_checkpoint_is_refused_by_export(checkpoint_copy, tmp_path, capsys):
    pipeline = _sdxl_style_pipeline(tmp_path / "sdxl")
    data = json.loads((checkpoint_copy / "checkpoint.json").read_text())
    data["pretrained"] = str(pipeline)
    (checkpoint_copy / "checkpoint.json").write_text(json.dumps(data))
    rc, line = _cli(["--checkpoint", checkpoint_copy, "--output", tmp_path / "A"], capsys)
    assert rc == 2 and "addition_embed_type='text_time'" in line
    assert not (tmp_path / "A").exists()


# -- item 6: the base model reference survives a move -----------------------------------------


def test_recorded_base_model_is_tiny_hub_id_or_relative(tmp_path, monkeypatch):
    from aptp.train.checkpoint import record_pretrained, resolve_recorded_pretrained
    from aptp.train.models import TINY_WEIGHTS, resolve_pretrained

    run = tmp_path / "repo" / "runs" / "x"
    teacher = tmp_path / "repo" / "teachers" / "t"
    (teacher).mkdir(parents=True)
    run.mkdir(parents=True)
    assert record_pretrained("tiny", run) == "tiny"
    assert record_pretrained(resolve_pretrained("tiny"), run) == "tiny"
    assert record_pretrained("stabilityai/stable-diffusion-2-1", run) == "stabilityai/stable-diffusion-2-1"
    assert record_pretrained(str(teacher), run) == "../../teachers/t"
    (run / "own-teacher").mkdir()
    assert record_pretrained(str(run / "own-teacher"), run) == "./own-teacher"
    # The repository moves: the relative reference still finds the teacher.
    moved = tmp_path / "elsewhere"
    (tmp_path / "repo").rename(moved)
    found = resolve_recorded_pretrained("../../teachers/t", moved / "runs" / "x")
    assert Path(found) == moved / "teachers" / "t" and Path(found).is_dir()
    # Older checkpoints: the committed teacher's absolute path in a repository that moved.
    old = str(Path("/gone/checkout") / Path(*TINY_WEIGHTS.parts[-3:]))
    assert resolve_recorded_pretrained(old, run) == resolve_pretrained("tiny")
    # A cwd-relative path an older checkpoint recorded still resolves from the working directory.
    monkeypatch.chdir(moved)
    assert resolve_recorded_pretrained("./teachers/t", moved / "runs" / "x") == "./teachers/t"
    assert resolve_recorded_pretrained("stabilityai/stable-diffusion-2-1", run) == "stabilityai/stable-diffusion-2-1"


def test_old_checkpoint_naming_a_moved_committed_teacher_resolves(checkpoint_copy):
    from aptp.train.checkpoint import CheckpointInfo
    from aptp.train.models import TINY_WEIGHTS, resolve_pretrained

    data = json.loads((checkpoint_copy / "checkpoint.json").read_text())
    data["pretrained"] = str(Path("/old/home/aptp") / Path(*TINY_WEIGHTS.parts[-3:]))
    (checkpoint_copy / "checkpoint.json").write_text(json.dumps(data))
    assert CheckpointInfo.load(checkpoint_copy).base_model(checkpoint_copy) == resolve_pretrained("tiny")


def test_make_synthetic_refuses_a_user_folder(tmp_path, capsys):
    from aptp.benchmarks.cli import main

    folder = _user_folder(tmp_path / "docs")
    assert main(["make-synthetic", "--output", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not an aptp export" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # no pipeline or checkpoint built beside it
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def test_filesystem_errors_anywhere_in_a_command_are_one_line(capsys):
    from aptp.cli import run_command

    def full(path):
        def command():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return command

    assert run_command("aptp-train", full("/runs/x/state/step_5/model.safetensors")) == 2
    err = capsys.readouterr().err
    assert err == "aptp-train: error: No space left on device (/runs/x/state/step_5/model.safetensors)\n"
    assert run_command("aptp-bench", full(None)) == 2
    assert capsys.readouterr().err == "aptp-bench: error: No space left on device\n"

    def bug():
        raise OSError("no errno: a bug, not the machine")

    with pytest.raises(OSError, match="a bug"):
        run_command("aptp-train", bug)

    def missing_aptp_module():
        import aptp.no_such_module  # noqa: F401

    with pytest.raises(ModuleNotFoundError):
        run_command("aptp-train", missing_aptp_module)


def test_bench_seed_beyond_64_bits_is_one_line(tmp_path, capsys):
    from aptp.benchmarks.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["make-synthetic", "--output", str(tmp_path / "S"), "--seed", str(2**64)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "expected a seed in [0, 2**63)" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


# -- values no export can use: one line, before any work ---------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--resolution", "1000000"], "resolution must be 8..8192"),
    (["--max-batch", "1000000000"], "max-batch must be 1..1024"),
])
def test_absurd_options_are_one_line(args, message, tmp_path, capsys):
    rc, line = _cli(["--checkpoint", tmp_path / "nope", "--output", tmp_path / "A", *args], capsys)
    assert rc == 2 and message in line, line


def test_scheduler_steps_the_model_cannot_run_are_one_line():
    from aptp.errors import ConfigError
    from aptp.export.scheduler_tables import build_scheduler_table
    from aptp.train.models import resolve_pretrained
    from diffusers import DDIMScheduler

    config = dict(DDIMScheduler.load_config(resolve_pretrained("tiny"), subfolder="scheduler"))
    # DDIM with steps_offset=1 at 1000 steps reaches timestep 1000 (an IndexError inside diffusers).
    with pytest.raises(ConfigError, match="cannot run 1000 inference steps"):
        build_scheduler_table("ddim", config, 1000)
    with pytest.raises(ConfigError, match="set_timesteps"):
        build_scheduler_table("ddim", config, 5000)


def test_empty_or_non_finite_codes_are_refused(checkpoint_copy):
    import torch
    from safetensors.torch import load_file, save_file

    from aptp.errors import ArtifactError
    from aptp.export.exporter import _read_checkpoint

    path = checkpoint_copy / "codes.safetensors"
    original = load_file(str(path))
    tensors = {k: v.clone() for k, v in original.items()}
    tensors["hard_masks"][0] = 0
    save_file(tensors, str(path))
    with pytest.raises(ArtifactError, match="code 0's hard mask keeps no unit"):
        _read_checkpoint(checkpoint_copy)
    tensors = {k: v.clone() for k, v in original.items()}
    tensors["logits"][1, 3] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(ArtifactError, match="non-finite code logits"):
        _read_checkpoint(checkpoint_copy)
    save_file(original, str(path))
    data = json.loads((checkpoint_copy / "checkpoint.json").read_text())
    text = json.dumps({**data, "budget_target": "__nan__"}).replace('"__nan__"', "NaN")
    (checkpoint_copy / "checkpoint.json").write_text(text)
    with pytest.raises(ArtifactError, match="holds NaN"):
        _read_checkpoint(checkpoint_copy)
    data["code_share"] = [-1.0, 2.0]
    (checkpoint_copy / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="'code_share' holds -1.0"):
        _read_checkpoint(checkpoint_copy)


@pytest.mark.parametrize("extra, message", [
    (["--set", "vae.max_steps=abc"], "vae.max_steps must be an integer"),
    (["--set", "vae=[1"], "override 'vae=[1': malformed YAML at line 1"),
    (["--set", "vae=3"], "vae must be a mapping"),
    (["--set", "seed.x=1"], "seed is a value, not a section"),
    (["--config", "{bad_yaml}"], "malformed YAML"),
])
def test_bad_pretrain_config_is_one_line(extra, message, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    extra = [e.replace("{bad_yaml}", str(bad)) for e in extra]
    rc, line = _train(["pretrain", "--output-dir", tmp_path / "p", *extra], capsys)
    assert rc == 2 and message in line, line
    assert not (tmp_path / "p").exists()


def test_os_level_path_problems_are_output_errors(tmp_path):
    with pytest.raises(OutputError, match="File name too long"):
        check_output_dir(tmp_path / ("a" * 300), EXPORT)
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    with pytest.raises(OutputError):
        check_output_dir(tmp_path / "loop1", EXPORT)
    with pytest.raises(OutputError, match="cannot write there"):
        with staged_output(tmp_path / "loop1" / "A", EXPORT):
            pass


def test_missing_onnxruntime_names_both_flavours():
    from aptp.cli import missing_extra

    message = missing_extra(ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"))
    assert "pip install 'aptp[cpu]' (or 'aptp[gpu]')" in message
    assert "aptp[serve]" in missing_extra(ModuleNotFoundError("x", name="ray.serve"))
    assert missing_extra(ModuleNotFoundError("x", name="aptp.train.nothing")) is None
