"""Depth: a keep/skip gate on the last ResNet and the last transformer of each down and up block.

A skipped module becomes an identity. In an up block a ResNet receives cat(hidden, skip); its
identity passes the main (hidden) part through and drops the skip connection.
"""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel, Transformer2DModelOutput
from torch import nn

from .base import GateKind, MacsScaling, SiteGates, register_gate_kind
from .site import GateSite


class SkippedResnet(nn.Module):
    """Stands in for a ResnetBlock2D removed by a depth gate."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        return input_tensor[:, : self.out_channels]


class SkippedTransformer(nn.Module):
    """Stands in for a Transformer2DModel removed by a depth gate."""

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def _depth_candidates(unet: nn.Module) -> dict[int, str]:
    """id(module) -> 'resnet' | 'transformer' for the modules that may be skipped."""
    candidates: dict[int, str] = {}
    for blocks, is_up in ((getattr(unet, "down_blocks", []), False), (getattr(unet, "up_blocks", []), True)):
        for block in blocks:
            resnets = getattr(block, "resnets", None)
            if resnets:
                last = resnets[-1]
                # An identity needs the main input to have the output's width and resolution.
                if isinstance(last, ResnetBlock2D) and not last.up and not last.down:
                    main_ok = last.in_channels > last.out_channels if is_up else last.in_channels == last.out_channels
                    if main_ok:
                        candidates[id(last)] = "resnet"
            attentions = getattr(block, "attentions", None)
            if attentions and isinstance(attentions[-1], Transformer2DModel):
                candidates[id(attentions[-1])] = "transformer"
    return candidates


def _identity(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    if isinstance(module, ResnetBlock2D):
        x = args[0] if args else kwargs["input_tensor"]
        return x[:, : module.out_channels]
    return args[0] if args else kwargs["hidden_states"]


@register_gate_kind
class DepthGate(GateKind):
    kind = "depth"
    module_types = (ResnetBlock2D, Transformer2DModel)
    may_be_empty = True

    def __init__(self, unet: nn.Module | None = None, **options):
        super().__init__(unet, **options)
        self._candidates = _depth_candidates(unet) if unet is not None else {}

    def find_sites(self, name: str, module: nn.Module) -> list[GateSite]:
        if id(module) not in self._candidates:
            return []
        return [GateSite(name=name, kind=self.kind, unit_sizes=(1,))]

    def install(self, module: nn.Module, gates: SiteGates):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output):
            x = _identity(mod, args, kwargs)
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            g = gates.per_unit(x.shape[0]).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            mixed = g * out + (1 - g) * x
            if isinstance(output, tuple):
                return (mixed, *output[1:])
            if isinstance(output, Transformer2DModelOutput):
                return Transformer2DModelOutput(sample=mixed)
            return mixed

        return [module.register_forward_hook(hook, with_kwargs=True)]

    def slice(self, module: nn.Module, site: GateSite, kept_units: list[int]) -> nn.Module:
        if kept_units:
            return module
        if isinstance(module, ResnetBlock2D):
            return SkippedResnet(module.out_channels)
        return SkippedTransformer()

    def macs_scaling(self, site: GateSite, module: nn.Module) -> MacsScaling:
        return MacsScaling(enclosing=site.name)

    def describe(self, module: nn.Module, site: GateSite, kept_units: list[int]) -> dict:
        return {"skipped": not kept_units}
