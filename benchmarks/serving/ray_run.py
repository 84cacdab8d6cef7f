"""The Ray half of ``aptp-bench serve``; runs inside a loopback-only network namespace.

    unshare -n sh -c 'ip link set lo up && exec python -m aptp.benchmarks.serving.ray_run CONFIG.json'

`aptp.benchmarks.serving.suite` starts it that way (Ray binds every interface, and its replicas open
internal servers: nothing may leave loopback). It starts a single-node Ray (no dashboard,
usage stats off, a short temp dir of its own, removed afterwards), serves the export with
`aptp.runtime.ray_serve` on 127.0.0.1, and measures, over HTTP:
- identity: the first prompts' PNGs against the in-process pipeline's images;
- overhead at low load: one request at a time, alternating the Ray app and an in-process
  `GenerationServer` on the same prompts and seeds;
- the suite's rates (same seeded arrivals) for the routed and dense models.
Writes the JSON named in the config. Every request has a timeout; every loop is bounded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

PORT = 8347
APP = "aptp-bench"


URL = f"http://127.0.0.1:{PORT}"


def post(body: dict[str, Any], timeout: float, url: str = URL) -> dict[str, Any]:
    """One HTTP request to aptp's ``POST /`` at `url`; raises on a non-200 answer."""
    req = urllib.request.Request(f"{url}/", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
            expert = resp.headers.get("X-Aptp-Expert")
            return {"expert": int(expert) if expert.isdigit() else expert,
                    "batch_size": int(resp.headers.get("X-Aptp-Batch-Size")), "png": payload}
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"HTTP {err.code}: {err.read().decode('utf-8', 'replace')}") from None


def http_sender(pool: ThreadPoolExecutor, prompts, seeds, codes, expert, timeout: float,
                url: str = URL) -> Callable[[int], Future]:
    def send(i: int) -> Future:
        body: dict[str, Any] = {"prompt": prompts[i], "seed": int(seeds[i])}
        forced = expert if expert is not None else (None if codes is None else int(codes[i]))
        if forced is not None:
            body["expert"] = forced
        return pool.submit(lambda: {k: v for k, v in post(body, timeout, url).items() if k != "png"})
    return send


def http_rate_runs(config: dict[str, Any], server: str, url: str = URL) -> list[dict[str, Any]]:
    """The suite's open-loop runs over HTTP at `url`: every rate of `config`, the routed and the
    dense model on the same arrivals, their order alternating per rate; `server` labels the rows."""
    from .loadgen import poisson_arrivals, run_open_loop, summarize_load

    prompts, seeds, codes = config["prompts"], config["seeds"], config.get("codes")
    runs = []
    with ThreadPoolExecutor(int(config["count"])) as pool:
        for r, rate in enumerate(config["rates"]):
            arrivals = poisson_arrivals(rate, int(config["count"]), int(config["seed"]) + r,
                                        float(config["max_seconds"]))
            for variant, expert in (("routed", None), ("dense", "dense"))[:: 1 if r % 2 == 0 else -1]:
                send = http_sender(pool, prompts, seeds, codes if expert is None else None, expert,
                                   float(config["drain_s"]), url)
                outcomes = run_open_loop(send, arrivals, float(config["drain_s"]))
                runs.append({"server": server, "variant": variant,
                             **summarize_load(outcomes, rate, float(config["slo_s"])), "load_1min": os.getloadavg()[0]})
    return runs


def identity(pipe, prompts, seeds, codes, n: int, timeout: float, url: str = URL) -> dict[str, Any]:
    """Images and experts of `n` requests over HTTP against the same requests in-process."""
    from PIL import Image

    diffs, same_expert = [], 0
    for i in range(n):
        expert = None if codes is None else int(codes[i])
        body = {"prompt": prompts[i], "seed": int(seeds[i]), **({} if expert is None else {"expert": expert})}
        got = post(body, timeout, url)
        want = pipe([prompts[i]], seeds=[int(seeds[i])], expert=expert)[0]
        pixels = np.asarray(Image.open(io.BytesIO(got["png"])).convert("RGB")).astype(int)
        diffs.append(int(np.abs(pixels - want.image.astype(int)).max()))
        same_expert += got["expert"] == want.expert
    return {"requests": n, "identical_images": sum(d == 0 for d in diffs), "max_abs_pixel_diff": max(diffs),
            "same_expert": same_expert}


def _overhead(pipe, prompts, seeds, codes, n: int, max_wait: float, timeout: float) -> dict[str, Any]:
    from aptp.runtime import GenerationServer

    from .loadgen import interleaved_times

    def request(i: int) -> tuple[str, int, Any]:
        return prompts[i % len(prompts)], int(seeds[i % len(seeds)]), None if codes is None else int(codes[i % len(codes)])

    def via_ray(i: int) -> None:
        prompt, seed, expert = request(i)
        post({"prompt": prompt, "seed": seed, **({} if expert is None else {"expert": expert})}, timeout)

    with GenerationServer(pipe, max_wait=max_wait) as server:
        def via_server(i: int) -> None:
            prompt, seed, expert = request(i)
            server.generate(prompt, seed=seed, expert=expert, timeout=timeout)

        ray_s, local_s = interleaved_times(via_ray, via_server, n)
    return {"requests": n, "ray_median_s": statistics.median(ray_s), "server_median_s": statistics.median(local_s),
            "overhead_s": statistics.median(ray_s) - statistics.median(local_s),
            "overhead_ratio": statistics.median(ray_s) / statistics.median(local_s), "ray_s": ray_s,
            "server_s": local_s}


def main(config_path: str) -> int:
    import ray
    from ray import serve

    from aptp.runtime import AptpPipeline
    from aptp.runtime.ray_serve import ServeOptions, build_app

    config = json.loads(Path(config_path).read_text())
    prompts, seeds, codes = config["prompts"], config["seeds"], config.get("codes")
    timeout = float(config["drain_s"])
    result: dict[str, Any] = {"port": PORT}
    temp = tempfile.mkdtemp(prefix="aptp-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    clock = time.monotonic()
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1",
                 logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        options = ServeOptions(num_cpus=0.25, router_num_cpus=0.25, threads=int(config["threads"]),
                               max_wait_s=float(config["max_wait_s"]), verify=False)
        serve.run(build_app(config["artifacts"], options), name=APP, route_prefix="/")
        result["startup_s"] = time.monotonic() - clock
        result["replica_threads"] = options.threads
        pipe = AptpPipeline.from_export(config["artifacts"], verify=False, threads=int(config["threads"]))
        n = min(int(config["overhead_requests"]), len(prompts))
        result["identity"] = identity(pipe, prompts, seeds, codes, n, timeout)
        result["overhead"] = _overhead(pipe, prompts, seeds, codes, n, float(config["max_wait_s"]), timeout)
        pipe.close()
        result["runs"] = http_rate_runs(config, "ray")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
        result["elapsed_s"] = time.monotonic() - clock
        Path(config["output"]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
