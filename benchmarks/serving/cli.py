"""`aptp-bench serve`: its arguments and its run (torch and Ray are imported only after they parse)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from aptp.cli import positive_int, seed_int

from ..args import PROG, Parser, check_artifacts, float_list, setup_logging

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} serve", description="Open-loop Poisson load (seeded, bounded, loopback only) "
               "against GenerationServer for the routed, dense and static models, then the Ray Serve app in a "
               "loopback-only network namespace; writes serve.json, serve.md and serve_latency.png.")
    p.add_argument("--artifacts", type=Path, required=True, metavar="DIR", help="export directory (aptp-export)")
    p.add_argument("--output-dir", type=Path, default=Path("bench-serve"), metavar="DIR",
                   help="where the reports go (default: ./bench-serve)")
    p.add_argument("--rates", type=float_list, metavar="LIST",
                   help="offered loads in requests/s (default: fractions of the dense server's capacity)")
    p.add_argument("--rate-factors", type=float_list, default=[0.25, 0.5, 0.75, 1.0, 1.5], metavar="LIST",
                   help="default rates as fractions of the dense capacity (0.25,0.5,0.75,1,1.5)")
    p.add_argument("--count", type=positive_int, default=24, metavar="N", help="requests per run at most (24)")
    p.add_argument("--max-seconds", type=float, default=20.0, metavar="S", help="arrivals per run at most (20 s)")
    p.add_argument("--drain", type=float, default=90.0, metavar="S", help="wait for answers after the last send")
    p.add_argument("--slo", type=float, metavar="S", help="p95 latency SLO (default: --slo-factor x dense alone)")
    p.add_argument("--slo-factor", type=float, default=4.0, metavar="X", help="default SLO factor (4)")
    p.add_argument("--max-wait", type=float, default=0.05, metavar="S", help="batch wait of the servers (0.05 s)")
    p.add_argument("--threads", type=positive_int, default=2, metavar="N", help="intra-op threads (2)")
    p.add_argument("--seed", type=seed_int, default=0, help="arrival seed (0)")
    p.add_argument("--no-static", dest="static", action="store_false", help="skip the static model")
    p.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray Serve app")
    p.add_argument("--no-local", dest="local", action="store_false",
                   help="skip the local mode (aptp-serve's default HTTP server, in this process)")
    p.add_argument("--static-dir", type=Path, metavar="DIR", help="cache of the static model's ONNX graph")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str]) -> int:
    """Parse `argv`, run the suite, print where the reports went; returns the exit code."""
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    from .suite import ServeBenchOptions, run_serve_bench

    options = ServeBenchOptions(rates=args.rates, rate_factors=args.rate_factors, count=args.count,
                                max_seconds=args.max_seconds, drain_s=args.drain, slo_s=args.slo,
                                slo_factor=args.slo_factor, max_wait_s=args.max_wait, threads=args.threads,
                                seed=args.seed, static=args.static, ray=args.ray, local=args.local,
                                static_dir=args.static_dir)
    options.check()
    check_artifacts(args.artifacts)
    results = run_serve_bench(args.artifacts, args.output_dir, options)
    print(f"wrote {args.output_dir}/serve.json, serve.md, serve_latency.png")
    for name, value in results["checks"].items():
        print(f"  {name}: {value}")
    return 0
