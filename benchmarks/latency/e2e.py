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
    from aptp.runtime.pipeline import AptpPipeline

    artifacts = load_artifacts(model.root, verify=False)
    table = scheduler_for_steps(model, options.e2e_steps)
    pipes = {"routed": AptpPipeline(artifacts, backend="onnxruntime", threads=threads, scheduler=table),
             "dense": AptpPipeline(artifacts, backend="onnxruntime", threads=threads, scheduler=table)}
    if static:
        # The same pipeline with its dense slot holding the static model: same code path exactly.
        swapped = dataclasses.replace(artifacts, dense=ModelFile(onnx=Path(static["onnx"]), macs_ratio=static["ratio"]))
        pipes["static"] = AptpPipeline(swapped, backend="onnxruntime", threads=threads, scheduler=table)
    batch = list(prompts)
    seeds = list(range(len(batch)))
    routed_opts = pipes["routed"].options(num_inference_steps=table.num_steps)
    forced = {name: pipes[name].options(num_inference_steps=table.num_steps, expert=RT_DENSE)
              for name in pipes if name != "routed"}
    route_times: list[float] = []
    stage_samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def routed() -> None:
        start = time.perf_counter()
        router_codes = pipes["routed"].route(batch)  # the router always runs and is timed
        route_times.append(time.perf_counter() - start)
        use = codes if model.synthetic else router_codes
        results = pipes["routed"].generate(batch, seeds, routed_opts, codes=use)
        record_stages(stage_samples["routed"], results)

    def forced_call(name: str) -> Callable[[], None]:
        def call() -> None:
            results = pipes[name].generate(batch, seeds, forced[name])
            record_stages(stage_samples[name], results)
        return call

    calls = {"routed": routed, **{name: forced_call(name) for name in forced}}
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
        row = {"backend": "onnxruntime", "resolution": model.nominal, "batch": len(batch), "steps": table.num_steps,
               "max_batch_per_unet_call": pipes["dense"].max_batch,
               "order": "one model at a time" if options.e2e_sequential else "interleaved",
               "guidance_scale": routed_opts.guidance_scale, "variant": name, **stats,
               "images_per_s": len(batch) / stats["median_s"], "speedup_vs_dense": dense_median / stats["median_s"],
               "macs_ratio": expected if name == "routed" else (1.0 if name == "dense" else static["ratio"]),
               "stages_median_s": {k: statistics.median(v) for k, v in stage_samples[name].items()}}
        if name == "routed":
            route = statistics.median(route_times) if route_times else 0.0
            row.update({"routing": routing, "assignment": counts, "router_s": route, "dispatch_s": dispatch,
                        "router_share": route / stats["median_s"], "dispatch_share": dispatch / stats["median_s"],
                        "overhead_share": (route + dispatch) / stats["median_s"]})
        rows.append(row)
    return rows


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
