"""Export a PyTorch model to ONNX through its `OnnxConfig`, and check the graph against PyTorch.

`export_onnx` traces with ``torch.onnx.export(..., opset_version=18, dynamo=False)`` (DESIGN 6)
into a scratch directory next to the target, then writes the final file: inline below the
protobuf limit, otherwise with all weights in one external data file beside it. `validate_onnx`
runs the graph in onnxruntime on random inputs at several sizes along every dynamic axis and
compares with the (fp32) PyTorch model; a graph beyond its config's tolerance raises
`OnnxValidationError`, so nothing unchecked reaches a manifest.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aptp.errors import ArtifactError

from .onnx_configs import OnnxConfig

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "ExportedGraph",
    "OnnxValidationError",
    "check_tolerance",
    "compare_onnx",
    "consolidate_graph",
    "export_and_validate",
    "export_onnx",
    "make_session",
    "validate_onnx",
]

logger = logging.getLogger(__name__)

# protobuf cannot serialise a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
# Tensors below this stay inside the graph even when the weights go to external data.
_INLINE_TENSOR_BYTES = 1024


class OnnxValidationError(ArtifactError):
    """An exported graph whose outputs differ from PyTorch beyond its config's tolerance."""


@dataclass
class ExportedGraph:
    """What the exporter records about one graph."""

    path: Path
    max_abs_error: float
    external_data: Path | None = None
    # The onnxruntime session the validation used, for further comparisons without reloading.
    session: Any = field(default=None, repr=False, compare=False)

    def files(self) -> list[Path]:
        return [self.path] + ([self.external_data] if self.external_data else [])


def make_session(path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None) -> Any:
    """An onnxruntime session on CPU (default) using `threads` intra-op threads.

    `threads` defaults to torch's thread count, which follows ``OMP_NUM_THREADS``: onnxruntime
    itself ignores that variable and would take every core.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def _model_for_precision(model: Any, config: OnnxConfig) -> Any:
    if config.precision != "fp16" or not isinstance(model, nn.Module):
        return model
    # A copy: the fp32 original stays the validation reference.
    return copy.deepcopy(model).to(torch.float16).eval()


def consolidate_graph(src: Path, dst: Path, threshold: int, data_name: str) -> Path | None:
    """Write the graph at `src` (possibly with per-tensor external files beside it, as the
    TorchScript exporter leaves models over 2 GiB) to `dst`: inline if its weights fit under
    `threshold` bytes, else with every large tensor in one external file `data_name`.
    Returns the external data path, or None."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(src), load_external_data=False)
    tensors = list(_all_tensors(proto))
    total = 0
    for tensor in tensors:
        if uses_external_data(tensor):
            total += int(_external_info(tensor).get("length", 0) or 0) or _external_size(src.parent, tensor)
        else:
            total += len(tensor.raw_data)
    if total <= threshold and not any(uses_external_data(t) for t in tensors):
        shutil.move(str(src), str(dst))
        return None
    if total <= threshold:
        model = onnx.load(str(src), load_external_data=True)
        onnx.save_model(model, str(dst))
        return None
    data_path = dst.with_name(data_name)
    offset = 0
    with open(data_path, "wb") as out:
        for tensor in tensors:
            if uses_external_data(tensor):
                payload = _read_external(src.parent, tensor)
            elif len(tensor.raw_data) >= _INLINE_TENSOR_BYTES:
                payload = tensor.raw_data
            else:
                continue
            # Page-aligned offsets let onnxruntime memory-map the weights.
            pad = (-offset) % 4096
            out.write(b"\0" * pad)
            offset += pad
            out.write(payload)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", offset), ("length", len(payload))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += len(payload)
    onnx.save_model(proto, str(dst))
    return data_path


def _all_tensors(proto) -> Any:
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(proto)


def _external_info(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _external_size(directory: Path, tensor) -> int:
    return (directory / _external_info(tensor)["location"]).stat().st_size


def _read_external(directory: Path, tensor) -> bytes:
    info = _external_info(tensor)
    with open(directory / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0) or 0))
        length = info.get("length")
        return f.read(int(length)) if length else f.read()


def export_onnx(
    model: Any,
    config: OnnxConfig,
    path: str | os.PathLike,
    *,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    external_data_name: str | None = None,
) -> tuple[Path, Path | None]:
    """Trace `model` (wrapped by `config`) to ONNX at `path`.

    Args:
        model: the PyTorch model in float32 (converted on a copy for ``fp16`` configs); for the
            router head, ``(head, code_logits, unit_weights)``.
        config: the graph's `OnnxConfig`.
        path: the ``.onnx`` file to write; its directory is created.
        external_data_threshold: weights above this many bytes go to one external data file.
        external_data_name: that file's name (default ``<path name>.data``).

    Returns:
        ``(onnx path, external data path or None)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model = _model_for_precision(model, config)
    # eval() matters: torch.onnx.export restores the wrapper's own training flag afterwards,
    # recursively, and a fresh wrapper module starts in training mode (dropout would switch on).
    wrapped = config.wrap(export_model).eval()
    dummy = config.dummy_inputs()
    dynamic_axes = {name: axes for name, axes in {**config.inputs, **config.outputs}.items() if axes}
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        traced = scratch / path.name
        with config.patch(export_model if isinstance(export_model, nn.Module) else wrapped), torch.no_grad():
            torch.onnx.export(
                wrapped,
                tuple(dummy.values()),
                str(traced),
                opset_version=config.DEFAULT_ONNX_OPSET,
                dynamo=False,
                input_names=list(config.inputs),
                output_names=list(config.outputs),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        data = consolidate_graph(traced, path, external_data_threshold, external_data_name or f"{path.name}.data")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    import onnx

    onnx.checker.check_model(str(path))
    logger.info("exported %s (%s) to %s%s", config.NAME, config.precision, path,
                f" + {data.name}" if data else "")
    return path, data


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def compare_onnx(model: Any, config: OnnxConfig, path: str | os.PathLike, session: Any = None) -> float:
    """Max abs difference between onnxruntime on `path` and the fp32 PyTorch `model`.

    `model` is anything `config.wrap` accepts (for a UNet also a module that masks a full UNet).
    Inputs are random, at every size of `config.validation_dims()`; float inputs are drawn in
    the graph's precision and given to PyTorch in float32 (same values).

    Raises:
        OnnxValidationError: wrong input/output names, a wrong output shape or a non-finite output.
    """
    session = session or make_session(path)
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if names != list(config.inputs) or outputs != list(config.outputs):
        raise OnnxValidationError(
            f"{path}: graph I/O {names} -> {outputs} differs from the {config.NAME} config "
            f"{list(config.inputs)} -> {list(config.outputs)}"
        )
    reference = config.wrap(model).eval()
    worst = 0.0
    for index, dims in enumerate(config.validation_dims()):
        inputs = config.dummy_inputs(dims, seed=1000 + index)
        feed = {name: _as_numpy(t) for name, t in inputs.items()}
        ref_inputs = [t.float() if t.is_floating_point() else t for t in inputs.values()]
        with torch.no_grad():
            expected = reference(*ref_inputs)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(None, feed)
        for name, want, have in zip(config.outputs, expected, got):
            shape = config.shape(name, {**config.dims, **dims})
            if tuple(have.shape) != shape:
                raise OnnxValidationError(
                    f"{path}: output {name} has shape {tuple(have.shape)} for inputs "
                    f"{ {k: tuple(v.shape) for k, v in feed.items()} }, expected {shape}"
                )
            have = have.astype(np.float32)
            if not np.all(np.isfinite(have)):
                raise OnnxValidationError(f"{path}: output {name} holds non-finite values ({config.precision})")
            worst = max(worst, float(np.max(np.abs(have - _as_numpy(want.float())))))
    return worst


def check_tolerance(error: float, config: OnnxConfig, path: str | os.PathLike, against: str = "PyTorch") -> None:
    """Raise `OnnxValidationError` when `error` exceeds the config's tolerance."""
    if not error <= config.atol:
        raise OnnxValidationError(
            f"{path}: {config.NAME} ({config.precision}) differs from {against} by {error:.3g}, above the "
            f"tolerance {config.atol:g}"
        )


def validate_onnx(model: Any, config: OnnxConfig, path: str | os.PathLike, session: Any = None) -> float:
    """`compare_onnx`, then fail beyond ``config.atol``; returns the max abs error.

    Raises:
        OnnxValidationError: see `compare_onnx`, or an error above the tolerance.
    """
    error = compare_onnx(model, config, path, session)
    check_tolerance(error, config, path)
    logger.info("validated %s (%s): max abs error %.3g", path, config.precision, error)
    return error


def export_and_validate(model: Any, config: OnnxConfig, path: str | os.PathLike, **kwargs: Any) -> ExportedGraph:
    """`export_onnx` then `validate_onnx`: the only way graphs enter an aptp export."""
    onnx_path, data = export_onnx(model, config, path, **kwargs)
    session = make_session(onnx_path)
    error = validate_onnx(model, config, onnx_path, session=session)
    return ExportedGraph(path=onnx_path, max_abs_error=error, external_data=data, session=session)
