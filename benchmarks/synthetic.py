"""Synthetic experts at deployment scale: a real UNet config with random weights, hard masks
searched to given MACs ratios, written as a pruning checkpoint and exported with the real
exporter, so `aptp-bench latency` measures it exactly like a trained export.

Nothing here is trained, so two things are synthetic and labelled so in ``synthetic.json``
(beside the checkpoint, where the latency suite finds it through the manifest):
- the masks: per expert, a keep fraction per gate site from one scalar "pruning strength" times
  a per-kind weight (some experts prune ResNet widths harder, others heads or feed-forward
  units), searched by bisection with `MacsModel` and refined unit by unit to the target ratio;
  which units are kept is a seeded random choice (latency depends only on the counts);
- the routing: the exported router head is random, so the suite assigns a prompt mix to the
  experts deterministically by the recorded shares instead of by the router's argmax (the
  router network itself still runs and is timed).

    aptp-bench make-synthetic --unet-config sd21 --resolution 256 --output artifacts/sd21-256
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from aptp.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "KIND_PROFILES",
    "SYNTHETIC_FILE",
    "MaskSearch",
    "build_synthetic_checkpoint",
    "build_synthetic_pipeline",
    "load_bench_config",
    "make_synthetic",
    "mask_from_fractions",
    "read_synthetic_info",
    "search_mask",
]

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SYNTHETIC_FILE = "synthetic.json"
CODE_BASE = 3.0
ROUTER_EMBED_DIM = 384  # all-MiniLM-L6-v2, the offline router encoder
ROUTER_ENCODER = "all-MiniLM-L6-v2"
# Per-kind pruning weights, cycled over the experts: experts differ in shape, not just in size.
KIND_PROFILES: tuple[dict[str, float], ...] = (
    {"resnet": 1.0, "attention": 1.0, "feedforward": 1.0},
    {"resnet": 1.4, "attention": 0.6, "feedforward": 0.8},
    {"resnet": 0.7, "attention": 1.4, "feedforward": 1.2},
    {"resnet": 0.8, "attention": 0.8, "feedforward": 1.5},
)
UNIFORM_PROFILE = {"resnet": 1.0, "attention": 1.0, "feedforward": 1.0, "depth": 0.0}


def load_bench_config(name: str | os.PathLike) -> dict[str, Any]:
    """A benchmark model config: a name under ``benchmarks/configs`` (``sd21``) or a YAML path."""
    path = Path(name)
    if not path.suffix:
        candidates = [CONFIG_DIR / f"{name}_unet.yaml", CONFIG_DIR / f"{name}.yaml"]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        known = sorted(p.stem.removesuffix("_unet") for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown --unet-config {name!r}: no {path}; known configs: {', '.join(known)} "
                          "(or pass a YAML file path)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    base = (config or {}).pop("extends", None)
    if base is not None:
        # A variant of another config (e.g. sd21 with K=8 experts): top-level sections replace the base's.
        if Path(str(base)).stem == path.stem:
            raise ConfigError(f"benchmark config {path} extends itself")
        config = {**load_bench_config(base), **config}
    for key in ("unet", "text_length", "experts"):
        if key not in (config or {}):
            raise ConfigError(f"benchmark config {path} has no '{key}' section")
    config["path"] = str(path)
    return config


# -- masks ------------------------------------------------------------------------------------


def mask_from_fractions(layout: Any, fractions: Sequence[float], seed: int = 0):
    """A hard (N,) mask keeping ``round(fraction * units)`` units (at least one) of every width
    site; a depth site is kept when its fraction is >= 0.5. Which units: seeded random."""
    import torch

    generator = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros(layout.num_gates, dtype=torch.bool)
    for site, fraction in zip(layout.sites, fractions):
        n = site.num_units
        if site.kind == "depth":
            keep = int(float(fraction) >= 0.5)
        else:
            keep = min(n, max(1, int(round(float(fraction) * n))))
        order = torch.randperm(n, generator=generator)[:keep]
        mask[site.offset + order] = True
    return mask


@dataclass
class MaskSearch:
    """The result of `search_mask`: the mask, its MACs ratio, and how it was found."""

    mask: Any
    ratio: float
    target: float
    strength: float
    profile: dict[str, float]

    @property
    def relative_error(self) -> float:
        return abs(self.ratio - self.target) / self.target


def _fractions(layout: Any, strength: float, profile: Mapping[str, float]) -> list[float]:
    return [min(1.0, max(0.0, 1.0 - strength * float(profile.get(s.kind, 1.0)))) for s in layout.sites]


def search_mask(macs: Any, layout: Any, target: float, profile: Mapping[str, float] | None = None,
                seed: int = 0, tolerance: float = 0.005, iterations: int = 40) -> MaskSearch:
    """A hard mask whose MACs ratio is `target` within `tolerance` (relative) where the unit
    granularity allows.

    Keep fraction of a site = ``1 - strength * profile[kind]``; `strength` is bisected until the
    ratio brackets `target`, then single units are added or removed (the one landing nearest
    the target each time) to close the rounding gap.
    """
    import torch

    profile = dict(UNIFORM_PROFILE if profile is None else profile)
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target MACs ratio must be in (0, 1], got {target}")

    def ratio_of(mask) -> float:
        return float(macs.ratio(mask.float().unsqueeze(0))[0])

    low, high = 0.0, 1.0 / max(1e-6, min(v for v in profile.values() if v > 0))
    best = mask_from_fractions(layout, _fractions(layout, 0.0, profile), seed)
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        mask = mask_from_fractions(layout, _fractions(layout, mid, profile), seed)
        if ratio_of(mask) > target:
            low = mid
        else:
            high = mid
    mask = mask_from_fractions(layout, _fractions(layout, low, profile), seed)  # just above the target
    ratio = ratio_of(mask)
    # Refine: flip the single unit whose change lands closest to the target, while that helps.
    width_gates = torch.tensor([s.kind != "depth" for s in layout.sites])[layout.unit_site]
    for _ in range(layout.num_gates):
        if abs(ratio - target) <= tolerance * target:
            break
        removing = ratio > target
        candidates = torch.nonzero(mask & width_gates if removing else ~mask & width_gates).flatten()
        if removing:  # never empty a site
            counts = torch.zeros(len(layout.sites), dtype=torch.long).index_add_(
                0, layout.unit_site, mask.long())
            candidates = candidates[counts[layout.unit_site[candidates]] > 1]
        if candidates.numel() == 0:
            break
        trial = mask.unsqueeze(0).repeat(candidates.numel(), 1)
        trial[torch.arange(candidates.numel()), candidates] = not removing
        ratios = macs.ratio(trial.float())
        pick = int(torch.argmin((ratios - target).abs()))
        if abs(float(ratios[pick]) - target) >= abs(ratio - target):
            break
        mask, ratio = trial[pick].clone(), float(ratios[pick])
    best = mask
    return MaskSearch(best, ratio, float(target), low, profile)


# -- pipeline and checkpoint --------------------------------------------------------------------


def build_synthetic_pipeline(directory: str | os.PathLike, config: Mapping[str, Any], full_components: bool = False,
                             seed: int = 0) -> Path:
    """A diffusers pipeline with the config's UNet (random weights), a text encoder and VAE with
    the same interfaces (reduced unless `full_components`), and a DDIM scheduler.

    The tokenizer is the offline MiniLM WordPiece tokenizer (no CLIP vocabulary is available
    offline), truncating at the config's text length. Skips the build when `directory` already
    holds a pipeline built from the same config.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from aptp.train.models import tiny_tokenizer

    directory = Path(directory)
    stamp = {"config": config.get("path"), "unet": dict(config["unet"]), "full_components": bool(full_components),
             "seed": int(seed)}
    stamp_file = directory / "aptp_synthetic_pipeline.json"
    if (directory / "model_index.json").is_file() and stamp_file.is_file():
        if json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp)):
            logger.info("reusing the synthetic pipeline in %s", directory)
            return directory
    text_length = int(config["text_length"])
    reduced = config.get("reduced", {}) if not full_components else {}
    text_cfg = {**config.get("text_encoder", {}), **reduced.get("text_encoder", {})}
    vae_cfg = {**config.get("vae", {}), **reduced.get("vae", {})}
    tokenizer = tiny_tokenizer(text_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=int(config["unet"]["cross_attention_dim"]),
            intermediate_size=int(text_cfg.get("intermediate_size", 1024)),
            num_hidden_layers=int(text_cfg.get("num_hidden_layers", 1)),
            num_attention_heads=int(text_cfg.get("num_attention_heads", 16)),
            projection_dim=int(text_cfg.get("projection_dim", 512)),
            max_position_embeddings=text_length,
            hidden_act=text_cfg.get("hidden_act", "gelu"),
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ))
        blocks = list(vae_cfg.get("block_out_channels", [32, 32, 64, 64]))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=tuple(vae_cfg.get("down_block_types", ["DownEncoderBlock2D"] * len(blocks))),
            up_block_types=tuple(vae_cfg.get("up_block_types", ["UpDecoderBlock2D"] * len(blocks))),
            block_out_channels=tuple(blocks), layers_per_block=int(vae_cfg.get("layers_per_block", 1)),
            latent_channels=int(vae_cfg.get("latent_channels", 4)), norm_num_groups=int(vae_cfg.get("norm_num_groups", 32)),
            sample_size=int(config["unet"]["sample_size"]) * 2 ** (len(blocks) - 1),
            scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
        )
    scheduler = DDIMScheduler(**config.get("scheduler", {}))
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory)
    stamp_file.write_text(json.dumps(stamp, indent=2))
    logger.info("wrote a synthetic %s pipeline (random weights, %s components) to %s", config.get("name"),
                "full" if full_components else "reduced", directory)
    return directory


def build_synthetic_checkpoint(directory: str | os.PathLike, pipeline: str | os.PathLike, config: Mapping[str, Any],
                               resolution: int, seed: int = 0, components: Any = None) -> Path:
    """A pruning checkpoint over `pipeline` whose K codes are masks searched to the config's
    target MACs ratios at `resolution`, with a random router head and ``synthetic.json``."""
    import torch

    from aptp.train import checkpoint as ckpt
    from aptp.train.gates import GateLayout
    from aptp.train.macs import DeployShape, MacsModel
    from aptp.train.models import load_components
    from aptp.train.router import RouterHead

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    comps = components or load_components(str(pipeline))
    unet = comps.unet
    factor = comps.vae_scale_factor
    step = factor * 2 ** (len(unet.config.down_block_types) - 1)
    if resolution % step:
        raise ConfigError(f"--resolution {resolution} is not a multiple of {step} (VAE factor {factor} x UNet downsampling)")
    latent = resolution // factor
    text_length = int(config["text_length"])
    layout = GateLayout.from_unet(unet, depth=False)
    macs = MacsModel(unet, layout, DeployShape(latent, latent, text_length))
    targets = [float(t) for t in config["experts"]["targets"]]
    shares = [float(s) for s in config["experts"].get("shares") or [1.0 / len(targets)] * len(targets)]
    if len(shares) != len(targets) or abs(sum(shares) - 1.0) > 1e-6:
        raise ConfigError(f"experts.shares must be {len(targets)} numbers summing to 1, got {shares}")
    searches = [search_mask(macs, layout, t, KIND_PROFILES[k % len(KIND_PROFILES)], seed=seed + k)
                for k, t in enumerate(targets)]
    masks = torch.stack([s.mask for s in searches])
    logits = torch.where(masks, torch.tensor(4.0), torch.tensor(-4.0)) - CODE_BASE
    ratios = [s.ratio for s in searches]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = RouterHead(embed_dim=ROUTER_EMBED_DIM, num_gates=layout.num_gates, hidden_dim=32)
    head.save_pretrained(str(directory / ckpt.ROUTER_HEAD_DIR))
    ckpt.save_layout(directory, layout)
    ckpt.save_codes(directory, logits, masks)
    mixture = sum(r * s for r, s in zip(ratios, shares))
    ckpt.CheckpointInfo(
        pretrained=ckpt.record_pretrained(str(pipeline), directory), num_codes=len(targets), encoder=ROUTER_ENCODER,
        resolution=int(resolution), latent_height=latent, latent_width=latent, text_length=text_length,
        budget_target=float(mixture), code_base=CODE_BASE, dense_macs=macs.dense_macs, code_macs_ratio=ratios,
        code_share=shares, step=0,
    ).save(directory)
    info = {
        "synthetic": True,
        "config": config.get("name"), "config_path": config.get("path"), "source": config.get("source"),
        "weights": "random (seeded); no training",
        "routing": "synthetic: prompts are assigned to experts deterministically in proportion to 'shares'; "
                   "the exported router head is random and its argmax is not used",
        "mask_search": "keep fraction per site = 1 - strength * profile[kind], bisected with MacsModel, then "
                       "refined unit by unit; kept units chosen at random (seeded)",
        "resolution": int(resolution), "targets": targets, "macs_ratio": ratios, "shares": shares,
        "expected_macs_ratio": mixture, "profiles": [s.profile for s in searches],
        "strengths": [s.strength for s in searches], "seed": int(seed),
    }
    (directory / SYNTHETIC_FILE).write_text(json.dumps(info, indent=2))
    for k, s in enumerate(searches):
        logger.info("synthetic expert %d: target %.3f, MACs ratio %.4f (%s)", k, s.target, s.ratio, s.profile)
    return directory


def read_synthetic_info(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """``synthetic.json`` of the checkpoint an export came from, or None for a trained one."""
    path = (manifest.get("checkpoint") or {}).get("path")
    if not path:
        return None
    file = Path(path) / SYNTHETIC_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def make_synthetic(unet_config: str, resolution: int | None, output: str | os.PathLike, *, steps: int = 10,
                   max_batch: int = 4, full_components: bool = False, seed: int = 0,
                   work_dir: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Build pipeline + checkpoint for `unet_config` and export them to `output` with
    `aptp.export.export_checkpoint`; returns the manifest. The pipeline and checkpoint stay in
    `work_dir` (default: beside `output`) because the torch backends and the masked full UNet
    need them."""
    from aptp.export.exporter import ExportOptions, export_checkpoint
    from aptp.train.models import load_components

    from aptp.outputs import EXPORT, SYNTHETIC_WORK, check_output_dir, claim_in_place

    config = load_bench_config(unet_config)
    resolution = int(resolution or config.get("cpu_resolution") or 8 * int(config["unet"]["sample_size"]))
    output = Path(output).expanduser().absolute()
    check_output_dir(output, EXPORT, allow_existing=overwrite)  # refused before the pipeline is built
    work = Path(work_dir).expanduser().absolute() if work_dir else output.parent
    name = output.name
    for folder in (work / f"{name}-pipeline", work / f"{name}-checkpoint"):
        # Rebuilt in place when the settings change: only folders this command made.
        claim_in_place(folder, SYNTHETIC_WORK, allow_existing=True, inputs=[("output", output)])
    pipeline = build_synthetic_pipeline(work / f"{name}-pipeline", config, full_components, seed)
    checkpoint = build_synthetic_checkpoint(work / f"{name}-checkpoint", pipeline, config, resolution, seed,
                                            components=load_components(str(pipeline)))
    options = ExportOptions(resolution=resolution, min_resolution=None, max_resolution=None,
                            max_batch=max_batch, steps=steps)
    return export_checkpoint(checkpoint, output, options, overwrite=overwrite)
