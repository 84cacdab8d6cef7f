"""The serving suite's local-mode run: ``aptp-serve``'s default HTTP server, in this process.

The same export behind `aptp.runtime.local_serve.LocalServer` (uvicorn on 127.0.0.1, an
ephemeral port, the `GenerationServer` inside): its images against in-process ones, its
per-request cost over calling the pipeline directly at low load (HTTP, JSON, PNG encoding and the
server's batching wait, interleaved request by request so load drift hits both alike), and the
same Poisson rates as the other runs for the routed and dense models. No Ray, no network
namespace: it binds loopback only.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .loadgen import interleaved_times
from .ray_run import http_rate_runs, identity, post

__all__ = ["run_local_http"]


def _overhead(pipe: Any, url: str, prompts: Sequence[str], seeds: Sequence[int], codes: Sequence[int] | None,
              n: int, timeout: float) -> dict[str, Any]:
    def request(i: int) -> tuple[str, int, int | None]:
        return prompts[i % len(prompts)], int(seeds[i % len(seeds)]), None if codes is None else int(codes[i % len(codes)])

    def via_http(i: int) -> None:
        prompt, seed, expert = request(i)
        post({"prompt": prompt, "seed": seed, **({} if expert is None else {"expert": expert})}, timeout, url)

    def direct(i: int) -> None:
        prompt, seed, expert = request(i)
        pipe([prompt], seeds=[seed], expert=expert)

    http_s, direct_s = interleaved_times(via_http, direct, n)
    return {"requests": n, "http_median_s": statistics.median(http_s), "direct_median_s": statistics.median(direct_s),
            "overhead_s": statistics.median(http_s) - statistics.median(direct_s),
            "overhead_ratio": statistics.median(http_s) / statistics.median(direct_s), "http_s": http_s,
            "direct_s": direct_s}


def run_local_http(root: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Run the local mode on the export at `root`; `config` holds the suite's prompts, seeds,
    codes (synthetic exports) and settings, as the Ray run takes them."""
    from aptp.runtime import AptpPipeline
    from aptp.runtime.local_serve import LocalOptions, LocalServer

    prompts, seeds, codes = config["prompts"], config["seeds"], config.get("codes")
    timeout = float(config["drain_s"])
    clock = time.monotonic()
    server = LocalServer.start(str(root), options=LocalOptions(max_wait=float(config["max_wait_s"]),
                                                             max_queue=max(64, int(config["count"])),
                                                             threads=int(config["threads"]), verify=False))
    result: dict[str, Any] = {"url": server.url, "startup_s": time.monotonic() - clock}
    pipe = AptpPipeline.from_export(root, verify=False, threads=int(config["threads"]))
    try:
        n = min(int(config["overhead_requests"]), len(prompts))
        result["identity"] = identity(pipe, prompts, seeds, codes, n, timeout, server.url)
        result["overhead"] = _overhead(pipe, server.url, prompts, seeds, codes, n, timeout)
        result["runs"] = http_rate_runs(dict(config), "local", server.url)
    finally:
        pipe.close()
        server.stop()
        result["elapsed_s"] = time.monotonic() - clock
    return result
