"""``aptp-train``: prune (router + codes), route prompts to experts, fine-tune one expert.

    aptp-train prune --config tiny --output-dir runs/tiny [--max-steps N] [--resume] [--set k=v ...]
    aptp-train route --checkpoint runs/tiny [--prompts FILE | --data-format F --data-path P] [--output FILE]
    aptp-train finetune --checkpoint runs/tiny --expert 0 [--max-steps N] [--resume] [--set k=v ...]
    aptp-train pretrain --output-dir DIR [--config tiny_teacher] [--stages vae,unet] [--init-from DIR] [--resume]

Bad input (any `AptpError`) prints one line, ``aptp-train: error: <message>``, and exits 2;
anything else is a bug and keeps its traceback. The trainer is imported only inside each
handler, so a bad config is reported before torch or diffusers load.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path
from typing import Sequence

from aptp import __version__
from aptp.cli import positive_int, run_command
from aptp.errors import DatasetError
from aptp.train.config import DataFormat

PROG = "aptp-train"
DATA_FORMATS = typing.get_args(DataFormat)

logger = logging.getLogger(__name__)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (YAML-parsed), e.g. --set prune.batch_size=4; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``aptp-train`` argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train a prompt-routed mixture of pruned experts from a text-to-image diffusion model."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = commands.add_parser("prune", help="train the router and the architecture codes on a frozen UNet")
    prune.add_argument("--config", required=True, metavar="NAME_OR_YAML", help="preset name (e.g. tiny) or YAML path")
    prune.add_argument("--output-dir", required=True, type=Path, metavar="DIR", help="checkpoint directory")
    prune.add_argument("--max-steps", type=positive_int, metavar="N", help="override prune.max_steps")
    prune.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    _add_set(prune)
    prune.set_defaults(handler=_prune)

    route = commands.add_parser("route", help="assign prompts to experts with a trained router")
    route.add_argument("--checkpoint", required=True, type=Path, metavar="DIR", help="a prune output directory")
    source = route.add_mutually_exclusive_group()
    source.add_argument("--prompts", type=Path, metavar="FILE",
                        help="prompts: .txt (one per line), .jsonl (text/prompt key) or .tsv with a Prompt column (PartiPrompts)")
    source.add_argument("--data-format", choices=DATA_FORMATS, help="route a dataset's captions instead")
    route.add_argument("--data-path", metavar="PATH", help="dataset file or directory for --data-format")
    route.add_argument("--output", type=Path, metavar="FILE", help="where to write the routing (default: in DIR)")
    route.set_defaults(handler=_route)

    finetune = commands.add_parser("finetune", help="fine-tune one expert, sliced from the dense UNet")
    finetune.add_argument("--checkpoint", required=True, type=Path, metavar="DIR", help="a pruned and routed directory")
    finetune.add_argument("--expert", required=True, type=_non_negative_int, metavar="I", help="expert (code) index")
    finetune.add_argument("--max-steps", type=positive_int, metavar="N", help="override finetune.max_steps")
    finetune.add_argument("--resume", action="store_true", help="continue this expert's latest checkpoint")
    _add_set(finetune)
    finetune.set_defaults(handler=_finetune)

    pretrain = commands.add_parser("pretrain", help="train the small offline text-to-image teacher from scratch")
    pretrain.add_argument("--config", default="tiny_teacher", metavar="NAME_OR_YAML",
                          help="pretraining recipe (default: the tiny_teacher preset)")
    pretrain.add_argument("--output-dir", required=True, type=Path, metavar="DIR", help="diffusers pipeline directory to write")
    pretrain.add_argument("--init-from", type=Path, metavar="DIR", help="start from this pipeline instead of random weights")
    pretrain.add_argument("--stages", default="vae,unet", help="comma-separated stages to train, in order (vae, unet)")
    pretrain.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    pretrain.add_argument("--resume", action="store_true",
                          help="continue the interrupted run in --output-dir from its latest training state")
    _add_set(pretrain)
    pretrain.set_defaults(handler=_pretrain)
    return parser


def _pretrain(args: argparse.Namespace) -> None:
    from aptp.train.pretrain import load_pretrain_config, run_pretrain

    config = load_pretrain_config(args.config, args.overrides)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    output = run_pretrain(config, args.output_dir, init_from=args.init_from, stages=stages, overwrite=args.overwrite,
                          resume=args.resume)
    logger.info("pretrained pipeline written to %s", output)


def _prune(args: argparse.Namespace) -> None:
    from aptp.train.config import apply_overrides, load_config

    config = load_config(args.config, args.overrides)
    if args.max_steps is not None:
        config = apply_overrides(config, [f"prune.max_steps={args.max_steps}"])

    from aptp.train.trainer import run_prune

    run_prune(config, args.output_dir, args.resume)


def _route(args: argparse.Namespace) -> None:
    if args.data_path is not None and args.data_format is None:
        raise DatasetError("--data-path needs --data-format (one of " + ", ".join(DATA_FORMATS) + ")")
    from aptp.train.data import load_prompts
    from aptp.train.trainer import run_route

    prompts = list(load_prompts(args.prompts)) if args.prompts is not None else None

    output = run_route(args.checkpoint, prompts, args.data_format, args.data_path, args.output)
    logger.info("routing written to %s", output)


def _finetune(args: argparse.Namespace) -> None:
    from aptp.train.config import parse_overrides

    # Names are checked now; the values are applied to the checkpoint's config by the trainer.
    parse_overrides(args.overrides)

    from aptp.train.trainer import run_finetune

    output = run_finetune(args.checkpoint, args.expert, args.max_steps, args.resume, list(args.overrides))
    logger.info("expert %d written to %s", args.expert, output)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aptp-train``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command in ("prune", "finetune", "pretrain"):
        from .interrupts import announce_interrupts

        announce_interrupts(PROG)  # a step can take minutes; say at once that Ctrl-C was heard
    return run_command(PROG, lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
