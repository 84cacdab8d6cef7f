"""Analytic MACs against torch's FlopCounterMode on sliced UNets (within 1%)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_unet
from test_gates import random_hard_mask

from aptp.train.gates import GateLayout
from aptp.train.macs import DeployShape, MacsModel, count_flops
from aptp.train.slicing import slice_unet


@pytest.mark.parametrize("shape", [DeployShape(8, 8, 7), DeployShape(16, 12, 11)])
def test_analytic_macs_match_flop_counter(unet_name, shape):
    unet = make_unet(unet_name)
    layout = GateLayout.from_unet(unet, ff_groups=4, depth=True)
    macs = MacsModel(unet, layout, shape)
    dense_counted = count_flops(unet, shape) / 2
    assert abs(macs.dense_macs - dense_counted) / dense_counted < 0.01
    assert abs(macs(torch.ones(layout.num_gates)).item() - dense_counted) / dense_counted < 0.01
    g = torch.Generator().manual_seed(0)
    for keep in (0.25, 0.5, 0.8):
        mask = random_hard_mask(layout, g, keep=keep)
        sliced, _ = slice_unet(unet, layout, mask)
        counted = count_flops(sliced, shape) / 2
        analytic = macs(mask).item()
        assert abs(analytic - counted) / counted < 0.01, f"keep={keep}: analytic {analytic:.0f} vs counted {counted:.0f}"
        assert counted < dense_counted


def test_macs_are_differentiable_and_monotone():
    unet = make_unet("multi_layer")
    layout = GateLayout.from_unet(unet, ff_groups=4)
    macs = MacsModel(unet, layout, DeployShape(8, 8, 7))
    gates = torch.full((3, layout.num_gates), 0.5, requires_grad=True)
    ratio = macs.ratio(gates)
    assert ratio.shape == (3,)
    ratio.sum().backward()
    assert (gates.grad > 0).all(), "every gate should add MACs"
    with torch.no_grad():
        assert macs.ratio(torch.zeros(1, layout.num_gates)).item() < macs.ratio(torch.full((1, layout.num_gates), 0.5)).item() < 1.0


def test_cross_attention_keys_use_text_length():
    unet = make_unet("multi_layer")
    layout = GateLayout.from_unet(unet, ff_groups=4)
    short = MacsModel(unet, layout, DeployShape(8, 8, 4)).dense_macs
    long = MacsModel(unet, layout, DeployShape(8, 8, 64)).dense_macs
    assert long > short
