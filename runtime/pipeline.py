"""Prompt-routed generation from an export: route, group by expert, denoise, decode.

    pipe = AptpPipeline.from_export("exports/tiny")
    results = pipe(["a red car", "a bowl of soup"], seeds=[0, 1])
    results[0].image            # (H, W, 3) uint8; results[0].expert is its code

A batch of prompts is tokenised, routed (router encoder -> head -> argmax), encoded by the text
encoder, and grouped by code (`kernels.group_by_code`). Each group gathers its latents and text
states into one contiguous batch (`kernels.gather_rows`), runs the classifier-free-guided
sampling loop on its expert's UNet (`aptp.runtime.denoise`) and scatters its final latents back
(`kernels.scatter_rows`); the groups run one after another, or several at once with ``workers``
(`aptp.runtime.dispatch`). The VAE decoder then decodes the whole batch in chunks of
``max_batch``. Results come back in the caller's order. ``expert=k`` or ``expert="dense"`` skips the router and runs every prompt on that UNet.

Randomness: prompt ``i``'s initial noise is
``numpy.random.Generator(numpy.random.PCG64(seeds[i])).standard_normal((C, h, w), dtype=float32)``
times the sampler's ``init_noise_sigma``, drawn per prompt, so a request gives the same image
alone or in any batch. ``seeds=None`` draws fresh seeds and reports them in the results.

The text encoder and the router run once over the whole batch (they are shared by every
expert); the loop runs per group and the decoder once per ``max_batch`` prompts. Sessions are created once per pipeline, on
first use (or all at construction with ``preload=True``), and reused. With ``memory_budget``
the UNet sessions are owned by `aptp.runtime.residency.ResidencyManager` instead: loaded on
demand, evicted least recently used to stay within the budget, never while a group runs on
them; ``pipe.memory_report()`` shows what each one measured.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from aptp.errors import ArtifactError, RuntimeInputError, shown

from . import dispatch, img2img, kernels, request_options
from .artifacts import DENSE, ExportArtifacts, ModelFile, load_artifacts
from .denoise import StepCallback, denoise, denoise_on_device, uses_guidance
from .engine import (
    BACKENDS,
    DEVICES,
    Engine,
    OnnxRuntimeEngine,
    TensorRTEngine,
    check_threads,
    default_threads,
    onnxruntime_providers,
    tensorrt_available,
)
from .images import to_uint8
from .request_options import (
    OUTPUT_TYPES,
    GenerationOptions,
    GenerationResult,
    check_guidance,
    check_precision,
    check_size,
    check_steps,
)
from .residency import MemoryProbe, ResidencyManager, parse_memory_budget
from .shape_sessions import ShapeSessionEngine, check_shape_sessions
from .router import Router
from .sampler_library import SamplerLibrary
from .scheduler import SchedulerTable
from .tokenize import PromptTokenizer, check_prompts

__all__ = [
    "STAGES",
    "AptpPipeline",
    "GenerationOptions",
    "GenerationResult",
    "ProgressCallback",
    "initial_noise",
    "resolve_backend",
]

logger = logging.getLogger(__name__)

#: Timed stages, in order; every result's ``timings`` has these keys (seconds).
STAGES = ("tokenise", "route", "text_encode", "denoise", "decode")


#: ``callback(step, total, expert)`` after each sampling step of a UNet run (see `AptpPipeline.__call__`).
ProgressCallback = Callable[[int, int, Any], None]


def initial_noise(seed: int, shape: Sequence[int]) -> np.ndarray:
    """The standard normal noise of one request: ``Generator(PCG64(seed)).standard_normal(shape)``,
    float32. Multiply by the sampler's ``init_noise_sigma`` for the initial latents."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(tuple(shape), dtype=np.float32)


def resolve_backend(backend: str, device: str, artifacts: ExportArtifacts) -> str:
    """``"onnxruntime"`` or ``"tensorrt"`` for the UNets: ``auto`` takes TensorRT plans on CUDA
    when ``tensorrt`` imports and every UNet has a plan, else onnxruntime.

    Raises:
        RuntimeInputError: an unknown backend or device, or ``tensorrt`` where it cannot run.
    """
    if backend not in BACKENDS:
        raise RuntimeInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device not in DEVICES:
        raise RuntimeInputError(f"device must be one of {DEVICES}, got {device!r}")
    missing = [key for key in artifacts.model_keys if artifacts.unet(key).tensorrt is None]
    ok, reason = tensorrt_available()
    if backend == "tensorrt":
        if device != "cuda":
            raise RuntimeInputError("backend 'tensorrt' runs on device 'cuda' only; pass device='cuda'")
        if not ok:
            raise RuntimeInputError(f"backend 'tensorrt' is unavailable: {reason}; use backend 'onnxruntime'")
        if missing:
            raise RuntimeInputError(f"export {artifacts.root} has no TensorRT plan for UNets {missing}: "
                                    "re-export on a machine with TensorRT, or use backend 'onnxruntime'")
        return "tensorrt"
    if backend == "auto" and device == "cuda" and ok and not missing:
        return "tensorrt"
    return "onnxruntime"


def _manifest_sha256(artifacts: ExportArtifacts) -> str:
    try:
        return hashlib.sha256((artifacts.root / "manifest.json").read_bytes()).hexdigest()
    except OSError:  # artifacts built in memory (tests): nothing on disk to name
        return ""


def _describe_unet(key: int | str) -> str:
    return "the dense UNet" if key == DENSE else f"expert {key}'s UNet"


class AptpPipeline:
    """Routed text-to-image generation from one export directory; torch-free.

    Args:
        artifacts: a verified export (`load_artifacts`); `from_export` loads it for you.
        backend: ``"auto"``, ``"onnxruntime"`` or ``"tensorrt"`` (see `resolve_backend`).
        device: ``"cpu"`` or ``"cuda"``. On CUDA the loop keeps latents on the GPU when
            ``aptp._C_cuda`` sees a device, else it runs on the host between GPU model calls.
        device_id: GPU ordinal.
        threads: intra-op threads per session (default: ``$OMP_NUM_THREADS``, else all cores).
        scheduler: another sampler table (`SchedulerTable` or its dict) for the export's models,
            e.g. one exported for another sampler or step count; default: the manifest's.
        preload: create every session now instead of on first use.
        max_batch: prompts per UNet call (a larger expert group runs in chunks); default: the
            export's ``max_batch``.
        memory_budget: bytes (int) or text (``"3GiB"``, ``"512MiB"``, ``"2GB"``) the UNet
            sessions may take together; they are then loaded on demand and evicted least
            recently used (`aptp.runtime.residency`). ``None``: every UNet stays once loaded.
            Router, text encoder and VAE decoder are always resident and not counted.
        precision: ``"int8"`` runs the int8 UNets that ``aptp-export --quantize int8`` wrote;
            ``None`` (or the export's own ``fp32``/``fp16``) runs the exported UNets.
        shape_sessions: on CPU, up to this many extra sessions per UNet specialised to the shapes
            it is called with (`aptp.runtime.shape_sessions`); each holds its own copy of the
            weights, charged to the memory budget. 0 (default): off; measured 0.97-1.02x on one
            thread (each UNet's share under the default workers), 1.02-1.11x on two (BENCHMARKS.md).
        workers: UNet runs at once (`aptp.runtime.dispatch`): a request's expert groups
            (halved while there are fewer than workers) run concurrently, each UNet session with
            ``threads // workers`` intra-op threads, and a request with fewer runs than workers
            splits each call's rows between the idle ones (one prompt: its unconditional and
            conditional rows). ``"auto"`` (default): 2 on CPU with 2 or more threads, else 1; 1
            runs the groups one after another with every thread. Measured on 2 cores: 2 workers
            ran 8 prompts on 4 experts 1.4x faster, one prompt 1.05x. More than 1 needs CPU.
    """

    def __init__(self, artifacts: ExportArtifacts, *, backend: str = "auto", device: str = "cpu",
                 device_id: int = 0, threads: int | None = None,
                 scheduler: SchedulerTable | Mapping[str, Any] | None = None, preload: bool = False,
                 max_batch: int | None = None, memory_budget: int | str | None = None,
                 precision: str | None = None, shape_sessions: int = 0, workers: int | str = "auto"):
        self.artifacts = artifacts
        self.threads = check_threads(threads)
        self.workers = dispatch.resolve_workers(workers, device, self.threads or default_threads())
        if self.workers > 1 and device != "cpu":
            raise RuntimeInputError(f"workers={self.workers} runs UNet groups concurrently on CPU cores; on "
                                    f"device {device!r} use workers=1")
        self.shape_sessions = check_shape_sessions(shape_sessions)
        self.precision = check_precision(precision, artifacts)
        self.memory_budget = parse_memory_budget(memory_budget)
        self.device = device
        self.device_id = int(device_id)
        self.backend = resolve_backend(backend, device, artifacts)
        onnxruntime_providers(device, self.backend, self.device_id)  # CUDA without onnxruntime-gpu fails here
        # Concurrent runs split the cores between them (see `aptp.runtime.dispatch`).
        self.unet_threads = self.threads if self.workers == 1 else \
            max(1, (self.threads or default_threads()) // self.workers)
        self._runs = dispatch.RunPool(self.workers)
        self._callback_lock = threading.Lock()  # concurrent runs report progress one at a time
        self.max_batch = artifacts.max_batch if max_batch is None else max_batch
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise RuntimeInputError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.scheduler: SchedulerTable = artifacts.scheduler
        self.samplers = SamplerLibrary.from_manifest(artifacts.manifest.get("samplers"), artifacts.scheduler,
                                                     source=f"{artifacts.root}/manifest.json: samplers")
        # Images record which export made them: the manifest lists every file's sha256.
        self.manifest_sha256 = _manifest_sha256(artifacts)
        self.on_device_loop = device == "cuda" and kernels.cuda_available()
        if self.backend == "tensorrt" and not self.on_device_loop:
            # TensorRT engines hand back device buffers: only the on-device loop consumes them.
            if backend == "tensorrt":
                raise RuntimeInputError(f"backend 'tensorrt' needs the CUDA kernels ({kernels.cuda_status()}); "
                                        "rebuild aptp with a CUDA toolkit or use backend 'onnxruntime'")
            self.backend = "onnxruntime"
        if device == "cuda" and not self.on_device_loop:
            logger.warning("device 'cuda' without the CUDA kernels (%s): latents go through the host every "
                           "step", kernels.cuda_status())
        self.text_tokenizer = PromptTokenizer(
            artifacts.tokenizer.path, artifacts.tokenizer.max_length, artifacts.tokenizer.pad_token_id,
            pad_to_max_length=True, warn_truncation=True, name="text encoder",
            sha256=artifacts.sha256(artifacts.tokenizer.path))
        self.router = Router(
            PromptTokenizer(artifacts.router_tokenizer.path, artifacts.router_tokenizer.max_length,
                            artifacts.router_tokenizer.pad_token_id, pad_to_max_length=False,
                            warn_truncation=False, name="router encoder",
                            sha256=artifacts.sha256(artifacts.router_tokenizer.path)),
            self._make_engine(artifacts.router_encoder.onnx), self._make_engine(artifacts.router_head.onnx),
            artifacts.num_codes)
        self._engines: dict[Any, Engine] = {
            "text_encoder": self._make_engine(artifacts.text_encoder.onnx),
            "vae_decoder": self._make_engine(artifacts.vae_decoder.onnx),
            "router_encoder": self.router.encoder,
            "router_head": self.router.head,
        }
        self._lock = threading.Lock()  # engine creation and the unconditional text states
        self._device_lock = threading.Lock()  # the on-device loop reuses the UNets' buffers
        self._uncond: np.ndarray | None = None
        self.residency = ResidencyManager(self.memory_budget, self._new_unet_engine, self._unet_file_bytes,
                                          describe=_describe_unet, probe=MemoryProbe(device, self.device_id))
        for key in artifacts.experts:  # a missing int8 file or an expert that cannot fit alone fails here
            self.unet_file(key)
            self.residency.check_fits(key)
        if scheduler is not None:
            other = self.with_scheduler(scheduler)
            self.scheduler, self.samplers = other.scheduler, other.samplers
        if preload:
            self.load()
        elif device == "cuda":
            # Fail at construction, not at the first request, where CUDA would not really run.
            self.router.encoder.load()

    @classmethod
    def from_export(cls, path: str | os.PathLike, *, verify: bool = True, trusted_key: Any = None,
                    **kwargs: Any) -> AptpPipeline:
        """Verify the export at `path` (every file's sha256 unless ``verify=False``) and build a
        pipeline on it; keyword arguments go to the constructor.

        Whatever `verify` says, each file is hashed again when a session reads it (sessions are
        created lazily), and a file that no longer matches the manifest is refused then.
        `trusted_key` (an Ed25519 public key, e.g. a PEM file path) refuses a manifest that it
        did not sign (see `aptp.export.signing`)."""
        return cls(load_artifacts(path, verify=verify, trusted_key=trusted_key), **kwargs)

    # ---- engines -------------------------------------------------------------------------

    def _make_engine(self, path: os.PathLike, plan: os.PathLike | None = None, threads: int | None = None) -> Engine:
        # Engines hash the bytes they load against the manifest (verify-then-swap cannot work).
        a = self.artifacts
        if plan is not None and self.backend == "tensorrt":
            return TensorRTEngine(plan, self.device_id, sha256=a.sha256(plan))
        # Graphs without a plan under backend 'tensorrt' (text encoder, VAE, router) take
        # onnxruntime's best provider: TensorRT's if it activates, else CUDA.
        backend = "auto" if self.backend == "tensorrt" else self.backend
        return OnnxRuntimeEngine(path, self.device, threads=self.threads if threads is None else threads,
                                 backend=backend,
                                 device_id=self.device_id, sha256=a.sha256(path), external_data=a.external_weights(path))

    def unet_file(self, key: int | str) -> ModelFile:
        """The UNet graph of expert `key` or ``"dense"`` at this pipeline's precision: on CPU
        with onnxruntime, the graph `aptp-export --cpu-graphs` optimised where the export has one."""
        entry = self.artifacts.unet(key)
        if self.precision == "int8":
            if entry.int8 is None:
                raise ArtifactError(f"export {self.artifacts.root} has no int8 UNet for {_describe_unet(key)}: "
                                    "re-export with aptp-export --quantize int8, or use the default precision")
            return entry.int8
        if entry.cpu_graph is not None and self.device == "cpu" and self.backend == "onnxruntime":
            return entry.cpu_graph
        return entry

    def _new_unet_engine(self, key: int | str) -> Engine:
        entry = self.unet_file(key)
        if self.shape_sessions and self.device == "cpu":
            a = self.artifacts
            return ShapeSessionEngine(entry.onnx, self.device, threads=self.unet_threads, backend=self.backend,
                                      sha256=a.sha256(entry.onnx), max_sessions=self.shape_sessions,
                                      external_data=a.external_weights(entry.onnx))
        return self._make_engine(entry.onnx, entry.tensorrt, threads=self.unet_threads)

    def _unet_file_bytes(self, key: int | str) -> int:
        entry = self.unet_file(key)
        paths = [entry.tensorrt] if self.backend == "tensorrt" and entry.tensorrt else [entry.onnx, entry.external_data]
        return sum(p.stat().st_size for p in paths if p is not None and p.is_file())

    def unet(self, key: int | str) -> Engine:
        """The loaded UNet engine of expert `key` or ``"dense"``, loaded on demand. Under a
        memory budget it may be evicted once returned, and an evicted engine refuses to load
        again (it would bypass the budget): to run on it, hold ``pipe.residency.use(key)``
        instead, which pins it and reloads it within the budget."""
        with self.residency.use(key) as engine:
            return engine

    def memory_report(self) -> dict[str, Any]:
        """The budget, this process's RSS (and device memory on CUDA) now, and per UNet session
        its measured cost (RSS and device bytes added by its last load), loads and evictions."""
        probe = self.residency.probe
        return {"precision": self.precision or self.artifacts.precision, "process_rss_bytes": probe.rss(),
                "device_used_bytes": probe.device_used(), **self.residency.report()}

    def load(self, unets: bool = True) -> None:
        """Create every session now: router, text encoder, VAE decoder and, with `unets`, every
        UNet (under a memory budget, the UNets that fit together, in the export's order)."""
        for engine in list(self._engines.values()):
            engine.load()
        if unets:
            self.residency.preload(self.artifacts.model_keys)

    def with_scheduler(self, scheduler: SchedulerTable | Mapping[str, Any]) -> AptpPipeline:
        """A pipeline sampling with another table on the same sessions (nothing is reloaded).

        The table must fit the export's models (same training schedule and prediction type);
        `aptp.export.scheduler_tables.build_scheduler_table` writes one for any sampler.
        """
        if not isinstance(scheduler, SchedulerTable):
            scheduler = SchedulerTable.from_dict(scheduler, source="scheduler argument")
        if scheduler.prediction_type != self.scheduler.prediction_type:
            raise RuntimeInputError(
                f"the new sampler table predicts {scheduler.prediction_type!r}, the export's models "
                f"{self.scheduler.prediction_type!r}: build the table from the model's own scheduler config")
        other = copy.copy(self)  # shares the engines and their locks
        other.scheduler = scheduler
        other.samplers = self.samplers.with_default(scheduler)
        return other

    def providers(self) -> dict[str, str | None]:
        """The provider running each loaded graph (``"unet_<key>"`` for UNets), for reports."""
        return {(f"unet_{name[1]}" if isinstance(name, tuple) else name): getattr(engine, "provider", None)
                for name, engine in list(self._engines.items()) if engine.loaded}

    def close(self) -> None:
        """Drop every session and device buffer."""
        with self._lock:
            for engine in self._engines.values():
                engine.unload()
        self._runs.shutdown()
        self.residency.clear()

    def __enter__(self) -> AptpPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- requests ------------------------------------------------------------------------

    def latent_shape(self, options: GenerationOptions) -> tuple[int, int, int]:
        """``(C, h, w)`` of one sample's latents at the options' image size."""
        factor = self.artifacts.vae_scale_factor
        return (self.artifacts.latent_channels, options.height // factor, options.width // factor)

    def options(self, *, guidance_scale: Any = None, num_inference_steps: Any = None, expert: Any = None,
                output_type: str = "np", height: Any = None, width: Any = None, scheduler: Any = None,
                steps: Any = None, strength: Any = None, inpaint: bool = False) -> GenerationOptions:
        """Check request options and fill in the export's defaults.

        ``scheduler`` names the sampler (``"ddim"``, ``"euler"``, ``"dpmpp_2m"``, ``"pndm"``
        (PLMS, one more model call than steps); default: the export's); ``steps`` is a short
        spelling of ``num_inference_steps`` (default: the export's table's). Any step count in
        the export's range (1-150) works with any sampler the export lists; an export made before
        per-request samplers runs its own table only.

        Raises:
            RuntimeInputError: steps not a positive integer or outside the export's range, an
                unknown or unavailable sampler, a guidance scale that is not a finite number in
                `request_options.GUIDANCE_RANGE`, an unknown expert, an unknown output type, an
                image size outside the export's range or not a multiple of its ``size_multiple``.
        """
        a = self.artifacts
        steps = check_steps(num_inference_steps, steps, self.scheduler.num_steps)
        sampler, steps = self.samplers.check(self.scheduler.name if scheduler is None else scheduler, steps)
        scale = check_guidance(guidance_scale, self.artifacts.guidance_scale)
        if expert is not None:
            keys = self.artifacts.model_keys
            if isinstance(expert, bool) or expert not in keys:
                raise RuntimeInputError(f"expert must be one of {keys} (or None to route), got {shown(expert)}")
            expert = int(expert) if expert != DENSE else DENSE
        if output_type not in OUTPUT_TYPES:
            raise RuntimeInputError(f"output_type must be one of {OUTPUT_TYPES}, got {shown(output_type)}")
        if strength is not None:  # the cut must keep a step at these steps
            img2img.t_start(steps, img2img.check_strength(strength))
        return GenerationOptions(scale, steps, check_size(height, "height", a.image_height, a),
                                 check_size(width, "width", a.image_width, a), expert, output_type, sampler,
                                 None if strength is None else float(strength), bool(inpaint))

    def check_seeds(self, seeds: Any, count: int) -> list[int]:
        """`seeds` as `count` integers: an int ``s`` gives ``s, s+1, ...``; ``None`` draws fresh ones."""
        return request_options.check_seeds(seeds, count)

    def route(self, prompts: str | Sequence[str]) -> np.ndarray:
        """The expert code of each prompt, ``(B,)`` int64."""
        return self.router.route(check_prompts(prompts))

    def table(self, options: GenerationOptions) -> SchedulerTable:
        """The sampler table of `options` (built once per (sampler, steps), then cached)."""
        return self.samplers.table(options.scheduler or self.scheduler.name, options.num_inference_steps)

    def _uncond_states(self) -> np.ndarray:
        """Text states of the empty prompt ``(1, L, D)``: diffusers' unconditional input, computed once."""
        with self._lock:
            if self._uncond is None:
                tokens = self.text_tokenizer([""])
                self._uncond = self._encode_text(tokens.input_ids)
            return self._uncond

    def _encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        out = self._engines["text_encoder"].infer({"input_ids": input_ids})["last_hidden_state"]
        return np.ascontiguousarray(out, dtype=np.float32)

    def __call__(self, prompts: str | Sequence[str], *, seeds: int | Sequence[int] | None = None,
                 guidance_scale: float | None = None, num_inference_steps: int | None = None,
                 expert: int | str | None = None, output_type: str = "np", height: int | None = None,
                 width: int | None = None, scheduler: str | None = None, steps: int | None = None,
                 negative_prompt: str | Sequence[str | None] | None = None,
                 callback: ProgressCallback | None = None, init_image: Any = None, strength: float | None = None,
                 mask_image: Any = None, mask_blur: float | None = None,
                 keep_unmasked: bool = True) -> list[GenerationResult]:
        """Generate one image per prompt; results in the order of `prompts`.

        Args:
            prompts: one prompt or a list of prompts (non-empty text each).
            seeds: one integer per prompt; an int ``s`` means ``s, s+1, ...``; ``None`` draws
                fresh seeds (see the module docstring for how noise follows from a seed).
            guidance_scale: classifier-free guidance in `request_options.GUIDANCE_RANGE` (default: the
                manifest's); ``<= 1`` runs the conditional model only, as diffusers does.
            num_inference_steps: sampling steps, in the export's range (1-150); default: the
                export's. ``steps`` is the same option under a shorter name.
            scheduler: ``"ddim"``, ``"euler"``, ``"dpmpp_2m"`` or ``"pndm"`` (PLMS; ``"plms"`` too)
                (default: the export's sampler).
            negative_prompt: text the unconditional half of classifier-free guidance encodes
                instead of the empty prompt: one string for all prompts or one per prompt
                (``None``/``""`` for none). Routing still reads the positive prompt only.
            expert: ``None`` routes each prompt; a code or ``"dense"`` forces that UNet.
            output_type: ``"np"`` decodes images; ``"latent"`` stops after the loop.
            height, width: image size in pixels (default: the export's nominal size).
            callback: ``callback(step, total, expert)`` after each sampling step of each UNet
                run (an expert group, in chunks of ``max_batch``); ``step`` restarts at 1 for
                each run. An exception it raises ends the call.
            init_image: img2img: an (H, W, 3) uint8 array, PIL image, image bytes or path, or one
                per prompt; its size is the default height/width (else it is resized).
            strength: how much of the init image is repainted, in (0, 1] (default 0.8; 1.0
                with a mask). mask_image: inpainting: white repaints, black keeps (one or one
                per prompt); mask_blur: its Gaussian blur radius in pixels. keep_unmasked: put the
                init pixels back where the mask keeps them (as A1111 does); ``False`` gives
                diffusers' inpainting output, whose kept pixels move with the decoder. See
                ``docs/img2img.md``.

        Raises:
            RuntimeInputError: bad prompts or options (nothing is run).
            ArtifactError: a model file that onnxruntime cannot load or run.
        """
        prompts = check_prompts(prompts)
        images, height, width, strength, inpaint = img2img.image_arguments(
            self.artifacts, init_image, mask_image, mask_blur, strength, len(prompts), height, width)
        opts = self.options(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                            expert=expert, output_type=output_type, height=height, width=width,
                            scheduler=scheduler, steps=steps, strength=strength, inpaint=inpaint)
        negatives = self.check_negative_prompts(negative_prompt, len(prompts))
        seed_list = self.check_seeds(seeds, len(prompts))
        return self.generate(prompts, seed_list, opts, negative_prompts=negatives, callback=callback,
                             init_images=images, keep_unmasked=keep_unmasked)

    def check_negative_prompts(self, negative_prompt: Any, count: int) -> list[str | None] | None:
        """`negative_prompt` as one entry per prompt (``None`` for none), or ``None`` if no prompt has one."""
        return request_options.check_negative_prompts(negative_prompt, count)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], options: GenerationOptions,
                 codes: np.ndarray | None = None,
                 negative_prompts: Sequence[str | None] | None = None,
                 callback: ProgressCallback | None = None,
                 init_images: Sequence[img2img.ImageRequest] | None = None,
                 keep_unmasked: bool = True) -> list[GenerationResult]:
        """`__call__` on already checked prompts, seeds and options (the server's entry).

        `codes` (one per prompt) skips the router when the caller routed already;
        `negative_prompts` (one per prompt, ``None`` for the empty prompt) as checked by
        `check_negative_prompts`; `callback` as in `__call__`; `init_images` (one per prompt, as
        `img2img.image_arguments` checks them) exactly when ``options.strength`` is set.
        """
        schedule = None
        if (init_images is None) != (options.strength is None) \
                or (init_images is not None and len(init_images) != len(prompts)):
            raise RuntimeInputError("img2img options need one init image per prompt, and init images need a strength")
        if options.strength is not None:
            schedule = img2img.strength_schedule(self.samplers, options.scheduler or self.scheduler.name,
                                                 options.num_inference_steps, options.strength)
        table = self.table(options) if schedule is None else schedule.table
        batch = len(prompts)
        timings = dict.fromkeys(STAGES, 0.0)
        clock = time.perf_counter()
        tokens = self.text_tokenizer(prompts)
        router_tokens = self.router.tokenize(prompts) if options.expert is None and codes is None else None
        timings["tokenise"] = time.perf_counter() - clock

        clock = time.perf_counter()
        num_codes = self.artifacts.num_codes
        if options.expert is not None:
            index = np.full(batch, num_codes if options.expert == DENSE else options.expert, dtype=np.int64)
        elif codes is not None:
            index = np.asarray(codes, dtype=np.int64)
        else:
            index = self.router.route(router_tokens)
        timings["route"] = time.perf_counter() - clock
        for slot in np.unique(index).tolist():  # a UNet that cannot fit the budget fails before any work
            self.residency.check_fits(DENSE if slot == num_codes else int(slot))

        clock = time.perf_counter()
        cond = self._encode_text(tokens.input_ids)
        guided = uses_guidance(options.guidance_scale)
        uncond = per_row_uncond = None
        if guided and negative_prompts is not None and any(negative_prompts):
            # diffusers encodes the negative prompts like the prompts (padded to max_length).
            per_row_uncond = self._encode_text(self.text_tokenizer([n or "" for n in negative_prompts]).input_ids)
        elif guided:
            uncond = self._uncond_states()
        timings["text_encode"] = time.perf_counter() - clock

        image_start = None
        if schedule is not None and init_images is not None:
            clock = time.perf_counter()
            image_start = img2img.ImageStart.encode(self._vae_encoder(), init_images, seeds, schedule, self.latent_shape(options),
                                              self.artifacts.vae_scale_factor, options.inpaint)
            latents = image_start.latents
            timings["encode_image"] = time.perf_counter() - clock
        else:
            noise = np.stack([initial_noise(seed, self.latent_shape(options)) for seed in seeds])
            latents = np.ascontiguousarray(table.initial_latents(noise), dtype=np.float32)
        final = np.empty_like(latents)
        order, offsets = kernels.group_by_code(index, num_codes + 1)  # slot K is the dense model

        def key_of(slot: int) -> int | str:
            return DENSE if slot == num_codes else slot

        runs = dispatch.plan_runs(order, offsets, self.max_batch, self.workers, cost=lambda slot: self._unet_cost(
            key_of(slot)))
        parts = dispatch.row_parts(self.workers, len(runs))

        def execute(run: dispatch.UnetRun, cancel: threading.Event) -> tuple[np.ndarray, str | None]:
            key, rows = key_of(run.slot), run.rows
            x = kernels.gather_rows(latents, rows)
            text = kernels.gather_rows(cond, rows)
            if per_row_uncond is not None:
                text = np.concatenate([kernels.gather_rows(per_row_uncond, rows), text])
            elif guided:
                text = np.concatenate([np.broadcast_to(uncond, (rows.size, *uncond.shape[1:])), text])
            step = self._step_hook(callback, key, cancel)
            blend = None if image_start is None else image_start.blender(rows)
            return self._denoise(key, x, text, options.guidance_scale, table, step, blend, parts)

        denoised: dict[int, float] = {}
        group_provider: dict[int, str | None] = {}
        chunk_size: dict[int, int] = {}
        for done in dispatch.run_all(runs, execute, self._runs.runs()):
            (x, provider), rows = done.value, done.run.rows
            kernels.scatter_rows(x, rows, final)
            # A row's denoise time is its group's: every run of its expert (they may overlap).
            denoised[done.run.slot] = denoised.get(done.run.slot, 0.0) + done.seconds
            for row in rows.tolist():
                group_provider[row] = provider
                chunk_size[row] = int(rows.size)
            logger.info("expert %s: %d prompt(s), %d %s steps, %.3f s", key_of(done.run.slot), rows.size,
                        table.num_steps, table.name, done.seconds)

        pixels: np.ndarray | None = None
        if options.output_type == "np":
            # One decoder call per max_batch prompts of the request, whichever experts made them.
            clock = time.perf_counter()
            decoder = self._engines["vae_decoder"]
            for start in range(0, batch, self.max_batch):
                decoded = decoder.infer({"latent_sample": final[start:start + self.max_batch]})["sample"]
                if pixels is None:
                    pixels = np.empty((batch, *decoded.shape[1:]), dtype=np.float32)
                pixels[start:start + len(decoded)] = decoded
            timings["decode"] = time.perf_counter() - clock

        if pixels is not None and init_images is not None and options.inpaint and keep_unmasked:
            img2img.keep_unmasked_pixels(pixels, init_images)
        images = to_uint8(pixels) if pixels is not None else None
        results = []
        for i, prompt in enumerate(prompts):
            slot = int(index[i])
            results.append(GenerationResult(
                prompt=prompt, seed=int(seeds[i]), expert=DENSE if slot == num_codes else slot,
                latents=final[i], image=None if images is None else images[i], truncated=tokens.truncated[i],
                timings={**timings, "denoise": denoised[slot]}, provider=group_provider[i],
                negative_prompt=None if negative_prompts is None else negative_prompts[i],
                scheduler=table.name, num_inference_steps=options.num_inference_steps,
                guidance_scale=options.guidance_scale, height=options.height, width=options.width,
                manifest_sha256=self.manifest_sha256, batch_size=chunk_size[i], strength=options.strength,
                init_image=None if init_images is None else init_images[i],
            ))
        return results

    def _vae_encoder(self) -> Engine:
        with self._lock:  # created on first img2img use (`img2img.image_arguments` checked it exists)
            if "vae_encoder" not in self._engines:
                self._engines["vae_encoder"] = self._make_engine(self.artifacts.vae_encoder.onnx)
            return self._engines["vae_encoder"]

    def _step_hook(self, callback: ProgressCallback | None, key: int | str,
                   cancel: threading.Event) -> StepCallback:
        """After each step: stop if another run of the request failed, else report progress."""
        def step(done: int, total: int) -> None:
            if cancel.is_set():
                raise dispatch.RunCancelled(f"expert {key}: stopped, another run of the request failed")
            if callback is not None:
                with self._callback_lock:
                    callback(done, total, key)
        return step

    def _unet_cost(self, key: int | str) -> float:
        """Relative cost of one row on UNet `key` (its MACs ratio; 1 if the export does not say)."""
        ratio = getattr(self.artifacts.unet(key), "macs_ratio", None)
        return float(ratio) if ratio else 1.0

    def _denoise(self, key: int | str, x: np.ndarray, text: np.ndarray, guidance_scale: float,
                 table: SchedulerTable, callback: StepCallback | None = None,
                 blend: img2img.Blend | None = None, parts: int = 1) -> tuple[np.ndarray, str | None]:
        """The final latents of one run, and the provider that ran its UNet (read while the UNet
        is pinned: afterwards a budget may already have evicted it)."""
        with self.residency.use(key) as unet:  # pinned: never evicted while this group runs on it
            provider = getattr(unet, "provider", None)
            if self.on_device_loop and blend is None:  # inpainting blends on the host
                with self._device_lock:
                    return denoise_on_device(unet, x, text, table, guidance_scale, callback=callback), provider
            pool = self._runs.parts() if parts > 1 else None
            if pool is not None:
                unet = dispatch.RowSplitEngine(unet, parts, pool)
            try:
                return denoise(unet, x, text, table, guidance_scale, callback, blend), provider
            except ValueError as err:  # a graph whose shapes do not match its manifest entry
                raise ArtifactError(f"expert {key}: {err}") from err
