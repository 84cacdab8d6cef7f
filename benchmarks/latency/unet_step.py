"""The UNet-step timings: per backend, every variant loaded and interleaved with dense (or pairwise)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm


from .backends import Step, ort_step, torch_step, trt_step
from .model import BenchModel
from .options import DENSE, FIXED, LatencyOptions, MASKED, ORT_BACKENDS, STATIC, TORCH_CUDA_BACKENDS
from .timing import interleaved, summarize


def step_factories(backend: str, model: BenchModel, static: dict[str, Any] | None, threads: int, masked: bool,
                   masked_codes: Sequence[int] | None = None, fixed_shapes: bool = False
                   ) -> dict[str, Callable[[], Step]]:
    """Per variant, a function loading it on `backend` (so a low-memory run holds few at once).
    `fixed_shapes` (onnxruntime on CPU) adds ``NAME+fixed`` for every UNet: the same graph run
    through sessions specialised to each configuration's shapes."""
    m = model.manifest
    made: dict[str, Callable[[], Step]] = {}
    if backend in ORT_BACKENDS:
        device = "cuda" if backend == "onnxruntime-cuda" else "cpu"
        paths = {DENSE: model.root / m["dense"]["unet"],
                 **{f"expert_{e['code']}": model.root / e["unet"] for e in m["experts"]}}
        if static:
            paths[STATIC] = Path(static["onnx"])
        for name, path in paths.items():
            made[name] = lambda path=path: ort_step(path, model.shape, threads, device)
            if fixed_shapes and device == "cpu":
                made[name + FIXED] = lambda path=path: ort_step(path, model.shape, threads, device, fixed_shapes=True)
    elif backend == "tensorrt":
        made[DENSE] = lambda: trt_step(model.root / m["dense"]["tensorrt"], model.shape)
        for e in m["experts"]:
            made[f"expert_{e['code']}"] = lambda e=e: trt_step(model.root / e["tensorrt"], model.shape)
    else:
        from aptp.train.experts import load_expert
        from aptp.train.slicing import slice_unet

        if backend in TORCH_CUDA_BACKENDS:
            from .torch_cuda import TorchPlacement, torch_cuda_step

            placement = TorchPlacement.for_device("cuda", cuda_graphs=backend == "torch-cuda-graphs")

            def step(unet: Any, gates: Any = None, layout: Any = None, own: bool = False) -> Step:
                return torch_cuda_step(unet, model.shape, placement, gates=gates, layout=layout, in_place=own)
        else:
            def step(unet: Any, gates: Any = None, layout: Any = None, own: bool = False) -> Step:
                return torch_step(unet, model.shape, backend, gates=gates, layout=layout)

        made[DENSE] = lambda: step(model.dense_torch)
        for e in m["experts"]:
            made[f"expert_{e['code']}"] = lambda e=e: step(
                load_expert(model.root / "experts" / f"expert_{e['code']}"), own=True)
        if static:
            made[STATIC] = lambda: step(slice_unet(model.dense_torch, model.layout, static["mask"])[0], own=True)
        if masked:
            # The reference's way: the full UNet, the pruned units zeroed by hooks (apply_gates).
            for code in (range(model.num_codes) if masked_codes is None else masked_codes):
                made[f"{MASKED}_{code}"] = lambda code=code: step(model.dense_torch, gates=model.masks[code],
                                                                  layout=model.layout)
    return made


Samples = dict[tuple[int, int], dict[str, list[float]]]


def dense_of(name: str) -> str:
    """The dense variant `name` is compared with: the dense UNet run the same way."""
    return DENSE + FIXED if name.endswith(FIXED) else DENSE


def time_backend(backend: str, factories: Mapping[str, Callable[[], Step]], configs: Sequence[tuple[int, int]],
                 model: BenchModel, options: LatencyOptions, providers: dict[str, str | None] | None = None,
                 first_calls: Samples | None = None, memory: Samples | None = None
                 ) -> tuple[Samples, dict[tuple[int, int], dict[str, float]]]:
    """Samples per configuration and variant, and the dense median each variant is compared with.

    Default: every variant loaded, all interleaved, ``calls_in_a_row`` calls per turn (the
    samples are the calls after the first; `first_calls`, when given, receives the first ones).
    ``pairwise``: dense stays loaded and each other variant is loaded alone and interleaved with
    it (memory for two models); each ratio is then against the dense timings of its own pair.
    A ``+fixed`` variant is compared with ``dense+fixed`` and loaded together with its dynamic
    twin. `providers`, when given, receives what ran each variant (`Step.provider`); `memory`,
    per configuration and variant, what the step measured of its sessions (`Step.memory`)."""
    providers = {} if providers is None else providers
    samples: Samples = {c: defaultdict(list) for c in configs}
    reference: dict[tuple[int, int], dict[str, float]] = {c: {} for c in configs}
    if first_calls is not None:
        first_calls.update({c: defaultdict(list) for c in configs})
    if memory is not None:
        memory.update({c: {} for c in configs})

    def run(steps: Mapping[str, Step], label: str) -> None:
        for res, batch in tqdm(configs, desc=f"unet step [{backend}{label}]", leave=False):
            latent = res // model.vae_factor
            providers.update({name: step.provider for name, step in steps.items()})
            calls = {name: step.prepare(batch, latent, latent) for name, step in steps.items()}
            if memory is not None:
                memory[(res, batch)].update({name: step.memory[(batch, latent, latent)]
                                             for name, step in steps.items() if (batch, latent, latent) in step.memory})
            first: dict[str, list[float]] = {}
            got = interleaved(calls, options.repeats, options.warmup, options.calls_in_a_row, first)
            for name, values in got.items():
                samples[(res, batch)][name] += values
                if first_calls is not None:
                    first_calls[(res, batch)][name] += first.get(name, [])
                if dense_of(name) != name:
                    reference[(res, batch)][name] = statistics.median(got[dense_of(name)])

    baselines = [name for name in (DENSE, DENSE + FIXED) if name in factories]
    held = {name: factories[name]() for name in baselines}
    try:
        if options.pairwise:
            for name, make in factories.items():
                if name in baselines or name.endswith(FIXED):
                    continue
                pair = {name: make()}
                if name + FIXED in factories:
                    pair[name + FIXED] = factories[name + FIXED]()
                try:
                    run({**held, **pair}, f" {name}")
                finally:
                    for step in pair.values():
                        step.close()
        else:
            steps = {**held, **{name: make() for name, make in factories.items() if name not in held}}
            try:
                run(steps, "")
            finally:
                for name, step in steps.items():
                    if name not in held:
                        step.close()
    finally:
        for step in held.values():
            step.close()
    return samples, reference


def step_rows(backend: str, resolution: int, batch: int, samples: Mapping[str, list[float]],
              ratios: Mapping[str, float], threshold: float,
              reference: Mapping[str, float] | None = None,
              first_calls: Mapping[str, list[float]] | None = None,
              memory: Mapping[str, Mapping[str, float]] | None = None) -> list[dict[str, Any]]:
    """One report row per variant of one configuration. A ``+fixed`` row also carries its speed
    against its dynamic twin and, with `memory`, what its session specialised to this shape
    holds against the dynamic session."""
    rows = []
    for name, values in samples.items():
        stats = summarize(values)
        first = (first_calls or {}).get(name)
        if first:  # what the first call after another model costs over a call in a row
            stats["first_call_median_s"] = statistics.median(first)
            stats["switch_s"] = stats["first_call_median_s"] - stats["median_s"]
        base = name.removesuffix(FIXED)
        macs_key = f"expert_{base.split('_')[1]}" if base.startswith(MASKED) else base
        macs_ratio = 1.0 if base.startswith(MASKED) else ratios.get(macs_key)
        dense = (reference or {}).get(name, statistics.median(samples[dense_of(name)]))
        latency_ratio = stats["median_s"] / dense
        row = {"backend": backend, "resolution": resolution, "batch": batch, "variant": name,
               "sessions": "fixed shapes" if name.endswith(FIXED) else "dynamic", **stats,
               "macs_ratio": macs_ratio, "latency_ratio": latency_ratio,
               "latency_per_macs": latency_ratio / macs_ratio if macs_ratio else None}
        if base.startswith("expert_") or base == STATIC:
            row["deviation"] = abs(latency_ratio - macs_ratio) / macs_ratio
            row["within_threshold"] = row["deviation"] <= threshold
        if base.startswith(MASKED):
            row["expert_macs_ratio"] = ratios.get(macs_key)
        measured = dict((memory or {}).get(name) or {})
        if name.endswith(FIXED) and base in samples:
            row["speed_vs_dynamic"] = statistics.median(samples[base]) / stats["median_s"]
            session = ((memory or {}).get(base) or {}).get("session_bytes")
            if session and "specialised_bytes" in measured:
                # What one specialised session per UNet (--shape-sessions) adds to the dynamic one.
                measured["memory_vs_dynamic"] = (session + measured["specialised_bytes"]) / session
        row.update(measured)
        rows.append(row)
    return rows
