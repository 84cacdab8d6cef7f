"""Resumable training state of `aptp.train.pretrain`: save, find, check and restore it.

A pretraining run writes its state under ``<output>/.pretrain-state/`` every
``checkpoint_every`` steps and at the end of each stage; ``--resume`` continues from the latest
one and ends with bitwise the same weights as a run never interrupted. That holds because the
batch and every random draw of a step are functions of (seed, step) (`StepBatchSampler`,
`step_generator`), and the rest (weights, EMA averages, optimiser and schedule, the global RNGs,
how much of the log was written) comes back from the state.

One snapshot is a directory ``<stage index>-<stage>-<step>`` holding:

- ``vae.safetensors``, ``unet.safetensors``, ``text_encoder.safetensors``: the weights;
- ``ema_unet.safetensors``, ``ema_text_encoder.safetensors``: the EMA averages (UNet stage);
- ``optimizer.pt``, ``rng.pt``: optimiser/schedule and RNG states, with ``torch.save``. These
  pickles live only in this training-state folder, which only `load_optimizer` and
  `restore_rng` read (with ``weights_only=True``); the finished pipeline, which other code
  loads, replaces the folder and holds none, and the runtime never loads either;
- ``state.json``: format, aptp version, stage, step, whether the stage is finished, the config
  hash and the config itself (to name what differs), the VAE scaling factor, the log length.

A snapshot is written in a temporary directory and renamed into place; the previous one is
deleted only after that, so an interrupted run always leaves its last complete state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from aptp import __version__
from aptp.errors import ArtifactError, ConfigError

logger = logging.getLogger(__name__)

STATE_DIR = ".pretrain-state"
LOG_NAME = "pretrain_log.jsonl"
STATE_FORMAT = "aptp-pretrain-state"
STAGES = ("vae", "unet")
MODULES = ("vae", "unet", "text_encoder")
_TEMP_PREFIX = ".tmp-"
# Keys of the identity that cannot change the weights, so a resumed run may change them.
_FREE_KEYS = ("checkpoint_every",)


def state_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / STATE_DIR


def run_identity(config: Any, stages: Sequence[str], init_from: str | os.PathLike | None) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the config (bar keys that do
    not change the result), the stages and where training started from."""
    identity = config.to_dict()
    for key in _FREE_KEYS:
        identity.pop(key, None)
    identity["stages"] = [s for s in STAGES if s in stages]
    identity["init_from"] = None if init_from is None else str(Path(init_from).expanduser().absolute())
    return identity


def identity_hash(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class TrainingState:
    """One complete snapshot: `step` steps of `stage` are done; `done` once the stage finished."""

    path: Path
    stage: str
    step: int
    done: bool
    info: dict[str, Any]

    def describe(self) -> str:
        return f"the end of the {self.stage} stage" if self.done else f"{self.stage} step {self.step}"


def _snapshot_name(stage: str, step: int) -> str:
    return f"{STAGES.index(stage)}-{stage}-{step:09d}"


def latest_state(output_dir: str | os.PathLike) -> TrainingState | None:
    """The most advanced complete snapshot under ``output_dir/.pretrain-state``, if any."""
    root = state_root(output_dir)
    found: list[tuple[tuple[int, int, bool], TrainingState]] = []
    for path in root.iterdir() if root.is_dir() else []:
        if path.name.startswith(_TEMP_PREFIX) or not (path / "state.json").is_file():
            continue
        try:
            info = json.loads((path / "state.json").read_text())
            state = TrainingState(path, info["stage"], int(info["step"]), bool(info["stage_done"]), info)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ArtifactError(f"cannot resume: {path / 'state.json'} is unreadable ({error})") from error
        if info.get("format") != STATE_FORMAT or state.stage not in STAGES:
            raise ArtifactError(f"cannot resume: {path} is not an aptp pretrain state")
        found.append(((STAGES.index(state.stage), state.step, state.done), state))
    return max(found, key=lambda item: item[0])[1] if found else None


def check_same_run(state: TrainingState, identity: Mapping[str, Any]) -> None:
    """Refuse to resume under another config, naming the keys that differ."""
    if state.info.get("config_hash") == identity_hash(identity):
        if state.info.get("aptp_version") != __version__:
            logger.warning("resuming a state written by aptp %s with aptp %s: the result may differ from an "
                           "uninterrupted run", state.info.get("aptp_version"), __version__)
        return
    before, now = _flatten(state.info.get("identity") or {}), _flatten(identity)
    changed = [f"{key} ({before.get(key, '<unset>')!r} -> {now.get(key, '<unset>')!r})"
               for key in sorted(set(before) | set(now)) if before.get(key, "<unset>") != now.get(key, "<unset>")]
    what = ", ".join(changed) if changed else "its hash"
    raise ConfigError(f"cannot resume {state.path.parent.parent}: the run was started with another config "
                      f"(differs in {what}); resume with the same config, stages and --init-from, "
                      "or start over with --overwrite")


def has_state(output_dir: str | os.PathLike) -> bool:
    """Whether ``output_dir`` holds a complete snapshot (cheap; nothing is parsed)."""
    root = state_root(output_dir)
    try:
        return root.is_dir() and any((p / "state.json").is_file() for p in root.iterdir()
                                     if not p.name.startswith(_TEMP_PREFIX))
    except OSError:  # unreadable: the output check names the reason
        return False


def clean_temp(output_dir: str | os.PathLike) -> None:
    """Remove snapshots a killed run left half-written (only our own temporary directories)."""
    root = state_root(output_dir)
    for path in root.glob(f"{_TEMP_PREFIX}*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


def restore_rng(state: TrainingState) -> None:
    """Put the global torch, numpy and python RNGs back where they were when `state` was saved."""
    saved = torch.load(state.path / "rng.pt", weights_only=True)
    torch.set_rng_state(saved["torch"])
    kind, keys, position, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = saved["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_state(
    output_dir: str | os.PathLike,
    *,
    stage: str,
    step: int,
    done: bool,
    identity: Mapping[str, Any],
    modules: Mapping[str, torch.nn.Module],
    emas: Mapping[str, Mapping[str, torch.Tensor]] = {},
    ema_updates: Mapping[str, int] = {},
    optimizer: torch.optim.Optimizer | None = None,
    schedule: Any = None,
    extra: Mapping[str, Any] = {},
) -> TrainingState:
    """Write one snapshot (temporary directory, then rename) and drop the older ones."""
    root = state_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    temp.mkdir()
    try:
        for name, module in modules.items():
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                      str(temp / f"{name}.safetensors"))
        for name, shadow in emas.items():
            save_file({k: v.detach().contiguous() for k, v in shadow.items()}, str(temp / f"ema_{name}.safetensors"))
        if optimizer is not None:
            # torch.save only here, in the training-state folder: nothing the runtime (or any
            # pipeline loader) reads; the finished pipeline replaces this folder.
            torch.save({"optimizer": optimizer.state_dict(),
                        "schedule": None if schedule is None else schedule.state_dict()}, temp / "optimizer.pt")
        torch.save(_rng_state(), temp / "rng.pt")
        info = {
            "format": STATE_FORMAT,
            "aptp_version": __version__,
            "stage": stage,
            "step": step,
            "stage_done": done,
            "config_hash": identity_hash(identity),
            "identity": dict(identity),
            "ema_updates": dict(ema_updates),
            **extra,
        }
        (temp / "state.json").write_text(json.dumps(info, indent=1) + "\n")
        target = root / _snapshot_name(stage, step)
        if target.exists():  # the same step saved again (a resumed run reaching it): replace it
            shutil.rmtree(target)
        os.replace(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    for old in root.iterdir():
        if old != target and not old.name.startswith(_TEMP_PREFIX) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved the training state at %s (%s)", "the end of the " + stage + " stage" if done
                else f"{stage} step {step}", target)
    return TrainingState(target, stage, step, done, info)


def load_modules(state: TrainingState, modules: Mapping[str, torch.nn.Module]) -> None:
    """Load the snapshot's weights into `modules` (strictly: every key, nothing extra)."""
    for name, module in modules.items():
        module.load_state_dict(load_file(str(state.path / f"{name}.safetensors")), strict=True)


def load_ema(state: TrainingState, name: str) -> tuple[dict[str, torch.Tensor], int]:
    return load_file(str(state.path / f"ema_{name}.safetensors")), int(state.info["ema_updates"][name])


def load_optimizer(state: TrainingState, optimizer: torch.optim.Optimizer, schedule: Any) -> None:
    saved = torch.load(state.path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    if schedule is not None and saved["schedule"] is not None:
        schedule.load_state_dict(saved["schedule"])


class TrainLog:
    """The JSON-lines log of a run, kept beside its states; a resumed run cuts it back to the
    length it had at the state it resumes from and appends from there."""

    def __init__(self, output_dir: str | os.PathLike, resume: TrainingState | None, history: Path | None = None):
        self.path = state_root(output_dir) / LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume is None:
            # A fresh run keeps the history of stages trained before (run separately, --init-from).
            self.path.write_text(history.read_text() if history is not None and history.is_file() else "")
            return
        length = int(resume.info.get("log_bytes", 0))
        if not self.path.is_file() or self.path.stat().st_size < length:
            raise ArtifactError(f"cannot resume: the log {self.path} is missing or shorter than at "
                                f"{resume.describe()}; start over with --overwrite")
        with self.path.open("r+b") as f:
            f.truncate(length)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size
