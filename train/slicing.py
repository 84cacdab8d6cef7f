"""Physical slicing: a hard keep-mask turns the full UNet into a dense, smaller UNet.

The arch spec (JSON) records the kept units of every site, so an expert is rebuilt from the
base UNet config + arch spec alone, and its sliced weights then load into it.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from torch import nn

from aptp.errors import ArtifactError
from aptp.outputs import ordinary_mode

from .gates import GateLayout

ARCH_SPEC_FORMAT = 1


@dataclass
class ArchSpec:
    """Kept units at every gate site of one expert, plus the widths they give (for readers)."""

    ff_groups: int
    depth: bool
    sites: list[dict] = field(default_factory=list)  # name, kind, kept_units, and widths

    def kept_units(self) -> list[list[int]]:
        return [list(s["kept_units"]) for s in self.sites]

    def to_dict(self) -> dict:
        return {"format": ARCH_SPEC_FORMAT, "ff_groups": self.ff_groups, "depth": self.depth, "sites": self.sites}

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpec":
        if d.get("format") != ARCH_SPEC_FORMAT:
            raise ArtifactError(f"arch spec format {d.get('format')!r} is not supported (expected {ARCH_SPEC_FORMAT})")
        return cls(ff_groups=int(d["ff_groups"]), depth=bool(d["depth"]), sites=list(d["sites"]))

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ArchSpec":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ArtifactError(f"cannot read arch spec {path}: {e}") from e


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        ordinary_mode(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_kept_units(unet: nn.Module, layout: GateLayout, kept_units: list[list[int]]) -> list[dict]:
    """Slice `unet` in place; returns the per-site records of the arch spec."""
    if len(kept_units) != len(layout.sites):
        raise ValueError(f"{len(kept_units)} kept-unit lists for {len(layout.sites)} sites")
    kinds = layout.gate_kinds(unet)
    records: list[dict] = []
    # Width sites first: a depth gate may then replace a whole (already sliced) module.
    order = sorted(range(len(layout.sites)), key=lambda i: layout.sites[i].kind == "depth")
    by_index: dict[int, dict] = {}
    for i in order:
        site, kept = layout.sites[i], sorted(kept_units[i])
        kind = kinds[site.kind]
        if not kept and not kind.may_be_empty:
            raise ValueError(f"site {site.name} ({site.kind}) would keep no unit")
        if any(u < 0 or u >= site.num_units for u in kept):
            raise ValueError(f"site {site.name} ({site.kind}) has kept units outside 0..{site.num_units - 1}")
        module = unet.get_submodule(site.name)
        by_index[i] = {"name": site.name, "kind": site.kind, "kept_units": kept, **kind.describe(module, site, kept)}
        new = kind.slice(module, site, kept)
        if new is not module:
            _replace_module(unet, site.name, new)
    for i in range(len(layout.sites)):
        records.append(by_index[i])
    return records


def slice_unet(unet: nn.Module, layout: GateLayout, hard_gates: torch.Tensor) -> tuple[nn.Module, ArchSpec]:
    """A sliced copy of `unet` for one hard (N,) mask, and the arch spec that rebuilds it."""
    sliced = copy.deepcopy(unet)
    sites = apply_kept_units(sliced, layout, layout.kept_units(hard_gates))
    return sliced, ArchSpec(ff_groups=layout.config.ff_groups, depth=layout.config.depth, sites=sites)


def build_expert_structure(base_config: dict, spec: ArchSpec, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """An expert UNet with the spec's widths and uninitialised weights (load its state dict next)."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(base_config)
    layout = GateLayout.from_unet(unet, ff_groups=spec.ff_groups, depth=spec.depth)
    expected = [(s.name, s.kind) for s in layout.sites]
    recorded = [(s["name"], s["kind"]) for s in spec.sites]
    if expected != recorded:
        raise ArtifactError("arch spec does not match the base UNet config: its gate sites differ")
    apply_kept_units(unet, layout, spec.kept_units())
    return unet.to_empty(device=device)
