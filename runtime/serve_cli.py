"""``aptp-serve``: serve an export over HTTP, in this process (default) or on Ray Serve (``--ray``).

    aptp-serve --artifacts exports/tiny                                    # local: http://127.0.0.1:8000/
    aptp-serve --artifacts exports/tiny --port 7860 --memory-budget 3GiB --max-queue 32
    aptp-serve --artifacts exports/tiny --ray --replicas 6 --num-cpus 1    # Ray: 6 expert replicas by share
    aptp-serve --artifacts exports/tiny --ray --replicas 0=3,1=2,dense=1 --num-gpus 0.5
    aptp-serve --artifacts exports/tiny --ray --address auto               # join a running cluster
    curl -s -X POST localhost:8000/ -d '{"prompt": "a red car", "seed": 7}' > car.png

The local mode (one device: a laptop, a Jetson) runs the in-process `GenerationServer` behind
uvicorn (`aptp.runtime.local_serve`; needs ``aptp[local]``); SIGINT/SIGTERM answer queued
requests 503 and stop once the running batch is done. ``--ray`` deploys a router and one
deployment per expert on Ray Serve (``aptp[serve]``); without ``--address`` a local
single-node Ray starts (no dashboard) and stops with the server. Both modes answer the same
routes (`aptp.runtime.http_app`): aptp's POST /, the A1111 API under /sdapi/v1/, the page at /.
The default host is 127.0.0.1: pass ``--host 0.0.0.0`` deliberately to expose it. Bad input
prints ``aptp-serve: error: <message>`` and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from typing import Sequence

from aptp import __version__
from aptp.cli import positive_int, run_command
from aptp.errors import ConfigError, shown

PROG = "aptp-serve"
APP_NAME = "aptp"

logger = logging.getLogger(__name__)


#: Most replicas one model may ask for (Ray refuses counts past int64, and a node holds far fewer).
MAX_REPLICAS = 1024


def parse_replicas(text: str) -> int | dict[int | str, int]:
    """``N`` (expert replicas in all, split by prompt share) or ``0=2,1=1,dense=1``."""
    try:
        if "=" not in text:
            counts: int | dict[int | str, int] = int(text)
            numbers = [counts]
        else:
            counts = {}
            for item in text.split(","):
                key, value = item.split("=")
                counts["dense" if key.strip() == "dense" else int(key)] = int(value)
            numbers = list(counts.values())
    except ValueError:
        raise ConfigError(f"--replicas must be a number or CODE=N pairs such as 0=2,1=1,dense=1, got {shown(text)}"
                          ) from None
    if any(not 1 <= n <= MAX_REPLICAS for n in numbers):
        raise ConfigError(f"--replicas counts must be between 1 and {MAX_REPLICAS}, got {shown(text)}")
    return counts


def check_seconds(value: float | None, flag: str) -> None:
    """Refuse a wait that is negative, infinite or NaN (checked before anything loads)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{flag} must be a finite number of seconds >= 0, got {value}")


#: Flags that only the Ray mode reads (refused without --ray rather than silently ignored).
RAY_FLAGS = ("replicas", "autoscale", "num_cpus", "num_gpus", "no_dense", "address", "ray_cpus", "ray_temp_dir")
#: Flags that only the local mode reads.
LOCAL_FLAGS = ("max_queue", "swap_wait", "memory_budget", "device", "workers")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serve an aptp export over HTTP: in this process (default) or on Ray Serve "
                "(--ray). Routes: POST / {\"prompt\", \"seed\", \"guidance_scale\", \"steps\"} -> PNG (or JSON with "
                "?format=json); the AUTOMATIC1111 API under /sdapi/v1/; a page at /.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--artifacts", required=True, help="the export directory aptp-export wrote")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port (8000; A1111 clients expect 7860)")
    p.add_argument("--max-batch", type=positive_int, help="prompts per expert batch (default: the export's)")
    p.add_argument("--max-wait", type=float, default=0.02, metavar="S", help="batch wait in seconds (0.02)")
    p.add_argument("--threads", type=positive_int, help="onnxruntime threads per model (local: $OMP_NUM_THREADS or "
                   "every core; Ray: 1 per replica)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export's files")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    local = p.add_argument_group("local mode (the default)")
    local.add_argument("--max-queue", type=positive_int, default=None,
                       help="requests that may wait at once; more get 503 (64)")
    local.add_argument("--swap-wait", type=float, default=None, metavar="S",
                       help="head start, in seconds of waiting, of the expert that ran last and of resident experts "
                       "over others (5): bounds how long a request waits for an expert swap")
    local.add_argument("--memory-budget", metavar="SIZE", help="memory the UNet sessions may take together, e.g. "
                       "3GiB; they are loaded on demand and evicted least recently used (default: unlimited)")
    local.add_argument("--device", choices=["cpu", "cuda"], default=None, help="where the models run (cpu)")
    local.add_argument("--workers", default=None, metavar="N|auto",
                       help="CPU: UNet runs at once, each with threads/N threads (auto: 2 with 2 or more threads; "
                       "1: one batch's runs one after another with every thread)")
    ray = p.add_argument_group("Ray mode (--ray)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: a router and one deployment per expert "
                     "(needs aptp[serve])")
    ray.add_argument("--replicas", type=str, help="expert replicas in all, split by prompt share (at least one "
                     "each), or CODE=N pairs like 0=2,1=1,dense=1 (default: one per model)")
    ray.add_argument("--autoscale", action="store_true", default=None,
                     help="autoscale each expert between 1 replica and its share of --replicas")
    ray.add_argument("--num-cpus", type=float, default=None, help="Ray CPUs per expert replica (1)")
    ray.add_argument("--num-gpus", type=float, default=None, help="Ray GPUs per expert replica (0: run on CPU)")
    ray.add_argument("--no-dense", action="store_true", default=None, help="do not deploy the dense UNet")
    ray.add_argument("--address", help="a running Ray cluster to deploy on (e.g. 'auto'); default: start one here")
    ray.add_argument("--ray-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
    ray.add_argument("--ray-temp-dir", help="temp/log directory of the local Ray (keep it short)")
    return p


def _refuse_other_mode(args: argparse.Namespace) -> None:
    flags, mode = (LOCAL_FLAGS, "the local mode (drop --ray)") if args.ray else (RAY_FLAGS, "--ray")
    given = ["--" + name.replace("_", "-") for name in flags if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only apply to {mode}")


def run_local(args: argparse.Namespace) -> int:
    from .dispatch import parse_workers
    from .local_serve import LocalOptions, require_uvicorn, serve_forever
    from .residency import parse_memory_budget

    require_uvicorn()
    parse_memory_budget(args.memory_budget, "--memory-budget")  # fails before the export loads
    options = LocalOptions(max_batch=args.max_batch, max_wait=args.max_wait,
                           max_queue=64 if args.max_queue is None else args.max_queue,
                           max_wait_s=5.0 if args.swap_wait is None else args.swap_wait,
                           memory_budget=args.memory_budget, threads=args.threads, device=args.device or "cpu",
                           verify=not args.no_verify, workers=parse_workers(args.workers))
    serve_forever(args.artifacts, args.host, args.port, options,
                  announce=lambda line: print(f"{PROG}: {line}", flush=True))
    return 0


def run(args: argparse.Namespace) -> int:
    _refuse_other_mode(args)
    check_seconds(args.max_wait, "--max-wait")
    check_seconds(args.swap_wait, "--swap-wait")
    if not args.ray:
        return run_local(args)
    from .artifacts import load_artifacts
    from .ray_serve import ServeOptions, build_app, check_placement, deployment_plan, require_ray

    options = ServeOptions(replicas=None if args.replicas is None else parse_replicas(args.replicas),
                           autoscaling=bool(args.autoscale), max_batch=args.max_batch, max_wait_s=args.max_wait,
                           num_cpus=1.0 if args.num_cpus is None else args.num_cpus,
                           num_gpus=0.0 if args.num_gpus is None else args.num_gpus,
                           threads=args.threads or 1, dense=not args.no_dense, verify=not args.no_verify)
    options.check()
    plan = deployment_plan(load_artifacts(args.artifacts, verify=False), options)  # bad input fails before Ray starts
    serve = require_ray()
    import ray

    app = build_app(args.artifacts, options)
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, _temp_dir=args.ray_temp_dir)
    try:
        check_placement(plan, options, ray.cluster_resources())
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"{PROG}: serving {args.artifacts} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        # Our app goes in any case; a local Ray goes with it, a cluster we joined stays.
        try:
            serve.delete(APP_NAME) if args.address else serve.shutdown()
        finally:
            ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aptp-serve``; returns the exit code (2 bad input, 130 stopped with Ctrl-C)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(PROG, lambda: run(args), interrupted="stopped")


if __name__ == "__main__":
    sys.exit(main())
