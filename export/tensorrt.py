"""TensorRT engines from the exported ONNX UNets, and the GroupNorm width rule they need.

Engines are built only where ``import tensorrt`` works and a CUDA GPU is visible
(`tensorrt_status`); elsewhere the exporter warns and writes ONNX only. The lifecycle follows
the TensorRT demo's ``Engine``: the constructor stores the path, and ``build``, ``load``,
``activate``, ``allocate_buffers``, ``infer`` and ``unload`` each do one step. The model
contract (input names, profiles) comes from the ONNX config, not from here.

GroupNorm after slicing
-----------------------
A sliced ResNet keeps whole GroupNorm groups of ``norm2``: ``num_groups`` shrinks and the
channels per group stay, so ``num_groups`` always divides ``num_channels`` and the ONNX
lowering (reshape to ``(N, groups, -1)``, InstanceNormalization, affine) is valid for every
kept count. That part is only *checked* (`check_group_norm`). What TensorRT fp16 handles badly
is the resulting *width*: its fp16 kernels work on channel-vectorised layouts (``kHWC8``,
``kCHW16``; tensor-core convolutions want ``C % 8 == 0``), and the demo's fused GroupNorm plugin
accepts nothing but half ``kHWC8`` input with 32 groups. A kept width such as 5 groups x 10
channels = 50 (SD 2.1's 320-wide blocks) forces reformat layers around ``conv1 -> norm2 ->
conv2`` or non-tensor-core kernels. So, for engines only, `aligned_group_count` rounds the kept
group count up until ``groups * channels_per_group`` is a multiple of 8 (never past the
original count), and `pad_group_norm_widths` adds those groups as exact zeros: zero ``conv1``
rows and bias, zero ``time_emb_proj`` rows, unit/zero GroupNorm affine, zero ``conv2`` columns.
A zero group normalises to zero (mean 0, variance 0, ``0 / sqrt(eps) = 0``) and ``silu(0) = 0``
meets zero ``conv2`` weights, so the output is unchanged; the exporter still validates the
padded graph against the unpadded PyTorch expert and records every padding in the manifest.
None of this can run against a real TensorRT here (no tensorrt package, no GPU): the rule is
unit-tested on its own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from aptp.errors import ArtifactError, ConfigError

__all__ = [
    "CHANNEL_ALIGNMENT",
    "Engine",
    "aligned_group_count",
    "check_group_norm",
    "group_norm_padding_plan",
    "pad_group_norm_widths",
    "tensorrt_status",
]

logger = logging.getLogger(__name__)

#: fp16 channel vector width of TensorRT's kHWC8 layout and tensor-core convolutions.
CHANNEL_ALIGNMENT = 8


def tensorrt_status() -> tuple[bool, str]:
    """``(True, version)`` when engines can be built here, else ``(False, reason)``."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "the 'tensorrt' Python package is not installed"
    except Exception as err:  # a broken install (missing libnvinfer) raises OSError and friends
        return False, f"'import tensorrt' failed: {err}"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to this process"
    return True, str(getattr(trt, "__version__", "unknown"))


# -- GroupNorm widths --------------------------------------------------------------------------


def check_group_norm(num_groups: int, num_channels: int) -> None:
    """Raise unless ``num_groups`` divides ``num_channels`` (what slicing guarantees)."""
    if num_groups < 1 or num_channels < 1 or num_channels % num_groups:
        raise ArtifactError(
            f"GroupNorm with {num_groups} groups over {num_channels} channels: groups must divide channels "
            "(a sliced expert keeps whole groups; this arch spec was not produced by aptp's slicing)"
        )


def aligned_group_count(kept_groups: int, channels_per_group: int, total_groups: int,
                        alignment: int = CHANNEL_ALIGNMENT) -> int:
    """Smallest group count >= `kept_groups` whose width is a multiple of `alignment`.

    Capped at `total_groups` (the unsliced count: never wider than the dense block, whose own
    width is left as the model defines it).

    Raises:
        ConfigError: a count or size below 1, or more kept groups than exist.
    """
    for name, value in (("kept_groups", kept_groups), ("channels_per_group", channels_per_group),
                        ("total_groups", total_groups), ("alignment", alignment)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if kept_groups > total_groups:
        raise ConfigError(f"kept_groups {kept_groups} exceeds the block's {total_groups} groups")
    groups = kept_groups
    while groups < total_groups and (groups * channels_per_group) % alignment:
        groups += 1
    return groups


def _resnets(unet: nn.Module):
    from diffusers.models.resnet import ResnetBlock2D

    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            yield name, module


def group_norm_padding_plan(unet: nn.Module, base_config: Mapping[str, Any] | None = None,
                            alignment: int = CHANNEL_ALIGNMENT) -> list[dict[str, Any]]:
    """Per ResNet whose ``norm2`` width is not a multiple of `alignment`: what padding fixes it.

    ``total_groups`` is the unsliced count (``norm_num_groups`` of `base_config`, default the
    UNet's own config, which for a sliced expert is its base config). Each entry: ``{"module", "groups", "channels_per_group", "padded_groups"}``;
    entries whose group count cannot grow (already at the total) are left out.
    """
    # A sliced expert's config is its base config, so it knows the unsliced count too.
    total = int((base_config or getattr(unet, "config", None) or {}).get("norm_num_groups") or 0)
    plan = []
    for name, resnet in _resnets(unet):
        norm = resnet.norm2
        check_group_norm(norm.num_groups, norm.num_channels)
        per_group = norm.num_channels // norm.num_groups
        target = aligned_group_count(norm.num_groups, per_group, max(total, norm.num_groups), alignment)
        if target != norm.num_groups:
            plan.append({"module": name, "groups": norm.num_groups, "channels_per_group": per_group,
                         "padded_groups": target})
    return plan


def _grow_rows(weight: torch.Tensor, extra: int, fill: float = 0.0) -> torch.Tensor:
    pad = torch.full((extra, *weight.shape[1:]), fill, dtype=weight.dtype, device=weight.device)
    return torch.cat([weight.detach(), pad], dim=0)


def _grow_cols(weight: torch.Tensor, extra: int) -> torch.Tensor:
    pad = torch.zeros((weight.shape[0], extra, *weight.shape[2:]), dtype=weight.dtype, device=weight.device)
    return torch.cat([weight.detach(), pad], dim=1)


def _pad_resnet(resnet: nn.Module, padded_groups: int) -> None:
    norm = resnet.norm2
    per_group = norm.num_channels // norm.num_groups
    width = norm.num_channels
    extra = (padded_groups - norm.num_groups) * per_group
    conv1, conv2 = resnet.conv1, resnet.conv2
    conv1.weight = nn.Parameter(_grow_rows(conv1.weight, extra), requires_grad=False)
    if conv1.bias is not None:
        conv1.bias = nn.Parameter(_grow_rows(conv1.bias, extra), requires_grad=False)
    conv1.out_channels += extra
    if resnet.time_emb_proj is not None:
        proj = resnet.time_emb_proj
        if resnet.time_embedding_norm == "scale_shift":
            # Output rows are [scale (width), shift (width)]: pad each half.
            halves = [proj.weight[:width], proj.weight[width:]]
            weight = torch.cat([_grow_rows(h, extra) for h in halves], dim=0)
            bias = None
            if proj.bias is not None:
                bias = torch.cat([_grow_rows(b, extra) for b in (proj.bias[:width], proj.bias[width:])], dim=0)
        else:
            weight = _grow_rows(proj.weight, extra)
            bias = _grow_rows(proj.bias, extra) if proj.bias is not None else None
        proj.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            proj.bias = nn.Parameter(bias, requires_grad=False)
        proj.out_features = weight.shape[0]
    new_norm = nn.GroupNorm(padded_groups, width + extra, eps=norm.eps, affine=norm.affine,
                            device=conv1.weight.device, dtype=conv1.weight.dtype)
    if norm.affine:
        new_norm.weight = nn.Parameter(_grow_rows(norm.weight, extra, fill=1.0), requires_grad=False)
        new_norm.bias = nn.Parameter(_grow_rows(norm.bias, extra), requires_grad=False)
    resnet.norm2 = new_norm
    conv2.weight = nn.Parameter(_grow_cols(conv2.weight, extra), requires_grad=False)
    conv2.in_channels += extra


def pad_group_norm_widths(unet: nn.Module, base_config: Mapping[str, Any] | None = None,
                          alignment: int = CHANNEL_ALIGNMENT) -> list[dict[str, Any]]:
    """Apply `group_norm_padding_plan` to `unet` in place (output unchanged); returns the plan."""
    plan = group_norm_padding_plan(unet, base_config, alignment)
    for entry in plan:
        _pad_resnet(unet.get_submodule(entry["module"]), entry["padded_groups"])
    if plan:
        logger.info("padded %d ResNet widths to multiples of %d for TensorRT fp16", len(plan), alignment)
    return plan


# -- engines -----------------------------------------------------------------------------------


class Engine:
    """One serialized TensorRT engine (a ``.plan`` file) and its execution context.

    Args:
        path: where the plan is (or will be) stored.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.engine = None
        self.context = None
        self.tensors: dict[str, torch.Tensor] = {}

    def build(self, onnx_path: str | os.PathLike, input_profile: Mapping[str, tuple], *, fp16: bool = True,
              timing_cache: str | os.PathLike | None = None, workspace_bytes: int | None = None) -> Path:
        """Parse `onnx_path`, build with one optimisation profile, write the plan to `path`.

        `input_profile`: ``{input name: (min shape, opt shape, max shape)}``. The timing cache
        is read if present and written back, so later builds (other experts, re-exports) reuse
        the kernel timings.
        """
        import tensorrt as trt

        trt_logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(trt_logger)
        flags = 0
        if int(trt.__version__.split(".")[0]) < 10:
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, trt_logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ArtifactError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in input_profile.items():
            profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
        config.add_optimization_profile(profile)
        cache_path = Path(timing_cache) if timing_cache else None
        cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(bytes(serialized))
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        logger.info("built TensorRT engine %s", self.path)
        return self.path

    def load(self) -> None:
        """Deserialize the plan."""
        import tensorrt as trt

        if not self.path.is_file():
            raise ArtifactError(f"TensorRT engine {self.path} does not exist")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT cannot load {self.path} (built by another TensorRT version or GPU?)")

    def activate(self, device_memory: int | None = None) -> None:
        """Create the execution context, on a shared device-memory block when one is given."""
        if self.engine is None:
            self.load()
        if device_memory is None:
            self.context = self.engine.create_execution_context()
        else:
            self.context = self.engine.create_execution_context_without_device_memory()
            self.context.device_memory = device_memory

    def allocate_buffers(self, shapes: Mapping[str, tuple[int, ...]], device: str = "cuda") -> None:
        """Preallocate every I/O tensor for `shapes` (input shapes; outputs are inferred)."""
        import tensorrt as trt

        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if name not in shapes:
                    raise ConfigError(f"{self.path}: no shape given for input {name!r}")
                self.context.set_input_shape(name, tuple(shapes[name]))
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _TORCH_DTYPES[str(self.engine.get_tensor_dtype(name))]
            self.tensors[name] = torch.empty(shape, dtype=dtype, device=device)
            self.context.set_tensor_address(name, self.tensors[name].data_ptr())

    def infer(self, feed: Mapping[str, torch.Tensor], stream: int) -> dict[str, torch.Tensor]:
        """Copy `feed` into the input buffers, run on CUDA `stream`, return the buffers by name."""
        for name, value in feed.items():
            self.tensors[name].copy_(value)
        if not self.context.execute_async_v3(stream):
            raise ArtifactError(f"TensorRT inference failed for engine {self.path}")
        return self.tensors

    def unload(self) -> None:
        """Drop buffers, context and engine (in that order)."""
        self.tensors.clear()
        self.context = None
        self.engine = None


_TORCH_DTYPES = {
    "DataType.FLOAT": torch.float32,
    "DataType.HALF": torch.float16,
    "DataType.INT32": torch.int32,
    "DataType.INT64": torch.int64,
    "DataType.BOOL": torch.bool,
}
