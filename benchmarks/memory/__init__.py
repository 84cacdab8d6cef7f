"""The memory suite (`aptp-bench memory`): a fixed mixed workload served under memory budgets at
fp32 and int8, each run in a fresh process.

- `cli`: the options and the run;
- `suite`: budgets, workload, the int8 copy of the export, the runs and their checks;
- `worker`: one run in its own process (`python -m aptp.benchmarks.memory.worker SPEC OUT`);
- `ratios`: peak over budget, pinned RSS, throughput against the reference (checks and report);
- `report`: `memory.json`, `memory.md`, `memory.png`.
"""

from aptp.lazy import lazy_exports

__all__ = ["MemoryOptions", "run_memory"]

# Lazy: the worker subprocess imports this package and needs none of the suite.
__getattr__, __dir__ = lazy_exports(__name__, {name: ".suite" for name in __all__}, __all__)
