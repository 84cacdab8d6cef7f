"""Strict reading of one released APTP set: hypernet, quantizer and the expert folders.

Layout of a set directory (as the authors' trainer writes it and the Hub holds it)::

    hypernet/config.json                     HyperStructure config (structure, input_dim, ...)
    hypernet/diffusion_pytorch_model.safetensors   mh_fc.<i>.weight [w_i, E] (+ .bias)
    quantizer/config.json                    StructureVectorQuantizer config (n_e = K, base, ...)
    quantizer/diffusion_pytorch_model.safetensors  embedding.weight, embedding_gs [K, D]
    arch<k>/checkpoint-<step>/arch_vector.pt        torch.save of embedding_gs[k] as [1, D]
    arch<k>/checkpoint-<step>/unet/config.json      the authors' gated UNet config (unpruned sizes)
    arch<k>/checkpoint-<step>/unet/diffusion_pytorch_model.safetensors  the sliced expert

Everything is checked here, before anything is written: every key and shape, K across the
three places, ``arch_vector == embedding_gs[k]``. A problem is one `ArtifactError` line.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aptp.errors import ArtifactError

from ..checkpoint import read_tensors
from .layout import AUTHORS_BLOCK_NAMES, AuthorsLayout

__all__ = ["ReleaseExpert", "ReleaseRouter", "ReleaseSet", "read_release", "read_arch_vector"]

WEIGHTS = "diffusion_pytorch_model.safetensors"
_ARCH_DIR = re.compile(r"^arch(\d+)$")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# UNet config keys that fix the sizes: an expert's config must repeat the base's.
_SIZE_KEYS = ("block_out_channels", "layers_per_block", "attention_head_dim", "num_attention_heads",
              "cross_attention_dim", "norm_num_groups", "in_channels", "out_channels",
              "transformer_layers_per_block", "use_linear_projection")


@dataclass
class ReleaseRouter:
    """The routing parameters of a set, in the authors' order."""

    head_weight: torch.Tensor  # (D, E): the width heads then the depth head, stacked
    head_bias: torch.Tensor  # (D,) zeros without linear_bias
    embedding_gs: torch.Tensor  # (K, D) the codes used at inference
    temperature: float
    base: float
    depth_order: list[int]  # already reduced modulo the number of depth entries
    non_zero_width: bool
    input_dim: int


@dataclass
class ReleaseExpert:
    code: int
    folder: Path  # arch<k>/checkpoint-<step>
    step: int
    arch_vector: torch.Tensor  # (D,)
    unet_config: dict
    weights_path: Path


@dataclass
class ReleaseSet:
    path: Path
    num_codes: int
    structure: dict
    ff_gate_width: int
    router: ReleaseRouter
    experts: list[ReleaseExpert] = field(default_factory=list)


def _read_config(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{what} {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{what} {path} is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise ArtifactError(f"{what} {path} is not a JSON object")
    return data


def _check_keys(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], who: str) -> None:
    """Every expected key with its shape, and nothing else; one line for the first problem."""
    for key, shape in expected.items():
        if key not in tensors:
            raise ArtifactError(f"{who}: {path} lacks the key {key} (expected shape {list(shape)})")
        if tuple(tensors[key].shape) != tuple(shape):
            raise ArtifactError(f"{who}: key {key} in {path} has shape {list(tensors[key].shape)}, "
                                f"expected {list(shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ArtifactError(f"{who}: {path} holds the unexpected key {extra[0]} (shape "
                            f"{list(tensors[extra[0]].shape)}){f' and {len(extra) - 1} more' if len(extra) > 1 else ''}")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{who}: key {key} in {path} is not a finite float tensor ({tensor.dtype})")


def _structure_equal(a: Any, b: dict) -> bool:
    try:
        return [[int(x) for x in m] for m in a["width"]] == b["width"] and \
            [[int(x) for x in m] for m in a["depth"]] == b["depth"]
    except (TypeError, KeyError, ValueError):
        return False


def read_arch_vector(path: Path, dim: int) -> torch.Tensor:
    """The (D,) arch vector in `path`: `torch.load(weights_only=True)`, a float tensor [1, D].

    The authors save ``embedding_gs[k].unsqueeze(0)``, a view: the file holds the whole [K, D]
    storage at an offset, which only torch's own loader reads right."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArtifactError(f"{path} is not a tensor file torch can load safely (weights_only): {first[:200]}") from error
    if not isinstance(value, torch.Tensor):
        raise ArtifactError(f"{path} holds a {type(value).__name__}, not a tensor")
    if not value.is_floating_point() or tuple(value.shape) != (1, dim):
        raise ArtifactError(f"{path} holds a {value.dtype} tensor of shape {list(value.shape)}; expected a float "
                            f"tensor of shape [1, {dim}]")
    return value.detach().reshape(-1).to(torch.float32).clone()


def _read_router(root: Path, layout: AuthorsLayout) -> tuple[ReleaseRouter, int, dict]:
    structure = layout.structure()
    hyper_dir, quant_dir = root / "hypernet", root / "quantizer"
    hconf = _read_config(hyper_dir / "config.json", "hypernet config")
    qconf = _read_config(quant_dir / "config.json", "quantizer config")
    if hconf.get("_class_name") != "HyperStructure":
        raise ArtifactError(f"{hyper_dir / 'config.json'} names class {hconf.get('_class_name')!r}, not HyperStructure")
    if qconf.get("_class_name") != "StructureVectorQuantizer":
        raise ArtifactError(f"{quant_dir / 'config.json'} names class {qconf.get('_class_name')!r}, "
                            "not StructureVectorQuantizer")
    for what, conf, path in (("hypernet", hconf, hyper_dir), ("quantizer", qconf, quant_dir)):
        if not _structure_equal(conf.get("structure"), structure):
            raise ArtifactError(f"the {what} structure in {path / 'config.json'} does not match the base UNet's "
                                f"layout (D={layout.dim}); is --base the model the set was pruned from?")
    if hconf.get("single_arch_param"):
        raise ArtifactError(f"{hyper_dir} is a single-architecture baseline (single_arch_param), not a router")
    if hconf.get("wn_flag", True):
        raise ArtifactError(f"{hyper_dir / 'config.json'}: weight-normalised heads (wn_flag true) are not supported; "
                            "the released sets use wn_flag false")
    if qconf.get("resource_aware_normalization", True):
        raise ArtifactError(f"{quant_dir / 'config.json'}: resource_aware_normalization needs the training-time MACs "
                            "template, which the set does not hold; the released sets use false")
    if qconf.get("remap") is not None:
        raise ArtifactError(f"{quant_dir / 'config.json'}: index remapping (remap) is not supported")
    input_dim = hconf.get("input_dim", 768)
    k = qconf.get("n_e")
    if not isinstance(input_dim, int) or input_dim < 1 or not isinstance(k, int) or k < 1:
        raise ArtifactError(f"bad input_dim {input_dim!r} or n_e {k!r} in the set's configs")
    bias = bool(hconf.get("linear_bias", False))
    expected: dict[str, tuple[int, ...]] = {}
    heads = layout.width_groups + [layout.num_depth]
    for i, width in enumerate(heads):
        expected[f"mh_fc.{i}.weight"] = (width, input_dim)
        if bias:
            expected[f"mh_fc.{i}.bias"] = (width,)
    hweights = read_tensors(hyper_dir / WEIGHTS, what="hypernet weights")
    _check_keys(hyper_dir / WEIGHTS, hweights, expected, "hypernet")
    qweights = read_tensors(quant_dir / WEIGHTS, what="quantizer weights")
    _check_keys(quant_dir / WEIGHTS, qweights, {"embedding.weight": (k, layout.dim), "embedding_gs": (k, layout.dim)},
                "quantizer")
    weight = torch.cat([hweights[f"mh_fc.{i}.weight"].float() for i in range(len(heads))])
    head_bias = (torch.cat([hweights[f"mh_fc.{i}.bias"].float() for i in range(len(heads))]) if bias
                 else torch.zeros(layout.dim))
    try:
        temperature, base = float(qconf.get("temperature", 0.4)), float(qconf.get("base", 2))
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"{quant_dir / 'config.json'}: temperature/base are not numbers") from error
    if not temperature > 0:
        raise ArtifactError(f"{quant_dir / 'config.json'}: temperature must be > 0, got {temperature}")
    n_depth = layout.num_depth
    raw_order = qconf.get("depth_order")
    order = list(range(n_depth)) if raw_order is None else raw_order
    if not isinstance(order, list) or not all(isinstance(i, int) for i in order) or len(order) != n_depth:
        raise ArtifactError(f"{quant_dir / 'config.json'}: depth_order must list {n_depth} integers, got {raw_order!r}")
    reduced = [i % n_depth for i in order] if n_depth else []
    if sorted(reduced) != list(range(n_depth)):
        raise ArtifactError(f"{quant_dir / 'config.json'}: depth_order {raw_order} is not a permutation of the "
                            f"{n_depth} depth entries")
    router = ReleaseRouter(head_weight=weight, head_bias=head_bias, embedding_gs=qweights["embedding_gs"].float(),
                           temperature=temperature, base=base, depth_order=reduced,
                           non_zero_width=bool(qconf.get("non_zero_width", True)), input_dim=input_dim)
    return router, k, qconf


def _expert_folder(root: Path, code: int) -> tuple[Path, int]:
    arch = root / f"arch{code}"
    if not arch.is_dir():
        raise ArtifactError(f"expert {code}: the set has no folder {arch}")
    checkpoints = sorted((int(m.group(1)), p) for p in arch.iterdir() if p.is_dir()
                         and (m := _CHECKPOINT_DIR.match(p.name)))
    if len(checkpoints) != 1:
        found = [p.name for _, p in checkpoints] or "none"
        raise ArtifactError(f"expert {code}: {arch} must hold exactly one checkpoint-<step> folder, found {found}")
    step, folder = checkpoints[0]
    return folder, step


def _check_unet_config(config: dict, base: dict, path: Path, code: int, ff_gate_width: int) -> None:
    for key in _SIZE_KEYS:
        mine, theirs = config.get(key), base.get(key)
        if isinstance(mine, list) or isinstance(theirs, list):
            mine = list(mine) if isinstance(mine, (list, tuple)) else mine
            theirs = list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        if key in config and mine != theirs:
            raise ArtifactError(f"expert {code}: {path} has {key} {mine!r}, the base UNet {theirs!r}")
    for key, kinds in (("down_block_types", base.get("down_block_types")), ("up_block_types", base.get("up_block_types"))):
        want = [AUTHORS_BLOCK_NAMES.get(t, t) for t in kinds]
        if list(config.get(key) or []) != want:
            raise ArtifactError(f"expert {code}: {path} has {key} {config.get(key)!r}; the authors' gated blocks for "
                                f"the base are {want}")
    mid = AUTHORS_BLOCK_NAMES.get(base.get("mid_block_type") or "UNetMidBlock2DCrossAttn")
    if config.get("mid_block_type") != mid:
        raise ArtifactError(f"expert {code}: {path} has mid_block_type {config.get('mid_block_type')!r}, expected {mid}")
    if int(config.get("ff_gate_width", ff_gate_width)) != ff_gate_width or config.get("gated_ff", True) is not True:
        raise ArtifactError(f"expert {code}: {path} has gated_ff {config.get('gated_ff')!r} / ff_gate_width "
                            f"{config.get('ff_gate_width')!r}; the set's structure needs gated feed-forwards of "
                            f"{ff_gate_width} groups")


def read_release(root: str | Path, layout: AuthorsLayout, base_config: dict) -> ReleaseSet:
    """Read and check a set against the base UNet's authors' layout (expert weights are only
    located here; `importer` checks their keys and shapes against each code)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ArtifactError(f"--release {root} is not a directory")
    router, k, qconf = _read_router(root, layout)
    present = sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ARCH_DIR.match(p.name)))
    if present and max(present) >= k:
        raise ArtifactError(f"the quantizer holds K={k} codes but the set has expert folders up to arch{max(present)}")
    experts = []
    for code in range(k):
        folder, step = _expert_folder(root, code)
        vector = read_arch_vector(folder / "arch_vector.pt", layout.dim)
        if not torch.equal(vector, router.embedding_gs[code]):
            diff = float((vector - router.embedding_gs[code]).abs().max())
            raise ArtifactError(f"expert {code}: {folder / 'arch_vector.pt'} differs from the quantizer's "
                                f"embedding_gs[{code}] (max abs difference {diff:.3g}); the folder and the codes are "
                                "from different runs")
        unet_dir = folder / "unet"
        config = _read_config(unet_dir / "config.json", f"expert {code} UNet config")
        _check_unet_config(config, base_config, unet_dir / "config.json", code, layout.ff_gate_width)
        weights = unet_dir / WEIGHTS
        if not weights.is_file():
            raise ArtifactError(f"expert {code}: {weights} is missing")
        experts.append(ReleaseExpert(code=code, folder=folder, step=step, arch_vector=vector, unet_config=config,
                                     weights_path=weights))
    return ReleaseSet(path=root, num_codes=k, structure=layout.structure(), ff_gate_width=layout.ff_gate_width,
                      router=router, experts=experts)
