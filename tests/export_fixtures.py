"""Small pruning checkpoints for the export and runtime tests, built without training.

A checkpoint is assembled from the same pieces `aptp-train prune` uses: the tiny pipeline, a
gate layout, K random codes whose hard masks prune different amounts (so the experts' MACs
differ), a randomly initialised router head, experts sliced with `slice_unet` and saved with
`save_expert`, then ``checkpoint.json`` written last. Everything is seeded.

    pipeline = build_tiny_pipeline(tmp / "tiny")          # once per test session
    checkpoint = build_tiny_checkpoint(tmp / "ckpt", pipeline)
    export_checkpoint(checkpoint, tmp / "export")          # or: aptp-export --checkpoint ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Offsets of the code logits: about 84% and 38% of the gates kept, so the two experts differ.
DEFAULT_KEEP_OFFSETS = (1.0, -0.3)
CODE_BASE = 3.0
ENCODER = "all-MiniLM-L6-v2"
MINILM_DIM = 384


def build_tiny_pipeline(directory: str | os.PathLike) -> Path:
    """The ``tiny`` diffusers pipeline (64 px, 16x16 latents, 32 tokens) at `directory`."""
    from aptp.train.models import build_tiny_pipeline as _build

    directory = Path(directory)
    if not (directory / "model_index.json").is_file():
        _build(directory)
    return directory


def build_tiny_checkpoint(
    directory: str | os.PathLike,
    pipeline: str | os.PathLike,
    keep_offsets: Sequence[float] = DEFAULT_KEEP_OFFSETS,
    seed: int = 0,
    shares: Sequence[float] | None = None,
    write_experts: bool = True,
) -> Path:
    """A complete pruning checkpoint with ``len(keep_offsets)`` codes over the tiny pipeline.

    Args:
        directory: where to write it (created).
        pipeline: a tiny pipeline directory (`build_tiny_pipeline`).
        keep_offsets: one per code; higher keeps more gates.
        seed: seeds codes and router head.
        shares: the prompt share per code recorded in checkpoint.json (default: uniform).
        write_experts: write ``experts/expert_<k>`` (else the exporter slices them itself).
    """
    from aptp.train import checkpoint as ckpt
    from aptp.train.codes import hard_gates
    from aptp.train.experts import save_expert
    from aptp.train.gates import GateLayout
    from aptp.train.macs import DeployShape, MacsModel
    from aptp.train.models import load_components
    from aptp.train.router import RouterHead
    from aptp.train.slicing import slice_unet

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    components = load_components(str(pipeline))
    unet = components.unet
    layout = GateLayout.from_unet(unet, ff_groups=8, depth=False)
    generator = torch.Generator().manual_seed(seed)
    num_codes = len(keep_offsets)
    offsets = torch.tensor(list(keep_offsets), dtype=torch.float32)[:, None]
    logits = torch.randn(num_codes, layout.num_gates, generator=generator) + offsets - CODE_BASE
    masks = hard_gates(logits, CODE_BASE, layout.unit_site, layout.site_nonempty)

    factor = components.vae_scale_factor
    resolution = int(unet.config.sample_size) * factor
    shape = DeployShape(int(unet.config.sample_size), int(unet.config.sample_size), components.text_length)
    macs = MacsModel(unet, layout, shape)
    ratios = [float(r) for r in macs.ratio(masks.float())]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = RouterHead(embed_dim=MINILM_DIM, num_gates=layout.num_gates, hidden_dim=32)
    head.save_pretrained(str(directory / ckpt.ROUTER_HEAD_DIR))
    ckpt.save_layout(directory, layout)
    ckpt.save_codes(directory, logits, masks)
    if write_experts:
        for code in range(num_codes):
            sliced, spec = slice_unet(unet, layout, masks[code])
            save_expert(ckpt.expert_dir(directory, code), sliced, spec, unet.config,
                        info={"code": code, "macs_ratio": ratios[code], "finetuned": False})
    share = list(shares) if shares is not None else [1.0 / num_codes] * num_codes
    ckpt.CheckpointInfo(
        pretrained=str(pipeline), num_codes=num_codes, encoder=ENCODER, resolution=resolution,
        latent_height=shape.latent_height, latent_width=shape.latent_width, text_length=shape.text_length,
        budget_target=0.6, code_base=CODE_BASE, dense_macs=macs.dense_macs, code_macs_ratio=ratios,
        code_share=share, step=0,
    ).save(directory)
    return directory
