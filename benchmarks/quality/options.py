"""The quality suite's arguments and the names its modules share: the rows, the pairs compared,
the settings two runs must share to be compared, and how an older run's missing setting reads.

torch-free, so the seed and allocation summaries and the parser load without the trainer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["ALL_ROWS", "EVALUATION_SETTINGS", "EXTRA_ROWS", "PAIRS", "PARTI_DEFAULT", "ROWS", "add_premise_arguments",
           "build_parser", "saved_setting"]

ROWS = ("dense", "aptp", "static", "aptp_no_ot", "static_long")
# Rows that exist but are not trained unless --rows names them.
EXTRA_ROWS = ("aptp_k8", "aptp_quality", "aptp_sensitivity", "static_lower", "static_upper")
ALL_ROWS = ROWS + EXTRA_ROWS
PARTI_DEFAULT = Path("/work/shared/data/PartiPrompts.tsv")

PAIRS = (("aptp", "static"), ("aptp", "static_long"), ("aptp_k8", "static"), ("aptp_k8", "static_long"),
         ("aptp_quality", "static"), ("aptp_quality", "static_long"), ("aptp_quality", "aptp"),
         ("aptp_sensitivity", "static"), ("aptp_sensitivity", "static_long"), ("aptp_sensitivity", "aptp"),
         ("aptp", "aptp_no_ot"), ("static", "dense"), ("static_upper", "static"), ("static", "static_lower"),
         # static_upper at APTP's mean MACs (--static-spread chosen so) is the equal-MACs static baseline
         ("aptp", "static_upper"),
         # what K times the fine-tuning alone buys a static model, per family
         ("static_long", "static"), ("static_long", "dense"))

EVALUATION_SETTINGS = ("pretrained", "num_samples", "prompt_seed", "noise_seed", "steps", "guidance", "classifier",
                       "num_codes", "target", "prune_steps", "finetune_steps", "batch_size", "train_samples", "train_seed", "quality_weight", "sensitivity_weight", "static_spread", "set")


def saved_setting(settings: dict[str, Any], key: str) -> Any:
    """A run's recorded setting; a run older than the option recorded none and used its default."""
    return settings[key] if key in settings else build_parser().get_default(key)


def build_parser() -> argparse.ArgumentParser:
    """Every option of `aptp-bench quality` (the table, --premise, --over-seeds)."""
    parser = argparse.ArgumentParser(prog="aptp-bench quality", description="Offline replication of the APTP quality table.")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--pretrained", default="tiny", help="the dense teacher pipeline (default: tiny)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ALL_ROWS,
                        help=f"rows to train and score (default: {' '.join(ROWS)}; also: {' '.join(EXTRA_ROWS)})")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse rows already trained in --output-dir, and keep rows already scored there with the "
                             "same evaluation settings that --rows does not name")
    parser.add_argument("--num-codes", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.6, help="MACs budget (fraction of the dense UNet)")
    parser.add_argument("--prune-steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=50, help="per expert")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=512, help="procedural training prompts (seed --train-seed)")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--quality-weight", type=float, default=1.0,
                        help="sinkhorn.quality_weight of the aptp_quality row (see aptp.train.quality_assignment)")
    parser.add_argument("--sensitivity-weight", type=float, default=1.0,
                        help="sinkhorn.sensitivity_weight of the aptp_sensitivity row (see aptp.train.prompt_sensitivity)")
    parser.add_argument("--static-spread", type=float, default=0.15,
                        help="the static_lower / static_upper rows prune to --target minus / plus this")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra trainer override for every pruned row")
    parser.add_argument("--num-samples", type=int, default=256, help="held-out prompts (one image each)")
    parser.add_argument("--prompt-seed", type=int, default=1, help="ProceduralCaptions seed of the held-out prompts")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--classifier", type=Path, default=None, help="classifier weights (default: committed)")
    parser.add_argument("--parti", type=Path, default=PARTI_DEFAULT, help="PartiPrompts TSV for the routing analysis")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    parser.add_argument("--train-only", action="store_true",
                        help="only train the pruned rows (run row subsets in parallel, then score them all with --reuse)")
    add_premise_arguments(parser)
    parser.add_argument("--over-seeds", nargs="+", metavar="RUN",
                        help="summarise the quality runs (directories or quality.json) of several training seeds instead: "
                             "per-seed values, mean and spread, paired differences per seed and pooled, routed MACs per "
                             "family per seed (writes seeds.json / seeds.md in --output-dir)")
    return parser


def add_premise_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `--premise` (`aptp.benchmarks.quality.premise`)."""
    parser.add_argument("--premise", action="store_true",
                        help="measure the premise instead of the table: alignment per prompt family of the dense teacher "
                             "under uniform static masks at --ratios (writes premise.json / premise.md)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6, 0.4], help="MACs ratios of the uniform masks")
    parser.add_argument("--ff-groups", type=int, default=8, help="gates per feed-forward (the tiny preset's 8)")
