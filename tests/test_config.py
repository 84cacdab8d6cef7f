"""aptp.train.config: presets, validation messages, overrides, round trip."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from aptp.errors import ConfigError
from aptp.train.config import TrainConfig, apply_overrides, load_config, parse_overrides, preset_names


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_tiny_preset_loads_with_its_values():
    config = load_config("tiny")
    assert "tiny" in preset_names()
    assert config.model.pretrained == "tiny"
    assert config.model.resolution == 64
    assert config.codes.num_codes == 4
    assert config.gates.ff_groups == 8
    assert config.data.format == "procedural"
    # Values the preset leaves out keep the reference defaults.
    assert config.loss_weights == TrainConfig().loss_weights
    assert config.sinkhorn.iterations == 3
    assert isinstance(config.prune.learning_rate, float)


def test_defaults_are_the_reference_setting():
    config = TrainConfig()
    assert config.codes.num_codes == 8
    assert config.budget.target == pytest.approx(0.6)
    assert (config.loss_weights.resource, config.loss_weights.contrastive) == (2.0, 100.0)
    assert config.prune.max_steps == 5000 and config.prune.router_warmup_steps == 500


def test_yaml_file_overrides_only_what_it_names(tmp_path):
    path = write(tmp_path, """
        codes:
          num_codes: 3
        prune:
          learning_rate: 1e-4   # YAML 1.1 would read this as a string
        seed: 7
    """)
    config = load_config(str(path))
    assert config.codes.num_codes == 3
    assert config.prune.learning_rate == pytest.approx(1e-4)
    assert config.seed == 7
    assert config.codes.base == TrainConfig().codes.base


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(str(write(tmp_path, ""))) == TrainConfig()
    assert load_config(str(write(tmp_path, "prune:\n", "b.yaml"))).prune == TrainConfig().prune


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in str(info.value)


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_config("huge")


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, "model:\n  resolution: 64\n  pretrained: [unclosed\ncodes:\n  num_codes: 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+") as info:
        load_config(str(path))
    assert str(path) in str(info.value)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(write(tmp_path, "- a\n- b\n")))


def test_unknown_section_named_with_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown section or top-level key 'optimizer'") as info:
        load_config(str(write(tmp_path, "optimizer:\n  lr: 1\n")))
    assert "prune" in str(info.value) and "loss_weights" in str(info.value)


def test_unknown_key_in_section_named_with_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'num_expert' in section 'codes'") as info:
        load_config(str(write(tmp_path, "codes:\n  num_expert: 2\n")))
    assert "num_codes" in str(info.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("codes:\n  num_codes: two\n", "codes.num_codes must be an integer"),
        ("codes:\n  num_codes: 2.5\n", "codes.num_codes must be an integer"),
        ("gates:\n  depth: 1\n", "gates.depth must be a boolean"),
        ("budget:\n  target: high\n", "budget.target must be a number"),
        ("model:\n  pretrained: 3\n", "model.pretrained must be a string"),
        ("data:\n  format: parquet\n", "data.format must be one of"),
        ("prune: 5\n", "section 'prune' must be a mapping"),
    ],
)
def test_wrong_types(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words):
        load_config(str(write(tmp_path, text)))


@pytest.mark.parametrize("target", [0, 1.5, -0.2])
def test_budget_target_out_of_range(tmp_path, target):
    with pytest.raises(ConfigError, match=r"budget.target must be in \(0, 1\]"):
        load_config(str(write(tmp_path, f"budget:\n  target: {target}\n")))


def test_budget_target_one_is_allowed(tmp_path):
    assert load_config(str(write(tmp_path, "budget:\n  target: 1\n"))).budget.target == 1.0


def test_zero_codes(tmp_path):
    with pytest.raises(ConfigError, match="codes.num_codes must be at least 1, got 0"):
        load_config(str(write(tmp_path, "codes:\n  num_codes: 0\n")))


@pytest.mark.parametrize(
    "override",
    ["prune.max_steps=0", "prune.batch_size=-1", "finetune.max_steps=0", "finetune.batch_size=0", "prune.checkpoint_every=0"],
)
def test_non_positive_steps_and_batches(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key} must be positive"):
        load_config("tiny", [override])


def test_dataset_path_required_for_file_formats():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config("tiny", ["data.format=jsonl"])
    assert load_config("tiny", ["data.format=jsonl", "data.path=prompts.jsonl"]).data.path == "prompts.jsonl"


def test_overrides_apply_with_yaml_values():
    config = load_config(
        "tiny", ["prune.max_steps=7", "gates.depth=true", "model.text_length=null", "seed=3", "budget.target=0.5"]
    )
    assert config.prune.max_steps == 7
    assert config.gates.depth is True
    assert config.model.text_length is None
    assert config.seed == 3
    assert config.budget.target == 0.5


@pytest.mark.parametrize(
    "override, words",
    [
        ("prune.max_steps", "not of the form section.key=value"),
        ("foo.bar=1", "unknown section or top-level key 'foo'"),
        ("prune.steps=1", "unknown key 'steps' in section 'prune'"),
        ("prune=1", "is a section"),
        ("seed.x=1", "'seed' has no sub-keys"),
        ("prune.max_steps=[1", "malformed YAML"),
    ],
)
def test_bad_overrides(override, words):
    with pytest.raises(ConfigError, match=words):
        parse_overrides([override])


def test_apply_overrides_returns_new_validated_config():
    base = load_config("tiny")
    changed = apply_overrides(base, ["codes.num_codes=6"])
    assert changed.codes.num_codes == 6 and base.codes.num_codes == 4
    with pytest.raises(ConfigError, match="codes.num_codes"):
        apply_overrides(base, ["codes.num_codes=0"])


def test_round_trip_through_save(tmp_path):
    config = load_config("tiny", ["prune.learning_rate=3e-3", "data.path=x.jsonl", "model.revision=fp16"])
    path = config.save(tmp_path / "sub" / "config.yaml")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    again = load_config(str(path))
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert yaml.safe_load(path.read_text())["codes"]["num_codes"] == 4


def test_to_dict_covers_every_field():
    data = TrainConfig().to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig.from_dict(data) == TrainConfig()
