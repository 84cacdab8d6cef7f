"""Physical removal of channels from the layers a gate site touches.

One function per (layer type, side), in the spirit of Torch-Pruning's per-type pruners. Each
returns a new layer holding copies of the kept slices, on the device and dtype of the old one
(meta tensors included, so structure can be rebuilt without weights).
"""

from __future__ import annotations

import torch
from torch import nn


def _index(tensor: torch.Tensor, dim: int, keep: list[int]) -> torch.Tensor:
    idx = torch.as_tensor(keep, dtype=torch.long, device=tensor.device)
    return tensor.detach().index_select(dim, idx).clone()


def _check(keep: list[int], size: int, what: str) -> None:
    if not keep:
        raise ValueError(f"cannot remove every channel of {what}")
    if min(keep) < 0 or max(keep) >= size:
        raise ValueError(f"channel index out of range for {what} of size {size}: {min(keep)}..{max(keep)}")


def slice_linear(layer: nn.Linear, out_keep: list[int] | None = None, in_keep: list[int] | None = None) -> nn.Linear:
    """Keep rows `out_keep` (output features) and/or columns `in_keep` (input features)."""
    weight, bias = layer.weight, layer.bias
    if out_keep is not None:
        _check(out_keep, layer.out_features, "Linear out_features")
        weight = _index(weight, 0, out_keep)
        bias = _index(bias, 0, out_keep) if bias is not None else None
    if in_keep is not None:
        _check(in_keep, layer.in_features, "Linear in_features")
        weight = _index(weight, 1, in_keep)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    return new


def slice_conv2d(layer: nn.Conv2d, out_keep: list[int] | None = None, in_keep: list[int] | None = None) -> nn.Conv2d:
    """Keep output channels `out_keep` and/or input channels `in_keep` of an ungrouped convolution."""
    if layer.groups != 1:
        raise ValueError("slicing grouped convolutions is not supported")
    weight, bias = layer.weight, layer.bias
    if out_keep is not None:
        _check(out_keep, layer.out_channels, "Conv2d out_channels")
        weight = _index(weight, 0, out_keep)
        bias = _index(bias, 0, out_keep) if bias is not None else None
    if in_keep is not None:
        _check(in_keep, layer.in_channels, "Conv2d in_channels")
        weight = _index(weight, 1, in_keep)
    new = nn.Conv2d(
        weight.shape[1], weight.shape[0], kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
        dilation=layer.dilation, bias=bias is not None, padding_mode=layer.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )
    new.weight = nn.Parameter(weight.detach().clone(), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    return new


def slice_group_norm(layer: nn.GroupNorm, keep_groups: list[int]) -> nn.GroupNorm:
    """Keep whole groups: the statistics of the kept groups are unchanged, so the result is exact."""
    per_group = layer.num_channels // layer.num_groups
    _check(keep_groups, layer.num_groups, "GroupNorm groups")
    channels = [g * per_group + c for g in sorted(keep_groups) for c in range(per_group)]
    new = nn.GroupNorm(len(keep_groups), len(channels), eps=layer.eps, affine=layer.affine,
                       device=layer.weight.device if layer.affine else None,
                       dtype=layer.weight.dtype if layer.affine else None)
    if layer.affine:
        new.weight = nn.Parameter(_index(layer.weight, 0, channels), requires_grad=layer.weight.requires_grad)
        new.bias = nn.Parameter(_index(layer.bias, 0, channels), requires_grad=layer.bias.requires_grad)
    return new
