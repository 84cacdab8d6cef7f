"""The serving suite (`aptp-bench serve`): open-loop Poisson load against the in-process server
for the routed, dense and static models, then the Ray Serve app in a loopback-only namespace.

- `cli`: the options and the run;
- `suite`: the runs in this process and the Ray subprocess's results;
- `loadgen`: seeded Poisson arrivals, bounded open-loop sending, per-run summaries;
- `ray_run`: the Ray Serve run (`python -m aptp.benchmarks.serving.ray_run CONFIG.json`);
- `report`: `serve.json`, `serve.md`, `serve_latency.png`.
"""

from aptp.lazy import lazy_exports

__all__ = ["ServeBenchOptions", "run_serve_bench"]

# Lazy: the Ray subprocess imports this package and needs none of the suite.
__getattr__, __dir__ = lazy_exports(__name__, {name: ".suite" for name in __all__}, __all__)
