"""The gate layout of a UNet: every site, in one fixed traversal order, as one flat gate vector."""

from __future__ import annotations

from functools import cached_property

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from . import attention, depth, feedforward, resnet  # noqa: F401  (register the kinds)
from .base import GATE_KINDS, GateKind, make_gate_kinds
from .site import GateSite


class GateLayout(ConfigMixin):
    """All gate sites of a UNet and where each one's gates sit in the flat vector.

    Built by walking the model (`GateLayout.from_unet`), saved as JSON with the checkpoint
    (`save_config`/`from_config`), so codes, masks and arch specs always refer to the same order.
    """

    config_name = "gate_layout.json"

    @register_to_config
    def __init__(self, sites: list[dict], ff_groups: int = feedforward.DEFAULT_FF_GROUPS, depth: bool = True):
        parsed = [GateSite.from_dict(s) for s in sites]
        offset = 0
        for site in parsed:
            if site.offset != offset:
                raise ValueError(f"gate site {site.name} ({site.kind}) has offset {site.offset}, expected {offset}")
            offset += site.num_units
        self.sites: list[GateSite] = parsed
        self.num_gates = offset

    @classmethod
    def from_unet(cls, unet: nn.Module, ff_groups: int = feedforward.DEFAULT_FF_GROUPS, depth: bool = True) -> "GateLayout":
        kinds = make_gate_kinds(unet, cls._kind_options(ff_groups, depth))
        sites: list[dict] = []
        offset = 0
        for name, module in unet.named_modules():
            for kind in kinds:
                if kind.matches(module):
                    for site in kind.find_sites(name, module):
                        sites.append(GateSite(site.name, site.kind, site.unit_sizes, offset).to_dict())
                        offset += site.num_units
        if not sites:
            raise ValueError(f"no gate site found in {type(unet).__name__}: is it a diffusers UNet2DConditionModel?")
        return cls(sites=sites, ff_groups=ff_groups, depth=depth)

    @staticmethod
    def _kind_options(ff_groups: int, depth: bool) -> dict:
        kinds = [k for k in GATE_KINDS if depth or k != "depth"]
        return {"kinds": kinds, "ff_groups": ff_groups}

    def gate_kinds(self, unet: nn.Module) -> dict[str, GateKind]:
        """Instances of the kinds this layout uses, bound to `unet` (depth needs its structure)."""
        return {k.kind: k for k in make_gate_kinds(unet, self._kind_options(self.config.ff_groups, self.config.depth))}

    # Tensors describing the flat vector, used by codes, router and MACs.
    @cached_property
    def unit_site(self) -> torch.Tensor:
        """(N,) site index of each gate."""
        return torch.cat([torch.full((s.num_units,), i, dtype=torch.long) for i, s in enumerate(self.sites)])

    @cached_property
    def unit_weights(self) -> torch.Tensor:
        """(N,) 1/sqrt(gates in the site): every site weighs the same in a cosine similarity."""
        return torch.cat([torch.full((s.num_units,), s.num_units ** -0.5) for s in self.sites])

    @cached_property
    def site_nonempty(self) -> torch.Tensor:
        """(S,) whether a site must keep at least one gate on (all but depth gates)."""
        return torch.tensor([not GATE_KINDS[s.kind].may_be_empty for s in self.sites])

    @cached_property
    def unit_to_site_fraction(self) -> torch.Tensor:
        """(N, S) matrix: gates @ it = kept fraction of every site's channels."""
        m = torch.zeros(self.num_gates, len(self.sites))
        for i, s in enumerate(self.sites):
            m[s.offset : s.offset + s.num_units, i] = torch.tensor(s.unit_sizes, dtype=torch.float) / s.channels
        return m

    def site_slice(self, site: GateSite) -> slice:
        return slice(site.offset, site.offset + site.num_units)

    def kept_units(self, hard_gates: torch.Tensor) -> list[list[int]]:
        """Per site, the indices of the units a hard (N,) 0/1 mask keeps."""
        hard_gates = torch.as_tensor(hard_gates).flatten()
        if hard_gates.numel() != self.num_gates:
            raise ValueError(f"mask has {hard_gates.numel()} gates, layout has {self.num_gates}")
        return [torch.nonzero(hard_gates[self.site_slice(s)] > 0.5).flatten().tolist() for s in self.sites]

    def summary(self) -> dict[str, int]:
        """Number of sites per kind."""
        out: dict[str, int] = {}
        for s in self.sites:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out
