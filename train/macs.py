"""Analytic MACs of a gated UNet, differentiable in the gate values.

MACs count what `torch.utils.flop_counter.FlopCounterMode` counts (FLOPs = 2 x MACs):
convolutions, linear layers and the two attention matmuls (QK^T and AV). Normalisations and
elementwise ops are left out. Shapes are recorded once, by one forward at batch 1 at the
deployment resolution and text length; after that the count is a closed-form function of the
kept fraction at every site, so the resource loss can differentiate it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gates import GateLayout
from .gates.apply import apply_gates  # noqa: F401  (re-exported convenience for callers)
from diffusers.models.attention_processor import Attention


@dataclass(frozen=True)
class DeployShape:
    """What a MACs count depends on besides the architecture."""

    latent_height: int
    latent_width: int
    text_length: int


def record_layer_macs(unet: nn.Module, shape: DeployShape) -> dict[str, float]:
    """MACs of every Conv2d/Linear (by qualified name) and every attention's matmuls
    (keyed `<attention name>@matmul`) for one sample at `shape`."""
    macs: dict[str, float] = {}
    handles = []

    def conv_hook(name):
        def hook(module: nn.Conv2d, args, output):
            kh, kw = module.kernel_size
            positions = output.shape[2] * output.shape[3]
            macs[name] = macs.get(name, 0.0) + positions * module.out_channels * (module.in_channels // module.groups) * kh * kw
        return hook

    def linear_hook(name):
        def hook(module: nn.Linear, args, output):
            rows = output.numel() // output.shape[-1] // output.shape[0]
            macs[name] = macs.get(name, 0.0) + rows * module.in_features * module.out_features
        return hook

    def attention_hook(name):
        def hook(module: Attention, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            if context is None and len(args) > 1:
                context = args[1]
            lq = x.shape[1] if x.dim() == 3 else x.shape[2] * x.shape[3]
            lk = lq if context is None else context.shape[1]
            # QK^T and AV: each heads * Lq * Lk * head_dim, head_dim * heads = inner_dim.
            key = f"{name}@matmul"
            macs[key] = macs.get(key, 0.0) + 2.0 * lq * lk * module.to_q.out_features
        return hook

    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name)))
        if isinstance(module, Attention):
            handles.append(module.register_forward_hook(attention_hook(name), with_kwargs=True))
    try:
        param = next(unet.parameters())
        config = unet.config
        sample = torch.zeros(1, config.in_channels, shape.latent_height, shape.latent_width, device=param.device, dtype=param.dtype)
        context = torch.zeros(1, shape.text_length, config.cross_attention_dim, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            unet(sample, torch.tensor([1], device=param.device), encoder_hidden_states=context)
    finally:
        for h in handles:
            h.remove()
    return macs


class MacsModel(nn.Module):
    """MACs of the UNet as a function of gate values: macs(gates) = sum_t coef_t * f[a_t] * f[b_t].

    f holds the kept fraction of every site plus a constant 1; each term is one layer (or one
    attention's matmuls) scaled by at most one width site and at most one enclosing depth site.
    """

    def __init__(self, unet: nn.Module, layout: GateLayout, shape: DeployShape):
        super().__init__()
        self.shape = shape
        layer_macs = record_layer_macs(unet, shape)
        kinds = layout.gate_kinds(unet)
        ones = len(layout.sites)
        width_of: dict[str, int] = {}
        enclosing: list[tuple[str, int]] = []
        for i, site in enumerate(layout.sites):
            scaling = kinds[site.kind].macs_scaling(site, unet.get_submodule(site.name))
            for layer in scaling.layers:
                width_of[layer] = i
            for attn in scaling.attention:
                width_of[f"{attn}@matmul"] = i
            if scaling.enclosing is not None:
                enclosing.append((scaling.enclosing + ".", i))
        missing = [k for k in width_of if k not in layer_macs]
        if missing:
            raise ValueError(f"gated layers that never ran in the MACs probe: {missing[:5]}")
        coefs, first, second = [], [], []
        for key, value in layer_macs.items():
            name = key.split("@")[0]
            depth = [i for prefix, i in enclosing if (name + ".").startswith(prefix)]
            coefs.append(value)
            first.append(width_of.get(key, ones))
            second.append(depth[0] if depth else ones)
        self.register_buffer("coefs", torch.tensor(coefs, dtype=torch.float64), persistent=False)
        self.register_buffer("first", torch.tensor(first, dtype=torch.long), persistent=False)
        self.register_buffer("second", torch.tensor(second, dtype=torch.long), persistent=False)
        self.register_buffer("unit_to_site", layout.unit_to_site_fraction.to(torch.float64), persistent=False)
        self.dense_macs = float(sum(coefs))

    def site_fractions(self, gates: torch.Tensor) -> torch.Tensor:
        """(B, S) kept fraction of every site's channels (a depth site: its gate value)."""
        if gates.dim() == 1:
            gates = gates.unsqueeze(0)
        return gates.to(torch.float64) @ self.unit_to_site

    def forward(self, gates: torch.Tensor) -> torch.Tensor:
        """(B,) MACs per sample for (B, N) gate values (soft or hard), float64."""
        f = self.site_fractions(gates)
        f = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)
        return (f[:, self.first] * f[:, self.second]) @ self.coefs

    def ratio(self, gates: torch.Tensor) -> torch.Tensor:
        """(B,) MACs relative to the dense UNet."""
        return self.forward(gates) / self.dense_macs


def count_flops(unet: nn.Module, shape: DeployShape) -> float:
    """FLOPs of one forward at batch 1 by torch's own counter, with the plain attention processor
    (the counter misses scaled_dot_product_attention on CPU)."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    original = getattr(unet, "attn_processors", None)
    unet.set_attn_processor(AttnProcessor())
    try:
        param = next(unet.parameters())
        config = unet.config
        sample = torch.randn(1, config.in_channels, shape.latent_height, shape.latent_width, device=param.device, dtype=param.dtype)
        context = torch.randn(1, shape.text_length, config.cross_attention_dim, device=param.device, dtype=param.dtype)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(sample, torch.tensor([1], device=param.device), encoder_hidden_states=context)
        return float(counter.get_total_flops())
    finally:
        if original:
            unet.set_attn_processor(original)
