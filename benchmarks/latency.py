"""The latency suite: what slicing and routing buy, measured side by side in one run.

For one export directory it times, per backend, resolution and batch size:
- one UNet step of the dense model, of every expert, of a static pruned model with the
  routed mixture's average MACs, and (on torch backends) of the masked full UNet, i.e. the
  dense UNet under an expert's hard mask, as the reference implementation runs an expert;
- end to end (tokenise, route, text encoder, sampling loop, VAE decoder) through
  `aptp.runtime.AptpPipeline` on a mixed prompt set: routed vs dense vs static;
- where an expert's latency ratio strays more than `gap_threshold` from its MACs ratio on
  onnxruntime, a per-op-type profile (onnxruntime's profiler) of expert and dense.

Methodology: every variant is warmed up, then repetitions are interleaved round-robin across
the variants (the order rotates each round), so background load hits them alike; figures are
medians with the interquartile range. With ``pairwise`` (for models whose variants do not all
fit in memory) dense stays loaded and each other variant is loaded alone and interleaved with
it; each ratio is then against the dense timings of its own pair. Thread counts are set explicitly (onnxruntime
``intra_op_num_threads``, ``torch.set_num_threads``) and recorded with the machine.
Timings are never asserted anywhere: they are reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from aptp.errors import ArtifactError, ConfigError

from .synthetic import read_synthetic_info, search_mask

__all__ = [
    "ALL_BACKENDS",
    "MIXED_PROMPTS",
    "LatencyOptions",
    "backend_status",
    "machine_info",
    "run_latency",
    "summarize",
    "synthetic_assignment",
]

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "aptp-bench-latency"
RESULTS_VERSION = 1
ALL_BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt", "torch", "torch-compile", "torch-cuda")
# Backends taken by default when present; torch.compile only on request (minutes of compiling).
DEFAULT_BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt", "torch", "torch-cuda")
TORCH_BACKENDS = ("torch", "torch-compile", "torch-cuda")
ORT_BACKENDS = ("onnxruntime", "onnxruntime-cuda")
DENSE, STATIC, MASKED = "dense", "static", "masked"
# A mixed prompt set: people, animals, objects, scenes, styles, text; short and long.
MIXED_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "close-up portrait of an old fisherman with a grey beard, dramatic side light",
    "a watercolor painting of a quiet harbour at dawn",
    "a red sports car parked on a wet city street at night, neon reflections",
    "a bowl of ramen with a soft-boiled egg, top view, studio lighting",
    "a cat sleeping on a stack of books",
    "an isometric illustration of a tiny island with a lighthouse",
    "the word 'OPEN' written in neon letters above a cafe door",
    "a herd of elephants crossing a river at sunset, aerial view",
    "a medieval castle on a cliff, oil painting in the style of the romantic era",
    "a minimalist logo of a fox, flat vector",
    "a crowded market in Marrakesh, bright colours, street photography",
    "a macro photo of a dew drop on a spider web",
    "a child flying a kite on a windy beach",
    "a futuristic city skyline with flying cars, concept art",
    "a wooden chair",
)


@dataclass
class LatencyOptions:
    """What `aptp-bench latency` can change.

    Attributes:
        backends: names from `ALL_BACKENDS`, or None for every default backend present.
        batch_sizes: UNet batch sizes (rows per UNet call; guidance doubles a request's rows).
        resolutions: image sizes in pixels; None: the export's nominal size and half of it.
        repeats, warmup: timed and untimed calls per variant and configuration.
        threads: intra-op threads for every backend (None: all logical cores).
        masked: also time the masked full UNet (torch backends).
        static: also build, export and time the static pruned baseline (needs torch).
        e2e: also time end-to-end generation (onnxruntime backends).
        e2e_batch, e2e_steps, e2e_repeats: prompts per request, sampler steps (None: the
            export's table), timed requests per variant.
        gap_threshold: relative distance of latency ratio from MACs ratio that asks for a profile.
        profile_repeats: runs per session under the onnxruntime profiler.
        static_dir: where the static baseline's ONNX graph is cached (None: output_dir/static).
        e2e_sequential: end to end, time one model at a time instead of interleaving them
            (memory for one pipeline's UNets; less robust to changing background load).
        masked_codes: the experts whose masked full UNet is timed (None: all).
        pairwise: low memory: hold only dense and one other variant at a time, interleaving each
            variant with dense (ratios against the dense timings of the same pair).
    """

    backends: Sequence[str] | None = None
    batch_sizes: Sequence[int] = (1, 2, 4, 8)
    resolutions: Sequence[int] | None = None
    repeats: int = 10
    warmup: int = 2
    threads: int | None = None
    masked: bool = True
    static: bool = True
    e2e: bool = True
    e2e_batch: int = 8
    e2e_steps: int | None = None
    e2e_repeats: int = 3
    gap_threshold: float = 0.15
    profile_repeats: int = 5
    static_dir: str | os.PathLike | None = None
    pairwise: bool = False
    masked_codes: Sequence[int] | None = None
    e2e_sequential: bool = False

    def check(self) -> None:
        """Raise `ConfigError` for values no run can use."""
        for name in ("repeats", "e2e_batch", "e2e_repeats", "profile_repeats"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if int(self.warmup) < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and int(self.threads) < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ConfigError(f"--batch-sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.resolutions is not None and (not self.resolutions or any(int(r) < 1 for r in self.resolutions)):
            raise ConfigError(f"--resolutions must be positive pixel sizes, got {list(self.resolutions)}")
        if self.e2e_steps is not None and int(self.e2e_steps) < 1:
            raise ConfigError(f"--e2e-steps must be >= 1, got {self.e2e_steps}")
        for code in self.masked_codes or ():
            if int(code) < 0:
                raise ConfigError(f"--masked-codes must be expert codes (>= 0), got {code}")
        for name in self.backends or ():
            if name not in ALL_BACKENDS:
                raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(ALL_BACKENDS)}")


# -- statistics and machine ---------------------------------------------------------------------


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, IQR, min and max of timing samples (seconds), and the samples."""
    values = sorted(float(s) for s in samples)
    if not values:
        raise ValueError("no samples")
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median_s": statistics.median(values), "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1,
            "min_s": values[0], "max_s": values[-1], "n": len(values), "samples_s": list(samples)}


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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- backends -----------------------------------------------------------------------------------


def _torch_status() -> tuple[bool, str | None]:
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
    except ImportError as err:
        return False, f"{err.name or 'torch'} is not installed"
    return True, None


def backend_status(name: str, manifest: Mapping[str, Any]) -> tuple[bool, str | None]:
    """Whether backend `name` can run here: ``(True, None)`` or ``(False, reason)``."""
    if name not in ALL_BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(ALL_BACKENDS)}")
    if name == "onnxruntime":
        return True, None
    if name == "onnxruntime-cuda":
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return False, f"onnxruntime {ort.__version__} has no CUDAExecutionProvider ({', '.join(providers)})"
        return True, None
    if name == "tensorrt":
        from aptp.runtime.engine import tensorrt_available

        ok, reason = tensorrt_available()
        if not ok:
            return False, reason
        missing = [e["code"] for e in manifest.get("experts", []) if not e.get("tensorrt")]
        if missing or not (manifest.get("dense") or {}).get("tensorrt"):
            return False, "the export has no TensorRT plans (re-export with --tensorrt on a GPU machine)"
        return True, None
    ok, reason = _torch_status()
    if not ok:
        return False, reason
    if name == "torch-cuda":
        import torch

        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
    if name == "torch-compile":
        import torch

        if not hasattr(torch, "compile"):
            return False, "this torch has no torch.compile"
    return True, None


class _Step:
    """One variant on one backend: `prepare(batch, h, w)` returns a callable running one UNet step."""

    def __init__(self, prepare: Callable[[int, int, int], Callable[[], Any]], close: Callable[[], None] | None = None):
        self.prepare = prepare
        self.close = close or (lambda: None)


def _inputs(batch: int, channels: int, height: int, width: int, text_length: int, hidden: int,
            seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, channels, height, width), dtype=np.float32),
        "timestep": np.full((batch,), 500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, text_length, hidden), dtype=np.float32),
    }


def _ort_step(path: Path, shape: Mapping[str, int], threads: int, device: str) -> _Step:
    from aptp.runtime.engine import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(path, device=device, threads=threads, backend="onnxruntime")
    engine.load()

    def prepare(batch: int, height: int, width: int) -> Callable[[], Any]:
        feed = _inputs(batch, shape["channels"], height, width, shape["text_length"], shape["hidden"])
        feed = {name: value.astype(engine.input_dtype(name)) for name, value in feed.items()}
        return lambda: engine.infer(feed)

    return _Step(prepare, engine.unload)


def _trt_step(plan: Path, shape: Mapping[str, int]) -> _Step:
    from aptp.runtime.engine import TensorRTEngine

    engine = TensorRTEngine(plan)
    engine.load()

    def prepare(batch: int, height: int, width: int) -> Callable[[], Any]:
        feed = _inputs(batch, shape["channels"], height, width, shape["text_length"], shape["hidden"])
        feed = {name: value.astype(engine.input_dtype(name)) for name, value in feed.items()}
        engine.allocate_buffers({name: value.shape for name, value in feed.items()})

        def run() -> Any:
            out = engine.infer(feed)
            _cuda_sync()
            return out

        return run

    return _Step(prepare, engine.unload)


def _cuda_sync() -> None:
    with contextlib.suppress(Exception):
        import torch

        torch.cuda.synchronize()


def _torch_step(unet: Any, shape: Mapping[str, int], backend: str, gates: Any = None, layout: Any = None) -> _Step:
    """A torch UNet step; `gates` (one hard mask) runs the full UNet masked (apply_gates)."""
    import torch

    device = "cuda" if backend == "torch-cuda" else "cpu"
    unet = unet.to(device).eval()
    model = unet
    if backend == "torch-compile":
        model = torch.compile(unet)

    def prepare(batch: int, height: int, width: int) -> Callable[[], Any]:
        feed = {k: torch.from_numpy(v).to(device) for k, v in
                _inputs(batch, shape["channels"], height, width, shape["text_length"], shape["hidden"]).items()}
        mask = None if gates is None else gates.float().to(device)

        def run() -> Any:
            from aptp.train.gates import apply_gates

            with torch.inference_mode(), apply_gates(unet, layout, mask):
                out = model(feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"],
                            return_dict=False)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        return run

    return _Step(prepare)


# -- the models ------------------------------------------------------------------------------


@dataclass
class _Model:
    """What the suite knows about one export."""

    root: Path
    manifest: dict[str, Any]
    synthetic: dict[str, Any] | None
    num_codes: int
    shares: list[float]
    shape: dict[str, int]
    nominal: int
    size_multiple: int
    vae_factor: int
    dense_torch: Any = None
    layout: Any = None
    masks: Any = None
    macs_models: dict[int, Any] = field(default_factory=dict)

    def variants(self) -> list[str]:
        return [DENSE, *[f"expert_{k}" for k in range(self.num_codes)]]


def _load_model(root: Path) -> _Model:
    from aptp.export.manifest import read_manifest

    if not root.exists():
        raise ArtifactError(f"artifacts directory {root} does not exist; pass the directory aptp-export wrote")
    if not (root / "manifest.json").is_file():
        raise ArtifactError(f"{root} has no manifest.json: pass the directory aptp-export wrote")
    manifest = read_manifest(root)
    if not manifest.get("dense"):
        raise ArtifactError(f"export {root} has no dense UNet: re-export without --no-dense (the latency ratios "
                            "are relative to it)")
    experts = manifest["experts"]
    k = len(experts)
    synthetic = read_synthetic_info(manifest)
    raw = [e.get("share") for e in experts]
    if synthetic:
        shares = [float(s) for s in synthetic["shares"]]
    elif all(s is not None for s in raw) and sum(raw) > 0:
        shares = [float(s) / sum(raw) for s in raw]
    else:
        shares = [1.0 / k] * k
    text_length = int(manifest["tokenizer"]["max_length"])
    hidden = int(manifest["text_encoder"]["hidden_size"])
    shape = {"channels": int(manifest["latent"]["channels"]), "text_length": text_length, "hidden": hidden}
    image = manifest["image"]
    return _Model(root=root, manifest=manifest, synthetic=synthetic, num_codes=k, shares=shares, shape=shape,
                  nominal=int(image["height"]), size_multiple=int(image.get("size_multiple") or 8),
                  vae_factor=int(manifest["vae"]["scale_factor"]))


def _load_torch(model: _Model) -> None:
    """Dense torch UNet, gate layout and the experts' hard masks (from their arch specs)."""
    import torch

    from aptp.train.gates import GateLayout
    from aptp.train.models import load_components
    from aptp.train.slicing import ArchSpec

    if model.dense_torch is not None:
        return
    comps = load_components(model.manifest["base_model"])
    model.dense_torch = comps.unet.eval()
    specs = [ArchSpec.load(model.root / e["arch_spec"]) for e in model.manifest["experts"]]
    model.layout = GateLayout.from_unet(model.dense_torch, ff_groups=specs[0].ff_groups, depth=specs[0].depth)
    masks = torch.zeros(model.num_codes, model.layout.num_gates, dtype=torch.bool)
    for code, spec in enumerate(specs):
        for site, kept in zip(model.layout.sites, spec.kept_units()):
            masks[code, [site.offset + u for u in kept]] = True
    model.masks = masks


def _macs_ratios(model: _Model, resolution: int, extra: Mapping[str, Any]) -> dict[str, float]:
    """MACs ratio of every variant at `resolution` (analytic, MacsModel), or the manifest's."""
    if model.dense_torch is None:
        ratios = {DENSE: 1.0, **{f"expert_{e['code']}": float(e["macs_ratio"]) for e in model.manifest["experts"]}}
        ratios.update({name: float(v["ratio"]) for name, v in extra.items() if v.get("ratio") is not None})
        return ratios
    from aptp.train.macs import DeployShape, MacsModel

    latent = resolution // model.vae_factor
    if latent not in model.macs_models:
        model.macs_models[latent] = MacsModel(model.dense_torch, model.layout,
                                              DeployShape(latent, latent, model.shape["text_length"]))
    macs = model.macs_models[latent]
    values = macs.ratio(model.masks.float()).tolist()
    ratios = {DENSE: 1.0, **{f"expert_{k}": float(v) for k, v in enumerate(values)}}
    for name, v in extra.items():
        if v.get("mask") is not None:
            ratios[name] = float(macs.ratio(v["mask"].float().unsqueeze(0))[0])
    return ratios


# -- routing and the static baseline ------------------------------------------------------------


def synthetic_assignment(prompts: Sequence[str], shares: Sequence[float]) -> np.ndarray:
    """Deterministic codes for `prompts` in proportion to `shares` (largest remainder), placed
    by a hash of each prompt so the mix does not depend on the order of the prompt list."""
    n, k = len(prompts), len(shares)
    total = float(sum(shares))
    exact = [n * float(s) / total for s in shares]
    counts = [int(np.floor(x)) for x in exact]
    for i in sorted(range(k), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    order = sorted(range(n), key=lambda i: hashlib.sha256(prompts[i].encode()).hexdigest())
    codes = np.empty(n, dtype=np.int64)
    start = 0
    for code, count in enumerate(counts):
        codes[order[start:start + count]] = code
        start += count
    return codes


def _route_prompts(model: _Model, prompts: Sequence[str], threads: int) -> tuple[np.ndarray, str]:
    if model.synthetic:
        return synthetic_assignment(prompts, model.shares), "synthetic (by shares)"
    from aptp.runtime.artifacts import load_artifacts
    from aptp.runtime.pipeline import AptpPipeline

    pipe = AptpPipeline(load_artifacts(model.root, verify=False), backend="onnxruntime", threads=threads)
    try:
        return np.asarray(pipe.route(list(prompts)), dtype=np.int64), "router (argmax)"
    finally:
        pipe.close()


def _static_baseline(model: _Model, target: float, directory: Path, nominal_latent: int) -> dict[str, Any]:
    """Slice the dense UNet by one uniform mask at `target` MACs and export it (cached by mask)."""
    from aptp.export.onnx_configs import UNetOnnxConfig
    from aptp.export.onnx_export import export_and_validate
    from aptp.train.macs import DeployShape, MacsModel
    from aptp.train.slicing import slice_unet

    shape = DeployShape(nominal_latent, nominal_latent, model.shape["text_length"])
    macs = model.macs_models.get(nominal_latent) or MacsModel(model.dense_torch, model.layout, shape)
    model.macs_models[nominal_latent] = macs
    search = search_mask(macs, model.layout, target, profile=None, seed=0)
    dense_sha = str(model.manifest.get("files", {}).get(model.manifest["dense"]["unet"], model.root))
    digest = hashlib.sha256(search.mask.numpy().tobytes() + dense_sha.encode()).hexdigest()[:16]
    target_dir = directory / f"static_{digest}"
    onnx_path = target_dir / "unet.onnx"
    if not onnx_path.is_file():
        unet, _ = slice_unet(model.dense_torch, model.layout, search.mask)
        logger.info("exporting the static baseline (MACs ratio %.4f for target %.4f) to %s", search.ratio, target,
                    target_dir)
        staging = Path(tempfile.mkdtemp(prefix=".static-", dir=directory))
        config = UNetOnnxConfig.from_unet(unet, nominal_latent, nominal_latent, model.shape["text_length"],
                                          batch=2, precision=model.manifest.get("precision", "fp32"))
        graph = export_and_validate(unet, config, staging / "unet.onnx")
        del graph, unet
        (staging / "mask.json").write_text(json.dumps({"target": target, "ratio": search.ratio,
                                                       "mask": search.mask.int().tolist()}))
        if target_dir.exists():
            import shutil

            shutil.rmtree(target_dir)
        os.replace(staging, target_dir)
    else:
        logger.info("reusing the static baseline in %s", target_dir)
    return {"onnx": onnx_path, "mask": search.mask, "ratio": search.ratio,
            "target": float(target), "dir": str(target_dir)}


# -- timing -----------------------------------------------------------------------------------


def _interleaved(calls: Mapping[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Warm every call up, then time `repeats` rounds, each round running every call once in an
    order rotated by one per round."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def _step_factories(backend: str, model: _Model, static: dict[str, Any] | None, threads: int, masked: bool,
                    masked_codes: Sequence[int] | None = None) -> dict[str, Callable[[], _Step]]:
    """Per variant, a function loading it on `backend` (so a low-memory run holds few at once)."""
    m = model.manifest
    made: dict[str, Callable[[], _Step]] = {}
    if backend in ORT_BACKENDS:
        device = "cuda" if backend == "onnxruntime-cuda" else "cpu"
        paths = {DENSE: model.root / m["dense"]["unet"],
                 **{f"expert_{e['code']}": model.root / e["unet"] for e in m["experts"]}}
        if static:
            paths[STATIC] = Path(static["onnx"])
        for name, path in paths.items():
            made[name] = lambda path=path: _ort_step(path, model.shape, threads, device)
    elif backend == "tensorrt":
        made[DENSE] = lambda: _trt_step(model.root / m["dense"]["tensorrt"], model.shape)
        for e in m["experts"]:
            made[f"expert_{e['code']}"] = lambda e=e: _trt_step(model.root / e["tensorrt"], model.shape)
    else:
        from aptp.train.experts import load_expert
        from aptp.train.slicing import slice_unet

        made[DENSE] = lambda: _torch_step(model.dense_torch, model.shape, backend)
        for e in m["experts"]:
            made[f"expert_{e['code']}"] = lambda e=e: _torch_step(
                load_expert(model.root / "experts" / f"expert_{e['code']}"), model.shape, backend)
        if static:
            made[STATIC] = lambda: _torch_step(slice_unet(model.dense_torch, model.layout, static["mask"])[0],
                                               model.shape, backend)
        if masked:
            # The reference's way: the full UNet, the pruned units zeroed by hooks (apply_gates).
            for code in (range(model.num_codes) if masked_codes is None else masked_codes):
                made[f"{MASKED}_{code}"] = lambda code=code: _torch_step(
                    model.dense_torch, model.shape, backend, gates=model.masks[code], layout=model.layout)
    return made


def _time_backend(backend: str, factories: Mapping[str, Callable[[], _Step]], configs: Sequence[tuple[int, int]],
                  model: _Model, options: LatencyOptions
                  ) -> tuple[dict[tuple[int, int], dict[str, list[float]]], dict[tuple[int, int], dict[str, float]]]:
    """Samples per configuration and variant, and the dense median each variant is compared with.

    Default: every variant loaded, all interleaved. ``pairwise``: dense stays loaded and each
    other variant is loaded alone and interleaved with it (memory for two models); each ratio
    is then against the dense timings of its own pair."""
    samples: dict[tuple[int, int], dict[str, list[float]]] = {c: defaultdict(list) for c in configs}
    reference: dict[tuple[int, int], dict[str, float]] = {c: {} for c in configs}

    def run(steps: Mapping[str, _Step], label: str) -> None:
        for res, batch in tqdm(configs, desc=f"unet step [{backend}{label}]", leave=False):
            latent = res // model.vae_factor
            calls = {name: step.prepare(batch, latent, latent) for name, step in steps.items()}
            got = _interleaved(calls, options.repeats, options.warmup)
            dense = statistics.median(got[DENSE])
            for name, values in got.items():
                samples[(res, batch)][name] += values
                if name != DENSE:
                    reference[(res, batch)][name] = dense

    dense = factories[DENSE]()
    try:
        if options.pairwise:
            for name, make in factories.items():
                if name == DENSE:
                    continue
                step = make()
                try:
                    run({DENSE: dense, name: step}, f" {name}")
                finally:
                    step.close()
        else:
            steps = {DENSE: dense, **{name: make() for name, make in factories.items() if name != DENSE}}
            try:
                run(steps, "")
            finally:
                for name, step in steps.items():
                    if name != DENSE:
                        step.close()
    finally:
        dense.close()
    return samples, reference


def _step_rows(backend: str, resolution: int, batch: int, samples: Mapping[str, list[float]],
               ratios: Mapping[str, float], threshold: float,
               reference: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    dense_all = statistics.median(samples[DENSE])
    rows = []
    for name, values in samples.items():
        stats = summarize(values)
        macs_key = f"expert_{name.split('_')[1]}" if name.startswith(MASKED) else name
        macs_ratio = 1.0 if name.startswith(MASKED) else ratios.get(macs_key)
        dense = (reference or {}).get(name, dense_all)
        latency_ratio = stats["median_s"] / dense
        row = {"backend": backend, "resolution": resolution, "batch": batch, "variant": name, **stats,
               "macs_ratio": macs_ratio, "latency_ratio": latency_ratio,
               "latency_per_macs": latency_ratio / macs_ratio if macs_ratio else None}
        if name.startswith("expert_") or name == STATIC:
            row["deviation"] = abs(latency_ratio - macs_ratio) / macs_ratio
            row["within_threshold"] = row["deviation"] <= threshold
        if name.startswith(MASKED):
            row["expert_macs_ratio"] = ratios.get(macs_key)
        rows.append(row)
    return rows


# -- profiling ----------------------------------------------------------------------------------


def profile_by_op(paths: Sequence[Path], shape: Mapping[str, int], batch: int, height: int, width: int,
                  threads: int, repeats: int, directory: Path) -> list[dict[str, float]]:
    """Seconds per ONNX op type for each graph in `paths`, from onnxruntime's profiler.

    The graphs' runs alternate (A, B, A, B, ...) so that background load hits them alike, as in
    the timings; the first run of each (allocations) is dropped, and each op type keeps its
    least disturbed run (the minimum): kernel times are wall times, and a preemption lands on
    whichever op happened to run.
    """
    import onnxruntime as ort

    directory.mkdir(parents=True, exist_ok=True)
    sessions, feeds = [], []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.log_severity_level = 3
        options.profile_file_prefix = str(directory / Path(path).parent.name)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = _inputs(batch, shape["channels"], height, width, shape["text_length"], shape["hidden"])
        types = {i.name: i.type for i in session.get_inputs()}
        feeds.append({k: v.astype(np.float16 if types.get(k) == "tensor(float16)" else v.dtype)
                      for k, v in feed.items()})
        sessions.append(session)
    for _ in range(repeats + 1):
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    profiles = []
    for session in sessions:
        events = json.loads(Path(session.end_profiling()).read_text())
        starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
        per_run: list[dict[str, float]] = [defaultdict(float) for _ in starts]
        for event in events:
            if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
                continue
            run = max((i for i, t in enumerate(starts) if t <= event["ts"]), default=0)
            per_run[run][event.get("args", {}).get("op_name", "?")] += float(event.get("dur", 0)) * 1e-6
        kept = per_run[1:] or per_run
        ops = set().union(*kept) if kept else set()
        per_op = {op: min(run.get(op, 0.0) for run in kept) for op in ops}
        profiles.append(dict(sorted(per_op.items(), key=lambda kv: -kv[1])))
    return profiles


def fixed_cost_fit(rows: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Least-squares ``latency = fixed + slope * MACs ratio`` over the sliced models (dense,
    experts, static) of one backend, resolution and batch: `fixed` is the per-call cost that
    slicing cannot remove (op dispatch, memory-bound and fixed-width ops)."""
    points = [(float(r["macs_ratio"]), float(r["median_s"])) for r in rows
              if r["variant"] == DENSE or r["variant"].startswith("expert_") or r["variant"] == STATIC]
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    slope, fixed = np.polyfit(xs, ys, 1)
    dense = float(next(r["median_s"] for r in rows if r["variant"] == DENSE))
    return {"fixed_s": float(fixed), "slope_s": float(slope), "fixed_share": float(fixed) / dense,
            "points": len(points)}


def _explain_gap(expert_ops: Mapping[str, float], dense_ops: Mapping[str, float], macs_ratio: float,
                 latency_ratio: float, fit: Mapping[str, float] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Per op type: dense and expert seconds, their ratio, and the excess over MACs-proportional
    time; a sentence naming the op types that account for most of the gap."""
    rows = []
    for op in sorted(set(expert_ops) | set(dense_ops)):
        d, e = dense_ops.get(op, 0.0), expert_ops.get(op, 0.0)
        rows.append({"op_type": op, "dense_s": d, "expert_s": e, "ratio": e / d if d else None,
                     "excess_s": e - macs_ratio * d})
    rows.sort(key=lambda r: -abs(r["excess_s"]))
    total_dense = sum(dense_ops.values()) or 1.0
    total_excess = sum(r["excess_s"] for r in rows)
    direction = "slower" if latency_ratio > macs_ratio else "faster"
    top = [r for r in rows[:4] if abs(r["excess_s"]) > 0]
    parts = []
    for r in top:
        share = 100.0 * r["dense_s"] / total_dense
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        parts.append(f"{r['op_type']} ({share:.0f}% of dense op time, time ratio {ratio}, "
                     f"excess {1e3 * r['excess_s']:+.2f} ms)")
    profiled = sum(expert_ops.values()) / total_dense
    text = (f"latency ratio {latency_ratio:.3f} vs MACs ratio {macs_ratio:.3f}: the expert is {direction} than "
            f"MACs-proportional. ")
    if fit is not None:
        share = min(max(fit["fixed_share"], 0.0), 1.0)
        text += (f"A linear fit of latency against MACs over the sliced models at this size gives a fixed cost of "
                 f"{1e3 * fit['fixed_s']:.2f} ms per call ({100 * fit['fixed_share']:.0f}% of dense), which slicing "
                 f"cannot remove: with it the expected latency ratio is {share + (1 - share) * macs_ratio:.3f}. ")
    text += (f"The profile (op time ratio {profiled:.3f}) puts the excess over MACs-proportional time at "
             f"{1e3 * total_excess:+.2f} ms per step, led by " + "; ".join(parts) + ". Op types whose time ratio exceeds the MACs ratio do "
            "not shrink with width (fixed-cost ops such as GroupNorm, Softmax, reshapes and elementwise "
            "kernels, or GEMMs at widths that tile poorly); a time ratio below it means that op got more "
            "efficient.")
    return rows, text


# -- end to end ----------------------------------------------------------------------------------


def _scheduler_for_steps(model: _Model, steps: int | None) -> Any:
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


def _end_to_end(model: _Model, static: dict[str, Any] | None, options: LatencyOptions, threads: int,
                prompts: Sequence[str], codes: np.ndarray, routing: str, ratios: Mapping[str, float]
                ) -> list[dict[str, Any]]:
    from aptp.runtime import kernels
    from aptp.runtime.artifacts import DENSE as RT_DENSE, ModelFile, load_artifacts
    from aptp.runtime.pipeline import AptpPipeline

    artifacts = load_artifacts(model.root, verify=False)
    table = _scheduler_for_steps(model, options.e2e_steps)
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
        _record_stages(stage_samples["routed"], results)

    def forced_call(name: str) -> Callable[[], None]:
        def call() -> None:
            results = pipes[name].generate(batch, seeds, forced[name])
            _record_stages(stage_samples[name], results)
        return call

    calls = {"routed": routed, **{name: forced_call(name) for name in forced}}
    try:
        if options.e2e_sequential:
            # Low memory: one model at a time (its sessions closed before the next is loaded).
            samples = {}
            for name, call in calls.items():
                samples.update(_interleaved({name: call}, options.e2e_repeats, warmup=1))
                pipes[name].close()
        else:
            samples = _interleaved(calls, options.e2e_repeats, warmup=1)
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
    dispatch = _dispatch_time(codes, model, len(batch), kernels)
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


def _record_stages(store: dict[str, list[float]], results: Sequence[Any]) -> None:
    """Stage times of one request: batch-wide stages once, per-group stages summed over groups."""
    first = results[0].timings
    for stage in ("tokenise", "route", "text_encode"):
        store[stage].append(float(first.get(stage, 0.0)))
    groups = {str(r.expert): r.timings for r in results}
    store["denoise"].append(sum(float(t.get("denoise", 0.0)) for t in groups.values()))
    store["decode"].append(sum(float(t.get("decode", 0.0)) for t in groups.values()))


def _dispatch_time(codes: np.ndarray, model: _Model, batch: int, kernels: Any, repeats: int = 20) -> float:
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


# -- the suite -----------------------------------------------------------------------------------


def _resolutions(model: _Model, requested: Sequence[int] | None) -> list[int]:
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


def _select_backends(model: _Model, requested: Sequence[str] | None) -> tuple[list[str], dict[str, Any]]:
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
    model = _load_model(root)
    bad = [c for c in options.masked_codes or () if int(c) >= model.num_codes]
    if bad:
        raise ConfigError(f"--masked-codes {bad}: the export has experts 0..{model.num_codes - 1}")
    resolutions = _resolutions(model, options.resolutions)
    backends, status = _select_backends(model, options.backends)
    out.mkdir(parents=True, exist_ok=True)
    threads = int(options.threads or os.cpu_count() or 1)
    notes: list[str] = []
    torch_ok, torch_reason = _torch_status()
    if torch_ok:
        import torch

        torch.set_num_threads(threads)
        _load_torch(model)
    else:
        notes.append(f"torch unavailable ({torch_reason}): no static baseline, no masked UNet, manifest MACs ratios")

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION, "created": _now(), "artifacts": str(root),
        "model": {"base_model": model.manifest["base_model"], "num_codes": model.num_codes,
                  "nominal_resolution": model.nominal, "text_length": model.shape["text_length"],
                  "precision": model.manifest.get("precision"), "shares": model.shares,
                  "synthetic": model.synthetic},
        "machine": machine_info(),
        "settings": {"threads": threads, "repeats": options.repeats, "warmup": options.warmup,
                     "batch_sizes": [int(b) for b in options.batch_sizes], "resolutions": resolutions,
                     "backends": backends, "interleaved": "pairwise with dense" if options.pairwise else "all variants", "gap_threshold": options.gap_threshold,
                     "statistic": "median and interquartile range over repeats",
                     "batch_meaning": "rows per UNet call (classifier-free guidance runs 2 rows per image)"},
        "backends": status, "variants": {}, "unet_step": [], "end_to_end": [], "gaps": [], "notes": notes,
    }

    # Routing of the mixed prompt set, then the static model with that mixture's MACs.
    prompts = [MIXED_PROMPTS[i % len(MIXED_PROMPTS)] for i in range(int(options.e2e_batch))]
    codes, routing = _route_prompts(model, prompts, threads)
    nominal_ratios = _macs_ratios(model, model.nominal, {})
    mixture = float(np.mean([nominal_ratios[f"expert_{c}"] for c in codes.tolist()]))
    share_mixture = float(sum(s * nominal_ratios[f"expert_{k}"] for k, s in enumerate(model.shares)))
    results["routing"] = {"prompts": prompts, "codes": codes.tolist(), "method": routing,
                          "expected_macs_ratio": mixture, "share_weighted_macs_ratio": share_mixture}
    static = None
    if options.static and torch_ok:
        static_dir = Path(options.static_dir).expanduser().absolute() if options.static_dir else out / "static"
        static_dir.mkdir(parents=True, exist_ok=True)
        static = _static_baseline(model, mixture, static_dir, model.nominal // model.vae_factor)
        notes.append(f"static baseline: one uniform mask (same keep fraction at every site) at MACs ratio "
                     f"{static['ratio']:.4f}, the routed prompt set's expected MACs {mixture:.4f}")
    extra = {STATIC: static} if static else {}

    for res in resolutions:
        ratios = _macs_ratios(model, res, extra)
        results["variants"][str(res)] = {name: {"macs_ratio": r} for name, r in ratios.items()}
    for k, share in enumerate(model.shares):
        for res in resolutions:
            results["variants"][str(res)][f"expert_{k}"]["share"] = share

    configs = [(res, int(b)) for res in resolutions for b in options.batch_sizes]
    for backend in backends:
        factories = _step_factories(backend, model, static, threads, options.masked and backend in TORCH_BACKENDS,
                                    options.masked_codes)
        try:
            samples, reference = _time_backend(backend, factories, configs, model, options)
        except Exception as err:  # e.g. torch.compile failing: record it and go on
            if backend != "torch-compile":
                raise
            status[backend] = {"available": False, "reason": f"failed: {type(err).__name__}: {err}"[:300]}
            logger.warning("torch.compile failed, skipping it: %s", err)
            continue
        for res, batch in configs:
            ratios = {n: v["macs_ratio"] for n, v in results["variants"][str(res)].items()}
            results["unet_step"] += _step_rows(backend, res, batch, samples[(res, batch)], ratios,
                                               options.gap_threshold, reference[(res, batch)])

    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in results["unet_step"]:
        groups[(row["backend"], row["resolution"], row["batch"])].append(row)
    results["fixed_cost_fits"] = [{"backend": b, "resolution": r, "batch": n, **fit}
                                  for (b, r, n), rows in groups.items() if (fit := fixed_cost_fit(rows))]
    # Profiles where onnxruntime's latency ratio strays from the MACs ratio.
    results["gaps"] = _profile_gaps(model, results, static, threads, options, out)

    if options.e2e:
        results["checks"] = _checks(results)
        report.write_reports(results, out)  # the UNet-step figures survive a failing end-to-end run
        model.dense_torch = None  # the runtime needs no torch model: make room for its sessions
        model.macs_models.clear()
        import gc

        gc.collect()
        ratios = {n: v["macs_ratio"] for n, v in results["variants"][str(model.nominal)].items()}
        results["end_to_end"] = _end_to_end(model, static, options, threads, prompts, codes, routing, ratios)
    results["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["checks"] = _checks(results)
    report.write_reports(results, out)
    return results


def _profile_gaps(model: _Model, results: Mapping[str, Any], static: dict[str, Any] | None, threads: int,
                  options: LatencyOptions, out: Path) -> list[dict[str, Any]]:
    worst: dict[str, dict[str, Any]] = {}
    for row in results["unet_step"]:
        if row["backend"] != "onnxruntime" or "within_threshold" not in row or row["within_threshold"]:
            continue
        if row["variant"] not in worst or row["deviation"] > worst[row["variant"]]["deviation"]:
            worst[row["variant"]] = row
    gaps = []
    paths = {DENSE: model.root / model.manifest["dense"]["unet"],
             **{f"expert_{e['code']}": model.root / e["unet"] for e in model.manifest["experts"]}}
    if static:
        paths[STATIC] = Path(static["onnx"])
    for name, row in tqdm(sorted(worst.items()), desc="profiles", leave=False):
        latent = row["resolution"] // model.vae_factor
        dense_ops, ops = profile_by_op([paths[DENSE], paths[name]], model.shape, row["batch"], latent, latent,
                                       threads, options.profile_repeats, out / "profiles")
        peers = [r for r in results["unet_step"] if (r["backend"], r["resolution"], r["batch"]) ==
                 (row["backend"], row["resolution"], row["batch"])]
        fit = fixed_cost_fit(peers)
        table, text = _explain_gap(ops, dense_ops, row["macs_ratio"], row["latency_ratio"], fit)
        gaps.append({"backend": row["backend"], "variant": name, "resolution": row["resolution"], "batch": row["batch"],
                     "latency_ratio": row["latency_ratio"], "macs_ratio": row["macs_ratio"],
                     "deviation": row["deviation"], "profiled_ratio": sum(ops.values()) / (sum(dense_ops.values()) or 1),
                     "fixed_cost_fit": fit, "op_types": table, "explanation": text})
    return gaps


def _checks(results: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's acceptance figures, computed (never asserted)."""
    ort_rows = [r for r in results["unet_step"] if r["backend"] == "onnxruntime" and r["variant"].startswith("expert_")]
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
    }
