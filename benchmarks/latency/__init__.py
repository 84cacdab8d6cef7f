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

The package is split by concern so other suites (memory, serving, the GPU check) share one backend
layer and one timing discipline:

- `options`: backend and variant names, `LatencyOptions`, the mixed prompt set;
- `timing`: `interleaved` (warm-up, rotated round-robin repetitions), `summarize`, `machine_info`;
- `backends`: the step-backend layer (`Step`, `ort_step`, `trt_step`, `torch_step`, `backend_status`);
- `model`: what the suite knows about one export, MACs ratios, routing, the static baseline;
- `unet_step`: UNet-step timings and rows; `profile`: op profiles and gap explanations;
- `e2e`: the end-to-end run through the runtime; `suite`: `run_latency`, which ties them together.
"""

from .backends import Step, backend_status
from .model import synthetic_assignment
from .options import ALL_BACKENDS, MIXED_PROMPTS, LatencyOptions
from .profile import fixed_cost_fit, profile_by_op
from .suite import run_latency
from .timing import interleaved, machine_info, summarize

__all__ = [
    "ALL_BACKENDS",
    "MIXED_PROMPTS",
    "LatencyOptions",
    "Step",
    "backend_status",
    "fixed_cost_fit",
    "interleaved",
    "machine_info",
    "profile_by_op",
    "run_latency",
    "summarize",
    "synthetic_assignment",
]
