"""``aptp-import``: a released APTP set (the authors' checkpoints) -> an aptp checkpoint.

    aptp-import --release SET_DIR --base SD21_DIR --prompt-encoder MPNET_DIR --output CHECKPOINT
                [--prompts FILE] [--resolution PX] [--overwrite]

The checkpoint is what `aptp-export` takes (like one `aptp-train prune` writes). Per expert it
prints the MACs relative to the dense base (aptp's counter, at the checkpoint's resolution), the
parameters, the release file's size and, with ``--prompts``, the share of those prompts routed to
it. Bad input prints one line, ``aptp-import: error: <message>``, exits 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from aptp import __version__
from aptp.cli import positive_int, run_command

PROG = "aptp-import"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Import one released APTP set (hypernet/, quantizer/, "
                                     "arch<k>/checkpoint-<step>/) as an aptp checkpoint for aptp-export.")
    parser.add_argument("--release", type=Path, required=True, metavar="SET_DIR",
                        help="the downloaded set, e.g. APTP-Base-COCO/")
    parser.add_argument("--base", type=Path, required=True, metavar="SD21_DIR",
                        help="the diffusers pipeline the set was pruned from (stabilityai/stable-diffusion-2-1)")
    parser.add_argument("--prompt-encoder", type=Path, required=True, metavar="MPNET_DIR",
                        help="sentence-transformers/all-mpnet-base-v2 on disk (transformers format)")
    parser.add_argument("--output", type=Path, required=True, metavar="CHECKPOINT",
                        help="checkpoint directory to write: a new path, an empty directory, or a previous import "
                        "with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous aptp-import output")
    parser.add_argument("--prompts", type=Path, metavar="FILE",
                        help="prompts, one per line: print the share routed to each expert and record it")
    parser.add_argument("--resolution", type=positive_int, metavar="PX",
                        help="deployment image size for the MACs count and export (default: the base's, "
                        "768 for SD 2.1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _import(args: argparse.Namespace) -> None:
    from .importer import import_release

    report = import_release(args.release, args.base, args.prompt_encoder, args.output, prompts=args.prompts,
                            resolution=args.resolution, overwrite=args.overwrite)
    print(f"imported {report.num_codes} experts (D={report.dim}) to {report.output}")
    print(f"  dense: {report.dense_macs / 1e9:.2f} GMACs, {report.dense_params / 1e6:.1f}M parameters")
    for e in report.experts:
        share = "" if e.share is None else f", prompt share {e.share:.1%} of {report.prompts}"
        print(f"  expert {e.code} (step {e.step}): MACs {e.macs_ratio:.3f} of dense, {e.params / 1e6:.1f}M parameters, "
              f"file {e.release_bytes / 2**20:.1f} MiB ({e.dtype}){share}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aptp-import``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command(PROG, lambda: _import(args), interrupted=f"interrupted; {args.output} was left as it was")


if __name__ == "__main__":
    sys.exit(main())
