"""``aptp-serve``: serve an export over HTTP on Ray Serve (router + one deployment per expert).

    aptp-serve --artifacts exports/tiny --host 127.0.0.1 --port 8000
    aptp-serve --artifacts exports/tiny --replicas 6 --num-cpus 1          # 6 expert replicas by share
    aptp-serve --artifacts exports/tiny --replicas 0=3,1=2,dense=1 --num-gpus 0.5
    aptp-serve --artifacts exports/tiny --address auto                     # join a running cluster
    curl -s -X POST localhost:8000/ -d '{"prompt": "a red car", "seed": 7}' > car.png

Without ``--address`` a local single-node Ray starts (no dashboard) and stops with the server
(Ctrl-C). The default host is 127.0.0.1: pass ``--host 0.0.0.0`` deliberately to expose it.
Needs ``pip install 'aptp[serve]'``. Bad input prints ``aptp-serve: error: <message>`` and
exits 2. The HTTP contract is in `aptp.runtime.serve_http`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from aptp import __version__
from aptp.cli import positive_int, run_command
from aptp.errors import ConfigError

PROG = "aptp-serve"
APP_NAME = "aptp"

logger = logging.getLogger(__name__)


def parse_replicas(text: str) -> int | dict[int | str, int]:
    """``N`` (expert replicas in all, split by prompt share) or ``0=2,1=1,dense=1``."""
    try:
        if "=" not in text:
            return int(text)
        counts: dict[int | str, int] = {}
        for item in text.split(","):
            key, value = item.split("=")
            counts["dense" if key.strip() == "dense" else int(key)] = int(value)
        return counts
    except ValueError:
        raise ConfigError(f"--replicas must be a number or CODE=N pairs such as 0=2,1=1,dense=1, got {text!r}"
                          ) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serve an aptp export over HTTP with Ray Serve: a router in front of "
                "one batched deployment per expert. POST {\"prompt\", \"seed\", \"guidance_scale\", \"steps\"} "
                "-> PNG (or JSON with ?format=json).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--artifacts", required=True, help="the export directory aptp-export wrote")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port (8000)")
    p.add_argument("--replicas", type=str, help="expert replicas in all, split by prompt share (at least one "
                   "each), or CODE=N pairs like 0=2,1=1,dense=1 (default: one per model)")
    p.add_argument("--autoscale", action="store_true",
                   help="autoscale each expert between 1 replica and its share of --replicas")
    p.add_argument("--max-batch", type=positive_int, help="prompts per expert batch (default: the export's)")
    p.add_argument("--max-wait", type=float, default=0.02, metavar="S", help="batch wait in seconds (0.02)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per expert replica (1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="Ray GPUs per expert replica (0: run on CPU)")
    p.add_argument("--threads", type=positive_int, default=1, help="onnxruntime threads per replica (1)")
    p.add_argument("--no-dense", action="store_true", help="do not deploy the dense UNet")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export's files")
    p.add_argument("--address", help="a running Ray cluster to deploy on (e.g. 'auto'); default: start one here")
    p.add_argument("--ray-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--ray-temp-dir", help="temp/log directory of the local Ray (keep it short)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def run(args: argparse.Namespace) -> int:
    from .artifacts import load_artifacts
    from .ray_serve import ServeOptions, build_app, deployment_plan, require_ray

    options = ServeOptions(replicas=None if args.replicas is None else parse_replicas(args.replicas),
                           autoscaling=args.autoscale, max_batch=args.max_batch, max_wait_s=args.max_wait,
                           num_cpus=args.num_cpus, num_gpus=args.num_gpus, threads=args.threads,
                           dense=not args.no_dense, verify=not args.no_verify)
    options.check()
    deployment_plan(load_artifacts(args.artifacts, verify=False), options)  # bad input fails before Ray starts
    serve = require_ray()
    import ray

    app = build_app(args.artifacts, options)
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, _temp_dir=args.ray_temp_dir)
    try:
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
