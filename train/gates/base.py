"""The gate-kind interface and its registry.

A gate kind knows, for one module type, where its gates sit (`find_sites`), how a batch of
per-sample gate values masks the module (`install`), how a hard keep-mask removes the gated
units for real (`slice`), and which layers' MACs scale with the kept fraction (`macs_scaling`).
Keeping the four side by side is what makes the masked model and the sliced model agree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .site import GateSite

GATE_KINDS: dict[str, type["GateKind"]] = {}


def register_gate_kind(cls: type["GateKind"]) -> type["GateKind"]:
    """Class decorator: make a gate kind discoverable by its `kind` name."""
    if not cls.kind or not cls.module_types:
        raise TypeError(f"{cls.__name__} must set `kind` and `module_types`")
    if cls.kind in GATE_KINDS:
        raise ValueError(f"gate kind {cls.kind!r} is registered twice")
    GATE_KINDS[cls.kind] = cls
    return cls


class SiteGates:
    """Per-sample gate values of one site for one forward call.

    The activation batch may be a multiple of the gate batch (classifier-free guidance runs
    [uncond; cond] in one batch), so values are tiled, sample i also gating rows i + k*B.
    """

    def __init__(self, site: GateSite, values: torch.Tensor):
        self.site = site
        self.values = values  # (B, num_units)
        self._sizes = torch.as_tensor(site.unit_sizes, device=values.device)

    def per_unit(self, batch: int) -> torch.Tensor:
        b = self.values.shape[0]
        if batch % b:
            raise ValueError(
                f"activation batch {batch} at {self.site.name} is not a multiple of the gate batch {b}"
            )
        return self.values.repeat(batch // b, 1) if batch != b else self.values

    def per_channel(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, channels) gate value of every gated channel."""
        return torch.repeat_interleave(self.per_unit(batch), self._sizes, dim=1).to(dtype)


@dataclass
class MacsScaling:
    """Which MACs a site's kept fraction multiplies.

    `layers`: qualified names of Linear/Conv2d layers whose MACs scale with the fraction (their
    gated side is either input or output, never both). `attention`: qualified names of Attention
    modules whose QK^T and AV matmuls scale with it. `enclosing`: a module prefix all of whose
    MACs scale with it (depth gates).
    """

    layers: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    enclosing: str | None = None


class GateKind(ABC):
    kind: ClassVar[str] = ""
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    # A site of this kind may end with every gate off (depth gates skip the module).
    may_be_empty: ClassVar[bool] = False

    def __init__(self, unet: nn.Module | None = None, **options):
        self.options = options

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.module_types)

    @abstractmethod
    def find_sites(self, name: str, module: nn.Module) -> list[GateSite]:
        """The gate sites this module offers (offsets are assigned by the layout)."""

    @abstractmethod
    def install(self, module: nn.Module, gates: SiteGates) -> list[RemovableHandle]:
        """Hook the module so its forward applies `gates`; the caller removes the handles."""

    @abstractmethod
    def slice(self, module: nn.Module, site: GateSite, kept_units: list[int]) -> nn.Module:
        """Remove the units not in `kept_units`; returns the module to put in its place."""

    @abstractmethod
    def macs_scaling(self, site: GateSite, module: nn.Module) -> MacsScaling:
        """The MACs that this site's kept fraction multiplies."""

    def describe(self, module: nn.Module, site: GateSite, kept_units: list[int]) -> dict:
        """Widths after slicing, recorded in the arch spec for readers (rebuilding uses the kept units)."""
        return {"kept_channels": len(site.kept_channels(kept_units))}


def make_gate_kinds(unet: nn.Module, options: dict) -> list[GateKind]:
    """One instance of every registered kind enabled by `options` (``kinds`` lists them)."""
    names = options.get("kinds") or list(GATE_KINDS)
    unknown = [n for n in names if n not in GATE_KINDS]
    if unknown:
        raise ValueError(f"unknown gate kinds {unknown}; registered: {sorted(GATE_KINDS)}")
    return [GATE_KINDS[n](unet, **options) for n in names]


PreHook = Callable[[nn.Module, tuple], tuple]


def mask_input_pre_hook(gates: SiteGates, channel_dim: int) -> PreHook:
    """A forward pre-hook multiplying the layer's input channels by the gates.

    `channel_dim` is 1 for (B, C, H, W) convolution inputs and -1 for (B, L, C) linear inputs.
    """

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        mask = gates.per_channel(x.shape[0], x.dtype)
        ones = [1] * (x.dim() - 2)
        mask = mask.view(mask.shape[0], mask.shape[1], *ones) if channel_dim == 1 else mask.view(mask.shape[0], *ones, mask.shape[1])
        return (x * mask, *args[1:])

    return hook
