"""Gate sites of a diffusers UNet: masking, slicing and MACs, one small class per kind."""

from .apply import apply_gates, capture_block_outputs, unet_blocks
from .base import GATE_KINDS, GateKind, MacsScaling, SiteGates, register_gate_kind
from .depth import SkippedResnet, SkippedTransformer
from .layout import GateLayout
from .site import GateSite

__all__ = [
    "GATE_KINDS",
    "GateKind",
    "GateLayout",
    "GateSite",
    "MacsScaling",
    "SiteGates",
    "SkippedResnet",
    "SkippedTransformer",
    "apply_gates",
    "capture_block_outputs",
    "register_gate_kind",
    "unet_blocks",
]
