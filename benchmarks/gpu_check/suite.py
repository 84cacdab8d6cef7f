"""One prepared GPU check: everything aptp's GPU path needs measured in one run, in one folder.

    bash benchmarks/gpu_check/run.sh OUT [--dry-run]      (installs carried wheels, builds, then:)
    aptp-bench gpu-check --output-dir OUT [--dry-run] [--budget-s 330]

Steps, each recorded in ``OUT/gpu_check.json`` (a failing step is recorded and the rest go on):

1. environment: GPU, CUDA, torch, onnxruntime providers, TensorRT status, the machine;
2. ``aptp._C_cuda``: imports, and what it sees (`aptp.runtime.kernels.cuda_status`);
3. the CUDA tests that skip on a CPU (kernels against their numpy twins; the on-device loop
   where onnxruntime's CUDA provider activates), by pytest, with a JUnit file;
4. UNet step, SD 2.1 shapes with random weights: dense vs 4 experts (MACs 0.45-0.75) vs a static
   model at their mean MACs, fp16, at 512 and 768 px, batch 1/2/4/8 (rows per UNet call),
   interleaved repetitions; latency ratio against MACs ratio per cell; eager and CUDA-graph
   columns; onnxruntime CUDA / TensorRT provider columns where those providers activate;
5. end to end (CFG, <= 25 steps, VAE decoder): routed mixed batches of 8 and 32 prompts,
   grouped per expert, vs dense vs static throughput.

``--dry-run`` runs the same code on the CPU with tiny shapes in float32 (no CUDA graphs; the
onnxruntime column on the CPU provider, labelled so), so the check is known to work before a
GPU sees it. A time budget (``--budget-s``) skips remaining cells, recorded as skipped, so a
real run stays under 8 minutes. Nothing is downloaded; timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from aptp.errors import ConfigError
from aptp.outputs import GPU_CHECK, claim_in_place

__all__ = ["GPU_CHECK_FORMAT", "GpuCheckOptions", "run_gpu_check"]

logger = logging.getLogger(__name__)

GPU_CHECK_FORMAT = "aptp-gpu-check"
REPO = Path(__file__).resolve().parent.parent.parent
RATIO_GOAL = 0.10  # the goal: expert latency ratio within 10% of its MACs ratio at batch >= 4
ROUTED_GOAL = 0.9  # routed throughput at least 0.9x static with 32 mixed prompts


class GpuCheckOptions(argparse.Namespace):
    """Parsed options (see `aptp.benchmarks.gpu_check.cli.parser`)."""


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    dry = args.dry_run
    fill = {"resolutions": [64, 128] if dry else [512, 768], "batch_sizes": [1, 2] if dry else [1, 2, 4, 8],
            "repeats": 2 if dry else 10, "e2e_prompts": [4, 8] if dry else [8, 32], "e2e_steps": 2 if dry else 25,
            "e2e_resolution": 64 if dry else 512, "e2e_repeats": 2, "budget_s": 1800.0 if dry else 330.0}
    for key, value in fill.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("repeats", "e2e_steps", "e2e_resolution", "e2e_repeats", "max_batch"):
        if int(getattr(args, name)) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.e2e_steps > 25:
        raise ConfigError(f"--e2e-steps {args.e2e_steps}: the check runs at most 25 steps")
    if args.budget_s <= 0:
        raise ConfigError(f"--budget-s must be positive, got {args.budget_s}")
    return args


# -- steps ------------------------------------------------------------------------------------


def _step(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one step; record ``{"status": "ok"|"failed", "seconds", ...}`` and never raise."""
    start = time.perf_counter()
    try:
        value = fn()
        results["steps"][name] = {"status": "ok", "seconds": round(time.perf_counter() - start, 2)}
        return value
    except Exception as err:  # recorded: one failing step must not hide the others
        logger.exception("gpu check step %s failed", name)
        results["steps"][name] = {"status": "failed", "seconds": round(time.perf_counter() - start, 2),
                                  "error": f"{type(err).__name__}: {err}"[:1000]}
        return None


def environment() -> dict[str, Any]:
    """Machine, GPU, library versions, onnxruntime's listed providers, TensorRT status."""
    from aptp.runtime.engine import tensorrt_available

    from ..machine import machine_info

    info: dict[str, Any] = {"machine": machine_info()}
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_available": torch.cuda.is_available(),
                         "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = {"version": ort.__version__, "listed_providers": ort.get_available_providers()}
    except ImportError as err:
        info["onnxruntime"] = {"missing": str(err)}
    ok, detail = tensorrt_available()
    info["tensorrt"] = {"available": ok, "detail": detail}
    return info


def cuda_extension() -> dict[str, Any]:
    """Whether ``aptp._C_cuda`` imports and what it sees."""
    from aptp.runtime import kernels

    out: dict[str, Any] = {"status_line": kernels.cuda_status(), "cuda_available": kernels.cuda_available()}
    try:
        import aptp._C_cuda as ext  # noqa: F401

        out["imported"] = True
        out["file"] = getattr(ext, "__file__", None)
    except ImportError as err:
        out["imported"] = False
        out["import_error"] = str(err)
    return out


def cuda_tests(out: Path, ort_cuda: bool) -> dict[str, Any]:
    """The CUDA tests (skipped on a CPU) by pytest in a subprocess; counts and skip reasons."""
    try:
        import pytest  # noqa: F401
    except ImportError as err:
        return {"ran": False, "reason": f"pytest is not importable here ({err}): carry its wheels in .whl/ "
                                        "(benchmarks/gpu_check/fetch_wheels.sh)"}
    selection = [str(REPO / "tests" / "test_kernels.py")]
    args = ["-k", "cuda"]
    if ort_cuda:  # the on-device loop needs onnxruntime's CUDA provider (and builds the tiny export)
        selection.append(str(REPO / "tests" / "test_runtime.py::test_on_device_loop_matches_cpu"))
        args = ["-k", "cuda or on_device"]
    junit = out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--rootdir={REPO}",
           f"--junitxml={junit}", *selection, *args]
    with tempfile.TemporaryDirectory() as cwd:  # not the repo root: its aptp/ folder would shadow the install
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    summary = {"ran": True, "returncode": proc.returncode, "command": " ".join(cmd[1:]), "junit": junit.name}
    if junit.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            summary[key] = int(suite.get(key, 0))
        summary["skip_reasons"] = sorted({(s.get("message") or "")[:200] for s in suite.iter("skipped")})
    return summary


# -- the UNet-step grid -----------------------------------------------------------------------


def _grid(models: Any, steps_for: Callable[[str, Any], Any], column: str, resolutions: Sequence[int],
          batches: Sequence[int], repeats: int, warmup: int, time_left: Callable[[], float],
          variants: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every variant (or those in `variants`, dense always) of one column timed per
    (resolution, batch) cell, interleaved."""
    import statistics

    from ..latency.timing import interleaved, summarize

    chosen = {name: m for name, m in models.variants().items() if variants is None or name in {"dense", *variants}}
    steps = {name: steps_for(name, module) for name, module in chosen.items()}
    rows: list[dict[str, Any]] = []
    try:
        for res in resolutions:
            ratios = models.macs[int(res)]
            latent = int(res) // models.vae_factor
            for batch in batches:
                if time_left() <= 0:
                    rows.append({"column": column, "resolution": int(res), "batch": int(batch),
                                 "skipped": "time budget spent"})
                    continue
                calls = {name: step.prepare(int(batch), latent, latent) for name, step in steps.items()}
                samples = interleaved(calls, repeats, warmup)
                del calls
                dense = statistics.median(samples["dense"])
                for name, values in samples.items():
                    stats = summarize(values)
                    latency_ratio = stats["median_s"] / dense
                    macs_ratio = ratios[name]
                    row = {"column": column, "provider": steps[name].provider, "resolution": int(res),
                           "batch": int(batch), "variant": name, **stats, "macs_ratio": macs_ratio,
                           "latency_ratio": latency_ratio}
                    if name != "dense":
                        row["gap"] = latency_ratio / macs_ratio - 1.0
                        row["within_10pct"] = abs(row["gap"]) <= RATIO_GOAL
                    rows.append(row)
    finally:
        for step in steps.values():
            step.close()
    return rows


def _onnx_column(models: Any, work: Path, device: str, backend: str, threads: int, resolutions: Sequence[int],
                 batches: Sequence[int], repeats: int, time_left: Callable[[], float],
                 variants: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Export the variants to ONNX once and time them through the runtime's engine; the engine
    checks the provider really activated (a CPU session is never labelled CUDA)."""
    from aptp.export.onnx_configs import UNetOnnxConfig
    from aptp.export.onnx_export import export_onnx

    from ..latency.backends import ort_step

    precision = "fp16" if device == "cuda" else "fp32"
    latent = int(resolutions[0]) // models.vae_factor
    paths = {}
    for name, module in models.variants().items():
        if variants is not None and name not in {"dense", *variants}:
            continue
        config = UNetOnnxConfig.from_unet(module, latent, latent, models.shape["text_length"], batch=2,
                                          precision=precision)
        paths[name] = export_onnx(module, config, work / name / "unet.onnx")[0]

    def steps_for(name: str, module: Any) -> Any:
        return ort_step(paths[name], models.shape, threads, device, backend=backend)

    column = "onnxruntime-tensorrt" if backend == "tensorrt" else f"onnxruntime-{device}"
    return _grid(models, steps_for, column, resolutions, batches, repeats, 2, time_left, variants)


def _ort_plan(args: argparse.Namespace, env: dict[str, Any]) -> list[tuple[str, str]]:
    """(device, backend) pairs of the onnxruntime columns to try."""
    if args.onnx == "never":
        return []
    listed = (env.get("onnxruntime") or {}).get("listed_providers") or []
    if args.dry_run:
        return [("cpu", "onnxruntime")]
    plan = []
    if "CUDAExecutionProvider" in listed or args.onnx == "always":
        plan.append(("cuda", "onnxruntime"))
    if "TensorrtExecutionProvider" in listed:
        plan.append(("cuda", "tensorrt"))
    return plan


# -- the run ----------------------------------------------------------------------------------


def run_gpu_check(args: argparse.Namespace) -> dict[str, Any]:
    """Run every step into ``args.output_dir``; returns what ``gpu_check.json`` holds."""
    from ..machine import now_iso
    from ..latency.torch_cuda import TorchPlacement, torch_cuda_step

    args = _defaults(args)
    out = Path(args.output_dir).expanduser().absolute()
    claim_in_place(out, GPU_CHECK, allow_existing=True)  # never over a user's summary.md
    deadline = time.monotonic() + float(args.budget_s)

    def time_left() -> float:
        return deadline - time.monotonic()

    results: dict[str, Any] = {
        "format": GPU_CHECK_FORMAT, "version": 1, "created": now_iso(), "dry_run": bool(args.dry_run),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": {}, "unet_step": [], "end_to_end": [], "notes": [],
    }
    env = _step(results, "environment", environment) or {}
    results["environment"] = env
    results["cuda_extension"] = _step(results, "cuda_extension", cuda_extension)
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    if not args.dry_run and not gpu:
        raise ConfigError("no CUDA device is visible to torch: run the check on a GPU machine, or pass --dry-run")
    threads = int(args.threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    device = "cuda" if gpu else "cpu"
    placement = TorchPlacement.for_device(device)
    results["placement"] = placement.label
    ort_plan = _ort_plan(args, env)
    if args.tests:
        ort_cuda = any(d == "cuda" for d, _ in ort_plan)
        results["cuda_tests"] = _step(results, "cuda_tests", lambda: cuda_tests(out, ort_cuda))
    _write(results, out)

    from .models import build_check_models, check_config

    config = check_config(args.unet_config, args.dry_run)
    resolutions = sorted({*map(int, args.resolutions), int(args.e2e_resolution)})
    models = _step(results, "models", lambda: build_check_models(config, resolutions))
    if models is None:
        _write(results, out)
        return results
    results["models"] = {"config": config.get("name"), "source": config.get("source"), "unet": config["unet"],
                         "macs_ratio": {str(r): v for r, v in models.macs.items()}, "shares": models.shares,
                         "weights": "random (seeded); latency depends on shapes only"}

    def eager(name: str, module: Any) -> Any:
        return torch_cuda_step(module, models.shape, placement)

    grid_budget = lambda: min(time_left(), deadline - 0.45 * args.budget_s - time.monotonic())  # noqa: E731
    rows = _step(results, "unet_step_torch", lambda: _grid(models, eager, f"torch-{device}", args.resolutions,
                                                          args.batch_sizes, args.repeats, 3, grid_budget))
    results["unet_step"] += rows or []
    _write(results, out)

    from .e2e import run_end_to_end

    e2e = _step(results, "end_to_end", lambda: run_end_to_end(
        models, placement, args.e2e_prompts, int(args.e2e_resolution), args.e2e_steps, 7.5, args.max_batch,
        args.e2e_repeats, time_left))
    results["end_to_end"] = e2e or []
    results["notes"].append("end to end: text states are fixed random tensors (the text encoder runs once per "
                            "request whatever the UNet); noise, CFG, the DDIM loop and the VAE decoder run on "
                            f"{placement.label}")
    _write(results, out)

    if gpu and args.cuda_graphs:
        graphs = TorchPlacement.for_device("cuda", cuda_graphs=True)

        def graphed(name: str, module: Any) -> Any:
            return torch_cuda_step(module, models.shape, graphs)

        rows = _step(results, "unet_step_cuda_graphs", lambda: _grid(
            models, graphed, "torch-cuda-graphs", args.resolutions, args.batch_sizes, args.repeats, 1, time_left))
        results["unet_step"] += rows or []
    elif args.cuda_graphs:
        results["steps"]["unet_step_cuda_graphs"] = {"status": "skipped", "reason": "no CUDA device (dry run)"}

    from aptp.runtime.engine import tensorrt_available

    import importlib.util

    if ort_plan and importlib.util.find_spec("onnx") is None:
        results["steps"]["onnxruntime"] = {"status": "skipped", "reason": "the onnx package is not installed: "
                                           "the onnxruntime columns need it to export the UNets"}
        ort_plan = []
    for ort_device, backend in ort_plan:
        name = f"onnxruntime_{ort_device}_{backend}"
        with tempfile.TemporaryDirectory(prefix="aptp-gpu-check-onnx-") as work:
            # A dry run exports two graphs only: the code path is the point, not the figures.
            rows = _step(results, name, lambda: _onnx_column(models, Path(work), ort_device, backend, threads,
                                                              args.resolutions, args.batch_sizes, args.repeats,
                                                              time_left, ["expert_0"] if args.dry_run else None))
        results["unet_step"] += rows or []
    if not ort_plan and "onnxruntime" not in results["steps"]:
        results["steps"]["onnxruntime"] = {"status": "skipped", "reason": "no GPU execution provider listed by "
                                           f"onnxruntime ({(env.get('onnxruntime') or {})})"}
    ok, detail = tensorrt_available()
    results["steps"]["tensorrt_native"] = {"status": "skipped", "reason": (
        f"tensorrt {detail} is importable; plans are built by `aptp-export --tensorrt` and timed by "
        "`aptp-bench latency --backends tensorrt`, not by this check") if ok else f"TensorRT absent: {detail}"}

    results["checks"] = checks(results)
    _write(results, out)
    return results


def checks(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, computed from the rows (never asserted)."""
    summary: dict[str, Any] = {}
    for column in sorted({r["column"] for r in results["unet_step"] if "variant" in r}):
        big = [r for r in results["unet_step"] if r.get("column") == column and r.get("variant", "").startswith(
            "expert_") and r["batch"] >= 4]
        summary[f"{column}: experts within 10% of MACs ratio at batch >= 4"] = (
            f"{sum(r['within_10pct'] for r in big)}/{len(big)}" if big else None)
    for row in results["end_to_end"]:
        if row.get("variant") == "routed":
            summary[f"routed vs static throughput, {row['prompts']} prompts"] = row["speed_vs_static"]
            summary[f"routed >= {ROUTED_GOAL}x static, {row['prompts']} prompts"] = (
                row["speed_vs_static"] >= ROUTED_GOAL)
    return summary


def _write(results: dict[str, Any], out: Path) -> None:
    """``gpu_check.json`` and ``summary.md``, each written to a temp file then renamed."""
    from .report import summary_markdown

    for name, text in (("gpu_check.json", json.dumps(results, indent=2, default=str)),
                       ("summary.md", summary_markdown(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
