"""`run_latency`: the whole latency suite on one export."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from aptp.errors import ConfigError, RuntimeInputError
from aptp.outputs import BENCH, check_output_dir, claim_in_place

from .backends import backend_status, torch_status
from .e2e import end_to_end
from .model import BenchModel, load_model, load_torch, macs_ratios, route_prompts, static_baseline
from .options import DEFAULT_BACKENDS, LatencyOptions, MIXED_PROMPTS, RESULTS_FORMAT, RESULTS_VERSION, STATIC, TORCH_BACKENDS
from .profile import fixed_cost_fit, profile_gaps
from .timing import machine_info, now_iso
from .unet_step import step_factories, step_rows, time_backend

logger = logging.getLogger(__name__)


def _resolutions(model: BenchModel, requested: Sequence[int] | None) -> list[int]:
    step = model.size_multiple
    if requested is None:
        half = model.nominal // 2
        chosen = [model.nominal] + ([half] if half % step == 0 and half >= step else [2 * model.nominal])
    else:
        chosen = [int(r) for r in requested]
    for r in chosen:
        if r % step:
            raise ConfigError(f"resolution {r} is not a multiple of {step} (VAE factor x UNet downsampling); "
                              f"try {max(step, r - r % step)}")
    return chosen


def _select_backends(model: BenchModel, requested: Sequence[str] | None) -> tuple[list[str], dict[str, Any]]:
    names = list(requested) if requested else list(DEFAULT_BACKENDS)
    status: dict[str, Any] = {}
    chosen = []
    for name in names:
        ok, reason = backend_status(name, model.manifest)
        status[name] = {"available": ok, "reason": reason}
        if ok:
            chosen.append(name)
        elif requested:
            logger.warning("backend %s skipped: %s", name, reason)
    if not chosen:
        raise ConfigError("none of the requested backends can run here: " +
                          "; ".join(f"{n}: {s['reason']}" for n, s in status.items()))
    return chosen, status


def run_latency(artifacts: str | os.PathLike, output_dir: str | os.PathLike,
                options: LatencyOptions | None = None) -> dict[str, Any]:
    """Run the suite on the export at `artifacts`; write ``results.json``, ``results.md`` and
    ``latency_vs_macs.png`` into `output_dir`; return the results.

    Raises:
        ArtifactError: no export at `artifacts` (or one without a dense UNet).
        ConfigError: bad options (unknown backend, resolution not a multiple of the UNet's stride).
    """
    from . import report

    options = options or LatencyOptions()
    options.check()
    root = Path(artifacts).expanduser().absolute()
    out = Path(output_dir).expanduser().absolute()
    check_output_dir(out, BENCH, allow_existing=True, inputs=[("export", root)])  # before any slow work
    model = load_model(root)
    bad = [c for c in options.masked_codes or () if int(c) >= model.num_codes]
    if bad:
        raise ConfigError(f"--masked-codes {bad}: the export has experts 0..{model.num_codes - 1}")
    resolutions = _resolutions(model, options.resolutions)
    backends, status = _select_backends(model, options.backends)
    # Results go to a new folder or one aptp-bench wrote before, never into the export or a user's folder.
    claim_in_place(out, BENCH, allow_existing=True, inputs=[("export", root)])
    threads = int(options.threads or os.cpu_count() or 1)
    notes: list[str] = []
    torch_ok, torch_reason = torch_status()
    if torch_ok:
        import torch

        torch.set_num_threads(threads)
        load_torch(model)
    else:
        notes.append(f"torch unavailable ({torch_reason}): no static baseline, no masked UNet, manifest MACs ratios")

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION, "created": now_iso(), "artifacts": str(root),
        "model": {"base_model": model.manifest["base_model"], "num_codes": model.num_codes,
                  "nominal_resolution": model.nominal, "text_length": model.shape["text_length"],
                  "precision": model.manifest.get("precision"), "shares": model.shares,
                  "synthetic": model.synthetic},
        "machine": machine_info(),
        "settings": {"threads": threads, "repeats": options.repeats, "warmup": options.warmup,
                     "calls_in_a_row": options.calls_in_a_row,
                     "batch_sizes": [int(b) for b in options.batch_sizes], "resolutions": resolutions,
                     "backends": backends, "interleaved": "pairwise with dense" if options.pairwise else "all variants",
                     "gap_threshold": options.gap_threshold, "fixed_shapes": options.fixed_shapes,
                     "statistic": "median and interquartile range over repeats",
                     "batch_meaning": "rows per UNet call (classifier-free guidance runs 2 rows per image)"},
        "backends": status, "variants": {}, "unet_step": [], "end_to_end": [], "gaps": [], "notes": notes,
    }

    # Routing of the mixed prompt set, then the static model with that mixture's MACs.
    prompts = [MIXED_PROMPTS[i % len(MIXED_PROMPTS)] for i in range(int(options.e2e_batch))]
    codes, routing = route_prompts(model, prompts, threads)
    nominal_ratios = macs_ratios(model, model.nominal, {})
    mixture = float(np.mean([nominal_ratios[f"expert_{c}"] for c in codes.tolist()]))
    share_mixture = float(sum(s * nominal_ratios[f"expert_{k}"] for k, s in enumerate(model.shares)))
    results["routing"] = {"prompts": prompts, "codes": codes.tolist(), "method": routing,
                          "expected_macs_ratio": mixture, "share_weighted_macs_ratio": share_mixture}
    static = None
    if options.static and torch_ok:
        static = static_baseline(model, mixture, options.static_dir, out)
        notes.append(f"static baseline: one uniform mask (same keep fraction at every site) at MACs ratio "
                     f"{static['ratio']:.4f}, the routed prompt set's expected MACs {mixture:.4f}")
    extra = {STATIC: static} if static else {}

    for res in resolutions:
        ratios = macs_ratios(model, res, extra)
        results["variants"][str(res)] = {name: {"macs_ratio": r} for name, r in ratios.items()}
    for k, share in enumerate(model.shares):
        for res in resolutions:
            results["variants"][str(res)][f"expert_{k}"]["share"] = share

    configs = [(res, int(b)) for res in resolutions for b in options.batch_sizes]
    for backend in backends:
        factories = step_factories(backend, model, static, threads, options.masked and backend in TORCH_BACKENDS,
                                   options.masked_codes, fixed_shapes=options.fixed_shapes)
        providers: dict[str, str | None] = {}
        first_calls: dict[tuple[int, int], dict[str, list[float]]] = {}
        memory: dict[tuple[int, int], dict[str, Any]] = {}
        try:
            samples, reference = time_backend(backend, factories, configs, model, options, providers, first_calls,
                                              memory)
        except RuntimeInputError as err:  # a GPU provider listed but not active: skipped, never mislabelled
            if backend == "onnxruntime":
                raise
            status[backend] = {"available": False, "reason": str(err)[:300]}
            logger.warning("backend %s skipped: %s", backend, err)
            continue
        except Exception as err:  # e.g. torch.compile failing: record it and go on
            if backend != "torch-compile":
                raise
            status[backend] = {"available": False, "reason": f"failed: {type(err).__name__}: {err}"[:300]}
            logger.warning("torch.compile failed, skipping it: %s", err)
            continue
        status[backend]["providers"] = sorted({p for p in providers.values() if p})
        for res, batch in configs:
            ratios = {n: v["macs_ratio"] for n, v in results["variants"][str(res)].items()}
            rows = step_rows(backend, res, batch, samples[(res, batch)], ratios, options.gap_threshold,
                             reference[(res, batch)], first_calls.get((res, batch)), memory.get((res, batch)))
            for row in rows:
                row["provider"] = providers.get(row["variant"])
            results["unet_step"] += rows

    groups: dict[tuple[str, int, int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in results["unet_step"]:
        groups[(row["backend"], row["resolution"], row["batch"], row["sessions"])].append(row)
    results["fixed_cost_fits"] = [{"backend": b, "resolution": r, "batch": n, "sessions": k, **fit}
                                  for (b, r, n, k), rows in groups.items() if (fit := fixed_cost_fit(rows))]
    # Profiles where onnxruntime's latency ratio strays from the MACs ratio.
    results["gaps"] = profile_gaps(model, results, static, threads, options, out)

    if options.e2e:
        results["checks"] = _checks(results)
        report.write_reports(results, out)  # the UNet-step figures survive a failing end-to-end run
        model.dense_torch = None  # the runtime needs no torch model: make room for its sessions
        model.macs_models.clear()
        import gc

        gc.collect()
        ratios = {n: v["macs_ratio"] for n, v in results["variants"][str(model.nominal)].items()}
        results["end_to_end"] = end_to_end(model, static, options, threads, prompts, codes, routing, ratios)
    results["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["checks"] = _checks(results)
    report.write_reports(results, out)
    return results


def _checks(results: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's acceptance figures, computed (never asserted)."""
    ort_rows = [r for r in results["unet_step"] if r["backend"] == "onnxruntime" and r["sessions"] == "dynamic"
                and r["variant"].startswith("expert_")]
    fixed = [r for r in results["unet_step"] if r.get("speed_vs_dynamic") is not None]
    within = [r for r in ort_rows if r["within_threshold"]]
    explained = {(g["variant"]) for g in results["gaps"]}
    routed = [r for r in results["end_to_end"] if r["variant"] == "routed"]
    static = [r for r in results["end_to_end"] if r["variant"] == "static"]
    return {
        "onnxruntime_expert_rows": len(ort_rows),
        "onnxruntime_expert_rows_within_threshold": len(within),
        "gaps_profiled": sorted(explained),
        "routed_speedup_vs_dense": routed[0]["speedup_vs_dense"] if routed else None,
        "routed_macs_ratio": routed[0]["macs_ratio"] if routed else None,
        "routed_speedup_at_least_1.4": (routed[0]["speedup_vs_dense"] >= 1.4) if routed else None,
        "static_speedup_vs_dense": static[0]["speedup_vs_dense"] if static else None,
        "routed_speed_vs_static": {str(r["workers"]): r.get("speed_vs_static")
                                   for r in results["end_to_end"] if r["variant"].startswith("routed")},
        "fixed_shapes_speed_vs_dynamic": [min(r["speed_vs_dynamic"] for r in fixed),
                                          max(r["speed_vs_dynamic"] for r in fixed)] if fixed else None,
        "fixed_shapes_memory_vs_dynamic": max((r["memory_vs_dynamic"] for r in fixed if "memory_vs_dynamic" in r),
                                              default=None),
        "fastest_routed_workers": min(((r["median_s"], r["workers"]) for r in results["end_to_end"]
                                       if r["variant"].startswith("routed")), default=(None, None))[1],
    }
