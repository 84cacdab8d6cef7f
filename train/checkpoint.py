"""The pruning checkpoint: what `aptp-train prune` leaves for `route`, `finetune` and export.

Layout of a checkpoint directory:
    checkpoint.json         format, base model, K, deployment shape, budget, per-code MACs ratios
    config.yaml             the exact training config
    gate_layout.json        the gate sites and their order in the flat gate vector
    codes.safetensors       `logits` (K, N) and `hard_masks` (K, N, uint8)
    router_head/            RouterHead.save_pretrained
    experts/expert_<k>/     one expert per code (aptp.train.experts): sliced dense weights,
                            replaced by fine-tuned ones after `finetune`
    routing.json            after `route`: per-prompt codes, counts, shares, expected MACs
    log.jsonl               one JSON object per logged training step
    prompt_sensitivity.json with sinkhorn.sensitivity_weight > 0: the prior, caption -> z-score
    state/                  resumable training state (accelerate), not needed downstream
"""

from __future__ import annotations

import logging
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from aptp.errors import ArtifactError
from aptp.outputs import ordinary_mode
from aptp.readers import read_json, require

from .gates import GateLayout
from .slicing import write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.json"
CODES_FILE = "codes.safetensors"
ROUTER_HEAD_DIR = "router_head"
EXPERTS_DIR = "experts"
ROUTING_FILE = "routing.json"


@dataclass
class CheckpointInfo:
    """The contents of checkpoint.json."""

    pretrained: str
    num_codes: int
    encoder: str
    resolution: int
    latent_height: int
    latent_width: int
    text_length: int
    budget_target: float
    code_base: float
    dense_macs: float
    code_macs_ratio: list[float]
    code_share: list[float] = field(default_factory=list)
    # Shares under plain argmax before the router's score bias was calibrated (for comparison).
    code_share_uncalibrated: list[float] = field(default_factory=list)
    step: int = 0
    format: int = CHECKPOINT_FORMAT

    def save(self, directory: Path) -> None:
        write_json_atomic(directory / CHECKPOINT_FILE, asdict(self))

    @classmethod
    def load(cls, directory: Path) -> "CheckpointInfo":
        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            raise ArtifactError(f"{directory} is not an aptp checkpoint: {CHECKPOINT_FILE} is missing")
        raw = read_json(path, dict, "checkpoint file")
        if raw.get("format") != CHECKPOINT_FORMAT:
            raise ArtifactError(
                f"{path} has checkpoint format {raw.get('format')!r}; this aptp reads format {CHECKPOINT_FORMAT}"
            )
        unknown = sorted(set(raw) - set(_FIELD_TYPES))
        missing = sorted(f.name for f in fields(cls) if f.name not in raw and f.default is MISSING
                         and f.default_factory is MISSING)
        if unknown or missing:
            raise ArtifactError(f"{path} does not match checkpoint format {CHECKPOINT_FORMAT}: "
                                + "; ".join(filter(None, [unknown and f"unknown keys {unknown}",
                                                          missing and f"missing keys {missing}"])))
        for key, value in raw.items():
            expect, item = _FIELD_TYPES[key]
            require(value, expect, f"{path}: '{key}'")
            if item is not None:
                for index, element in enumerate(value):
                    require(element, item, f"{path}: '{key}'[{index}]")
        for key in ("num_codes", "resolution", "latent_height", "latent_width", "text_length"):
            if key in raw and raw[key] < 1:
                raise ArtifactError(f"{path}: '{key}' must be >= 1, got {raw[key]}")
        return cls(**raw)

    def base_model(self, directory: Path) -> str:
        """The recorded base model as something `load_components` loads (see `record_pretrained`)."""
        return resolve_recorded_pretrained(self.pretrained, directory)


def record_pretrained(pretrained: str, directory: Path) -> str:
    """What a checkpoint at `directory` records as its base model: ``"tiny"`` for the tiny
    pipeline (committed or cached), a hub id as given, and a local pipeline directory as a path
    relative to the checkpoint (``./x`` or ``../x``), so that a repository or run folder moved
    whole still finds it. Absolute paths would break on the first move."""
    from .models import TINY_NAME, TINY_WEIGHTS, cache_dir

    if pretrained == TINY_NAME:
        return TINY_NAME
    local = Path(pretrained).expanduser()
    if not local.exists():
        return pretrained  # a hub id
    real = Path(os.path.realpath(local))
    tiny_cache = Path(os.path.realpath(cache_dir()))
    if real == Path(os.path.realpath(TINY_WEIGHTS)) or (real.parent == tiny_cache and real.name.startswith("tiny-sd-v")):
        return TINY_NAME
    relative = os.path.relpath(local.absolute(), Path(directory).expanduser().absolute())
    return relative if relative.startswith("..") else f"./{relative}"


def resolve_recorded_pretrained(recorded: str, directory: Path) -> str:
    """Inverse of `record_pretrained`; also reads older checkpoints, which recorded the path
    as resolved at training time (absolute, or relative to the working directory)."""
    from .models import TINY_NAME, TINY_WEIGHTS, resolve_pretrained

    if recorded == TINY_NAME:
        return resolve_pretrained(TINY_NAME)
    path = Path(recorded)
    if recorded.startswith(("./", "../")):
        beside = Path(directory).expanduser().absolute() / path
        if beside.exists() or not path.exists():
            return os.path.normpath(beside)
        return recorded  # an older checkpoint's path relative to the working directory
    if path.is_absolute() and not path.exists():
        # An older checkpoint of the committed teacher (or the cached tiny pipeline) made in a
        # repository or home that has since moved: the tiny pipeline is the same model.
        if path.parts[-3:] == TINY_WEIGHTS.parts[-3:] or path.name.startswith("tiny-sd-v"):
            logger.info("%s no longer exists; using the tiny pipeline (%s)", recorded, TINY_NAME)
            return resolve_pretrained(TINY_NAME)
    return recorded


# (type of the value, type of each element for lists) per checkpoint.json key.
_FIELD_TYPES: dict[str, tuple[type | tuple[type, ...], type | None]] = {
    "pretrained": (str, None), "num_codes": (int, None), "encoder": (str, None), "resolution": (int, None),
    "latent_height": (int, None), "latent_width": (int, None), "text_length": (int, None),
    "budget_target": (float, None), "code_base": (float, None), "dense_macs": (float, None),
    "code_macs_ratio": (list, float), "code_share": (list, float), "code_share_uncalibrated": (list, float),
    "step": (int, None), "format": (int, None),
}


def read_tensors(path: Path, keys: Sequence[str] = (), what: str = "") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path` (which must hold `keys`); a missing,
    unreadable, truncated or corrupt file is an `ArtifactError` naming it."""
    label = f"{what} {path}" if what else str(path)
    if not Path(path).is_file():
        raise ArtifactError(f"{label} is missing")
    try:
        tensors = load_file(str(path))
    except OSError as error:
        raise ArtifactError(f"cannot read {label}: {error.strerror or error}") from error
    except Exception as error:  # safetensors raises its own SafetensorError (and others) for bad bytes
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArtifactError(f"{label} is not a readable safetensors file (corrupt or truncated?): {first}") from error
    absent = [k for k in keys if k not in tensors]
    if absent:
        raise ArtifactError(f"{label} lacks the tensors {absent} (has {sorted(tensors)[:5]})")
    return tensors


def save_codes(directory: Path, logits: torch.Tensor, hard_masks: torch.Tensor) -> None:
    tmp = directory / f".{CODES_FILE}.tmp"
    save_file({"logits": logits.detach().cpu().contiguous(), "hard_masks": hard_masks.to(torch.uint8).cpu().contiguous()}, str(tmp))
    ordinary_mode(tmp)  # safetensors writes 0600
    os.replace(tmp, directory / CODES_FILE)


def load_codes(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (K, N), hard masks (K, N) bool)."""
    path = Path(directory) / CODES_FILE
    if not path.is_file():
        raise ArtifactError(f"checkpoint {directory} has no {CODES_FILE}")
    tensors = read_tensors(path, ("logits", "hard_masks"), "codes file")
    logits, masks = tensors["logits"], tensors["hard_masks"]
    if logits.dim() != 2 or masks.shape != logits.shape or not logits.is_floating_point():
        raise ArtifactError(f"{path}: expected float logits (K, N) and hard_masks of the same shape, got "
                            f"{tuple(logits.shape)} {logits.dtype} and {tuple(masks.shape)}")
    return logits, masks.bool()


def load_layout(directory: Path) -> GateLayout:
    path = Path(directory) / GateLayout.config_name
    if not path.is_file():
        raise ArtifactError(f"checkpoint {directory} has no {GateLayout.config_name}")
    config = read_json(path, dict, "gate layout")
    try:
        return GateLayout.from_config(config)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
        raise ArtifactError(f"gate layout {path} does not describe a gate layout: {error}") from error


def save_layout(directory: Path, layout: GateLayout) -> None:
    layout.save_config(str(directory))


def expert_dir(directory: Path, code: int) -> Path:
    return Path(directory) / EXPERTS_DIR / f"expert_{code}"


def load_routing(directory: Path) -> dict | None:
    path = Path(directory) / ROUTING_FILE
    if not path.is_file():
        return None
    routing = read_json(path, dict, "routing file")
    for key in ("share", "counts"):
        if key in routing:
            for index, value in enumerate(require(routing[key], list, f"{path}: '{key}'")):
                require(value, float, f"{path}: '{key}'[{index}]")
    return routing


def load_router_head(directory: Path):
    """The checkpoint's trained `RouterHead`; a missing, corrupt or mismatched one is an
    `ArtifactError` naming the file."""
    from .router import RouterHead

    head_dir = Path(directory) / ROUTER_HEAD_DIR
    if not head_dir.is_dir():
        raise ArtifactError(f"checkpoint {directory} has no {ROUTER_HEAD_DIR}/ (router head)")
    config = read_json(head_dir / "config.json", dict, "router head config")
    for key in ("embed_dim", "num_gates", "hidden_dim"):
        if key in config:
            value = require(config[key], int, f"{head_dir / 'config.json'}: '{key}'")
            if value < 1:
                raise ArtifactError(f"{head_dir / 'config.json'}: '{key}' must be >= 1, got {value}")
    weights = [p for p in head_dir.glob("*.safetensors")]
    for path in weights:
        read_tensors(path, what="router head weights")  # corrupt bytes fail here, naming the file
    try:
        return RouterHead.from_pretrained(str(head_dir))
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArtifactError(f"router head {head_dir} cannot be loaded: {first}") from error
