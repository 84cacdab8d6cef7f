"""End to end through `aptp.runtime.AptpPipeline`: routed vs dense vs static on one prompt set."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np


from .model import BenchModel
from .options import LatencyOptions
from .timing import interleaved, summarize


def scheduler_for_steps(model: BenchModel, steps: int | None) -> Any:
    """The export's sampler table, or one rebuilt with `steps` steps (needs diffusers)."""
    from aptp.runtime.scheduler import SchedulerTable

    table = SchedulerTable.from_dict(model.manifest["scheduler"], source="manifest")
    if steps is None or steps == table.num_steps:
        return table
    from aptp.export.scheduler_tables import build_scheduler_table

    config = model.manifest["scheduler"].get("config")
    if config is None:
        from diffusers import DDIMScheduler

        config = dict(DDIMScheduler.load_config(model.manifest["base_model"], subfolder="scheduler"))
    name = model.manifest["scheduler"].get("name", table.name)
    return SchedulerTable.from_dict(build_scheduler_table(name, config, int(steps)), source="aptp-bench")


def end_to_end(model: BenchModel, static: dict[str, Any] | None, options: LatencyOptions, threads: int,
               prompts: Sequence[str], codes: np.ndarray, routing: str, ratios: Mapping[str, float]
               ) -> list[dict[str, Any]]:
    from aptp.runtime import kernels
    from aptp.runtime.artifacts import DENSE as RT_DENSE, ModelFile, load_artifacts
    from aptp.runtime.denoise import uses_guidance
    from aptp.runtime.pipeline import AptpPipeline

    artifacts = load_artifacts(model.root, verify=False)
    table = scheduler_for_steps(model, options.e2e_steps)
    # The static model rides in the dense slot of the same pipeline: same code path exactly.
    swapped = None if not static else dataclasses.replace(
        artifacts, dense=ModelFile(onnx=Path(static["onnx"]), macs_ratio=static["ratio"]))
    pipes: dict[str, Any] = {}
    for workers in workers_to_time(options, threads):
        def make(export: Any, workers: int = workers) -> Any:
            return AptpPipeline(export, backend="onnxruntime", threads=threads, scheduler=table, workers=workers)

        pipes[variant_name("routed", workers)] = make(artifacts)
        pipes[variant_name("dense", workers)] = make(artifacts)
        if swapped is not None:
            pipes[variant_name("static", workers)] = make(swapped)
    batch = list(prompts)
    seeds = list(range(len(batch)))
    route_times: list[float] = []
    stage_samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def routed_call(name: str) -> Callable[[], None]:
        opts = pipes[name].options(num_inference_steps=table.num_steps)

        def call() -> None:
            start = time.perf_counter()
            router_codes = pipes[name].route(batch)  # the router always runs and is timed
            if name == "routed":
                route_times.append(time.perf_counter() - start)
            use = codes if model.synthetic else router_codes
            record_stages(stage_samples[name], pipes[name].generate(batch, seeds, opts, codes=use))
        return call

    def forced_call(name: str) -> Callable[[], None]:
        opts = pipes[name].options(num_inference_steps=table.num_steps, expert=RT_DENSE)

        def call() -> None:
            record_stages(stage_samples[name], pipes[name].generate(batch, seeds, opts))
        return call

    calls = {name: (routed_call if name.startswith("routed") else forced_call)(name) for name in pipes}
    try:
        if options.e2e_sequential:
            # Low memory: one model at a time (its sessions closed before the next is loaded).
            samples = {}
            for name, call in calls.items():
                samples.update(interleaved({name: call}, options.e2e_repeats, warmup=1))
                pipes[name].close()
        else:
            samples = interleaved(calls, options.e2e_repeats, warmup=1)
    finally:
        for pipe in pipes.values():
            pipe.close()
    route_times = route_times[1:]  # drop the warm-up
    for stages in stage_samples.values():
        for stage in stages:
            stages[stage] = stages[stage][1:]
    if route_times:
        stage_samples["routed"]["route"] = list(route_times)
    # Dispatch: grouping plus row gathers and scatters, on this batch's shapes (the UNet calls
    # themselves are the experts' cost, not overhead).
    dispatch = dispatch_time(codes, model, len(batch), kernels)
    counts = np.bincount(codes, minlength=model.num_codes).tolist()
    expected = float(sum(ratios[f"expert_{c}"] for c in codes.tolist()) / len(codes))
    dense_median = statistics.median(samples["dense"])
    rows = []
    for name, values in samples.items():
        stats = summarize(values)
        kind, workers = name.split("@")[0], pipes[name].workers
        static_name = variant_name("static", workers)
        row = {"backend": "onnxruntime", "resolution": model.nominal, "batch": len(batch), "steps": table.num_steps,
               "max_batch_per_unet_call": pipes[name].max_batch, "workers": workers,
               "unet_threads": pipes[name].unet_threads,
               "order": "one model at a time" if options.e2e_sequential else "interleaved",
               "guidance_scale": pipes[name].artifacts.guidance_scale, "variant": name, **stats,
               "images_per_s": len(batch) / stats["median_s"], "speedup_vs_dense": dense_median / stats["median_s"],
               "macs_ratio": expected if kind == "routed" else (1.0 if kind == "dense" else static["ratio"]),
               "stages_median_s": {k: statistics.median(v) for k, v in stage_samples[name].items()},
               "unet_calls_per_step": call_rows(codes if kind == "routed" else None, model.num_codes, len(batch),
                                                pipes[name].max_batch, workers,
                                                guided=uses_guidance(pipes[name].artifacts.guidance_scale))}
        if kind == "routed" and static_name in samples:
            row["speed_vs_static"] = statistics.median(samples[static_name]) / stats["median_s"]
        if name == "routed":
            route = statistics.median(route_times) if route_times else 0.0
            row.update({"routing": routing, "assignment": counts, "router_s": route, "dispatch_s": dispatch,
                        "router_share": route / stats["median_s"], "dispatch_share": dispatch / stats["median_s"],
                        "overhead_share": (route + dispatch) / stats["median_s"]})
        rows.append(row)
    return rows


def call_rows(codes: np.ndarray | None, num_codes: int, batch: int, max_batch: int, workers: int,
              guided: bool = True) -> list[int]:
    """Rows of each UNet call one sampling step of the request makes (`aptp.runtime.dispatch`'s
    plan; ``codes=None``: every prompt on one model), largest first: what a call's cost per row
    depends on."""
    from aptp.runtime import dispatch, kernels

    index = np.full(batch, num_codes, dtype=np.int64) if codes is None else np.asarray(codes, dtype=np.int64)
    order, offsets = kernels.group_by_code(index, num_codes + 1)
    runs = dispatch.plan_runs(order, offsets, max_batch, workers)
    parts = dispatch.row_parts(workers, len(runs))
    rows = [piece.stop - piece.start for run in runs
            for piece in dispatch.row_slices(run.size * (2 if guided else 1), parts)]
    return sorted(rows, reverse=True)


def variant_name(kind: str, workers: int) -> str:
    """``routed``/``dense``/``static``, with ``@2w`` for two concurrent UNet runs and so on."""
    return kind if workers == 1 else f"{kind}@{workers}w"


def workers_to_time(options: LatencyOptions, threads: int) -> list[int]:
    """The ``workers`` settings timed end to end: 1 (the reference every speedup is against) and
    the options', else 2 where the threads allow it."""
    if options.e2e_workers:
        return sorted({1, *(int(w) for w in options.e2e_workers)})
    return [1, 2] if threads >= 2 else [1]


def record_stages(store: dict[str, list[float]], results: Sequence[Any]) -> None:
    """Stage times of one request: batch-wide stages once, denoise summed over expert groups
    (with concurrent runs the sum exceeds the wall time it took)."""
    first = results[0].timings
    for stage in ("tokenise", "route", "text_encode", "decode"):
        store[stage].append(float(first.get(stage, 0.0)))
    groups = {str(r.expert): r.timings for r in results}
    store["denoise"].append(sum(float(t.get("denoise", 0.0)) for t in groups.values()))


def dispatch_time(codes: np.ndarray, model: BenchModel, batch: int, kernels: Any, repeats: int = 20) -> float:
    latent = model.nominal // model.vae_factor
    x = np.random.default_rng(0).standard_normal((batch, model.shape["channels"], latent, latent), dtype=np.float32)
    text = np.random.default_rng(1).standard_normal((batch, model.shape["text_length"], model.shape["hidden"]),
                                                    dtype=np.float32)
    out = np.empty_like(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        order, offsets = kernels.group_by_code(codes, model.num_codes + 1)
        for slot in range(model.num_codes + 1):
            rows = order[offsets[slot]:offsets[slot + 1]]
            if rows.size:
                part = kernels.gather_rows(x, rows)
                kernels.gather_rows(text, rows)
                kernels.scatter_rows(part, rows, out)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
