"""End-to-end throughput in torch for the GPU check: routed experts vs dense vs static.

One request = N mixed prompts: initial noise per prompt, classifier-free guidance (2 rows per
prompt per UNet call), a DDIM loop of S steps and the VAE decoder, all on the device. Routed:
prompts are assigned to experts in proportion to the shares (`synthetic_assignment`, since the
weights are random there is nothing for a router to read), grouped per expert, and each group
runs in chunks of at most ``max_batch`` prompts on its expert; dense and static run every prompt
on one model in the same chunks. Text states are fixed random tensors: the text encoder runs
once per request whatever the UNet, so it is left out of all three alike (said in the report).
The three variants are interleaved round-robin (`latency.timing.interleaved`).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .models import CheckModels
from ..latency.model import synthetic_assignment
from ..latency.options import MIXED_PROMPTS
from ..latency.timing import interleaved, summarize
from ..latency.torch_cuda import TorchPlacement

__all__ = ["run_end_to_end"]

logger = logging.getLogger(__name__)


def _prompts(count: int) -> list[str]:
    # Distinct texts (the assignment hashes them) cycling over the mixed prompt set.
    return [f"{MIXED_PROMPTS[i % len(MIXED_PROMPTS)]} #{i}" for i in range(count)]


class _Generator:
    """Runs one request on a mapping prompt -> module, timing denoise and decode."""

    def __init__(self, models: CheckModels, modules: Mapping[str, Any], vae: Any, placement: TorchPlacement,
                 resolution: int, steps: int, guidance: float, max_batch: int):
        import torch
        from diffusers import DDIMScheduler

        self.torch = torch
        self.device = torch.device(placement.device)
        self.dtype = getattr(torch, placement.dtype)
        self.modules = modules
        self.vae = vae
        self.latent = resolution // models.vae_factor
        self.channels = models.shape["channels"]
        self.scheduler = DDIMScheduler(**dict(models.config.get("scheduler") or {}))
        self.scheduler.set_timesteps(steps)
        self.guidance = float(guidance)
        self.max_batch = int(max_batch)
        gen = torch.Generator().manual_seed(1)
        shape = (1, models.shape["text_length"], models.shape["hidden"])
        self.uncond = torch.randn(shape, generator=gen).to(self.device, self.dtype)
        self.cond_pool = torch.randn((64, *shape[1:]), generator=gen).to(self.device, self.dtype)
        self.stages: dict[str, list[float]] = {"denoise": [], "decode": []}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def __call__(self, plan: Sequence[tuple[str, np.ndarray]], count: int) -> None:
        torch = self.torch
        denoise = decode = 0.0
        with torch.inference_mode():
            for name, rows in plan:
                unet = self.modules[name]
                for start in range(0, len(rows), self.max_batch):
                    chunk = rows[start:start + self.max_batch]
                    clock = time.perf_counter()
                    gen = torch.Generator().manual_seed(int(chunk[0]))
                    x = torch.randn((len(chunk), self.channels, self.latent, self.latent), generator=gen)
                    x = (x * self.scheduler.init_noise_sigma).to(self.device, self.dtype)
                    cond = self.cond_pool[torch.as_tensor(chunk % len(self.cond_pool))]
                    text = torch.cat([self.uncond.expand(len(chunk), -1, -1), cond])
                    for t in self.scheduler.timesteps:
                        eps = unet(torch.cat([x, x]), t.to(self.device), encoder_hidden_states=text,
                                   return_dict=False)[0]
                        uncond, cond_eps = eps.chunk(2)
                        guided = uncond + self.guidance * (cond_eps - uncond)
                        x = self.scheduler.step(guided, t, x, return_dict=False)[0]
                    self._sync()
                    middle = time.perf_counter()
                    image = self.vae.decode(x / self.vae.config.scaling_factor, return_dict=False)[0]
                    (image.clamp(-1, 1) * 127.5 + 127.5).to(torch.uint8)
                    self._sync()
                    denoise += middle - clock
                    decode += time.perf_counter() - middle
        self.stages["denoise"].append(denoise)
        self.stages["decode"].append(decode)


def run_end_to_end(models: CheckModels, placement: TorchPlacement, prompt_counts: Sequence[int], resolution: int,
                   steps: int, guidance: float, max_batch: int, repeats: int,
                   time_left: Callable[[], float] = lambda: float("inf")) -> list[dict[str, Any]]:
    """Rows per (prompt count, variant): median seconds per request, images/s, speed vs dense,
    MACs ratio, per-expert grouping, and the stage split. Skips prompt counts once `time_left`
    says the budget is spent (recorded as a row with ``skipped``)."""
    import torch

    from .models import build_vae_decoder

    dtype = getattr(torch, placement.dtype)
    device = torch.device(placement.device)
    def place(module: Any) -> Any:
        module = module.to(device=device)
        return module.to(dtype=dtype) if dtype != torch.float32 else module

    modules = {name: place(copy.deepcopy(m)).eval() for name, m in models.variants().items()}
    vae = place(build_vae_decoder(models.config))
    ratios = models.macs[resolution]
    rows: list[dict[str, Any]] = []
    try:
        for count in prompt_counts:
            if time_left() <= 0:
                rows.append({"prompts": int(count), "skipped": "time budget spent"})
                continue
            prompts = _prompts(int(count))
            codes = synthetic_assignment(prompts, models.shares)
            order = np.arange(len(prompts))
            routed_plan = [(f"expert_{k}", order[codes == k]) for k in range(len(models.experts))
                           if (codes == k).any()]
            plans = {"routed": routed_plan, "dense": [("dense", order)], "static": [("static", order)]}
            gens = {name: _Generator(models, modules, vae, placement, resolution, steps, guidance, max_batch)
                    for name in plans}
            calls = {name: (lambda name=name: gens[name](plans[name], len(prompts))) for name in plans}
            samples = interleaved(calls, repeats, warmup=1)
            dense_median = statistics.median(samples["dense"])
            static_median = statistics.median(samples["static"])
            expected = float(np.mean([ratios[f"expert_{c}"] for c in codes.tolist()]))
            for name, values in samples.items():
                stats = summarize(values)
                stages = {k: statistics.median(v[1:] or v) for k, v in gens[name].stages.items()}
                row = {"prompts": len(prompts), "variant": name, "provider": placement.label,
                       "resolution": resolution, "steps": int(steps), "guidance_scale": float(guidance),
                       "max_batch_prompts": int(max_batch), **stats,
                       "images_per_s": len(prompts) / stats["median_s"],
                       "speed_vs_dense": dense_median / stats["median_s"],
                       "speed_vs_static": static_median / stats["median_s"],
                       "macs_ratio": expected if name == "routed" else ratios[name],
                       "stages_median_s": stages}
                if name == "routed":
                    row["assignment"] = np.bincount(codes, minlength=len(models.experts)).tolist()
                    row["unet_calls_per_step"] = sum(-(-len(r) // max_batch) for _, r in routed_plan)
                else:
                    row["unet_calls_per_step"] = -(-len(prompts) // max_batch)
                rows.append(row)
    finally:
        del modules, vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
