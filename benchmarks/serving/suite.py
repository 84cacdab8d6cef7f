"""``aptp-bench serve``: the routed mixture, the dense model and the static model under load.

For one export, open-loop Poisson traffic (`aptp.benchmarks.serving.loadgen`: seeded arrivals, bounded
in count and time) at several rates is sent to an in-process `GenerationServer` serving
- the routed mixture (router in front, one batch list per expert),
- the dense model (every request on the dense UNet, all requests share batches),
- the static model of equal MACs (one uniform mask at the routed prompt mix's expected MACs,
  built and exported like the latency suite's static baseline; needs torch),
with the same arrivals for all three at each rate and the three interleaved per rate, so
background load hits them alike. Per run: throughput, p50/p95/p99 latency, batches formed per
expert; per model, the highest rate whose p95 stays within the SLO. The Ray Serve app of the
same export then runs in a loopback-only network namespace (`aptp.benchmarks.serving.ray_run`):
its images against in-process ones, its per-request overhead against `GenerationServer` at low
load, and the same rates for the routed and dense models.

Rates default to fractions of the dense server's capacity (``max_batch`` / latency of one
full dense batch, measured first); the SLO defaults to ``slo_factor`` times one dense request's
latency alone. Both are reported. Timings are never asserted: they are reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from aptp.errors import ConfigError
from aptp.outputs import BENCH_SERVE, claim_in_place

from .loadgen import highest_sustained, poisson_arrivals, run_open_loop, summarize_load

__all__ = ["ServeBenchOptions", "TrackedPipeline", "run_serve_bench", "server_sender"]

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "aptp-serve-bench"
VARIANTS = ("routed", "dense", "static")


@dataclass
class ServeBenchOptions:
    """What `aptp-bench serve` can change (see the module docstring)."""

    rates: Sequence[float] | None = None
    rate_factors: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.5)
    count: int = 24
    max_seconds: float = 20.0
    drain_s: float = 90.0
    slo_s: float | None = None
    slo_factor: float = 4.0
    max_wait_s: float = 0.05
    threads: int = 2
    seed: int = 0
    static: bool = True
    ray: bool = True
    local: bool = True
    ray_overhead_requests: int = 8
    static_dir: str | os.PathLike | None = None

    def check(self) -> None:
        if self.rates is not None and (not self.rates or any(not r > 0 for r in self.rates)):
            raise ConfigError(f"rates must be positive requests per second, got {self.rates}")
        if any(not f > 0 for f in self.rate_factors):
            raise ConfigError(f"rate factors must be positive, got {self.rate_factors}")
        for name in ("count", "threads", "ray_overhead_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_seconds", "drain_s", "slo_factor"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.slo_s is not None and not self.slo_s > 0:
            raise ConfigError(f"slo_s must be > 0 seconds, got {self.slo_s}")


class TrackedPipeline:
    """An `AptpPipeline` seen through the server: records every batch's size on its results
    and, for synthetic exports (random router head), replaces the router's codes by the
    synthetic assignment after the router has run (its cost stays in)."""

    def __init__(self, pipe: Any, codes_of: Mapping[str, int] | None = None):
        self._pipe = pipe
        self._codes_of = codes_of
        self.batches: list[tuple[Any, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def route(self, prompts: Sequence[str]) -> np.ndarray:
        codes = self._pipe.route(prompts)
        if self._codes_of is None:
            return codes
        return np.asarray([self._codes_of[p] for p in prompts], dtype=np.int64)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], options: Any, codes: Any = None) -> list[Any]:
        results = self._pipe.generate(prompts, seeds, options, codes)
        self.batches.append((options.expert, len(prompts)))
        for result in results:
            result.batch_size = len(prompts)  # a field of ours, read by `server_sender`
        return results


def server_sender(server: Any, prompts: Sequence[str], seeds: Sequence[int], expert: Any = None
                  ) -> Callable[[int], Future]:
    """`send` for the load generator: request ``i`` submitted to a `GenerationServer`."""

    def send(i: int) -> Future:
        outer: Future = Future()

        def done(inner: Future) -> None:
            err = inner.exception()
            if err is not None:
                outer.set_exception(err)
            else:
                result = inner.result()
                outer.set_result({"expert": result.expert, "batch_size": getattr(result, "batch_size", None)})

        server.submit(prompts[i], seed=int(seeds[i]), expert=expert).add_done_callback(done)
        return outer

    return send


def _calibrate(pipe: Any, prompt: str, max_batch: int) -> dict[str, float]:
    """Dense latency of one request alone (median of 3) and of one full batch."""
    opts = pipe.options(expert="dense")
    pipe.generate([prompt], [0], opts)  # warm-up
    single = []
    for i in range(3):
        clock = time.perf_counter()
        pipe.generate([prompt], [i], opts)
        single.append(time.perf_counter() - clock)
    clock = time.perf_counter()
    pipe.generate([prompt] * max_batch, list(range(max_batch)), opts)
    batch = time.perf_counter() - clock
    return {"dense_single_s": float(np.median(single)), "dense_full_batch_s": batch,
            "dense_capacity_per_s": max_batch / batch}


def _ray_run(root: Path, config: Mapping[str, Any], out: Path, timeout_s: float) -> dict[str, Any]:
    """The Ray half, in a fresh network namespace with only loopback (or why it was skipped)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return {"skipped": "Ray Serve is not installed: pip install 'aptp[serve]'"}
    if shutil.which("unshare") is None:
        return {"skipped": "needs `unshare` to keep Ray on loopback"}
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode:
        return {"skipped": f"cannot create a network namespace: {probe.stderr.strip()}"}
    config_path = out / "serve_ray_config.json"
    result_path = out / "serve_ray.json"
    config_path.write_text(json.dumps({**config, "artifacts": str(root), "output": str(result_path)}))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, "-m",
               "aptp.benchmarks.serving.ray_run", str(config_path)]
    log_path = out / "serve_ray.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the worker's process group: what we started
            proc.wait()
            return {"skipped": f"the Ray run did not finish within {timeout_s:.0f} s (log: {log_path})"}
    if not result_path.is_file():
        return {"skipped": f"the Ray run wrote no results (exit {proc.returncode}; log: {log_path})"}
    return json.loads(result_path.read_text())


def run_serve_bench(artifacts: str | os.PathLike, output_dir: str | os.PathLike,
                    options: ServeBenchOptions | None = None) -> dict[str, Any]:
    """Run the serving suite; write ``serve.json``, ``serve.md`` and ``serve_latency.png``."""
    from aptp.runtime import AptpPipeline, GenerationServer
    from aptp.runtime.artifacts import ModelFile, load_artifacts

    from . import report as serve_report
    from ..latency.backends import torch_status
    from ..latency.model import load_model, load_torch, macs_ratios, route_prompts, static_baseline
    from ..latency.options import MIXED_PROMPTS
    from ..machine import machine_info, now_iso

    options = options or ServeBenchOptions()
    options.check()
    root = Path(artifacts).expanduser().absolute()
    out = Path(output_dir).expanduser().absolute()
    claim_in_place(out, BENCH_SERVE, allow_existing=True, inputs=[("export", root)])
    model = load_model(root)
    notes: list[str] = []
    started = time.monotonic()
    machine = machine_info()  # load average before the run

    prompts = [MIXED_PROMPTS[i % len(MIXED_PROMPTS)] + ("" if i < len(MIXED_PROMPTS) else f", variation {i}")
               for i in range(options.count)]
    seeds = list(range(1000, 1000 + options.count))
    codes, routing = route_prompts(model, prompts, options.threads)
    torch_ok, torch_reason = torch_status()
    if torch_ok:
        load_torch(model)
    ratios = macs_ratios(model, model.nominal, {})
    mixture = float(np.mean([ratios[f"expert_{c}"] for c in codes.tolist()]))
    static = None
    if options.static and torch_ok:
        static = static_baseline(model, mixture, options.static_dir, out)
        notes.append(f"static: one uniform mask at MACs ratio {static['ratio']:.4f} (the routed prompt mix's "
                     f"expected MACs {mixture:.4f})")
    elif options.static:
        notes.append(f"no static model: torch unavailable ({torch_reason})")
    model.dense_torch = None  # the runtime's sessions from here on

    artifacts_ = load_artifacts(root, verify=False)
    pipe = AptpPipeline(artifacts_, backend="onnxruntime", threads=options.threads, preload=True)
    codes_of = {p: int(c) for p, c in zip(prompts, codes.tolist())} if model.synthetic else None
    pipes = {"routed": TrackedPipeline(pipe, codes_of), "dense": TrackedPipeline(pipe)}
    if static:
        swapped = dataclasses.replace(artifacts_, dense=ModelFile(onnx=Path(static["onnx"]), macs_ratio=static["ratio"]))
        pipes["static"] = TrackedPipeline(AptpPipeline(swapped, backend="onnxruntime", threads=options.threads,
                                                       preload=True))
    calibration = _calibrate(pipe, prompts[0], pipe.max_batch)
    rates = sorted(float(r) for r in options.rates) if options.rates else \
        [round(f * calibration["dense_capacity_per_s"], 3) for f in options.rate_factors]
    slo = float(options.slo_s or round(options.slo_factor * calibration["dense_single_s"], 3))
    logger.info("rates %s req/s, SLO p95 <= %.2f s, %s", rates, slo, calibration)

    runs: list[dict[str, Any]] = []
    for r, rate in enumerate(rates):
        arrivals = poisson_arrivals(rate, options.count, options.seed + r, options.max_seconds)
        names = list(pipes)
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order per rate
            tracked = pipes[name]
            server = GenerationServer(tracked, max_wait=options.max_wait_s, max_queue=options.count)
            expert = None if name == "routed" else "dense"
            try:
                outcomes = run_open_loop(server_sender(server, prompts, seeds, expert), arrivals, options.drain_s)
            finally:
                server.close()
            summary = summarize_load(outcomes, rate, slo)
            runs.append({"server": "GenerationServer", "variant": name, **summary, "load_1min": os.getloadavg()[0]})
            logger.info("%s @ %.3f/s: p95 %s s, throughput %s/s, mean batch %s", name, rate, summary["p95_s"],
                        summary["throughput"], summary["mean_batch"])
    for tracked in pipes.values():
        tracked.close()

    ray = {"skipped": "disabled (--no-ray)"}
    if options.ray:
        ray = _ray_run(root, {"prompts": prompts, "seeds": seeds, "codes": codes.tolist() if model.synthetic else None,
                              "rates": rates, "count": options.count, "max_seconds": options.max_seconds,
                              "drain_s": options.drain_s, "slo_s": slo, "seed": options.seed,
                              "max_wait_s": options.max_wait_s, "threads": options.threads,
                              "overhead_requests": options.ray_overhead_requests}, out, timeout_s=900)
        runs += ray.pop("runs", [])
    local = None
    if options.local:
        from .local_run import run_local_http

        local = run_local_http(root, {"prompts": prompts, "seeds": seeds,
                                      "codes": codes.tolist() if model.synthetic else None, "rates": rates,
                                      "count": options.count, "max_seconds": options.max_seconds,
                                      "drain_s": options.drain_s, "slo_s": slo, "seed": options.seed,
                                      "max_wait_s": options.max_wait_s, "threads": options.threads,
                                      "overhead_requests": options.ray_overhead_requests})
        runs += local.pop("runs", [])
    sustained = {f"{run_server}/{v}": highest_sustained([x for x in runs if x["variant"] == v
                                                            and x["server"] == run_server])
                 for run_server in ("GenerationServer", "ray", "local") for v in VARIANTS
                 if any(x["variant"] == v and x["server"] == run_server for x in runs)}
    results = {
        "format": RESULTS_FORMAT, "version": 1, "created": now_iso(), "artifacts": str(root),
        "model": {"num_codes": model.num_codes, "shares": model.shares, "nominal_resolution": model.nominal,
                  "max_batch": pipe.max_batch, "steps": pipe.scheduler.num_steps, "synthetic": bool(model.synthetic),
                  "macs_ratios": ratios, "routing": routing, "assignment": np.bincount(codes, minlength=model.num_codes).tolist(),
                  "mixture_macs_ratio": mixture, "static_macs_ratio": static["ratio"] if static else None},
        "machine": machine,
        "settings": {"rates": rates, "count": options.count, "max_seconds": options.max_seconds,
                     "drain_s": options.drain_s, "slo_p95_s": slo, "max_wait_s": options.max_wait_s,
                     "threads": options.threads, "seed": options.seed, "calibration": calibration,
                     "slo_rule": "p95 latency (scheduled arrival to completion) within the SLO and every request "
                                 "completed"},
        "runs": runs, "sustained_rate": sustained, "ray": ray, **({"local": local} if local else {}), "notes": notes,
        "elapsed_s": time.monotonic() - started,
    }
    results["checks"] = serve_report.checks(results)
    serve_report.write_reports(results, out)
    return results
