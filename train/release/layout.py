"""The authors' arch-vector layout and its declared mapping onto aptp's gate sites.

The released APTP sets (Hub ``rezashkv/diffusion_pruning``) describe every expert by an arch
vector in the authors' order. This module rebuilds that order from any diffusers
``UNet2DConditionModel`` by the authors' rules and maps every entry, by module name and gate
kind, to a gate of aptp's `GateLayout`. Nothing is matched by position.

Facts confirmed in the authors' code (github.com/rezashkv/diffusion_pruning at d0709c3):

- Module order (``pdm/models/unet/unet_2d_conditional.py``, ``get_structure``): down blocks,
  the mid block, up blocks; inside a block its ResNets first, then its transformers
  (``get_gate_structure`` of ``CrossAttnDownBlock2DWidthHalfDepthGated`` and the other blocks in
  ``pdm/models/unet/blocks.py``). Inside a transformer: per transformer block ``attn1`` heads,
  ``attn2`` heads, then the feed-forward groups (``BasicTransformerBlockWidthGated``).
- Widths: a ResNet has one entry per ``norm2`` group (``ResnetBlock2DWidthGated``, gate width
  ``norm2.num_groups``); an attention one entry per head (``GatedAttention``); a feed-forward
  ``ff_gate_width`` entries over consecutive equal slices of the inner units (``GEGLUGated``,
  both GEGLU halves sliced alike).
- Depth: only the *last* ResNet and the *last* transformer of every down and up block are
  depth-gated (the ``*HalfDepthGated`` blocks build ``ResnetBlock2DWidthDepthGated`` /
  ``Transformer2DModelWidthDepthGated`` for ``i = num_layers - 1`` only); the mid block has
  none (``UNetMidBlock2DCrossAttnWidthGated``). For SD 2.1 that is 4 + 3 down and 4 + 3 up = 14.
- The vector is every width entry (module order) then one depth entry per depth-gated module
  (module order): ``HyperStructure.transform_arch_vector`` (``pdm/models/hypernet/hypernet.py``)
  and ``set_structure``. For SD 2.1 this gives 1606 width + 14 depth = D = 1620 (checked in
  the tests from the SD 2.1 UNet config).
- An entry ``>= 0.5`` keeps its unit (``hard_concrete`` in ``pdm/utils/estimation_utils.py``).
  A dropped depth-gated module becomes the identity; a dropped up-block ResNet returns
  ``input[:, :C - skip_connection_dim]``, i.e. its main input without the skip tensor
  (``ResnetBlock2DWidthDepthGated.forward``); aptp's `SkippedResnet` computes the same slice.
- Pruning (``UNet2DConditionModelPruned.from_pretrained``) calls
  ``transform_arch_vector`` *without* the non-zero fix, then ``prune()``: ResNet groups cut
  ``conv1`` rows, ``time_emb_proj`` rows, ``norm2`` and ``conv2`` columns; heads cut
  ``to_q/k/v`` rows (head-major) and ``to_out.0`` columns; feed-forward groups cut GEGLU
  ``proj`` rows in both halves and ``net.2`` columns; a dropped module's sub-layers become
  ``nn.Identity`` (so its keys are absent). These are aptp's slicing rules (DESIGN 1.1).
- Their width gate on a ResNet sits *before* ``norm2`` (aptp masks after it). Only the masked
  training model differs; the released experts are already sliced, and a sliced ResNet is the
  same function either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from aptp.errors import ArtifactError

from ..gates import GateLayout

__all__ = ["AUTHORS_LAYOUT_VERSION", "AuthorsEntry", "AuthorsLayout", "AUTHORS_BLOCK_NAMES"]

#: Names the layout after the code it was confirmed against; recorded in every import.
AUTHORS_LAYOUT_VERSION = "rezashkv/diffusion_pruning@d0709c3:half-depth-gated-v1"

#: The authors' gated block classes (as their expert ``unet/config.json`` names them) for the
#: diffusers block types they replace.
AUTHORS_BLOCK_NAMES = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlock2DHalfGated",
    "DownBlock2D": "DownBlock2DHalfGated",
    "UNetMidBlock2DCrossAttn": "UNetMidBlock2DCrossAttnWidthGated",
    "UpBlock2D": "UpBlock2DHalfGated",
    "CrossAttnUpBlock2D": "CrossAttnUpBlock2DHalfGated",
}


@dataclass(frozen=True)
class AuthorsEntry:
    """One module of the authors' structure: its width groups and whether it is depth-gated."""

    name: str  # qualified diffusers module name (ResNet or Transformer2DModel)
    kind: str  # "resnet" or "transformer"
    widths: tuple[int, ...]  # entries per width group, in the authors' order
    width_sites: tuple[tuple[str, str], ...]  # (aptp site name, aptp kind) per width group
    depth: bool


def _authors_modules(unet: nn.Module, ff_gate_width: int) -> list[AuthorsEntry]:
    entries: list[AuthorsEntry] = []
    blocks = [(f"down_blocks.{i}", b, True) for i, b in enumerate(unet.down_blocks)]
    blocks.append(("mid_block", unet.mid_block, False))
    blocks += [(f"up_blocks.{i}", b, True) for i, b in enumerate(unet.up_blocks)]
    for prefix, block, gated_depth in blocks:
        resnets = list(getattr(block, "resnets", None) or [])
        for j, resnet in enumerate(resnets):
            name = f"{prefix}.resnets.{j}"
            entries.append(AuthorsEntry(name, "resnet", (int(resnet.norm2.num_groups),), ((name, "resnet"),),
                                        gated_depth and j == len(resnets) - 1))
        attentions = list(getattr(block, "attentions", None) or [])
        for j, transformer in enumerate(attentions):
            name = f"{prefix}.attentions.{j}"
            widths: list[int] = []
            sites: list[tuple[str, str]] = []
            for t, tb in enumerate(transformer.transformer_blocks):
                base = f"{name}.transformer_blocks.{t}"
                for attn in ("attn1", "attn2"):
                    widths.append(int(getattr(tb, attn).heads))
                    sites.append((f"{base}.{attn}", "attention"))
                widths.append(int(ff_gate_width))
                sites.append((f"{base}.ff", "feedforward"))
            entries.append(AuthorsEntry(name, "transformer", tuple(widths), tuple(sites),
                                        gated_depth and j == len(attentions) - 1))
    return entries


class AuthorsLayout:
    """The authors' arch-vector order for one UNet, mapped onto aptp's gate layout.

    Args:
        unet: the base UNet (weights are not read; a meta-device model will do).
        ff_gate_width: the authors' feed-forward gate width (``ff_gate_width``, 32 in the release).

    Raises:
        ArtifactError: when the UNet has a module the authors' layout cannot describe with aptp's
            gates (a group size that differs, a depth gate aptp has no identity for).
    """

    def __init__(self, unet: nn.Module, ff_gate_width: int = 32):
        self.ff_gate_width = int(ff_gate_width)
        self.modules = _authors_modules(unet, self.ff_gate_width)
        self.gate_layout = GateLayout.from_unet(unet, ff_groups=self.ff_gate_width, depth=True)
        self._build_mapping()

    # -- the authors' structure, as their hypernet/quantizer configs hold it ------------------
    def structure(self) -> dict[str, list[list[int]]]:
        """``{"width": [[...] per module], "depth": [[0|1] per module]}`` as in their configs."""
        return {"width": [list(m.widths) for m in self.modules],
                "depth": [[1 if m.depth else 0] for m in self.modules]}

    @cached_property
    def width_groups(self) -> list[int]:
        """Entries per width group, in order (one hypernet head each)."""
        return [w for m in self.modules for w in m.widths]

    @property
    def num_width(self) -> int:
        return sum(self.width_groups)

    @property
    def num_depth(self) -> int:
        return sum(1 for m in self.modules if m.depth)

    @property
    def dim(self) -> int:
        """D, the length of an arch vector."""
        return self.num_width + self.num_depth

    # -- the declared mapping -----------------------------------------------------------------
    def _build_mapping(self) -> None:
        sites = {(s.name, s.kind): s for s in self.gate_layout.sites}
        order: list[int] = []
        for module in self.modules:
            for (site_name, kind), width in zip(module.width_sites, module.widths):
                site = sites.get((site_name, kind))
                if site is None or site.num_units != width:
                    have = "none" if site is None else f"{site.num_units} gates"
                    raise ArtifactError(f"the authors' layout has {width} {kind} entries at {site_name}; aptp's "
                                        f"gate layout has {have} there")
                order.extend(range(site.offset, site.offset + site.num_units))
        for module in self.modules:
            if module.depth:
                site = sites.get((module.name, "depth"))
                if site is None:
                    raise ArtifactError(f"the authors depth-gate {module.name}, which aptp cannot skip "
                                        "(its input and output widths differ)")
                order.append(site.offset)
        depth_names = {s.name for s in self.gate_layout.sites if s.kind == "depth"}
        extra = depth_names - {m.name for m in self.modules if m.depth}
        if extra or sorted(order) != list(range(self.gate_layout.num_gates)):
            raise ArtifactError(f"aptp's gate layout has gates the authors' layout lacks (e.g. {sorted(extra)[:1]}); "
                                "this UNet is not shaped like the release's")
        #: authors' index i -> aptp gate index
        self.to_aptp = torch.tensor(order, dtype=torch.long)

    @cached_property
    def depth_of_width(self) -> torch.Tensor:
        """(num_width,) for every width entry the index of its module's depth entry, or -1."""
        out, depth_index = [], 0
        for module in self.modules:
            index = -1
            if module.depth:
                index = depth_index
                depth_index += 1
            out.extend([index] * sum(module.widths))
        return torch.tensor(out, dtype=torch.long)

    @cached_property
    def group_first(self) -> torch.Tensor:
        """(groups,) index of every width group's first entry."""
        starts, offset = [], 0
        for width in self.width_groups:
            starts.append(offset)
            offset += width
        return torch.tensor(starts, dtype=torch.long)

    @cached_property
    def group_of_width(self) -> torch.Tensor:
        """(num_width,) width group of every width entry."""
        return torch.repeat_interleave(torch.arange(len(self.width_groups)), torch.tensor(self.width_groups))

    def hard_mask(self, arch_vector: torch.Tensor) -> torch.Tensor:
        """aptp's (N,) bool gate mask for one arch vector ``(D,)`` of the authors.

        Entries ``>= 0.5`` keep their unit, exactly as the authors' pruning does (no non-zero
        fix: their pruning applies none). Widths inside a dropped module are kept as coded; the
        depth site removes the whole module either way.
        """
        vector = arch_vector.reshape(-1)
        if vector.numel() != self.dim:
            raise ArtifactError(f"arch vector has {vector.numel()} entries; this UNet's layout has D={self.dim}")
        mask = torch.zeros(self.gate_layout.num_gates, dtype=torch.bool)
        mask[self.to_aptp] = vector >= 0.5
        return mask

    def empty_width_groups(self, arch_vector: torch.Tensor) -> list[str]:
        """Names of the width groups of live modules that an arch vector keeps nothing of
        (the authors' pruning cannot build those)."""
        vector = arch_vector.reshape(-1)
        hard = vector[: self.num_width] >= 0.5
        depth = vector[self.num_width:] >= 0.5
        out, offset = [], 0
        for module in self.modules:
            for (site_name, _), width in zip(module.width_sites, module.widths):
                live = True
                if module.depth:
                    live = bool(depth[int(self.depth_of_width[offset])])
                if live and not bool(hard[offset: offset + width].any()):
                    out.append(site_name)
                offset += width
        return out
