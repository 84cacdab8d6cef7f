"""The memory suite (``aptp-bench memory``): serving K experts inside a memory budget.

On one export (the SD 2.1-shaped K=8 synthetic export for the issue's figures), a fixed,
seeded mixed workload is served by `aptp.runtime.GenerationServer` under each budget and
precision, each run in a fresh process (`aptp.benchmarks.memory.worker`):

- workload: ``requests`` prompts assigned to experts by the export's shares (synthetic exports,
  as the latency suite assigns them) or by the router (trained exports), seeds ``1000*seed + i``,
  submitted in a seeded shuffled order, all at once (a backlog) or ``arrival_gap_s`` apart;
- budgets: ``unlimited``, ``2x`` and ``1x`` the dense UNet's fp32 weights (its files' bytes),
  or byte sizes (``3GiB``). When the unlimited run would not fit this machine (the experts'
  fp32 files plus 1 GiB over 80% of ``MemAvailable``), the largest budget that fits replaces
  it as the reference and the report says so;
- precisions: ``fp32`` and ``int8`` (the int8 UNets are made first with
  `aptp.export.quantize.quantize_export` when the export has none);
- per run: peak and time-averaged RSS of the serving process, throughput, p50/p95 request
  latency, session loads and evictions, the server's batch and queue-wait stats; per UNet:
  fp32 vs int8 step latency (interleaved, in a worker of its own) and int8 error (from the
  manifest, measured at quantization over a fixed prompt set).

Nothing is asserted; the checks (peak RSS within budget + pinned parts, 2x-budget throughput vs
the reference, identical latents across budgets) are reported as measured.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aptp.errors import AptpError, ConfigError
from aptp.outputs import BENCH_MEMORY, claim_in_place
from aptp.runtime.request_options import GUIDANCE_RANGE
from aptp.runtime.serving import MAX_WAIT

from .ratios import peak_over_budget, throughput_vs_reference

__all__ = ["MemoryOptions", "build_workload", "resolve_budgets", "run_memory"]

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "aptp-bench-memory"
PROMPT_SUBJECTS = ("a red sports car", "a bowl of ramen", "an old lighthouse", "a snowy mountain village",
                   "a portrait of a fisherman", "a cat on a windowsill", "a city street at night",
                   "a plate of fresh fruit", "a sailing boat at sunset", "a robot in a workshop",
                   "a field of sunflowers", "a steam locomotive")
PROMPT_STYLES = ("photograph", "watercolor", "oil painting", "pencil sketch")
GiB = 1024**3


@dataclass
class MemoryOptions:
    """Settings of `run_memory` (the ``aptp-bench memory`` flags)."""

    requests: int = 48
    seed: int = 0
    budgets: Sequence[str] = ("unlimited", "2x", "1x")
    precisions: Sequence[str] = ("fp32", "int8")
    threads: int | None = None
    max_batch: int | None = None
    max_wait: float = 0.05
    max_wait_s: float = 5.0
    guidance_scale: float | None = None
    arrival_gap_s: float = 0.0
    sample_interval: float = 0.05
    step_repeats: int = 5
    step_warmup: int = 1
    profile_repeats: int = 3
    rounds: int = 1
    timeout_s: float = 3600.0
    calibration_prompts: int = 4
    quantize_in_place: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.requests < 1:
            raise ConfigError(f"--requests must be >= 1, got {self.requests}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        bad = [p for p in self.precisions if p not in ("fp32", "int8")]
        if bad or not self.precisions:
            raise ConfigError(f"--precisions must be a list of fp32, int8; got {list(self.precisions)}")
        for budget in self.budgets:
            _budget_bytes(budget, 1)  # a bad budget fails before anything runs
        # The workers' own checks, run here so a bad flag is one line before any worker starts.
        if not (math.isfinite(self.max_wait_s) and 0 <= self.max_wait_s <= MAX_WAIT):
            raise ConfigError(f"--max-wait-s must be in [0, {MAX_WAIT:g}] seconds, got {self.max_wait_s}")
        if not (math.isfinite(self.arrival_gap_s) and 0 <= self.arrival_gap_s <= MAX_WAIT):
            raise ConfigError(f"--arrival-gap must be in [0, {MAX_WAIT:g}] seconds, got {self.arrival_gap_s}")
        if self.guidance_scale is not None:
            low, high = GUIDANCE_RANGE
            if not (math.isfinite(self.guidance_scale) and low <= self.guidance_scale <= high):
                raise ConfigError(f"--guidance-scale must be a finite number in [{low:g}, {high:g}], "
                                  f"got {self.guidance_scale}")


#: Largest budget multiple of the dense UNet accepted ('2x'); beyond it a budget means nothing.
MAX_BUDGET_FACTOR = 1e6


def _budget_bytes(spec: str, dense_bytes: int) -> int | None:
    from aptp.runtime.residency import parse_memory_budget

    text = str(spec).strip().lower()
    if text.endswith("x"):
        try:
            factor = float(text[:-1])
        except ValueError:
            raise ConfigError(f"a budget is 'unlimited', a multiple of the dense UNet ('2x') or a size ('3GiB'), "
                              f"got {spec!r}") from None
        if not (math.isfinite(factor) and 0 < factor <= MAX_BUDGET_FACTOR):
            raise ConfigError(f"a budget multiple must be a number in (0, {MAX_BUDGET_FACTOR:g}], got {spec!r}")
        return int(factor * dense_bytes)
    try:
        return parse_memory_budget(spec, "--budgets")
    except AptpError as err:  # a bad flag of the suite: its own error type
        raise ConfigError(str(err)) from None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resolve_budgets(manifest: dict[str, Any], root: Path, budgets: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"label", "bytes", "note"}]`` for the requested budgets on this export and machine."""
    dense = manifest.get("dense")
    if not dense:
        raise ConfigError("the memory suite sizes its budgets by the dense UNet: export with the dense model")
    dense_bytes = _files_bytes(root, dense)
    experts_bytes = sum(_files_bytes(root, e) for e in manifest["experts"])
    available = _mem_available()
    out = []
    for spec in budgets:
        size = _budget_bytes(spec, dense_bytes)
        note = None
        if size is None and available is not None and experts_bytes + GiB > 0.8 * available:
            size = int(0.8 * available - GiB)
            note = (f"all {len(manifest['experts'])} experts ({experts_bytes / GiB:.1f} GiB of fp32 files) do not fit "
                    f"80% of this machine's available memory ({available / GiB:.1f} GiB): the largest budget that "
                    f"fits, {size / GiB:.1f} GiB, is the reference instead of unlimited")
        out.append({"label": str(spec), "bytes": size, "note": note})
    return out


def _files_bytes(root: Path, entry: dict[str, Any]) -> int:
    return sum((root / entry[k]).stat().st_size for k in ("unet", "external_data") if entry.get(k))


def build_workload(manifest: dict[str, Any], root: Path, requests: int, seed: int,
                   arrival_gap_s: float = 0.0, threads: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """The seeded request list (in arrival order) and how prompts were assigned to experts."""
    from ..latency import synthetic_assignment
    from ..synthetic import read_synthetic_info

    prompts = [f"{PROMPT_STYLES[(i // len(PROMPT_SUBJECTS)) % len(PROMPT_STYLES)]} of "
               f"{PROMPT_SUBJECTS[i % len(PROMPT_SUBJECTS)]}, variation {i}" for i in range(requests)]
    synthetic = read_synthetic_info(manifest)
    if synthetic is not None:
        codes, how = synthetic_assignment(prompts, synthetic["shares"]), "synthetic (by the export's shares)"
    else:
        from aptp.runtime import AptpPipeline

        pipe = AptpPipeline.from_export(root, verify=False, threads=threads)
        codes, how = pipe.route(prompts), "router (argmax)"
        pipe.close()
    rng = np.random.default_rng(seed)
    order = rng.permutation(requests)
    gaps = rng.exponential(arrival_gap_s, size=requests) if arrival_gap_s > 0 else np.zeros(requests)
    workload = [{"index": int(i), "prompt": prompts[i], "seed": 1000 * seed + int(i), "expert": int(codes[i]),
                 "gap": float(g)} for i, g in zip(order, gaps)]
    return workload, how


def _run_worker(spec: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """Run one worker, or reuse its result from an earlier, interrupted suite with the same spec."""
    spec_path, out_path, log_path = work / f"{name}.spec.json", work / f"{name}.json", work / f"{name}.log"
    if out_path.is_file() and spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        logger.info("reusing %s from an earlier run with the same settings", out_path)
        return json.loads(out_path.read_text())
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "aptp.benchmarks.memory.worker", str(spec_path), str(out_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=spec.get("timeout_s", 3600) + 600)
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"memory worker {name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(out_path.read_text())


INT8_COPY = "export-int8"


def int8_export(root: Path, output: Path, options: MemoryOptions) -> tuple[Path, dict[str, Any]]:
    """An export with int8 experts for the int8 runs, and its manifest: with
    ``options.quantize_in_place`` the user's export itself gains them (as ``aptp-export
    --quantize int8`` would do); otherwise a copy in ``output/export-int8`` does, so the user's
    export is never changed and an interrupted run leaves nothing inside it. The copy is reused
    while the source's manifest is unchanged."""
    from aptp.export.manifest import read_manifest
    from aptp.export.quantize import quantize_export
    from aptp.outputs import EXPORT, check_output_dir, staged_output

    def quantize(target: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        return quantize_export(target, "int8", threads=options.threads, calibration_prompts=options.calibration_prompts,
                               keys=[int(e["code"]) for e in manifest["experts"]])

    manifest = read_manifest(root, verify=False)
    if options.quantize_in_place:
        return root, quantize(root, manifest)
    copy, source_file = output / INT8_COPY, output / f"{INT8_COPY}.source.json"
    source = {"export": str(root), "manifest_sha256": _sha256(root / "manifest.json")}
    if source_file.is_file() and json.loads(source_file.read_text()) == source and (copy / "manifest.json").is_file():
        copied = read_manifest(copy, verify=True)
        if all(e.get("int8") for e in copied["experts"]):
            logger.info("reusing the int8 copy %s of %s", copy, root)
            return copy, copied
    check_output_dir(copy, EXPORT, allow_existing=True)  # replaced only if it is an export
    source_file.unlink(missing_ok=True)
    with staged_output(copy, EXPORT, what=f"quantizing a copy of {root}") as staging:
        shutil.copytree(root, staging, symlinks=True, dirs_exist_ok=True)
        quantize(staging, manifest)
    source_file.write_text(json.dumps(source) + "\n")
    return copy, read_manifest(copy, verify=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_memory(artifacts: str | os.PathLike, output_dir: str | os.PathLike, options: MemoryOptions) -> dict[str, Any]:
    """Run the suite; writes ``memory.json``, ``memory.md`` and ``memory.png`` to `output_dir`."""
    from aptp.export.manifest import read_manifest

    from ..machine import machine_info
    from .report import write_memory_reports

    options.check()
    root = Path(artifacts).expanduser().absolute()
    output = Path(output_dir).expanduser().absolute()
    claim_in_place(output, BENCH_MEMORY, allow_existing=True, inputs=[("export", root)])
    manifest = read_manifest(root, verify=True)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    quantization_s = None
    if "int8" in options.precisions and not all(e.get("int8") for e in manifest["experts"]):
        clock = _dt.datetime.now()
        root, manifest = int8_export(root, output, options)
        quantization_s = (_dt.datetime.now() - clock).total_seconds()
    budgets = resolve_budgets(manifest, root, options.budgets)
    workload, assignment = build_workload(manifest, root, options.requests, options.seed, options.arrival_gap_s,
                                          options.threads)
    runs = []
    work = output / "runs"  # per-run specs, results and logs: a rerun reuses the finished ones
    work.mkdir(exist_ok=True)
    # Round by round (every budget once, then again): a drift in the machine's load hits each
    # budget alike, and throughput is compared within a round.
    plan = [(precision, round_, budget) for precision in options.precisions for round_ in range(options.rounds)
            for budget in budgets]
    for precision, round_, budget in plan:
        name = f"{precision}-{budget['label']}" + (f"-r{round_}" if options.rounds > 1 else "")
        logger.info("memory run %s (%s)", name, budget["bytes"])
        spec = {"kind": "serve", "artifacts": str(root), "budget_bytes": budget["bytes"],
                "budget_label": budget["label"], "budget_note": budget["note"],
                "precision": None if precision == "fp32" else precision, "threads": options.threads,
                "max_batch": options.max_batch, "max_wait": options.max_wait, "max_wait_s": options.max_wait_s,
                "guidance_scale": options.guidance_scale, "sample_interval": options.sample_interval,
                "timeout_s": options.timeout_s, "workload": workload}
        result = _run_worker(spec, work, name)
        result["budget_note"] = budget["note"]
        result["round"] = round_
        runs.append(result)
    steps = None
    if "int8" in options.precisions:
        steps = _run_worker({"kind": "steps", "artifacts": str(root), "threads": options.threads,
                             "batch": options.max_batch or manifest["max_batch"],
                             "keys": [str(e["code"]) for e in manifest["experts"]],
                             "repeats": options.step_repeats, "warmup": options.step_warmup,
                             "profile_repeats": options.profile_repeats, "profile_dir": str(work / "profiles")},
                            work, "steps")
    logs = {p.stem: p.read_text()[-4000:] for p in work.glob("*.log")}
    machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = {
        "format": RESULTS_FORMAT, "started": started, "artifacts": str(root), "machine": machine,
        "settings": {**asdict(options), "assignment": assignment, "steps": manifest["scheduler"].get("num_inference_steps"),
                     "image": manifest["image"], "max_batch": options.max_batch or manifest["max_batch"],
                     "quantization_s": quantization_s},
        "unets": _unet_table(manifest, root, steps),
        "budgets": budgets, "runs": runs, "checks": _checks(runs),
        "worker_log_tails": logs,
    }
    write_memory_reports(results, output)
    return results


def _unet_table(manifest: dict[str, Any], root: Path, steps: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    entries = [(str(e["code"]), e) for e in manifest["experts"]] + \
        ([("dense", manifest["dense"])] if manifest.get("dense") else [])
    for key, entry in entries:
        int8 = entry.get("int8") or {}
        step = (steps or {}).get(key)
        rows.append({"key": key, "macs_ratio": entry.get("macs_ratio"), "share": entry.get("share"),
                     "fp32_bytes": _files_bytes(root, entry), "int8_bytes": int8.get("bytes"),
                     "int8_method": int8.get("method"), "int8_ops": int8.get("quantized_ops"),
                     "int8_error": int8.get("error"),
                     "ops": step.get("ops") if step else None,
                     "fp32_step_s": step["fp32"]["median_s"] if step else None,
                     "int8_step_s": step["int8"]["median_s"] if step else None,
                     "int8_speedup": step["speedup_int8"] if step else None})
    return rows


def _checks(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per precision and budget, over every round: the worst peak RSS against budget + pinned
    parts, and the median of the within-round throughput ratios to the reference budget."""
    checks: dict[str, Any] = {}
    for precision in sorted({r["precision"] for r in runs}):
        mine = [r for r in runs if r["precision"] == precision]
        hashes = {json.dumps(r["latents_sha256"], sort_keys=True) for r in mine}
        by_budget: dict[str, list[dict[str, Any]]] = {}
        for run in mine:
            by_budget.setdefault(run["budget_label"], []).append(run)
        checks[precision] = {
            "reference": mine[0]["budget_label"],
            "rounds": max(r.get("round", 0) for r in mine) + 1,
            "identical_latents_across_budgets": len(hashes) == 1,
            "runs": {label: _budget_checks(group, runs) for label, group in by_budget.items()},
        }
    return checks


def _budget_checks(group: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One budget's rounds: worst peak against budget + pinned parts, median throughput ratio."""
    ratios = [throughput_vs_reference(r, runs) for r in group]
    peaks = [peak_over_budget(r) for r in group]
    budgeted = group[0]["budget_bytes"] is not None
    return {"peak_rss_within_budget_plus_pinned": all(p <= 1 for p in peaks) if budgeted else None,
            "peak_over_pinned_vs_budget": max(peaks) if budgeted else None,
            "throughput_vs_reference": float(np.median(ratios)),
            "throughput_vs_reference_by_round": ratios,
            "completed": min(r["requests"] for r in group)}
