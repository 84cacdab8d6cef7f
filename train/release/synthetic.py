"""A synthetic release in exactly the authors' layout and file formats (tests, rehearsals).

`write_release` writes ``hypernet/``, ``quantizer/`` and ``arch<k>/checkpoint-<step>/`` for a
base UNet: diffusers-style configs with the authors' class names, safetensors with their key
names, ``arch_vector.pt`` saved as they save it (``torch.save`` of a row view of
``embedding_gs``), and every expert sliced from *perturbed* base weights by the authors'
pruning rules, implemented here on the state dict (independently of aptp's module slicing, so
an import checked against aptp's masked model tests both). `write_mpnet` writes a small
MPNet-shaped prompt encoder with random weights and a WordPiece tokenizer.

Nothing here is a model of anything: weights are random or perturbed, meant to exercise shapes,
keys and routing rules.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .layout import AUTHORS_BLOCK_NAMES, AuthorsLayout

__all__ = ["SD21_UNET_CONFIG", "SyntheticRelease", "code_vectors", "hypernet_weights", "perturbed_state", "slice_state_like_authors", "write_mpnet",
           "write_release"]

#: stabilityai/stable-diffusion-2-1 unet/config.json (the sizes; other keys take diffusers' defaults).
SD21_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True, "use_linear_projection": True,
}

_WORDS = ("a photo of the an in on with cat dog horse red blue green city night street portrait painting "
          "old young man woman tree river mountain sea sky house car bird flower table chair light dark "
          "watercolor oil sketch close up view small large bright quiet busy harbour astronaut riding").split()


def write_mpnet(directory: str | os.PathLike, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A small MPNet encoder (random weights, `save_pretrained`) and its fast tokenizer."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?-'")
    vocab = specials + list(dict.fromkeys(_WORDS)) + letters + [f"##{c}" for c in letters]
    tokenizer = MPNetTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=128)
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=130, pad_token_id=1)
    model = MPNetModel(config).eval()
    model.save_pretrained(str(directory))
    return directory


def code_vectors(layout: AuthorsLayout, num_codes: int, seed: int = 0) -> Tensor:
    """(K, D) soft codes like the authors' ``embedding_gs``: code 0 keeps everything, code 1
    has every depth gate off, the others keep random 55-90% of each group; every width group
    keeps at least one entry (their non-zero fix at training time)."""
    generator = torch.Generator().manual_seed(seed)
    codes = []
    for code in range(num_codes):
        keep_frac = 1.0 if code == 0 else 0.55 + 0.35 * torch.rand((), generator=generator).item()
        parts = []
        for width in layout.width_groups:
            keep = torch.rand(width, generator=generator) < keep_frac
            keep[torch.randint(width, (1,), generator=generator)] = True
            soft = torch.where(keep, 0.5 + 0.5 * torch.rand(width, generator=generator),
                               0.5 * torch.rand(width, generator=generator))
            parts.append(soft.clamp(1e-4, 1 - 1e-4))
        depth_keep = torch.rand(layout.num_depth, generator=generator) < (0.7 if code > 1 else 1.0)
        if code == 1:
            depth_keep[:] = False
        parts.append(torch.where(depth_keep, 0.5 + 0.5 * torch.rand(layout.num_depth, generator=generator),
                                 0.5 * torch.rand(layout.num_depth, generator=generator)).clamp(1e-4, 1 - 1e-4))
        codes.append(torch.cat(parts))
    return torch.stack(codes).float()


def perturbed_state(base_state: dict[str, Tensor], code: int, scale: float = 0.02) -> dict[str, Tensor]:
    """Base weights plus ``scale`` x each tensor's std of noise, seeded by the code (reproducible)."""
    generator = torch.Generator().manual_seed(1000 + code)
    out = {}
    for key in sorted(base_state):
        value = base_state[key].float()
        std = float(value.std()) if value.numel() > 1 else 1.0
        out[key] = value + scale * (std or 1.0) * torch.randn(value.shape, generator=generator)
    return out


def _rows(state: dict[str, Tensor], key: str, keep: Tensor) -> None:
    if key in state:
        state[key] = state[key][keep].contiguous()


def _cols(state: dict[str, Tensor], key: str, keep: Tensor) -> None:
    if key in state:
        state[key] = state[key][:, keep].contiguous()


def slice_state_like_authors(state: dict[str, Tensor], layout: AuthorsLayout, vector: Tensor) -> dict[str, Tensor]:
    """The state dict the authors' ``prune()`` leaves for one arch vector (D,) (see `layout`)."""
    state = dict(state)
    hard = vector >= 0.5
    offset, depth_index = 0, layout.num_width
    for module in layout.modules:
        for (site, kind), width in zip(module.width_sites, module.widths):
            keep = hard[offset: offset + width]
            offset += width
            if kind == "resnet":
                channels = state[f"{site}.conv1.weight"].shape[0]
                ch = torch.repeat_interleave(keep, channels // width)
                for key in ("conv1.weight", "conv1.bias", "time_emb_proj.weight", "time_emb_proj.bias",
                            "norm2.weight", "norm2.bias"):
                    _rows(state, f"{site}.{key}", ch)
                _cols(state, f"{site}.conv2.weight", ch)
            elif kind == "attention":
                inner = state[f"{site}.to_q.weight"].shape[0]
                ch = torch.repeat_interleave(keep, inner // width)
                for proj in ("to_q", "to_k", "to_v"):
                    _rows(state, f"{site}.{proj}.weight", ch)
                    _rows(state, f"{site}.{proj}.bias", ch)
                _cols(state, f"{site}.to_out.0.weight", ch)
            else:  # feed-forward: GEGLU proj holds (value, gate) halves
                inner = state[f"{site}.net.2.weight"].shape[1]
                ch = torch.repeat_interleave(keep, inner // width)
                both = torch.cat([ch, ch])
                _rows(state, f"{site}.net.0.proj.weight", both)
                _rows(state, f"{site}.net.0.proj.bias", both)
                _cols(state, f"{site}.net.2.weight", ch)
        if module.depth:
            if not bool(hard[depth_index]):
                prefix = module.name + "."
                state = {k: v for k, v in state.items() if not k.startswith(prefix)}
            depth_index += 1
    return state


def hypernet_weights(layout: AuthorsLayout, codes: Tensor, input_dim: int, seed: int = 0) -> dict[str, Tensor]:
    """Heads that map K random orthonormal directions of the embedding space to the K codes'
    keep patterns (plus noise), so that different prompts pick different experts."""
    generator = torch.Generator().manual_seed(seed)
    k = codes.shape[0]
    directions, _ = torch.linalg.qr(torch.randn(input_dim, k, generator=generator))  # (E, K)
    pattern = (codes >= 0.5).float() * 2 - 1  # (K, D)
    weight = 4.0 * pattern.T @ directions.T / max(1.0, (input_dim / 32) ** 0.5)
    weight = weight + 0.3 * torch.randn(weight.shape, generator=generator) / input_dim ** 0.5
    bias = -3.0 + 0.3 * torch.randn(weight.shape[0], generator=generator)
    heads = layout.width_groups + [layout.num_depth]
    out, start = {}, 0
    for i, width in enumerate(heads):
        out[f"mh_fc.{i}.weight"] = weight[start: start + width].contiguous()
        out[f"mh_fc.{i}.bias"] = bias[start: start + width].contiguous()
        start += width
    return out


def _authors_unet_config(base_config: dict, ff_gate_width: int) -> dict:
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(base_config).items()
              if not k.startswith("_")}
    config["down_block_types"] = [AUTHORS_BLOCK_NAMES[t] for t in config["down_block_types"]]
    config["up_block_types"] = [AUTHORS_BLOCK_NAMES[t] for t in config["up_block_types"]]
    config["mid_block_type"] = AUTHORS_BLOCK_NAMES[config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"]
    config["gated_ff"] = True
    config["ff_gate_width"] = ff_gate_width
    return {"_class_name": "UNet2DConditionModelPruned", "_diffusers_version": "0.23.1", **config}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


@dataclass
class SyntheticRelease:
    path: Path
    layout: AuthorsLayout
    codes: Tensor  # (K, D) embedding_gs
    hypernet: dict[str, Tensor]
    steps: list[int]


def write_release(directory: str | os.PathLike, unet: nn.Module, input_dim: int, num_codes: int = 4,
                  seed: int = 0, codes: Tensor | None = None, hypernet: dict[str, Tensor] | None = None,
                  depth_order: list[int] | None = None, perturb: float = 0.02) -> SyntheticRelease:
    """Write a set for `unet` (its weights are the base the experts are perturbed from)."""
    directory = Path(directory)
    layout = AuthorsLayout(unet, ff_gate_width=32)
    structure = layout.structure()
    codes = code_vectors(layout, num_codes, seed) if codes is None else codes.float()
    hypernet = hypernet_weights(layout, codes, input_dim, seed + 1) if hypernet is None else hypernet
    nd = layout.num_depth
    if depth_order is None:  # the released configs' pattern: [-1, -2, 0, 1, -3, -4, 2, 3, ...]
        depth_order, neg, pos = [], -1, 0
        while len(depth_order) < nd:
            for _ in range(2):
                if len(depth_order) < nd:
                    depth_order.append(neg)
                    neg -= 1
            for _ in range(2):
                if len(depth_order) < nd:
                    depth_order.append(pos)
                    pos += 1
    _write_json(directory / "hypernet" / "config.json", {
        "_class_name": "HyperStructure", "_diffusers_version": "0.23.1", "input_dim": int(input_dim),
        "linear_bias": True, "single_arch_param": False, "structure": structure, "wn_flag": False})
    save_file({k: v.contiguous() for k, v in hypernet.items()},
              str(directory / "hypernet" / "diffusion_pytorch_model.safetensors"))
    _write_json(directory / "quantizer" / "config.json", {
        "_class_name": "StructureVectorQuantizer", "_diffusers_version": "0.23.1", "base": 3, "beta": 0.25,
        "depth_order": depth_order, "n_e": int(num_codes), "non_zero_width": True, "optimal_transport": True,
        "remap": None, "resource_aware_normalization": False, "sane_index_shape": True,
        "sinkhorn_epsilon": 0.05, "sinkhorn_iterations": 3, "structure": structure, "temperature": 0.4,
        "unknown_index": "random"})
    generator = torch.Generator().manual_seed(seed + 2)
    embedding = nn.Parameter(codes.clone(), requires_grad=False)  # embedding_gs is a Parameter in their model
    save_file({"embedding.weight": torch.randn(codes.shape, generator=generator), "embedding_gs": codes.clone()},
              str(directory / "quantizer" / "diffusion_pytorch_model.safetensors"))
    base_state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    config = _authors_unet_config(unet.config, layout.ff_gate_width)
    steps = []
    for code in range(num_codes):
        step = 500 * (code + 1)
        steps.append(step)
        folder = directory / f"arch{code}" / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        # As their trainer: a row view (whole [K, D] storage in the file).
        torch.save(embedding[code].detach().unsqueeze(0), folder / "arch_vector.pt")
        sliced = slice_state_like_authors(perturbed_state(base_state, code, perturb), layout, codes[code])
        _write_json(folder / "unet" / "config.json", config)
        save_file({k: v.contiguous() for k, v in sliced.items()},
                  str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    return SyntheticRelease(path=directory, layout=layout, codes=codes, hypernet=hypernet, steps=steps)
