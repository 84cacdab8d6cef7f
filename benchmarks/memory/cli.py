"""`aptp-bench memory`: its arguments and its run (the runs themselves are subprocesses)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from aptp.cli import positive_int

from ..args import PROG, Parser, check_artifacts, name_list, setup_logging

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} memory", description="Serve a fixed mixed workload through GenerationServer under "
               "memory budgets (unlimited, 2x and 1x the dense UNet's fp32 weights) at fp32 and int8, each run in a "
               "fresh process: peak/mean RSS, throughput, latency, loads, evictions, int8 step speed and error; "
               "writes memory.json, memory.md and memory.png.")
    p.add_argument("--artifacts", type=Path, required=True, metavar="DIR", help="export directory (aptp-export)")
    p.add_argument("--output-dir", type=Path, default=Path("bench-results/memory"), metavar="DIR",
                   help="where the reports go (default: ./bench-results/memory)")
    p.add_argument("--budgets", type=name_list, default=["unlimited", "2x", "1x"], metavar="LIST",
                   help="unlimited, multiples of the dense UNet's fp32 bytes (2x) or sizes (3GiB) (default: "
                   "unlimited,2x,1x)")
    p.add_argument("--precisions", type=name_list, default=["fp32", "int8"], metavar="LIST",
                   help="fp32 and/or int8; int8 UNets are made first when the export has none, in a copy of the "
                   "export under --output-dir (default: fp32,int8)")
    p.add_argument("--quantize-in-place", action="store_true",
                   help="add the int8 UNets to the export itself (as aptp-export --quantize int8) instead of a copy")
    p.add_argument("--requests", type=positive_int, default=48, metavar="N", help="requests in the workload (48)")
    p.add_argument("--seed", type=int, default=0, help="workload seed: arrival order and request seeds (0)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="intra-op threads (default: all cores)")
    p.add_argument("--guidance-scale", type=float, metavar="X", help="guidance (default: the export's)")
    p.add_argument("--max-wait-s", type=float, default=5.0, metavar="S",
                   help="the server's head start for the current/resident expert, in seconds (5)")
    p.add_argument("--arrival-gap", type=float, default=0.0, metavar="S",
                   help="mean seconds between arrivals (exponential); 0 submits a backlog (default)")
    p.add_argument("--step-repeats", type=positive_int, default=5, metavar="N",
                   help="timed fp32/int8 UNet steps per expert (5)")
    p.add_argument("--rounds", type=positive_int, default=1, metavar="N",
                   help="serve every budget N times, interleaved round by round, and compare throughput within "
                   "each round (medians over rounds); guards the ratios against a machine whose load drifts (1)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str]) -> int:
    """Parse `argv`, run the suite, print where the reports went; returns the exit code."""
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    from .suite import MemoryOptions, run_memory

    options = MemoryOptions(requests=args.requests, seed=args.seed, budgets=args.budgets, precisions=args.precisions,
                            threads=args.threads, guidance_scale=args.guidance_scale, max_wait_s=args.max_wait_s,
                            arrival_gap_s=args.arrival_gap, step_repeats=args.step_repeats,
                            rounds=args.rounds, quantize_in_place=args.quantize_in_place)
    options.check()
    check_artifacts(args.artifacts)
    results = run_memory(args.artifacts, args.output_dir, options)
    print(f"wrote {args.output_dir}/memory.json, memory.md, memory.png")
    for run in results["runs"]:
        check = results["checks"][run["precision"]]["runs"][run["budget_label"]]
        print(f"  {run['precision']:4s} {run['budget_label']:>9s}: peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"{run['throughput_rps']:.4f} req/s ({check['throughput_vs_reference']:.2f}x the reference), "
              f"loads {run['stats']['loads']}, evictions {run['stats']['evictions']}")
    return 0
