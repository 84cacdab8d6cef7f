"""One run of the memory benchmark, in its own process (``python -m aptp.benchmarks.memory.worker``).

A fresh process per (budget, precision), so one run's freed heap and onnxruntime arenas do
not flatter or burden the next: RSS is sampled inside this serving process by a thread every
``sample_interval`` seconds while a `GenerationServer` serves the workload.

Two kinds of run, read from a JSON spec (argv[1]); the JSON result goes to argv[2]:
- ``"serve"``: the workload under ``budget_bytes`` at ``precision``: peak and time-averaged
  RSS, throughput, per-request latency, the server's stats and the pipeline's memory report,
  and a sha256 of each request's final latents (equal across budgets: a budget must not change
  a result).
- ``"steps"``: per UNet, one step of the fp32 and the int8 graph timed interleaved with the
  latency suite's timer, both sessions loaded side by side only for that UNet; then, with
  ``profile_repeats``, onnxruntime's per-op-type profile of both (where int8 wins or loses).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class RssSampler:
    """A daemon thread recording ``(seconds since start, RSS bytes)`` every `interval` seconds."""

    def __init__(self, probe: Any, interval: float):
        self.probe, self.interval = probe, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self.start_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.probe.rss()
            if rss is not None:
                self.samples.append((time.monotonic() - self.start_time, rss))
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def _time_weighted_mean(samples: list[tuple[float, int]]) -> float | None:
    if len(samples) < 2:
        return float(samples[0][1]) if samples else None
    t = np.array([s[0] for s in samples])
    v = np.array([s[1] for s in samples], dtype=np.float64)
    return float(np.sum(v[:-1] * np.diff(t)) / (t[-1] - t[0]))


def _rss_before_first_load(samples: list[tuple[float, int]], start: float, events: list[tuple], report: dict) -> int | None:
    """The pinned parts at work: the highest RSS sampled before the first UNet load began. By
    then the router and text encoder have run on the first batch, so their working memory at
    a full batch (which the warm-up's single prompt does not reach) is in it; no UNet is."""
    loads = [e for e in events if e[1] == "load"]
    if not loads:
        return None
    t, _, key, _ = loads[0]
    began = t - start - float(report["sessions"][str(key)]["load_seconds"])
    before = [rss for when, rss in samples if when < began]
    return max(before) if before else None


def serve(spec: dict[str, Any]) -> dict[str, Any]:
    from aptp.runtime import AptpPipeline, GenerationServer

    pipe = AptpPipeline.from_export(spec["artifacts"], verify=False, threads=spec.get("threads"),
                                    memory_budget=spec.get("budget_bytes"), precision=spec.get("precision"))
    probe = pipe.residency.probe
    pipe.load(unets=False)
    pipe.route(["warm up"])  # router, tokenisers and text encoder touched before the clock starts
    baseline = probe.rss()
    sampler = RssSampler(probe, float(spec["sample_interval"])).start()
    workload = spec["workload"]
    submitted: dict[int, float] = {}
    finished: dict[int, float] = {}
    futures = []
    with GenerationServer(pipe, max_batch=spec.get("max_batch"), max_wait=float(spec["max_wait"]),
                          max_wait_s=float(spec["max_wait_s"]), max_queue=len(workload) + 1) as server:
        start = time.monotonic()
        for item in workload:
            gap = float(item.get("gap", 0.0))
            if gap:
                time.sleep(gap)
            index = int(item["index"])
            submitted[index] = time.monotonic()
            future = server.submit(item["prompt"], seed=int(item["seed"]), expert=item["expert"],
                                   guidance_scale=spec.get("guidance_scale"), output_type="latent")
            future.add_done_callback(lambda f, i=index: finished.__setitem__(i, time.monotonic()))
            futures.append((index, future))
        results = {i: f.result(timeout=float(spec["timeout_s"])) for i, f in futures}
        end = max(finished.values())
        stats = server.stats()
    samples = sampler.stop()
    latencies = np.array([finished[i] - submitted[i] for i in results])
    report = pipe.memory_report()
    pinned_working = _rss_before_first_load(samples, sampler.start_time, pipe.residency.events, report)
    pipe.close()
    peak = max(s[1] for s in samples)
    return {
        "budget_bytes": spec.get("budget_bytes"), "budget_label": spec.get("budget_label"),
        "precision": spec.get("precision") or "fp32", "requests": len(results),
        "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
        "mean_rss_bytes": _time_weighted_mean(samples),
        "peak_over_baseline_bytes": peak - baseline,
        "pinned_working_rss_bytes": pinned_working,
        "peak_over_pinned_working_bytes": None if pinned_working is None else peak - pinned_working,
        "seconds": end - start, "throughput_rps": len(results) / (end - start),
        "latency_s": {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95)),
                      "max": float(latencies.max()), "mean": float(latencies.mean())},
        "stats": stats, "memory_report": report,
        "rss_timeline": [(round(t, 3), int(v)) for t, v in samples[:: max(1, len(samples) // 600)]],
        "latents_sha256": {str(i): hashlib.sha256(np.ascontiguousarray(r.latents).tobytes()).hexdigest()
                           for i, r in sorted(results.items())},
        "experts": {str(i): str(r.expert) for i, r in sorted(results.items())},
    }


def steps(spec: dict[str, Any]) -> dict[str, Any]:
    """fp32 vs int8 UNet-step latency per UNet, with the latency suite's backend and timing
    layer (interleaved repeats; both sessions loaded side by side for that UNet only)."""
    from aptp.runtime.artifacts import load_artifacts

    from ..latency.backends import ort_step
    from ..latency.profile import profile_by_op
    from ..latency.timing import interleaved, summarize

    artifacts = load_artifacts(spec["artifacts"], verify=False)
    rows = 2 * int(spec["batch"])  # classifier-free guidance doubles the UNet batch
    shape = {"channels": artifacts.latent_channels, "text_length": artifacts.tokenizer.max_length,
             "hidden": artifacts.text_hidden_size}
    out: dict[str, Any] = {}
    for key in spec["keys"]:
        entry = artifacts.unet(key if key == "dense" else int(key))
        if entry.int8 is None:
            continue
        variants = {"fp32": ort_step(entry.onnx, shape, spec.get("threads"), "cpu"),
                    "int8": ort_step(entry.int8.onnx, shape, spec.get("threads"), "cpu")}
        calls = {name: step.prepare(rows, artifacts.latent_height, artifacts.latent_width)
                 for name, step in variants.items()}
        samples = interleaved(calls, int(spec["repeats"]), int(spec["warmup"]))
        fp32, int8 = summarize(samples["fp32"]), summarize(samples["int8"])
        out[str(key)] = {"fp32": fp32, "int8": int8, "rows": rows,
                         "speedup_int8": fp32["median_s"] / int8["median_s"]}
        for step in variants.values():
            step.close()
        if spec.get("profile_repeats"):
            fp32_ops, int8_ops = profile_by_op(
                [entry.onnx, entry.int8.onnx], shape, rows, artifacts.latent_height, artifacts.latent_width,
                spec.get("threads") or 0, int(spec["profile_repeats"]), Path(spec["profile_dir"]) / str(key))
            out[str(key)]["ops"] = {"fp32": fp32_ops, "int8": int8_ops}
    return out


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    result = serve(spec) if spec["kind"] == "serve" else steps(spec)
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
