"""Feed-forward width: G gates over the inner units, masked before the output linear.

Works for any activation module whose `proj` linear produces the inner units (GELU,
approximate GELU) or twice them as (value, gate) halves (GEGLU, SwiGLU).
"""

from __future__ import annotations

from diffusers.models.attention import FeedForward
from torch import nn

from .base import GateKind, MacsScaling, SiteGates, mask_input_pre_hook, register_gate_kind
from .ops import slice_linear
from .site import GateSite, split_evenly

DEFAULT_FF_GROUPS = 32


def _parts(module: FeedForward) -> tuple[nn.Module, int, nn.Linear]:
    """(activation module, index of the output linear in `net`, output linear)."""
    act = module.net[0]
    for i, layer in enumerate(module.net):
        if i > 0 and isinstance(layer, nn.Linear):
            return act, i, layer
    raise ValueError("FeedForward without an output linear")


def _gated_halves(act: nn.Module, inner: int) -> bool:
    proj = getattr(act, "proj", None)
    if not isinstance(proj, nn.Linear):
        raise ValueError(f"unsupported feed-forward activation {type(act).__name__}: no `proj` linear")
    if proj.out_features == 2 * inner:
        return True
    if proj.out_features == inner:
        return False
    raise ValueError(f"{type(act).__name__}.proj has {proj.out_features} outputs for {inner} inner units")


@register_gate_kind
class FeedForwardGate(GateKind):
    kind = "feedforward"
    module_types = (FeedForward,)

    def __init__(self, unet: nn.Module | None = None, ff_groups: int = DEFAULT_FF_GROUPS, **options):
        super().__init__(unet, ff_groups=ff_groups, **options)
        if ff_groups < 1:
            raise ValueError(f"ff_groups must be >= 1, got {ff_groups}")
        self.ff_groups = ff_groups

    def find_sites(self, name: str, module: FeedForward) -> list[GateSite]:
        _, _, out = _parts(module)
        return [GateSite(name=name, kind=self.kind, unit_sizes=split_evenly(out.in_features, self.ff_groups))]

    def install(self, module: FeedForward, gates: SiteGates):
        _, _, out = _parts(module)
        return [out.register_forward_pre_hook(mask_input_pre_hook(gates, channel_dim=-1))]

    def slice(self, module: FeedForward, site: GateSite, kept_units: list[int]) -> nn.Module:
        act, out_index, out = _parts(module)
        keep = site.kept_channels(kept_units)
        inner = out.in_features
        rows = keep + [inner + c for c in keep] if _gated_halves(act, inner) else keep
        act.proj = slice_linear(act.proj, out_keep=rows)
        module.net[out_index] = slice_linear(out, in_keep=keep)
        return module

    def macs_scaling(self, site: GateSite, module: FeedForward) -> MacsScaling:
        _, out_index, _ = _parts(module)
        return MacsScaling(layers=[f"{site.name}.net.0.proj", f"{site.name}.net.{out_index}"])

    def describe(self, module: FeedForward, site: GateSite, kept_units: list[int]) -> dict:
        return {"groups": len(kept_units), "inner_dim": len(site.kept_channels(kept_units))}
