"""What machine a figure came from: `machine_info` (CPU, cores, memory, load, versions, GPU),
`now_iso` (the UTC timestamp every results file carries) and `machine_lines` (the lines each
report opens with)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import platform
from pathlib import Path
from typing import Any, Mapping

__all__ = ["machine_info", "machine_lines", "now_iso"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed or no metadata
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load, OS, Python and library versions, GPU (when visible)."""
    info: dict[str, Any] = {
        "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:12],
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {name: _version(name) for name in
                     ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "diffusers", "tensorrt", "aptp")},
    }
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")[0]
        info["memory_gib"] = round(int(meminfo.split()[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        info["memory_gib"] = None
    gpu = None
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    info["gpu"] = gpu
    return info


def now_iso() -> str:
    """The current UTC time, to the second, in ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def machine_lines(machine: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """The Markdown lines every suite's report opens with: machine, software, threads and repeats,
    load average before and after (`settings` keys: threads, repeats, warmup, interleaved, statistic)."""
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items() if v)
    gpu = machine.get("gpu")
    load = machine.get("load_average") or []
    after = machine.get("load_average_after") or []
    return [
        f"- Machine: {machine.get('cpu_model')}, {machine.get('logical_cores')} logical cores, "
        f"{machine.get('memory_gib')} GiB; GPU: {gpu['name'] + ' (CUDA ' + str(gpu['cuda']) + ')' if gpu else 'none'}",
        f"- Software: Python {machine.get('python')}, {versions}",
        f"- Threads: {settings.get('threads')} (onnxruntime intra-op, torch); repeats {settings.get('repeats')}, "
        f"warm-up {settings.get('warmup')}, interleaved round-robin ({settings.get('interleaved')}); "
        f"{settings.get('statistic')}",
        f"- Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load)}; after: "
        f"{', '.join(f'{x:.2f}' for x in after)}",
    ]
