"""Training configuration: typed dataclasses loaded from YAML, validated, saved with checkpoints.

This module is the one source of truth for every training knob. A config is a YAML mapping of
sections (``model``, ``router``, ``codes``, ...) to keys; anything not given keeps the default
below, which is the paper's reference setting (Stable Diffusion 2.1, 8 codes, 60% MACs).
Presets live in ``train/presets/<name>.yaml``; ``tiny`` runs the whole flow offline on a CPU.

Where a knob lives:
- ``router.contrastive_temperature`` is the softmax temperature of the contrastive loss (on both
  the router-vector and the sentence-embedding similarities): it shapes the router's space.
- ``sinkhorn`` holds the balanced-assignment solver's settings.
- ``prune.learning_rate`` trains the architecture codes, ``prune.router_learning_rate`` the
  router head; ``finetune.learning_rate`` trains an expert's sliced UNet weights.

Torch-free on purpose, so the CLI can reject a bad config before loading any model.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from aptp.errors import ConfigError
from aptp.outputs import ordinary_mode

DataFormat = Literal["procedural", "jsonl", "cc3m", "coco"]
MixedPrecision = Literal["no", "fp16", "bf16"]


@dataclass
class ModelConfig:
    """The base text-to-image model and the shapes it is trained and budgeted at."""

    # "tiny" (offline random SD-2.1-shaped pipeline), a hub id or a local diffusers pipeline dir.
    pretrained: str = "stabilityai/stable-diffusion-2-1"
    revision: str | None = None
    # Image side in pixels, for training and for the MACs budget (the deployment resolution).
    resolution: int = 256
    # Text tokens; None means the tokenizer's model_max_length (77 for SD 2.1).
    text_length: int | None = None


@dataclass
class RouterConfig:
    """The prompt router: a frozen sentence encoder and a trainable head."""

    encoder: str = "all-MiniLM-L6-v2"
    hidden_dim: int = 256
    # Softmax temperature of the contrastive loss, on both similarity structures.
    contrastive_temperature: float = 0.03


@dataclass
class CodesConfig:
    """Architecture codes: K trainable logit vectors relaxed as sigmoid((logit + g + base) / T)."""

    num_codes: int = 8
    base: float = 3.0
    temperature: float = 0.4


@dataclass
class GatesConfig:
    """Which gate sites exist."""

    # Gates per feed-forward (over its inner units).
    ff_groups: int = 32
    # Keep/skip gates for the last ResNet and transformer of each down and up block.
    depth: bool = False


@dataclass
class BudgetConfig:
    """The compute budget the mixture of experts must meet."""

    # Target MACs as a fraction of the dense UNet's, in (0, 1].
    target: float = 0.6
    # Weight of the terms that spread the experts' costs apart.
    spread_weight: float = 0.1


@dataclass
class LossWeightsConfig:
    """Weights of the pruning (and fine-tuning distillation) loss terms."""

    denoise: float = 1.0
    resource: float = 2.0
    contrastive: float = 100.0
    # As strong as the contrastive term: at 1 the head's gradient from the assignment
    # cross-entropy was ~15x smaller than the weighted contrastive one, the router never learnt
    # the balanced split, and argmax routing sent 66-99% of prompts to one code (issue 13).
    assignment: float = 100.0
    distill_output: float = 0.2
    distill_blocks: float = 0.2


@dataclass
class SinkhornConfig:
    """Balanced optimal-transport assignment of prompts to codes during training."""

    # False: plain argmax assignment during training (the "without optimal transport" ablation).
    enabled: bool = True
    epsilon: float = 0.05
    iterations: int = 3
    # > 0: the assignment also weighs what each code costs each prompt (log relative distillation error,
    # one extra no-gradient UNet pass per code and step; aptp.train.quality_assignment). 0 is
    # the reference method: similarity alone.
    quality_weight: float = 0.0
    # > 0: the assignment also pairs prompts that a uniform mask at the budget hurts more than
    # others (measured once before pruning) with the codes of more MACs (weight * z_prompt *
    # z_code_macs; aptp.train.prompt_sensitivity). 0 is the reference method.
    sensitivity_weight: float = 0.0


@dataclass
class PruneConfig:
    """The pruning phase: router and codes train, the UNet stays frozen."""

    max_steps: int = 5000
    # Steps at the start that train the router alone.
    router_warmup_steps: int = 500
    batch_size: int = 64
    learning_rate: float = 2e-4
    router_learning_rate: float = 2e-4
    checkpoint_every: int = 1000
    # Min-SNR loss weighting gamma; None disables the weighting.
    snr_gamma: float | None = 5.0
    gradient_accumulation_steps: int = 1
    mixed_precision: MixedPrecision = "no"


@dataclass
class FinetuneConfig:
    """Fine-tuning one expert (sliced from the dense weights) on the prompts routed to it."""

    max_steps: int = 30000
    batch_size: int = 64
    learning_rate: float = 1e-5
    checkpoint_every: int = 1000


@dataclass
class DataConfig:
    """Where training prompts and images come from."""

    format: DataFormat = "procedural"
    # File or directory for jsonl, cc3m and coco; unused by procedural.
    path: str | None = None
    # Number of generated samples for the procedural format.
    num_samples: int = 512
    num_workers: int = 0


@dataclass
class TrainConfig:
    """Every training knob, in sections. Build with `load_config` or `TrainConfig.from_dict`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    codes: CodesConfig = field(default_factory=CodesConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    loss_weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)
    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_values(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, source: str = "config") -> "TrainConfig":
        """Build and validate from a plain mapping (as YAML gives); ``source`` names it in errors."""
        return _build(cls, {} if raw is None else raw, source)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every knob (defaults included), as `save` writes it."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the full config as YAML, atomically (temp file + rename), so it reloads exactly."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                yaml.safe_dump(self.to_dict(), handle, sort_keys=False)
            ordinary_mode(tmp)  # mkstemp makes it 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def load_config(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a preset by bare name (``"tiny"``) or a YAML file by path, then apply overrides.

    ``overrides`` are ``section.key=value`` strings (``seed=3`` for top-level keys) whose values are
    parsed as YAML, as given to ``aptp-train --set``. Raises `ConfigError` on any problem.
    """
    text, source = _read_source(str(name_or_path))
    raw = parse_yaml(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return TrainConfig.from_dict(_merge_overrides(raw, overrides), source)


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """A new, validated config: ``config`` with ``section.key=value`` overrides applied."""
    if not overrides:
        return config
    return TrainConfig.from_dict(_merge_overrides(config.to_dict(), overrides), "overrides")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[tuple[str, ...], Any]]:
    """Check and split ``section.key=value`` strings into (key path, YAML value) pairs.

    Names are checked against the config schema here; values are type-checked when applied.
    """
    parsed = []
    for item in overrides:
        dotted, sep, value_text = item.partition("=")
        keys = tuple(dotted.strip().split("."))
        if not sep or not all(keys):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. prune.max_steps=100)")
        _check_key_path(keys, item)
        parsed.append((keys, parse_yaml(value_text, f"override '{item}'")))
    return parsed


def preset_names() -> list[str]:
    """Names of the presets shipped in ``aptp.train.presets``."""
    folder = importlib.resources.files("aptp.train") / "presets"
    if not folder.is_dir():
        return []
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


# --------------------------------------------------------------------------------------------
# Reading


def _is_bare_name(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_\-]+", name) is not None


def _read_source(name_or_path: str) -> tuple[str, str]:
    """Text and a display name of a preset (bare name) or a YAML file (anything else)."""
    if _is_bare_name(name_or_path):
        resource = importlib.resources.files("aptp.train") / "presets" / f"{name_or_path}.yaml"
        if not resource.is_file() and not Path(name_or_path).is_file():
            raise ConfigError(
                f"unknown preset '{name_or_path}'; available presets: {', '.join(preset_names()) or 'none'} "
                "(or pass the path of a YAML file)"
            )
        if resource.is_file():
            return resource.read_text(encoding="utf-8"), f"preset '{name_or_path}'"
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        what = "is a directory, not a YAML file" if path.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {name_or_path} (give a preset name such as 'tiny' or a YAML path)")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from error


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as Python values (``1e-4`` read as a float); a `ConfigError` naming ``source`` if malformed."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}") from error


# --------------------------------------------------------------------------------------------
# Overrides


def _check_key_path(keys: tuple[str, ...], item: str) -> None:
    """Raise unless ``keys`` names a field of TrainConfig (top-level) or of one of its sections."""
    cls: Any = TrainConfig
    for depth, key in enumerate(keys):
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            raise ConfigError(f"override '{item}': '{'.'.join(keys[:depth])}' has no sub-keys")
        names = {f.name: f for f in dataclasses.fields(cls)}
        if key not in names:
            where = f"key '{key}' in section '{keys[depth - 1]}'" if depth else f"section or top-level key '{key}'"
            raise ConfigError(f"override '{item}': unknown {where}; valid: {', '.join(names)}")
        cls = typing.get_type_hints(cls)[key]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"override '{item}': '{keys[0]}' is a section; set one of its keys (section.key=value)")


def _merge_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for keys, value in parse_overrides(overrides):
        node = merged
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return merged


# --------------------------------------------------------------------------------------------
# Building and validation


def _build(cls: type, raw: Any, source: str, section: str | None = None) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``raw``, checking key names and value types.

    ``source`` names the file or preset in messages, ``section`` the section being read (None for
    the top level).
    """
    if not isinstance(raw, Mapping):
        what = f"section '{section}'" if section else "the top level"
        raise ConfigError(f"{source}: {what} must be a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"key '{key}' in section '{section}'" if section else f"section or top-level key '{key}'"
            raise ConfigError(f"{source}: unknown {where}; valid: {', '.join(names)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            # An empty section ("prune:" alone) means "all defaults".
            kwargs[name] = _build(hint, {} if value is None else value, source, name)
        else:
            path = f"{section}.{name}" if section else name
            kwargs[name] = check_type(value, hint, f"{source}: {path}")
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def check_type(value: Any, hint: Any, label: str) -> Any:
    """Return ``value`` (ints widened to float where a float is expected) or raise ConfigError.

    Public: the pretraining config (`aptp.train.pretrain`) checks its fields with it, so both
    configs refuse a wrong type with the same message."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(value, option, label)
            except ConfigError:
                pass
        expected = " or ".join(_type_name(option) for option in options)
        raise ConfigError(f"{label} must be {expected}, got {_describe(value)}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{label} must be {_type_name(hint)}, got {_describe(value)}")
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:  # pragma: no cover - a schema bug, not bad input
        raise TypeError(f"unsupported config type {hint!r} for {label}")
    if not ok:
        raise ConfigError(f"{label} must be {_type_name(hint)}, got {_describe(value)}")
    return float(value) if hint is float else value


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _check_values(config: TrainConfig) -> None:
    """Range and consistency checks that types alone cannot express."""
    problems: list[str] = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    m, c, b = config.model, config.codes, config.budget
    # torch.manual_seed and numpy take 64-bit seeds, and aptp derives per-step seeds by adding.
    need(0 <= config.seed < 2**63, f"seed must be an integer in [0, 2**63), got {config.seed}")
    need(m.resolution > 0, f"model.resolution must be positive, got {m.resolution}")
    need(m.text_length is None or m.text_length > 0, f"model.text_length must be positive or null, got {m.text_length}")
    need(bool(m.pretrained.strip()), "model.pretrained must not be empty (use 'tiny', a hub id or a local directory)")
    need(config.router.hidden_dim > 0, f"router.hidden_dim must be positive, got {config.router.hidden_dim}")
    need(
        config.router.contrastive_temperature > 0,
        f"router.contrastive_temperature must be positive, got {config.router.contrastive_temperature}",
    )
    need(c.num_codes >= 1, f"codes.num_codes must be at least 1, got {c.num_codes}")
    need(c.temperature > 0, f"codes.temperature must be positive, got {c.temperature}")
    need(config.gates.ff_groups >= 1, f"gates.ff_groups must be at least 1, got {config.gates.ff_groups}")
    need(0 < b.target <= 1, f"budget.target must be in (0, 1] (a fraction of the dense MACs), got {b.target}")
    need(b.spread_weight >= 0, f"budget.spread_weight must be >= 0, got {b.spread_weight}")
    for name, weight in dataclasses.asdict(config.loss_weights).items():
        need(weight >= 0, f"loss_weights.{name} must be >= 0, got {weight}")
    need(config.sinkhorn.epsilon > 0, f"sinkhorn.epsilon must be positive, got {config.sinkhorn.epsilon}")
    need(config.sinkhorn.iterations >= 1, f"sinkhorn.iterations must be at least 1, got {config.sinkhorn.iterations}")
    need(config.sinkhorn.quality_weight >= 0, f"sinkhorn.quality_weight must be >= 0, got {config.sinkhorn.quality_weight}")
    need(config.sinkhorn.enabled or config.sinkhorn.quality_weight == 0,
         "sinkhorn.quality_weight needs sinkhorn.enabled=true: without the balanced plan the largest code "
         "would win every prompt")
    need(config.sinkhorn.sensitivity_weight >= 0,
         f"sinkhorn.sensitivity_weight must be >= 0, got {config.sinkhorn.sensitivity_weight}")
    need(config.sinkhorn.enabled or config.sinkhorn.sensitivity_weight == 0,
         "sinkhorn.sensitivity_weight needs sinkhorn.enabled=true: it acts on the balanced plan")
    for section in ("prune", "finetune"):
        values = getattr(config, section)
        for name in ("max_steps", "batch_size", "checkpoint_every"):
            need(getattr(values, name) > 0, f"{section}.{name} must be positive, got {getattr(values, name)}")
        need(values.learning_rate > 0, f"{section}.learning_rate must be positive, got {values.learning_rate}")
    p = config.prune
    need(p.router_warmup_steps >= 0, f"prune.router_warmup_steps must be >= 0, got {p.router_warmup_steps}")
    need(p.router_learning_rate > 0, f"prune.router_learning_rate must be positive, got {p.router_learning_rate}")
    need(p.snr_gamma is None or p.snr_gamma > 0, f"prune.snr_gamma must be positive or null, got {p.snr_gamma}")
    need(
        p.gradient_accumulation_steps >= 1,
        f"prune.gradient_accumulation_steps must be at least 1, got {p.gradient_accumulation_steps}",
    )
    d = config.data
    need(d.num_samples > 0, f"data.num_samples must be positive, got {d.num_samples}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(d.format == "procedural" or bool(d.path), f"data.path is required for data.format '{d.format}'")
    if problems:
        raise ConfigError("; ".join(problems))
