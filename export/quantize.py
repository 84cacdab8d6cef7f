"""int8 UNets beside the fp32 ones, for CPU and edge targets (``aptp-export --quantize int8``).

Per UNet of a finished fp32 export (every expert, and the dense model when present):

1. Calibration: the export's own runtime (`aptp.runtime.AptpPipeline`) samples the
   checkpoint's own prompts on that UNet (those `aptp-train route` sent to it, from the
   checkpoint's ``routing.json``, else a fixed built-in prompt set, recorded as such) and every
   UNet call's inputs are recorded: real activations, as the deployed loop produces them.
2. Static QDQ quantization with ``onnxruntime.quantization.quantize_static``: int8 weights
   (symmetric, per output channel) and uint8 activations (MinMax ranges from the calibration
   feeds) on ``Conv``, ``Gemm`` and the ``MatMul`` nodes that multiply by a weight. The
   attention matmuls of two activations (QK^T, AV) stay float: their ranges vary per prompt
   and step, and they hold no weights to shrink. If static quantization fails on a graph, the
   UNet falls back to dynamic quantization (``quantize_dynamic``, weights only, MatMul/Gemm)
   and the manifest says so.
3. Error against fp32 over a fixed prompt set (`ERROR_PROMPTS`, fixed seeds), run end to end
   by the runtime on both versions: mean and max absolute difference of the final latents and
   of the decoded pixels (0-255).

The manifest entry of each UNet gains ``int8`` (its file, size, sha256, method, the op types
quantized with their node counts, the errors) and ``bytes``/``sha256`` of the fp32 file; the
top level gains ``quantization``. New files are written under temporary names and renamed;
the manifest is replaced last (temporary file, then rename), so an interrupted run leaves the
fp32 export as it was (plus, at most, unlisted int8 files).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from aptp.errors import ConfigError
from aptp.outputs import ordinary_mode

from .manifest import file_sha256, open_fp32_export, replace_manifest, unet_entries

__all__ = [
    "CALIBRATION_PROMPTS",
    "ERROR_PROMPTS",
    "QUANTIZE_MODES",
    "quantize_export",
    "quantize_unet",
    "record_unet_inputs",
]

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)
INT8_FILE = "unet.int8.onnx"
# Used only when the checkpoint has no routing.json (no `aptp-train route` run).
CALIBRATION_PROMPTS = (
    "a red sports car on a mountain road", "a bowl of ramen with an egg", "a portrait of an old fisherman",
    "a watercolor painting of a lighthouse", "a cat sleeping on a windowsill", "a city skyline at night",
    "a plate of fresh fruit on a wooden table", "a snowy forest at dawn",
)
# The fixed prompt set the int8 error is measured on (seeds 0, 1, ...).
ERROR_PROMPTS = (
    "a yellow taxi in the rain", "a chocolate cake on a plate", "a dog running on the beach",
    "an astronaut riding a horse",
)
QUANTIZED_OP_TYPES = ("Conv", "Gemm", "MatMul")


# ---- calibration -------------------------------------------------------------------------------


class _Recorder:
    """An engine wrapper that keeps a copy of every feed, cast as the graph takes it."""

    def __init__(self, engine: Any, sink: list[dict[str, np.ndarray]]):
        self.engine, self.sink = engine, sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def infer(self, feed: dict[str, Any], stream: Any = None) -> dict[str, Any]:
        self.sink.append({name: np.array(value, dtype=self.engine.input_dtype(name), copy=True)
                          for name, value in feed.items()})
        return self.engine.infer(feed, stream)


def checkpoint_prompts(manifest: dict[str, Any], key: int | str, count: int) -> tuple[list[str], str]:
    """`count` prompts to calibrate UNet `key` on, and where they came from."""
    path = (manifest.get("checkpoint") or {}).get("path")
    routing = Path(path) / "routing.json" if path else None
    if routing is not None and routing.is_file():
        try:
            assignments = json.loads(routing.read_text()).get("assignments") or []
        except (OSError, json.JSONDecodeError, AttributeError):
            assignments = []
        texts = [a["text"] for a in assignments if isinstance(a, dict) and isinstance(a.get("text"), str)]
        own = [a["text"] for a in assignments if isinstance(a, dict) and a.get("code") == key and a.get("text")]
        ordered = list(dict.fromkeys(own + texts))  # its own prompts first, then the others
        if ordered:
            return (ordered * count)[:count], f"checkpoint routing.json ({len(own)} routed to this UNet)"
    return (list(CALIBRATION_PROMPTS) * count)[:count], "built-in prompt set (the checkpoint has no routing.json)"


def record_unet_inputs(pipe: Any, key: int | str, prompts: Sequence[str], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Run `pipe` on `prompts` forced onto UNet `key` and return every UNet call's inputs."""
    feeds: list[dict[str, np.ndarray]] = []
    original = pipe.residency.factory
    pipe.residency.clear()
    pipe.residency.factory = lambda k: _Recorder(original(k), feeds) if k == key else original(k)
    try:
        pipe(list(prompts), seeds=seed, expert=key, output_type="latent")
    finally:
        pipe.residency.clear()
        pipe.residency.factory = original
    return feeds


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # onnxruntime calls it on some versions; one pass is enough here
        pass


# ---- quantization -------------------------------------------------------------------------------


def _weight_matmuls(model: Any) -> tuple[list[str], list[str]]:
    """Names of MatMul nodes with a weight input, and of those multiplying two activations."""
    initializers = {t.name for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    weighted, activations = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul":
            has_weight = any(i in initializers or i in constants for i in node.input)
            (weighted if has_weight else activations).append(node.name)
    return weighted, activations


def count_quantized_ops(path: str | os.PathLike) -> dict[str, int]:
    """Op types of the int8 graph that run on int8 weights, with node counts: in QDQ form the
    nodes with an input dequantized from an int8 initializer (activation QDQ pairs elsewhere
    are not counted); in dynamic form the integer ops."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    weights = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
                            "MatMulIntegerToFloat"):
            counts[node.op_type] += 1
        elif node.op_type != "DequantizeLinear" and any(i in weights for i in node.input):
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))


def quantize_unet(fp32: str | os.PathLike, output: str | os.PathLike, feeds: list[dict[str, np.ndarray]],
                  *, external_data: bool = False) -> dict[str, Any]:
    """Write the int8 version of the UNet graph `fp32` to `output` (temporary name, then rename).

    Static QDQ calibrated on `feeds` (see the module docstring); dynamic when static fails.
    Returns ``{"method", "quantized_ops", "excluded"}``.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    fp32, output = Path(fp32), Path(output)
    model = onnx.load(str(fp32), load_external_data=False)
    weighted, activation_matmuls = _weight_matmuls(model)
    locations = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    del model
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=output.parent) as tmp:
        # Quantize a private copy of the fp32 graph: onnx refuses external data that has several
        # hard links (pipeline folders link the export's weights), and onnxruntime writes an
        # "-inferred" graph beside its input, which must not land in the export.
        source = Path(tmp) / "fp32"
        source.mkdir()
        for name in (fp32.name, *sorted(locations)):
            shutil.copyfile(fp32.parent / name, source / name)
        fp32 = source / fp32.name
        staged = Path(tmp) / output.name
        method = "static-qdq"
        try:
            if not feeds:
                raise ValueError("no calibration feeds were recorded")
            quantize_static(
                str(fp32), str(staged), _FeedReader(feeds), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES), nodes_to_exclude=activation_matmuls,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external_data,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        except Exception as err:  # noqa: BLE001 - onnxruntime raises many kinds; fall back and record why
            logger.warning("static int8 quantization of %s failed (%s); using dynamic quantization", fp32, err)
            method = f"dynamic (static failed: {type(err).__name__}: {err})"
            for leftover in Path(tmp).iterdir():
                if leftover != source:
                    leftover.unlink()
            quantize_dynamic(str(fp32), str(staged), op_types_to_quantize=["MatMul", "Gemm"],
                             nodes_to_exclude=activation_matmuls, weight_type=QuantType.QInt8, per_channel=False,
                             use_external_data_format=external_data)
        ops = count_quantized_ops(staged)
        written = sorted(p for p in Path(tmp).iterdir() if p != source)
        for path in written:
            ordinary_mode(path)  # 0644 like the fp32 files: tempfile and onnx's writers make some 0600
        for path in written:  # the graph last: a graph never points at data not yet in place
            if path != staged:
                os.replace(path, output.parent / path.name)
        os.replace(staged, output)
    return {"method": method, "quantized_ops": ops,
            "excluded": {"MatMul (activation x activation, attention)": len(activation_matmuls)},
            "weight_matmuls": len(weighted)}


# ---- error against fp32 ---------------------------------------------------------------------------


def measure_error(fp32_pipe: Any, int8_pipe: Any, key: int | str, prompts: Sequence[str] = ERROR_PROMPTS,
                  seed: int = 0) -> dict[str, Any]:
    """Final-latent and decoded-pixel (0-255) differences of UNet `key`, int8 vs fp32."""
    a = fp32_pipe(list(prompts), seeds=seed, expert=key)
    b = int8_pipe(list(prompts), seeds=seed, expert=key)
    latents = np.abs(np.stack([r.latents for r in a]) - np.stack([r.latents for r in b]))
    pixels = np.abs(np.stack([r.image for r in a]).astype(np.int16) - np.stack([r.image for r in b]).astype(np.int16))
    scale = float(np.abs(np.stack([r.latents for r in a])).mean())
    return {"prompts": len(prompts), "seed": int(seed),
            "latents_mean_abs": float(latents.mean()), "latents_max_abs": float(latents.max()),
            "latents_mean_abs_fp32": scale,
            "pixels_mean_abs": float(pixels.mean()), "pixels_max_abs": int(pixels.max())}


# ---- the whole export --------------------------------------------------------------------------------


def quantize_export(root: str | os.PathLike, mode: str = "int8", *, calibration_prompts: int = 4,
                    threads: int | None = None, keys: Sequence[int | str] | None = None,
                    signing_key: Any = None) -> dict[str, Any]:
    """Add int8 UNets to the fp32 export at `root` and list them in its manifest; returns it.

    Args:
        root: an export directory (``aptp-export`` output, fp32).
        mode: ``"int8"``.
        calibration_prompts: prompts sampled per UNet to record calibration activations.
        threads: intra-op threads of the calibration and error runs.
        keys: the UNets to quantize (default: every expert and the dense model).
        signing_key: the Ed25519 private key to re-sign the manifest with (`aptp.export.signing`);
            required when the export is signed, since its manifest changes.

    Raises:
        ConfigError: another mode, an fp16 export, or a signed export without `signing_key`.
        ArtifactError: the export is incomplete or modified (checked first).
    """
    from aptp.runtime import AptpPipeline
    import onnxruntime

    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"--quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    root, manifest, signing_key = open_fp32_export(root, signing_key, "adding int8 UNets", "--quantize int8",
                                                   "int8 quantization starts from fp32 weights")
    fp32_pipe = AptpPipeline.from_export(root, verify=False, threads=threads)
    entries = [(k, e) for k, e in unet_entries(manifest) if keys is None or k in keys]
    records: dict[str, Any] = {}
    for key, entry in tqdm(entries, desc="int8 UNets", leave=False):
        fp32_path = root / entry["unet"]
        prompts, source = checkpoint_prompts(manifest, key, calibration_prompts)
        feeds = record_unet_inputs(fp32_pipe, key, prompts)
        out = fp32_path.with_name(INT8_FILE)
        info = quantize_unet(fp32_path, out, feeds, external_data=entry.get("external_data") is not None)
        data = out.with_name(out.name + ".data")
        records[str(key)] = {"entry": entry, "path": out, "data": data if data.is_file() else None,
                             "info": info, "calibration": {"prompts": len(prompts), "source": source,
                                                           "unet_calls": len(feeds)}}
        logger.info("%s: int8 (%s) %s", key, info["method"], info["quantized_ops"])
    # The error runs need the int8 files listed: stage a manifest in memory, then measure.
    new_files = dict(manifest["files"])
    for rec in records.values():
        for path in (rec["path"], rec["data"]):
            if path is not None:
                new_files[path.relative_to(root).as_posix()] = file_sha256(path)
    for rec in records.values():
        entry = rec["entry"]
        rel = rec["path"].relative_to(root).as_posix()
        fp32_files = [root / entry["unet"]] + ([root / entry["external_data"]] if entry.get("external_data") else [])
        int8_files = [rec["path"]] + ([rec["data"]] if rec["data"] else [])
        entry["bytes"] = sum(p.stat().st_size for p in fp32_files)
        entry["sha256"] = manifest["files"][entry["unet"]]
        entry["int8"] = {
            "unet": rel,
            "external_data": rec["data"].relative_to(root).as_posix() if rec["data"] else None,
            "bytes": sum(p.stat().st_size for p in int8_files), "sha256": new_files[rel],
            "method": rec["info"]["method"], "quantized_ops": rec["info"]["quantized_ops"],
            "excluded_ops": rec["info"]["excluded"], "calibration": rec["calibration"],
        }
    manifest["files"] = new_files
    manifest["quantization"] = {
        "int8": {"tool": f"onnxruntime.quantization {onnxruntime.__version__}",
                 "format": "QDQ", "weights": "int8, symmetric, per output channel",
                 "activations": "uint8, asymmetric, MinMax over the calibration feeds",
                 "op_types": list(QUANTIZED_OP_TYPES), "error_prompts": list(ERROR_PROMPTS)},
    }
    replace_manifest(root, manifest, signing_key)
    # Measure the error with the runtime on the listed files; then record it.
    from aptp.runtime.artifacts import load_artifacts

    int8_pipe = AptpPipeline(load_artifacts(root, verify=True), threads=threads, precision="int8")
    for key, entry in entries:
        entry["int8"]["error"] = measure_error(fp32_pipe, int8_pipe, key)
        logger.info("%s: int8 vs fp32 %s", key, entry["int8"]["error"])
    fp32_pipe.close()
    int8_pipe.close()
    return replace_manifest(root, manifest, signing_key)
