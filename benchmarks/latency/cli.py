"""`aptp-bench latency`: its arguments and its run (torch is imported only after they parse)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from aptp.cli import positive_int

from ..args import PROG, Parser, check_artifacts, int_list, name_list, setup_logging

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} latency", description="UNet-step latency of every expert next to the dense "
               "UNet, the static pruned baseline and the masked full UNet, end-to-end routed throughput, on "
               "every backend present; writes results.json, results.md and latency_vs_macs.png.")
    p.add_argument("--artifacts", type=Path, required=True, metavar="DIR", help="export directory (aptp-export)")
    p.add_argument("--output-dir", type=Path, default=Path("bench-results"), metavar="DIR",
                   help="where the reports go (default: ./bench-results)")
    p.add_argument("--backends", type=name_list, metavar="LIST",
                   help="comma-separated: onnxruntime, onnxruntime-cuda, tensorrt, torch, torch-compile, torch-cuda "
                   "(default: every one present except torch-compile)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 2, 4, 8], metavar="LIST",
                   help="UNet batch sizes (default: 1,2,4,8)")
    p.add_argument("--resolutions", type=int_list, metavar="LIST",
                   help="image sizes in pixels (default: the export's and half of it)")
    p.add_argument("--repeats", type=positive_int, default=10, metavar="N", help="timed rounds per variant (10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed calls per variant first (2)")
    p.add_argument("--calls-in-a-row", type=positive_int, default=3, metavar="N",
                   help="consecutive calls per variant and round, as a sampling loop makes them; the first is "
                   "reported apart as the switch cost (3; 1: strict per-call interleaving)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="intra-op threads (default: all cores)")
    p.add_argument("--no-masked", dest="masked", action="store_false", help="skip the masked full UNet")
    p.add_argument("--masked-codes", type=lambda t: [int(v) for v in t.split(",") if v], metavar="LIST",
                   help="experts whose masked full UNet is timed (default: all)")
    p.add_argument("--no-static", dest="static", action="store_false", help="skip the static pruned baseline")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip end-to-end throughput")
    p.add_argument("--e2e-batch", type=positive_int, default=8, metavar="N", help="prompts per request (8)")
    p.add_argument("--e2e-steps", type=positive_int, metavar="N",
                   help="sampler steps end to end (default: the export's table)")
    p.add_argument("--e2e-repeats", type=positive_int, default=3, metavar="N", help="timed requests per model (3)")
    p.add_argument("--e2e-workers", type=int_list, metavar="LIST",
                   help="concurrent UNet runs end to end, each count timed side by side (default: 1,2 where "
                   "--threads allows 2, else 1)")
    p.add_argument("--gap-threshold", type=float, default=0.15, metavar="X",
                   help="relative latency/MACs gap that triggers a profile (0.15)")
    p.add_argument("--static-dir", type=Path, metavar="DIR",
                   help="cache of the static baseline's ONNX graph (default: OUTPUT_DIR/static)")
    p.add_argument("--e2e-sequential", action="store_true",
                   help="end to end: one model at a time instead of interleaved (less memory, less robust)")
    p.add_argument("--pairwise", action="store_true",
                   help="low memory: load dense plus one variant at a time, each interleaved with dense "
                   "(for models whose variants do not all fit in memory at once)")
    p.add_argument("--fixed-shapes", action="store_true",
                   help="onnxruntime on CPU: also time every UNet through sessions specialised to each batch's "
                   "shapes (what aptp-generate --shape-sessions runs), side by side with the dynamic ones")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str]) -> int:
    """Parse `argv`, run the suite, print where the reports went; returns the exit code."""
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    from . import LatencyOptions, run_latency

    options = LatencyOptions(
        backends=args.backends, batch_sizes=args.batch_sizes, resolutions=args.resolutions, repeats=args.repeats,
        warmup=args.warmup, calls_in_a_row=args.calls_in_a_row, threads=args.threads, masked=args.masked, static=args.static, e2e=args.e2e,
        e2e_batch=args.e2e_batch, e2e_steps=args.e2e_steps, e2e_repeats=args.e2e_repeats,
        gap_threshold=args.gap_threshold, static_dir=args.static_dir, pairwise=args.pairwise,
        masked_codes=args.masked_codes, e2e_sequential=args.e2e_sequential, e2e_workers=args.e2e_workers,
        fixed_shapes=args.fixed_shapes,
    )
    options.check()
    check_artifacts(args.artifacts)
    results = run_latency(args.artifacts, args.output_dir, options)
    checks = results["checks"]
    print(f"wrote {args.output_dir}/results.json, results.md, latency_vs_macs.png")
    print(f"  onnxruntime expert rows within {100 * options.gap_threshold:.0f}% of MACs: "
          f"{checks['onnxruntime_expert_rows_within_threshold']}/{checks['onnxruntime_expert_rows']}")
    if checks.get("routed_speedup_vs_dense") is not None:
        print(f"  routed end-to-end speedup vs dense: {checks['routed_speedup_vs_dense']:.2f}x "
              f"(MACs ratio {checks['routed_macs_ratio']:.3f})")
    return 0
