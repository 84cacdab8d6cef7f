"""aptp-train: bad input is one error line and exit code 2; handlers call the trainer as specified."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from aptp.errors import ArtifactError
from aptp.train.cli import main
from aptp.train.config import TrainConfig


@pytest.fixture
def fake_trainer(monkeypatch):
    """A stand-in `aptp.train.trainer` recording its calls (the real one is the lead's)."""
    calls: dict[str, tuple] = {}
    module = types.ModuleType("aptp.train.trainer")

    def run_prune(config, output_dir, resume):
        calls["prune"] = (config, output_dir, resume)

    def run_route(checkpoint_dir, prompts, data_format, data_path, output):
        calls["route"] = (checkpoint_dir, prompts, data_format, data_path, output)
        return checkpoint_dir / "routing.json"

    def run_finetune(checkpoint_dir, expert, max_steps, resume, overrides):
        calls["finetune"] = (checkpoint_dir, expert, max_steps, resume, overrides)
        if expert == 99:
            raise ArtifactError(f"expert 99 not in {checkpoint_dir}:\nthe checkpoint has 4 experts")
        return checkpoint_dir / "experts" / str(expert)

    module.run_prune, module.run_route, module.run_finetune = run_prune, run_route, run_finetune
    monkeypatch.setitem(sys.modules, "aptp.train.trainer", module)
    return calls


def assert_one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("aptp-train: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def prune_args(tmp_path: Path, config: str, *extra: str) -> list[str]:
    return ["prune", "--config", config, "--output-dir", str(tmp_path / "run"), *extra]


def test_missing_config(tmp_path, capsys, fake_trainer):
    assert main(prune_args(tmp_path, str(tmp_path / "missing.yaml"))) == 2
    assert_one_error_line(capsys, "not found", "missing.yaml")
    assert "prune" not in fake_trainer


def test_bad_yaml(tmp_path, capsys, fake_trainer):
    path = tmp_path / "bad.yaml"
    path.write_text("prune:\n  max_steps: [1, 2\n")
    assert main(prune_args(tmp_path, str(path))) == 2
    assert_one_error_line(capsys, "malformed YAML", "line")


def test_target_out_of_range(tmp_path, capsys, fake_trainer):
    path = tmp_path / "target.yaml"
    path.write_text("budget:\n  target: 1.5\n")
    assert main(prune_args(tmp_path, str(path))) == 2
    assert_one_error_line(capsys, "budget.target", "1.5")


def test_zero_codes_by_override(tmp_path, capsys, fake_trainer):
    assert main(prune_args(tmp_path, "tiny", "--set", "codes.num_codes=0")) == 2
    assert_one_error_line(capsys, "codes.num_codes", "at least 1")


def test_unknown_key_lists_valid_ones(tmp_path, capsys, fake_trainer):
    assert main(prune_args(tmp_path, "tiny", "--set", "prune.epochs=3")) == 2
    assert_one_error_line(capsys, "'epochs'", "max_steps")


def test_prune_passes_config_with_max_steps(tmp_path, fake_trainer):
    code = main(prune_args(tmp_path, "tiny", "--max-steps", "3", "--resume", "--set", "seed=5"))
    assert code == 0
    config, output_dir, resume = fake_trainer["prune"]
    assert isinstance(config, TrainConfig)
    assert config.prune.max_steps == 3 and config.seed == 5 and config.codes.num_codes == 4
    assert output_dir == tmp_path / "run" and resume is True


def test_non_positive_max_steps_is_a_usage_error(tmp_path, capsys, fake_trainer):
    with pytest.raises(SystemExit) as info:
        main(prune_args(tmp_path, "tiny", "--max-steps", "0"))
    assert info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_route_reads_prompt_file(tmp_path, fake_trainer):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n")
    assert main(["route", "--checkpoint", str(tmp_path), "--prompts", str(prompts)]) == 0
    assert fake_trainer["route"] == (tmp_path, ["a cat", "a dog"], None, None, None)


def test_route_dataset(tmp_path, fake_trainer):
    out = tmp_path / "r.json"
    argv = ["route", "--checkpoint", str(tmp_path), "--data-format", "jsonl", "--data-path", "d.jsonl", "--output", str(out)]
    assert main(argv) == 0
    assert fake_trainer["route"] == (tmp_path, None, "jsonl", "d.jsonl", out)


def test_route_missing_prompt_file(tmp_path, capsys, fake_trainer):
    assert main(["route", "--checkpoint", str(tmp_path), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert_one_error_line(capsys, "does not exist", "none.txt")
    assert "route" not in fake_trainer


def test_route_empty_prompt_file(tmp_path, capsys, fake_trainer):
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main(["route", "--checkpoint", str(tmp_path), "--prompts", str(tmp_path / "empty.txt")]) == 2
    assert_one_error_line(capsys, "has no usable samples", "empty.txt")


def test_route_data_path_without_format(tmp_path, capsys, fake_trainer):
    assert main(["route", "--checkpoint", str(tmp_path), "--data-path", "x"]) == 2
    assert_one_error_line(capsys, "--data-format")


def test_finetune_passes_arguments(tmp_path, fake_trainer):
    argv = ["finetune", "--checkpoint", str(tmp_path), "--expert", "2", "--max-steps", "5", "--set", "finetune.learning_rate=1e-4"]
    assert main(argv) == 0
    assert fake_trainer["finetune"] == (tmp_path, 2, 5, False, ["finetune.learning_rate=1e-4"])


def test_finetune_bad_override_name(tmp_path, capsys, fake_trainer):
    assert main(["finetune", "--checkpoint", str(tmp_path), "--expert", "0", "--set", "finetune.lr=1"]) == 2
    assert_one_error_line(capsys, "unknown key 'lr' in section 'finetune'")
    assert "finetune" not in fake_trainer


def test_trainer_errors_are_one_line(tmp_path, capsys, fake_trainer):
    assert main(["finetune", "--checkpoint", str(tmp_path), "--expert", "99"]) == 2
    assert_one_error_line(capsys, "expert 99", "4 experts")


def test_keyboard_interrupt_exits_130(tmp_path, capsys, fake_trainer, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["aptp.train.trainer"], "run_prune", interrupted)
    assert main(prune_args(tmp_path, "tiny")) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_bugs_keep_their_traceback(tmp_path, fake_trainer, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sys.modules["aptp.train.trainer"], "run_prune", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(prune_args(tmp_path, "tiny"))
