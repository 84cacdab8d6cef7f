"""ResNet width: one gate per GroupNorm group of `norm2`, masked right before `conv2`."""

from __future__ import annotations

from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .base import GateKind, MacsScaling, SiteGates, mask_input_pre_hook, register_gate_kind
from .ops import slice_conv2d, slice_group_norm, slice_linear
from .site import GateSite


@register_gate_kind
class ResnetGroupGate(GateKind):
    kind = "resnet"
    module_types = (ResnetBlock2D,)

    def find_sites(self, name: str, module: ResnetBlock2D) -> list[GateSite]:
        groups = module.norm2.num_groups
        per_group = module.norm2.num_channels // groups
        return [GateSite(name=name, kind=self.kind, unit_sizes=(per_group,) * groups)]

    def install(self, module: ResnetBlock2D, gates: SiteGates):
        # After norm2 and its activation, before conv2: a zeroed group then contributes nothing,
        # exactly as if conv2 never saw those channels.
        return [module.conv2.register_forward_pre_hook(mask_input_pre_hook(gates, channel_dim=1))]

    def slice(self, module: ResnetBlock2D, site: GateSite, kept_units: list[int]) -> nn.Module:
        keep = site.kept_channels(kept_units)
        module.conv1 = slice_conv2d(module.conv1, out_keep=keep)
        if module.time_emb_proj is not None:
            if module.time_embedding_norm == "scale_shift":
                width = module.norm2.num_channels
                module.time_emb_proj = slice_linear(module.time_emb_proj, out_keep=keep + [width + c for c in keep])
            else:
                module.time_emb_proj = slice_linear(module.time_emb_proj, out_keep=keep)
        module.norm2 = slice_group_norm(module.norm2, sorted(kept_units))
        module.conv2 = slice_conv2d(module.conv2, in_keep=keep)
        return module

    def macs_scaling(self, site: GateSite, module: ResnetBlock2D) -> MacsScaling:
        layers = [f"{site.name}.conv1", f"{site.name}.conv2"]
        if module.time_emb_proj is not None:
            layers.append(f"{site.name}.time_emb_proj")
        return MacsScaling(layers=layers)

    def describe(self, module: ResnetBlock2D, site: GateSite, kept_units: list[int]) -> dict:
        return {"groups": len(kept_units), "channels": len(site.kept_channels(kept_units))}
