"""Names, defaults and options of the latency suite."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence


from aptp.errors import ConfigError


RESULTS_FORMAT = "aptp-bench-latency"
RESULTS_VERSION = 1
ALL_BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt", "torch", "torch-compile", "torch-cuda",
                "torch-cuda-graphs")
# Backends taken by default when present; torch.compile only on request (minutes of compiling).
DEFAULT_BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt", "torch", "torch-cuda")
TORCH_BACKENDS = ("torch", "torch-compile", "torch-cuda", "torch-cuda-graphs")
# torch on CUDA runs in fp16 through `torch_cuda.torch_cuda_step` (the -graphs variant replays CUDA graphs).
TORCH_CUDA_BACKENDS = ("torch-cuda", "torch-cuda-graphs")
ORT_BACKENDS = ("onnxruntime", "onnxruntime-cuda")
DENSE, STATIC, MASKED = "dense", "static", "masked"
# Suffix of a variant run through a session specialised to each configuration's shapes.
FIXED = "+fixed"
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
        repeats, warmup: timed rounds and untimed calls per variant and configuration.
        calls_in_a_row: consecutive calls per variant and round, as a sampling loop makes them
            on one UNet; the first, right after another model ran, is reported apart (the
            switch cost) and the others are the step latency. 1: strict per-call interleaving.
        threads: intra-op threads for every backend (None: all logical cores).
        masked: also time the masked full UNet (torch backends).
        static: also build, export and time the static pruned baseline (needs torch).
        e2e: also time end-to-end generation (onnxruntime backends).
        e2e_batch, e2e_steps, e2e_repeats: prompts per request, sampler steps (None: the
            export's table), timed requests per variant.
        e2e_workers: concurrent UNet runs end to end (`AptpPipeline(workers=...)`); each count
            gets its own routed/dense/static pipelines, timed side by side (None: 1, plus 2
            where the threads allow it).
        gap_threshold: relative distance of latency ratio from MACs ratio that asks for a profile.
        profile_repeats: runs per session under the onnxruntime profiler.
        static_dir: where the static baseline's ONNX graph is cached (None: output_dir/static).
        e2e_sequential: end to end, time one model at a time instead of interleaving them
            (memory for one pipeline's UNets; less robust to changing background load).
        masked_codes: the experts whose masked full UNet is timed (None: all).
        pairwise: low memory: hold only dense and one other variant at a time, interleaving each
            variant with dense (ratios against the dense timings of the same pair).
        fixed_shapes: onnxruntime on CPU: also time every UNet through a session specialised to
            each configuration's shapes (`aptp.runtime.shape_sessions`, what ``--shape-sessions``
            runs), interleaved with the dynamic sessions; the fixed cost and the ratios are
            reported for both, with what the specialised session adds to memory.
    """

    backends: Sequence[str] | None = None
    batch_sizes: Sequence[int] = (1, 2, 4, 8)
    resolutions: Sequence[int] | None = None
    repeats: int = 10
    warmup: int = 2
    calls_in_a_row: int = 3
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
    e2e_workers: Sequence[int] | None = None
    fixed_shapes: bool = False

    def check(self) -> None:
        """Raise `ConfigError` for values no run can use."""
        for name in ("repeats", "calls_in_a_row", "e2e_batch", "e2e_repeats", "profile_repeats"):
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
        if self.e2e_workers is not None and (not self.e2e_workers or any(not 1 <= int(w) <= 64
                                                                          for w in self.e2e_workers)):
            raise ConfigError(f"--e2e-workers must be integers in [1, 64], got {list(self.e2e_workers)}")
        for code in self.masked_codes or ():
            if int(code) < 0:
                raise ConfigError(f"--masked-codes must be expert codes (>= 0), got {code}")
        for name in self.backends or ():
            if name not in ALL_BACKENDS:
                raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(ALL_BACKENDS)}")
