"""Expert artifacts: a sliced UNet saved as base config + arch spec + safetensors weights.

Training writes them (sliced from the dense weights at the end of pruning, replaced by the
fine-tuned weights later); export and anyone else rebuilds them with `load_expert`, without
masks or any training state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from aptp.errors import ArtifactError
from aptp.readers import read_json
from aptp.outputs import ordinary_mode

from .slicing import ArchSpec, build_expert_structure, write_json_atomic

BASE_CONFIG = "base_config.json"
ARCH_SPEC = "arch_spec.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
EXPERT_INFO = "expert.json"


def save_expert(directory: str | os.PathLike, unet: nn.Module, spec: ArchSpec, base_config: dict, info: dict | None = None) -> Path:
    """Write an expert directory atomically (temp dir + rename); an existing one is replaced whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        ordinary_mode(tmp)  # mkdtemp makes it 0700
        write_json_atomic(tmp / BASE_CONFIG, _plain_config(base_config))
        spec.save(tmp / ARCH_SPEC)
        state = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        ordinary_mode(tmp / WEIGHTS)  # safetensors writes 0600
        write_json_atomic(tmp / EXPERT_INFO, info or {})
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_expert(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild an expert UNet from its directory (base config + arch spec + weights)."""
    directory = Path(directory)
    for name in (BASE_CONFIG, ARCH_SPEC, WEIGHTS):
        if not (directory / name).is_file():
            raise ArtifactError(f"expert directory {directory} has no {name}")
    from .checkpoint import read_tensors

    base_config = read_json(directory / BASE_CONFIG, dict, "expert base config")
    spec = ArchSpec.load(directory / ARCH_SPEC)
    try:
        unet = build_expert_structure(base_config, spec, device=device)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ArtifactError(f"expert {directory}: its base config and arch spec do not build a UNet: {e}") from e
    state = {k: v.to(device) for k, v in read_tensors(directory / WEIGHTS, what="expert weights").items()}
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"weights in {directory} do not fit its arch spec: {e}") from e
    if dtype is not None:
        unet = unet.to(dtype)
    return unet.eval()


def expert_info(directory: str | os.PathLike) -> dict:
    path = Path(directory) / EXPERT_INFO
    return read_json(path, dict, "expert info") if path.is_file() else {}


def _plain_config(config) -> dict:
    """A JSON-safe copy of a diffusers FrozenDict config (tuples become lists)."""
    return json.loads(json.dumps(dict(config), default=list))
