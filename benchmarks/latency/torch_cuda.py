"""A torch step backend for GPU measurement where only PyTorch is installed (benchmarks only).

`torch_cuda_step` runs one UNet (a sliced expert, the static model or the dense UNet) in half
precision on CUDA, optionally replayed from a captured CUDA graph (launch overhead is then paid
once per step, not per kernel, which is what a fixed-shape edge deployment would do). The same
code runs on the CPU in float32 without graphs, so the GPU check's dry run exercises it.

Never imported by `aptp.runtime`: torch is imported inside the functions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .backends import Step, unet_inputs


@dataclass(frozen=True)
class TorchPlacement:
    """Where and how a torch step runs: ``device`` (``"cuda"``/``"cpu"``), ``dtype`` name
    (``"float16"``/``"float32"``) and whether a CUDA graph replays the step."""

    device: str = "cuda"
    dtype: str = "float16"
    cuda_graphs: bool = False

    @classmethod
    def for_device(cls, device: str, cuda_graphs: bool = False) -> TorchPlacement:
        """fp16 (+ graphs if asked) on CUDA; fp32 without graphs on the CPU (fp16 convolutions are
        slow or missing there, and CUDA graphs do not exist)."""
        if device == "cuda":
            return cls("cuda", "float16", cuda_graphs)
        return cls("cpu", "float32", False)

    @property
    def label(self) -> str:
        """What the reports record as the provider that ran."""
        return f"torch {self.device} {self.dtype}" + (" + CUDA graph" if self.cuda_graphs else "")


def torch_cuda_step(unet: Any, shape: Mapping[str, int], placement: TorchPlacement, gates: Any = None,
                    layout: Any = None, *, in_place: bool = False) -> Step:
    """One UNet step of `unet` at `placement`; the module is cast and moved once, here (a copy
    unless `in_place`: the dense UNet is shared by other variants and must stay float32).
    `gates` (one hard mask over `layout`) runs the full UNet masked, as the reference does.

    Inputs live in static buffers allocated per (batch, height, width) by ``prepare``; with
    ``cuda_graphs`` the step is captured after a warm-up on a side stream and each call replays
    it. Every call synchronises the device so the wall time is the step's.
    """
    import torch

    dtype = getattr(torch, placement.dtype)
    device = torch.device(placement.device)
    module = (unet if in_place else copy.deepcopy(unet)).to(device=device).eval()
    if dtype != torch.float32:
        module = module.to(dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    mask = None if gates is None else gates.to(device=device, dtype=dtype)

    def forward(feed: Mapping[str, Any]) -> Any:
        if mask is None:
            return module(feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"],
                          return_dict=False)[0]
        from aptp.train.gates import apply_gates

        with apply_gates(module, layout, mask):
            return module(feed["sample"], feed["timestep"], encoder_hidden_states=feed["encoder_hidden_states"],
                          return_dict=False)[0]

    def prepare(batch: int, height: int, width: int) -> Callable[[], Any]:
        host = unet_inputs(batch, shape["channels"], height, width, shape["text_length"], shape["hidden"])
        feed = {k: torch.from_numpy(v).to(device=device, dtype=dtype) for k, v in host.items()}
        if not placement.cuda_graphs:
            def run() -> Any:
                with torch.inference_mode():
                    out = forward(feed)
                sync()
                return out

            return run
        # Capture after warm-up on a side stream (cuDNN/cuBLAS pick their algorithms there).
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                forward(feed)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            out = forward(feed)

        def replay() -> Any:
            graph.replay()
            sync()
            return out

        return replay

    def close() -> None:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return Step(prepare, close, provider=placement.label)
