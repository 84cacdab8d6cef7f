"""Running a UNet under per-sample gates, for one call at a time.

A code is data passed to a call: hooks exist only inside the `apply_gates` context, so a model
never carries a hidden "current code" between calls.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .base import SiteGates
from .layout import GateLayout


@contextmanager
def apply_gates(unet: nn.Module, layout: GateLayout, gates: torch.Tensor | None) -> Iterator[None]:
    """Within the context, `unet`'s forward is masked by `gates`.

    gates: (B, N) per-sample values (soft in [0, 1] while training, hard 0/1 at inference), or
    (N,) for one mask shared by the batch, or None for the dense model. The activation batch
    may be a multiple of B (classifier-free guidance).
    """
    if gates is None:
        yield
        return
    if gates.dim() == 1:
        gates = gates.unsqueeze(0)
    if gates.dim() != 2 or gates.shape[1] != layout.num_gates:
        raise ValueError(f"gates must have shape (B, {layout.num_gates}) for this layout, got {tuple(gates.shape)}")
    kinds = layout.gate_kinds(unet)
    handles = []
    try:
        for site in layout.sites:
            module = unet.get_submodule(site.name)
            handles += kinds[site.kind].install(module, SiteGates(site, gates[:, layout.site_slice(site)]))
        yield
    finally:
        for handle in handles:
            handle.remove()


def unet_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The down, mid and up blocks whose outputs block distillation compares."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    return blocks


@contextmanager
def capture_block_outputs(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects each block's hidden-state output, in order, during the forward inside the context."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(hook) for _, block in unet_blocks(unet)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
