"""`aptp-bench gpu-check` (and `python -m aptp.benchmarks.gpu_check`, which `run.sh` runs): its
arguments and its run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..args import Parser, int_list, setup_logging

__all__ = ["main", "parser"]


def parser(prog: str = "aptp-bench gpu-check") -> argparse.ArgumentParser:
    """The check's options; `suite.run_gpu_check` fills the defaults a dry run changes."""
    p = Parser(prog=prog, description="The prepared GPU check: CUDA extension, CUDA tests, UNet-step latency "
               "ratios vs MACs ratios and routed end-to-end throughput, all under --output-dir.")
    p.add_argument("--output-dir", type=Path, required=True, metavar="DIR", help="where everything is written")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU in float32 (CI)")
    p.add_argument("--unet-config", default="sd21", help="benchmark UNet config (sd21) for a real run")
    p.add_argument("--resolutions", type=int_list, metavar="LIST", help="pixels (512,768; dry run 64,128)")
    p.add_argument("--batch-sizes", type=int_list, metavar="LIST", help="rows per UNet call (1,2,4,8; dry 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per cell (10; dry run 2)")
    p.add_argument("--e2e-prompts", type=int_list, metavar="LIST", help="mixed prompts per request (8,32; dry 4,8)")
    p.add_argument("--e2e-steps", type=int, default=None, help="sampler steps end to end (25; dry run 2)")
    p.add_argument("--e2e-resolution", type=int, default=None, help="end-to-end pixels (512; dry run 64)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="timed requests per variant (2)")
    p.add_argument("--max-batch", type=int, default=8, help="prompts per UNet call end to end (8)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="skip the CUDA-graph column")
    p.add_argument("--onnx", choices=("auto", "always", "never"), default="auto",
                   help="onnxruntime columns: auto = where a GPU provider activates (dry run: CPU provider)")
    p.add_argument("--no-tests", dest="tests", action="store_false", help="skip the CUDA pytest step")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cells after this many seconds (330; dry run 1800)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch, onnxruntime)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str]) -> int:
    """``aptp-bench gpu-check``: 0 when every step ran, 1 when a step failed (see the report)."""
    args = parser().parse_args(list(argv))
    setup_logging(args.verbose)
    from .suite import run_gpu_check

    results = run_gpu_check(args)
    failed = [name for name, step in results["steps"].items() if step.get("status") == "failed"]
    print(f"wrote {Path(args.output_dir) / 'gpu_check.json'} and summary.md "
          f"({'dry run, ' if results['dry_run'] else ''}{len(results['unet_step'])} UNet-step rows, "
          f"{len(results['end_to_end'])} end-to-end rows)")
    for name, value in (results.get("checks") or {}).items():
        print(f"  {name}: {value if not isinstance(value, float) else f'{value:.3f}'}")
    if failed:
        print(f"  failed steps: {', '.join(failed)} (errors in gpu_check.json)")
        return 1
    return 0
