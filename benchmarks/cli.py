"""``aptp-bench``: latency and quality suites over an aptp export.

    aptp-bench latency --artifacts A [--backends onnxruntime,torch] [--batch-sizes 1,2,4,8]
                       [--resolutions 64,128] [--repeats N] [--warmup N] [--threads N]
                       [--output-dir R] [--e2e-batch N] [--e2e-steps N] [--no-e2e] ...
    aptp-bench --artifacts A ...              (same as `aptp-bench latency --artifacts A ...`)
    aptp-bench quality ...                    (aptp.benchmarks.quality.table.main_quality)
    aptp-bench make-synthetic --unet-config sd21 --resolution 256 --output A
    aptp-bench serve --artifacts A [--rates 0.5,1,2] [--count N] [--slo S] [--no-ray] ...
    aptp-bench gpu-check --output-dir OUT [--dry-run]   (aptp.benchmarks.gpu_check)
    aptp-bench memory --artifacts A [--budgets unlimited,2x,1x] [--precisions fp32,int8] [--requests 48]

Bad input (any `AptpError`) prints one line, ``aptp-bench: error: <message>``, and exits 2;
Ctrl-C exits 130. torch is imported only after the arguments parse.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from aptp import __version__
from aptp.cli import positive_int, run_command, seed_int
from aptp.errors import ConfigError

PROG = "aptp-bench"
COMMANDS = ("latency", "quality", "make-synthetic", "serve", "gpu-check", "memory")

logger = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got '{text}'") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got '{text}'")
    return values


def _name_list(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too (the usage text goes to --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _latency_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} latency", description="UNet-step latency of every expert next to the dense "
                "UNet, the static pruned baseline and the masked full UNet, end-to-end routed throughput, on "
                "every backend present; writes results.json, results.md and latency_vs_macs.png.")
    p.add_argument("--artifacts", type=Path, required=True, metavar="DIR", help="export directory (aptp-export)")
    p.add_argument("--output-dir", type=Path, default=Path("bench-results"), metavar="DIR",
                   help="where the reports go (default: ./bench-results)")
    p.add_argument("--backends", type=_name_list, metavar="LIST",
                   help="comma-separated: onnxruntime, onnxruntime-cuda, tensorrt, torch, torch-compile, torch-cuda "
                   "(default: every one present except torch-compile)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8], metavar="LIST",
                   help="UNet batch sizes (default: 1,2,4,8)")
    p.add_argument("--resolutions", type=_int_list, metavar="LIST",
                   help="image sizes in pixels (default: the export's and half of it)")
    p.add_argument("--repeats", type=positive_int, default=10, metavar="N", help="timed calls per variant (10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed calls per variant first (2)")
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
    p.add_argument("--gap-threshold", type=float, default=0.15, metavar="X",
                   help="relative latency/MACs gap that triggers a profile (0.15)")
    p.add_argument("--static-dir", type=Path, metavar="DIR",
                   help="cache of the static baseline's ONNX graph (default: OUTPUT_DIR/static)")
    p.add_argument("--e2e-sequential", action="store_true",
                   help="end to end: one model at a time instead of interleaved (less memory, less robust)")
    p.add_argument("--pairwise", action="store_true",
                   help="low memory: load dense plus one variant at a time, each interleaved with dense "
                   "(for models whose variants do not all fit in memory at once)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _synthetic_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} make-synthetic", description="A real UNet config with random weights and K "
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


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got '{text}'") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got '{text}'")
    return values


def _serve_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} serve", description="Open-loop Poisson load (seeded, bounded, loopback only) "
                "against GenerationServer for the routed, dense and static models, then the Ray Serve app in a "
                "loopback-only network namespace; writes serve.json, serve.md and serve_latency.png.")
    p.add_argument("--artifacts", type=Path, required=True, metavar="DIR", help="export directory (aptp-export)")
    p.add_argument("--output-dir", type=Path, default=Path("bench-serve"), metavar="DIR",
                   help="where the reports go (default: ./bench-serve)")
    p.add_argument("--rates", type=_float_list, metavar="LIST",
                   help="offered loads in requests/s (default: fractions of the dense server's capacity)")
    p.add_argument("--rate-factors", type=_float_list, default=[0.25, 0.5, 0.75, 1.0, 1.5], metavar="LIST",
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
    p.add_argument("--static-dir", type=Path, metavar="DIR", help="cache of the static model's ONNX graph")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _serve(argv: Sequence[str]) -> int:
    args = _serve_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .serve import ServeBenchOptions, run_serve_bench

    options = ServeBenchOptions(rates=args.rates, rate_factors=args.rate_factors, count=args.count,
                                max_seconds=args.max_seconds, drain_s=args.drain, slo_s=args.slo,
                                slo_factor=args.slo_factor, max_wait_s=args.max_wait, threads=args.threads,
                                seed=args.seed, static=args.static, ray=args.ray, static_dir=args.static_dir)
    options.check()
    if not args.artifacts.exists():
        raise ConfigError(f"--artifacts {args.artifacts} does not exist; pass the directory aptp-export wrote")
    results = run_serve_bench(args.artifacts, args.output_dir, options)
    print(f"wrote {args.output_dir}/serve.json, serve.md, serve_latency.png")
    for name, value in results["checks"].items():
        print(f"  {name}: {value}")
    return 0


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="aptp benchmarks. Commands: latency (default), quality, make-synthetic, serve, gpu-check, memory; "
                "`aptp-bench COMMAND --help` for each.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("command", choices=COMMANDS)
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _latency(argv: Sequence[str]) -> int:
    args = _latency_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .latency import LatencyOptions, run_latency

    options = LatencyOptions(
        backends=args.backends, batch_sizes=args.batch_sizes, resolutions=args.resolutions, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, masked=args.masked, static=args.static, e2e=args.e2e,
        e2e_batch=args.e2e_batch, e2e_steps=args.e2e_steps, e2e_repeats=args.e2e_repeats,
        gap_threshold=args.gap_threshold, static_dir=args.static_dir, pairwise=args.pairwise,
        masked_codes=args.masked_codes, e2e_sequential=args.e2e_sequential,
    )
    options.check()
    if not args.artifacts.exists():
        raise ConfigError(f"--artifacts {args.artifacts} does not exist; pass the directory aptp-export wrote")
    results = run_latency(args.artifacts, args.output_dir, options)
    checks = results["checks"]
    print(f"wrote {args.output_dir}/results.json, results.md, latency_vs_macs.png")
    print(f"  onnxruntime expert rows within {100 * options.gap_threshold:.0f}% of MACs: "
          f"{checks['onnxruntime_expert_rows_within_threshold']}/{checks['onnxruntime_expert_rows']}")
    if checks.get("routed_speedup_vs_dense") is not None:
        print(f"  routed end-to-end speedup vs dense: {checks['routed_speedup_vs_dense']:.2f}x "
              f"(MACs ratio {checks['routed_macs_ratio']:.3f})")
    return 0


def _make_synthetic(argv: Sequence[str]) -> int:
    args = _synthetic_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .synthetic import load_bench_config, make_synthetic

    load_bench_config(args.unet_config)  # an unknown config fails before anything heavy
    manifest = make_synthetic(args.unet_config, args.resolution, args.output, steps=args.steps,
                              max_batch=args.max_batch, full_components=args.full_components, seed=args.seed,
                              work_dir=args.work_dir, overwrite=args.overwrite)
    print(f"exported {len(manifest['experts'])} synthetic experts to {args.output}")
    for entry in manifest["experts"]:
        print(f"  expert {entry['code']}: MACs ratio {entry['macs_ratio']:.3f}, share {entry['share']}")
    return 0


def _memory_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} memory", description="Serve a fixed mixed workload through GenerationServer under "
                "memory budgets (unlimited, 2x and 1x the dense UNet's fp32 weights) at fp32 and int8, each run in a "
                "fresh process: peak/mean RSS, throughput, latency, loads, evictions, int8 step speed and error; "
                "writes memory.json, memory.md and memory.png.")
    p.add_argument("--artifacts", type=Path, required=True, metavar="DIR", help="export directory (aptp-export)")
    p.add_argument("--output-dir", type=Path, default=Path("bench-results/memory"), metavar="DIR",
                   help="where the reports go (default: ./bench-results/memory)")
    p.add_argument("--budgets", type=_name_list, default=["unlimited", "2x", "1x"], metavar="LIST",
                   help="unlimited, multiples of the dense UNet's fp32 bytes (2x) or sizes (3GiB) (default: "
                   "unlimited,2x,1x)")
    p.add_argument("--precisions", type=_name_list, default=["fp32", "int8"], metavar="LIST",
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


def _memory(argv: Sequence[str]) -> int:
    args = _memory_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .memory import MemoryOptions, run_memory

    options = MemoryOptions(requests=args.requests, seed=args.seed, budgets=args.budgets, precisions=args.precisions,
                            threads=args.threads, guidance_scale=args.guidance_scale, max_wait_s=args.max_wait_s,
                            arrival_gap_s=args.arrival_gap, step_repeats=args.step_repeats,
                            rounds=args.rounds, quantize_in_place=args.quantize_in_place)
    options.check()
    if not args.artifacts.exists():
        raise ConfigError(f"--artifacts {args.artifacts} does not exist; pass the directory aptp-export wrote")
    results = run_memory(args.artifacts, args.output_dir, options)
    print(f"wrote {args.output_dir}/memory.json, memory.md, memory.png")
    for run in results["runs"]:
        check = results["checks"][run["precision"]]["runs"][run["budget_label"]]
        print(f"  {run['precision']:4s} {run['budget_label']:>9s}: peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"{run['throughput_rps']:.4f} req/s ({check['throughput_vs_reference']:.2f}x the reference), "
              f"loads {run['stats']['loads']}, evictions {run['stats']['evictions']}")
    return 0


def _quality(argv: Sequence[str]) -> int:
    try:
        from .quality.table import main_quality
    except ImportError as err:
        raise ConfigError(f"the quality suite is not available in this checkout (aptp.benchmarks.quality.table: "
                          f"{err}); update aptp or run the latency suite") from err
    return int(main_quality(list(argv)) or 0)


def _gpu_check(argv: Sequence[str]) -> int:
    from .gpu_check import main_gpu_check

    return main_gpu_check(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aptp-bench``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-h", "--help") or not argv:
        _top_parser().parse_args(argv or ["--help"])
        return 0
    if argv[0].startswith("-"):
        command, rest = "latency", argv  # `aptp-bench --artifacts A` is the latency suite
    else:
        command, rest = argv[0], argv[1:]
        if command not in COMMANDS:
            print(f"{PROG}: error: unknown command '{command}'; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
    handlers = {"latency": _latency, "quality": _quality, "make-synthetic": _make_synthetic, "serve": _serve,
                "gpu-check": _gpu_check, "memory": _memory}
    return run_command(PROG, lambda: handlers[command](rest))


if __name__ == "__main__":
    sys.exit(main())
