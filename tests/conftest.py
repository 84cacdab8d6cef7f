"""Shared fixtures: small SD-shaped UNets built from diffusers configs (no download)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Two structurally different UNets, so nothing passes by fitting one config.
UNET_CONFIGS = {
    # SD 2.1-like: linear projections, two transformer layers per block, GEGLU feed-forward.
    "multi_layer": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, use_linear_projection=True,
        transformer_layers_per_block=2,
    ),
    # SD 1.x-like: convolutional projections, one layer per block, other head counts.
    "single_layer": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 2, 8), use_linear_projection=False,
    ),
}


def make_unet(name: str, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIGS[name])
    # Random (not zero-initialised) output layers, so masking differences cannot hide.
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    return unet.eval()


@pytest.fixture(params=sorted(UNET_CONFIGS))
def unet_name(request) -> str:
    return request.param
