"""What prune and finetune share: accelerate set-up, step-indexed data and randomness,
resumable state, the JSON-lines log.

Resume is exact because nothing random depends on history: the batch and every random draw
(noise, timesteps, Gumbel noise) of step s are functions of (seed, s, process), and the
optimiser, model and step come back from the saved state.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from torch.utils.data import Dataset, Sampler

from aptp.errors import ArtifactError, ConfigError, DatasetError

from .config import TrainConfig
from .data import collate_captioned, load_dataset

logger = logging.getLogger(__name__)

STATE_DIR = "state"
LOG_FILE = "log.jsonl"


def make_accelerator(config: TrainConfig, mixed_precision: str = "no") -> Accelerator:
    return Accelerator(mixed_precision=mixed_precision)


def build_dataset(config: TrainConfig) -> Dataset:
    """The training dataset the config names, at the training resolution."""
    options: dict = {}
    if config.data.format == "procedural":
        options = {"num_samples": config.data.num_samples, "seed": config.seed}
    dataset = load_dataset(config.data.format, config.data.path, config.model.resolution, **options)
    if len(dataset) == 0:
        raise DatasetError(f"the {config.data.format} dataset at {config.data.path} has no usable samples")
    return dataset


def dataset_texts(dataset: Dataset) -> list[str]:
    """Every caption of a dataset, without decoding its images."""
    return [dataset.caption(i) for i in range(len(dataset))]


class StepBatchSampler(Sampler[list[int]]):
    """Index batches for steps start..stop-1; step s's batch depends only on (seed, s).

    Each epoch is a fresh seeded permutation; the global batch of a step is split evenly
    across processes, each taking its own contiguous part.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_step: int, stop_step: int,
                 num_processes: int = 1, process_index: int = 0, subset: list[int] | None = None):
        self.indices = list(range(num_samples)) if subset is None else list(subset)
        if not self.indices:
            raise DatasetError("no training sample to draw batches from")
        self.batch_size, self.seed = batch_size, seed
        self.start, self.stop = start_step, stop_step
        self.num_processes, self.process_index = num_processes, process_index
        if batch_size % num_processes:
            raise ConfigError(f"batch size {batch_size} is not divisible by {num_processes} processes")

    def global_batch(self, step: int) -> list[int]:
        n = len(self.indices)
        out: list[int] = []
        position = step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(position, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()
            take = min(self.batch_size - len(out), n - offset)
            out += [self.indices[i] for i in perm[offset : offset + take]]
            position += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.num_processes
        for step in range(self.start, self.stop):
            batch = self.global_batch(step)
            yield batch[self.process_index * local : (self.process_index + 1) * local]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def make_loader(dataset: Dataset, sampler: StepBatchSampler, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_captioned, num_workers=num_workers)


def step_generator(seed: int, step: int, process_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of every random draw at one step of one process."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 131 + process_index)


class JsonlLog:
    """Appends one JSON object per line; on resume, drops lines past the resumed step."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def latest_state(directory: Path) -> tuple[Path, int] | None:
    """The most recent complete saved state under `directory/state`, and its step."""
    root = directory / STATE_DIR
    candidates = []
    for child in root.glob("step_*") if root.is_dir() else []:
        if (child / "COMPLETE").is_file():
            candidates.append((int(child.name.split("_")[1]), child))
    if not candidates:
        return None
    step, path = max(candidates)
    return path, step


def load_state(accelerator: Accelerator, path: Path) -> None:
    """`accelerator.load_state` of a saved state, every failure one `ArtifactError`.

    accelerate reads its pickles (``random_states_*.pkl``...) with ``weights_only=True``: a file
    holding anything but tensors and plain values is refused, never executed. That refusal, a
    truncated file or a missing one is said in one line naming the state.
    """
    try:
        for rng_file in sorted(path.glob("random_states_*.pkl")):
            # accelerate swallows a random state it cannot read and resumes anyway, which would
            # no longer be the exact continuation a resume promises: check it here first.
            states = accelerate_load(rng_file)  # weights_only, with numpy's RNG state allowed as accelerate does
            if not isinstance(states, dict) or not {"random_state", "torch_manual_seed"} <= set(states):
                raise ArtifactError(f"cannot resume from {path}: {rng_file.name} holds no random states; remove that "
                                    "state folder to resume from an earlier one")
        accelerator.load_state(str(path))
    except pickle.UnpicklingError:
        raise ArtifactError(f"cannot resume from {path}: a file there is not a plain training state (it was refused, "
                            "not executed: only tensors and plain values are read); "
                            "remove that state folder to resume from an earlier one") from None
    except (OSError, EOFError, RuntimeError, ValueError, KeyError) as err:
        raise ArtifactError(f"cannot resume from {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                            "; remove that state folder to resume from an earlier one") from None


def save_state(accelerator: Accelerator, directory: Path, step: int, keep: int = 2) -> None:
    """Save the resumable state of step `step`; a state counts only once COMPLETE is written."""
    root = directory / STATE_DIR
    target = root / f"step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(target, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(target))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (target / "COMPLETE").write_text(str(step))
        old = sorted((int(p.name.split("_")[1]), p) for p in root.glob("step_*"))
        for _, path in old[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def check_resume_config(saved: Path, config: TrainConfig) -> None:
    """A resumed run must train under the same config (the budget in particular), bar its length."""
    from .config import load_config

    if not saved.is_file():
        raise ArtifactError(f"cannot resume: {saved} is missing")
    before = load_config(str(saved)).to_dict()
    now = config.to_dict()
    for section in (before, now):
        for phase in ("prune", "finetune"):
            section[phase].pop("max_steps", None)
    if before != now:
        changed = sorted(k for k in now if before.get(k) != now.get(k))
        raise ConfigError(f"cannot resume with a different config (sections {changed} differ from {saved})")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
