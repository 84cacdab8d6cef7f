"""Attention heads: one gate per head (self and cross attention), masked before `to_out`."""

from __future__ import annotations

from diffusers.models.attention_processor import Attention
from torch import nn

from .base import GateKind, MacsScaling, SiteGates, mask_input_pre_hook, register_gate_kind
from .ops import slice_linear
from .site import GateSite


@register_gate_kind
class AttentionHeadGate(GateKind):
    kind = "attention"
    module_types = (Attention,)

    def find_sites(self, name: str, module: Attention) -> list[GateSite]:
        if module.to_k is None or getattr(module, "add_k_proj", None) is not None:
            return []  # joint/added-KV attention is not an SD-style site
        if module.inner_kv_dim != module.inner_dim:
            return []  # grouped-query attention: heads are not independent
        head_dim = module.inner_dim // module.heads
        return [GateSite(name=name, kind=self.kind, unit_sizes=(head_dim,) * module.heads)]

    def install(self, module: Attention, gates: SiteGates):
        # The processor hands to_out[0] the heads concatenated head-major: (B, L, heads*dim).
        return [module.to_out[0].register_forward_pre_hook(mask_input_pre_hook(gates, channel_dim=-1))]

    def slice(self, module: Attention, site: GateSite, kept_units: list[int]) -> nn.Module:
        keep = site.kept_channels(kept_units)
        module.to_q = slice_linear(module.to_q, out_keep=keep)
        module.to_k = slice_linear(module.to_k, out_keep=keep)
        module.to_v = slice_linear(module.to_v, out_keep=keep)
        module.to_out[0] = slice_linear(module.to_out[0], in_keep=keep)
        module.heads = len(kept_units)
        module.inner_dim = module.inner_kv_dim = len(keep)
        return module

    def macs_scaling(self, site: GateSite, module: Attention) -> MacsScaling:
        layers = [f"{site.name}.{child}" for child in ("to_q", "to_k", "to_v", "to_out.0")]
        return MacsScaling(layers=layers, attention=[site.name])

    def describe(self, module: Attention, site: GateSite, kept_units: list[int]) -> dict:
        return {"heads": len(kept_units), "inner_dim": len(site.kept_channels(kept_units))}
