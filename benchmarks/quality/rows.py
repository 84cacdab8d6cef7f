"""Training the pruned rows of `aptp-bench quality`: each row's trainer overrides, and pruning
then fine-tuning every expert into the row's directory.

Rows whose configs differ only in fine-tuning (``static`` and ``static_long``) prune exactly
alike, so a row whose twin is already trained copies the twin's pruning instead of repeating
it: the equal-total-fine-tuning comparison then differs from ``static`` in fine-tuning alone,
and a 1000-step pruning is not paid twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from aptp.errors import AptpError
from aptp.outputs import CHECKPOINT, check_output_dir

logger = logging.getLogger(__name__)

DONE_FILE = "finetune_done.json"
# What `aptp-train prune` writes besides the experts (see aptp.train.checkpoint); checkpoint.json
# last, since its presence marks a complete checkpoint.
PRUNING_FILES = ("config.yaml", "gate_layout.json", "codes.safetensors", "log.jsonl", "router_head")


@dataclasses.dataclass
class RowSpec:
    """How one pruned row is trained: its trainer overrides."""

    name: str
    num_codes: int
    overrides: list[str]

    def pruning_overrides(self) -> list[str]:
        """The overrides that decide the pruning (everything but ``finetune.*``)."""
        return [o for o in self.overrides if not o.startswith("finetune.")]


def row_specs(args: argparse.Namespace, names: Any = None) -> list[RowSpec]:
    """The specs of the rows `names` (default ``args.rows``) that are trained, in that order."""
    common = [
        f"model.pretrained={args.pretrained}",
        f"budget.target={args.target}",
        f"prune.max_steps={args.prune_steps}",
        f"prune.router_warmup_steps={max(1, args.prune_steps // 10)}",
        f"prune.batch_size={args.batch_size}",
        "prune.checkpoint_every=1000000",  # no intermediate states: rows are short
        f"finetune.max_steps={args.finetune_steps}",
        f"finetune.batch_size={args.batch_size}",
        "finetune.checkpoint_every=1000000",
        f"data.num_samples={args.train_samples}",
        f"seed={args.train_seed}",
    ] + list(args.set or [])
    specs = {
        "aptp": RowSpec("aptp", args.num_codes, common + [f"codes.num_codes={args.num_codes}"]),
        "static": RowSpec("static", 1, common + ["codes.num_codes=1"]),
        "static_long": RowSpec("static_long", 1, common + ["codes.num_codes=1", f"finetune.max_steps={args.finetune_steps * args.num_codes}"]),
        "aptp_no_ot": RowSpec("aptp_no_ot", args.num_codes, common + [f"codes.num_codes={args.num_codes}", "sinkhorn.enabled=false"]),
        "aptp_k8": RowSpec("aptp_k8", 8, common + ["codes.num_codes=8"]),
        "aptp_quality": RowSpec("aptp_quality", args.num_codes, common + [
            f"codes.num_codes={args.num_codes}", f"sinkhorn.quality_weight={args.quality_weight}"]),
        "aptp_sensitivity": RowSpec("aptp_sensitivity", args.num_codes, common + [
            f"codes.num_codes={args.num_codes}", f"sinkhorn.sensitivity_weight={args.sensitivity_weight}"]),
        # Static models below and above the budget: with `static` they give each family's
        # alignment-vs-MACs curve after fine-tuning (see aptp.benchmarks.quality.allocation).
        "static_lower": RowSpec("static_lower", 1, common + ["codes.num_codes=1", f"budget.target={args.target - args.static_spread:g}"]),
        "static_upper": RowSpec("static_upper", 1, common + ["codes.num_codes=1", f"budget.target={args.target + args.static_spread:g}"]),
    }
    return [specs[name] for name in (args.rows if names is None else names) if name in specs]


def sinkhorn_switch_available() -> bool:
    """Whether the trainer's config has `sinkhorn.enabled` (the no-OT ablation needs it)."""
    from aptp.train.config import SinkhornConfig

    return "enabled" in {f.name for f in dataclasses.fields(SinkhornConfig)}


def pruning_twin(spec: RowSpec, candidates: list[RowSpec], rows_dir: Path, usable: set[str]) -> Path | None:
    """A trained row among `candidates` (names in `usable`) that pruned exactly as `spec` would:
    the same pruning overrides, recorded by its finished training. None if there is none."""
    from aptp.train.config import load_config

    mine = load_config("tiny", spec.pruning_overrides())
    for other in candidates:
        done = rows_dir / other.name / DONE_FILE
        if other.name == spec.name or other.name not in usable or not done.is_file():
            continue
        recorded = json.loads(done.read_text())
        if recorded.get("overrides") != other.overrides or recorded.get("pruning_from"):
            continue  # trained with other settings, or itself a copy: copy only from an original
        if load_config("tiny", other.pruning_overrides()) == mine:
            return rows_dir / other.name
    return None


def copy_pruning(source: Path, directory: Path, config: Any) -> None:
    """Make `directory` the pruning checkpoint that `source` was before its fine-tuning, with
    `config` (which differs from the source's only in fine-tuning) as its training config."""
    from aptp.train import checkpoint as ckpt

    info = ckpt.CheckpointInfo.load(source)
    recorded = json.loads((source / DONE_FILE).read_text())
    directory.mkdir(parents=True)
    for name in PRUNING_FILES:
        path = source / name
        (shutil.copytree if path.is_dir() else shutil.copyfile)(path, directory / name)
    config.save(directory / "config.yaml")
    # Experts the source could not fine-tune still hold their sliced weights, as pruning left them;
    # the fine-tuned ones are written again by this row's own fine-tuning.
    for skipped in recorded.get("not_finetuned", []):
        shutil.copytree(ckpt.expert_dir(source, skipped["expert"]), ckpt.expert_dir(directory, skipped["expert"]))
    info.pretrained = ckpt.record_pretrained(config.model.pretrained, directory)
    info.save(directory)


def train_row(spec: RowSpec, directory: Path, reuse: bool, pruning_from: Path | None = None) -> dict[str, Any]:
    """Prune (or copy `pruning_from`'s pruning, see `pruning_twin`) then fine-tune every expert of
    one row into `directory`; returns what happened."""
    from aptp.train import checkpoint as ckpt
    from aptp.train.config import load_config
    from aptp.train.finetune import run_finetune
    from aptp.train.prune import run_prune

    done = directory / DONE_FILE
    if reuse and done.is_file():
        logger.info("reusing the trained row %s in %s", spec.name, directory)
        return json.loads(done.read_text())
    started = time.perf_counter()
    config = load_config("tiny", spec.overrides)
    if directory.exists():
        # Only a training run aptp wrote is replaced: a folder of anything else stays as it is.
        check_output_dir(directory, CHECKPOINT, allow_existing=True)
        shutil.rmtree(directory)
    if pruning_from is not None:
        logger.info("row %s: copying the pruning of %s (same pruning config)", spec.name, pruning_from)
        copy_pruning(pruning_from, directory, config)
    else:
        run_prune(config, directory)
    prune_s = time.perf_counter() - started
    finetuned, skipped = [], []
    for k in range(ckpt.CheckpointInfo.load(directory).num_codes):
        try:
            run_finetune(directory, k)
            finetuned.append(k)
        except AptpError as error:  # an expert no training prompt is routed to keeps its sliced weights
            logger.warning("row %s: expert %d not fine-tuned: %s", spec.name, k, error)
            skipped.append({"expert": k, "reason": str(error)})
    record = {"row": spec.name, "overrides": spec.overrides, "prune_seconds": round(prune_s, 1),
              "total_seconds": round(time.perf_counter() - started, 1), "finetuned": finetuned, "not_finetuned": skipped}
    if pruning_from is not None:
        record["pruning_from"] = pruning_from.name
    done.write_text(json.dumps(record, indent=1))
    return record


def train_rows(args: argparse.Namespace, rows_dir: Path, all_rows: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Train (or reuse, with ``args.reuse``) every pruned row that ``args.rows`` names, in that
    order. A row copies a twin's pruning if the twin was trained by this call, or is on disk and
    ``args.reuse`` allows reusing it."""
    candidates = row_specs(args, all_rows)
    trained: dict[str, dict[str, Any]] = {}
    for spec in row_specs(args):
        if spec.name == "aptp_no_ot" and not sinkhorn_switch_available():
            continue
        usable = set(all_rows) if args.reuse else set(trained)
        twin = pruning_twin(spec, candidates, rows_dir, usable)
        trained[spec.name] = train_row(spec, rows_dir / spec.name, args.reuse, twin)
    return trained
