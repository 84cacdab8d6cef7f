"""`aptp-bench make-synthetic`: its arguments and its run (torch is imported only after they parse)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from aptp.cli import positive_int, seed_int

from .args import PROG, Parser, setup_logging

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} make-synthetic", description="A real UNet config with random weights and K "
               "experts whose masks hit target MACs ratios, exported with aptp-export's exporter.")
    p.add_argument("--unet-config", default="sd21", metavar="NAME",
                   help="a config under benchmarks/configs (sd21) or a YAML path (default: sd21)")
    p.add_argument("--resolution", type=positive_int, metavar="PX",
                   help="image size the MACs targets and the export use (default: the config's cpu_resolution)")
    p.add_argument("--output", type=Path, required=True, metavar="DIR",
                   help="export directory to write (new or empty; a previous export only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous aptp export at --output")
    p.add_argument("--work-dir", type=Path, metavar="DIR",
                   help="where the pipeline and checkpoint go (default: beside --output)")
    p.add_argument("--steps", type=positive_int, default=10, metavar="N", help="sampler table steps (10)")
    p.add_argument("--max-batch", type=positive_int, default=4, metavar="N", help="prompts per UNet call (4)")
    p.add_argument("--full-components", action="store_true",
                   help="use the config's full text encoder and VAE instead of the reduced stand-ins")
    p.add_argument("--seed", type=seed_int, default=0, help="weights, masks and router seed (0)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str]) -> int:
    """Parse `argv`, run the suite, print where the reports went; returns the exit code."""
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    from .synthetic import load_bench_config, make_synthetic

    load_bench_config(args.unet_config)  # an unknown config fails before anything heavy
    manifest = make_synthetic(args.unet_config, args.resolution, args.output, steps=args.steps,
                              max_batch=args.max_batch, full_components=args.full_components, seed=args.seed,
                              work_dir=args.work_dir, overwrite=args.overwrite)
    print(f"exported {len(manifest['experts'])} synthetic experts to {args.output}")
    for entry in manifest["experts"]:
        print(f"  expert {entry['code']}: MACs ratio {entry['macs_ratio']:.3f}, share {entry['share']}")
    return 0
