"""The models the GPU check measures, built in memory from a UNet config with random weights.

Dense UNet, K experts sliced by hard masks searched to the config's MACs targets (per-kind
pruning profiles, as `aptp-bench make-synthetic` does), and one static model sliced by a
uniform mask at the experts' share-weighted MACs (0.60 for SD 2.1's 0.45-0.75 experts). MACs
ratios are analytic (`MacsModel`) at every resolution measured. Nothing is trained or exported:
latency depends on the shapes, not on the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from aptp.errors import ConfigError

from ..synthetic import KIND_PROFILES, load_bench_config, search_mask

__all__ = ["DRY_RUN_CONFIG", "CheckModels", "build_check_models", "build_vae_decoder", "check_config"]

logger = logging.getLogger(__name__)

# Tiny shapes for --dry-run on a CPU: the same block types as SD 2.1 (cross-attention down and
# up blocks, linear projections, heads), a few hundred thousand parameters.
DRY_RUN_CONFIG: dict[str, Any] = {
    "name": "dry-run-tiny",
    "source": "aptp gpu_check --dry-run (tiny SD-like shapes)",
    "resolutions": [64, 128],
    "text_length": 8,
    "unet": {
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 32,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "use_linear_projection": True,
    },
    # Four VAE blocks: factor 8 as in SD, so 64/128 px are 8x8/16x16 latents.
    "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 4, "scaling_factor": 0.18215},
    "scheduler": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                  "steps_offset": 1, "prediction_type": "epsilon"},
    "experts": {"targets": [0.45, 0.55, 0.65, 0.75], "shares": [0.25, 0.25, 0.25, 0.25]},
}


def check_config(name: str, dry_run: bool) -> dict[str, Any]:
    """The model config: the tiny dry-run shapes, or a benchmark config (``sd21``) by name/path."""
    return dict(DRY_RUN_CONFIG) if dry_run else load_bench_config(name)


@dataclass
class CheckModels:
    """Dense, experts and static model (float32, CPU) with their masks and MACs ratios."""

    config: dict[str, Any]
    dense: Any
    layout: Any
    experts: list[Any]
    static: Any
    masks: Any
    static_mask: Any
    shares: list[float]
    vae_factor: int
    macs: dict[int, dict[str, float]] = field(default_factory=dict)  # resolution -> variant -> ratio

    @property
    def shape(self) -> dict[str, int]:
        """What `aptp.benchmarks.latency.backends.unet_inputs` needs."""
        return {"channels": int(self.dense.config.in_channels), "text_length": int(self.config["text_length"]),
                "hidden": int(self.dense.config.cross_attention_dim)}

    def variants(self) -> dict[str, Any]:
        """Name -> module: ``dense``, ``expert_<k>``, ``static``."""
        return {"dense": self.dense, **{f"expert_{k}": m for k, m in enumerate(self.experts)}, "static": self.static}

    def unet_stride(self) -> int:
        return self.vae_factor * 2 ** (len(self.dense.config.down_block_types) - 1)


def build_check_models(config: Mapping[str, Any], resolutions: Sequence[int], seed: int = 0) -> CheckModels:
    """Build the dense UNet (seeded random weights), search the expert masks at the first
    resolution, slice the experts and the static model, and compute MACs ratios at every
    resolution.

    Raises:
        ConfigError: a resolution that is not a multiple of the UNet's stride.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from aptp.train.gates import GateLayout
    from aptp.train.macs import DeployShape, MacsModel
    from aptp.train.slicing import slice_unet

    vae_blocks = len((config.get("vae") or {}).get("block_out_channels", [0, 0, 0, 0]))
    vae_factor = 2 ** (vae_blocks - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dense = UNet2DConditionModel(**config["unet"]).eval()
    stride = vae_factor * 2 ** (len(dense.config.down_block_types) - 1)
    bad = [r for r in resolutions if int(r) % stride]
    if bad:
        raise ConfigError(f"resolutions {bad} are not multiples of {stride} (VAE factor x UNet downsampling)")
    text_length = int(config["text_length"])
    layout = GateLayout.from_unet(dense, depth=False)
    macs_models = {int(r): MacsModel(dense, layout, DeployShape(int(r) // vae_factor, int(r) // vae_factor,
                                                                 text_length)) for r in resolutions}
    search_at = macs_models[int(resolutions[0])]
    targets = [float(t) for t in config["experts"]["targets"]]
    shares = [float(s) for s in config["experts"].get("shares") or [1.0 / len(targets)] * len(targets)]
    searches = [search_mask(search_at, layout, t, KIND_PROFILES[k % len(KIND_PROFILES)], seed=seed + k)
                for k, t in enumerate(targets)]
    masks = torch.stack([s.mask for s in searches])
    mixture = sum(s.ratio * w for s, w in zip(searches, shares))
    static_search = search_mask(search_at, layout, mixture, None, seed=seed)
    experts = [slice_unet(dense, layout, s.mask)[0].eval() for s in searches]
    static = slice_unet(dense, layout, static_search.mask)[0].eval()
    models = CheckModels(config=dict(config), dense=dense, layout=layout, experts=experts, static=static,
                         masks=masks, static_mask=static_search.mask, shares=shares, vae_factor=vae_factor)
    for res, macs in macs_models.items():
        ratios = macs.ratio(torch.cat([masks, static_search.mask.unsqueeze(0)]).float()).tolist()
        models.macs[res] = {"dense": 1.0, **{f"expert_{k}": float(r) for k, r in enumerate(ratios[:-1])},
                            "static": float(ratios[-1])}
        logger.info("MACs ratios at %d px: %s", res, {k: round(v, 4) for k, v in models.macs[res].items()})
    return models


def build_vae_decoder(config: Mapping[str, Any], seed: int = 0) -> Any:
    """The config's AutoencoderKL (random weights); the check uses its decoder only."""
    import torch
    from diffusers import AutoencoderKL

    vae_cfg = dict(config.get("vae") or {})
    blocks = list(vae_cfg.get("block_out_channels", [128, 256, 512, 512]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=tuple(vae_cfg.get("down_block_types", ["DownEncoderBlock2D"] * len(blocks))),
            up_block_types=tuple(vae_cfg.get("up_block_types", ["UpDecoderBlock2D"] * len(blocks))),
            block_out_channels=tuple(blocks), layers_per_block=int(vae_cfg.get("layers_per_block", 1)),
            latent_channels=int(vae_cfg.get("latent_channels", 4)),
            norm_num_groups=int(vae_cfg.get("norm_num_groups", 32)),
            scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
        )
    vae.encoder = None  # decode only: half the memory
    return vae.eval()
