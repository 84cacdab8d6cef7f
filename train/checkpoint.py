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
    state/                  resumable training state (accelerate), not needed downstream
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aptp.errors import ArtifactError

from .gates import GateLayout
from .slicing import write_json_atomic

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
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path} is not valid JSON: {e}") from e
        if raw.get("format") != CHECKPOINT_FORMAT:
            raise ArtifactError(
                f"{path} has checkpoint format {raw.get('format')!r}; this aptp reads format {CHECKPOINT_FORMAT}"
            )
        try:
            return cls(**raw)
        except TypeError as e:
            raise ArtifactError(f"{path} does not match checkpoint format {CHECKPOINT_FORMAT}: {e}") from e


def save_codes(directory: Path, logits: torch.Tensor, hard_masks: torch.Tensor) -> None:
    tmp = directory / f".{CODES_FILE}.tmp"
    save_file({"logits": logits.detach().cpu().contiguous(), "hard_masks": hard_masks.to(torch.uint8).cpu().contiguous()}, str(tmp))
    os.replace(tmp, directory / CODES_FILE)


def load_codes(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (K, N), hard masks (K, N) bool)."""
    path = Path(directory) / CODES_FILE
    if not path.is_file():
        raise ArtifactError(f"checkpoint {directory} has no {CODES_FILE}")
    tensors = load_file(str(path))
    return tensors["logits"], tensors["hard_masks"].bool()


def load_layout(directory: Path) -> GateLayout:
    path = Path(directory) / GateLayout.config_name
    if not path.is_file():
        raise ArtifactError(f"checkpoint {directory} has no {GateLayout.config_name}")
    return GateLayout.from_config(GateLayout.load_config(str(directory)))


def save_layout(directory: Path, layout: GateLayout) -> None:
    layout.save_config(str(directory))


def expert_dir(directory: Path, code: int) -> Path:
    return Path(directory) / EXPERTS_DIR / f"expert_{code}"


def load_routing(directory: Path) -> dict | None:
    path = Path(directory) / ROUTING_FILE
    return json.loads(path.read_text()) if path.is_file() else None
