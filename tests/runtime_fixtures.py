"""One tiny export shared by the runtime test files (built once per test session).

The checkpoint is `export_fixtures.build_tiny_checkpoint` (two codes over the tiny pipeline)
with one change: its random router head would send every prompt to the same code, so the
head is rewritten to split prompts along one direction of the sentence-embedding space
(vehicle prompts -> one code, food prompts -> the other). Routing, grouping and the return
order are then exercised by real routes.

For quicker iterations, ``APTP_TEST_RUNTIME_EXPORT=<dir>`` reuses an export that `tiny_export`
wrote before (its manifest names its checkpoint); by default each session builds its own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

VEHICLE_PROMPTS = ("a red sports car on a highway", "an old truck parked in a city street",
                   "a yellow taxi in new york")
FOOD_PROMPTS = ("a bowl of tomato soup", "a plate of fresh pasta", "a slice of chocolate cake")
STEPS = 4
MAX_BATCH = 4

_BUILT: dict[str, Path] = {}


def _splitting_head(checkpoint: Path) -> None:
    """Router head whose vector is ``silu(k (e . v - mid)) * (code_0 - code_1)``: the sign of
    ``e . v - mid`` picks the code (the cosine ignores the magnitude)."""
    import torch

    from aptp.train import checkpoint as ckpt
    from aptp.train.router import RouterHead, SentenceEncoder

    from export_fixtures import ENCODER

    encoder = SentenceEncoder(ENCODER, device="cpu")
    vehicles = encoder.encode(list(VEHICLE_PROMPTS)).mean(0)
    food = encoder.encode(list(FOOD_PROMPTS)).mean(0)
    direction = vehicles - food
    mid = float(((vehicles + food) / 2) @ direction)
    logits, _ = ckpt.load_codes(checkpoint)
    head = RouterHead.from_pretrained(str(checkpoint / ckpt.ROUTER_HEAD_DIR))
    scale = 5.0
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.fc1.weight[0] = scale * direction
        head.fc1.bias[0] = -scale * mid
        head.fc2.weight[:, 0] = logits[0] - logits[1]
    head.save_pretrained(str(checkpoint / ckpt.ROUTER_HEAD_DIR))


# Hang guards, not timings: where everything runs far slower (about 20x under qemu's arm64
# emulation, scripts/aarch64_check.sh) they are stretched by APTP_TEST_TIMEOUT_SCALE.
TIMEOUT_SCALE = float(os.environ.get("APTP_TEST_TIMEOUT_SCALE", "1"))


def hang_guard(seconds: float) -> float:
    """`seconds` stretched by APTP_TEST_TIMEOUT_SCALE (1 unless set)."""
    return seconds * TIMEOUT_SCALE


# What onnxruntime itself prints on import where it cannot read the CPU list from /sys (the
# arm64 emulation of scripts/aarch64_check.sh); not aptp's output.
_ORT_CPUINFO_NOISE = ("Error in cpuinfo:", "onnxruntime cpuid_info warning:",
                      "onnxruntime warning: cpuinfo_initialize failed")


def aptp_stderr_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that aptp wrote (onnxruntime's cpuinfo warnings left out)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith(_ORT_CPUINFO_NOISE)]


def tiny_export(root: Path) -> Path:
    """The export (``STEPS``-step DDIM, dense UNet included) under `root`, built on first call."""
    if "export" in _BUILT:
        return _BUILT["export"]
    reuse = os.environ.get("APTP_TEST_RUNTIME_EXPORT")
    if reuse:
        _BUILT["export"] = Path(reuse)
        return _BUILT["export"]
    from aptp.export import ExportOptions, export_checkpoint
    from aptp.train.models import resolve_pretrained

    from export_fixtures import build_tiny_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    checkpoint = build_tiny_checkpoint(root / "checkpoint", resolve_pretrained("tiny"))
    _splitting_head(checkpoint)
    export = root / "export"
    export_checkpoint(checkpoint, export, ExportOptions(steps=STEPS, max_batch=MAX_BATCH, scheduler="ddim"))
    _BUILT["export"] = export
    return export


def checkpoint_of_export() -> Path:
    """The checkpoint `tiny_export` exported (recorded in its manifest)."""
    manifest = json.loads((_BUILT["export"] / "manifest.json").read_text())
    return Path(manifest["checkpoint"]["path"])


def shallow_copy(export: Path, target: Path, copy: tuple[str, ...] = ()) -> Path:
    """A copy of `export` whose files are hard links (real copies across filesystems), except
    ``manifest.json`` and `copy` (real copies that a test may modify without touching the shared
    export). Not symlinks: the runtime refuses files that resolve outside the export. ONNX
    external data (``*.data``) is copied too: the onnx package refuses hard-linked weight files
    (a "hardlink attack"), and quantization loads graphs through it."""
    for dirpath, _, filenames in os.walk(export):
        for name in filenames:
            src = Path(dirpath) / name
            rel = src.relative_to(export)
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel.as_posix() == "manifest.json" or rel.as_posix() in copy or name.endswith(".data"):
                shutil.copyfile(src, dst)
            else:
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
    return target


def external_weights_graph(directory: Path, location: str) -> np.ndarray:
    """Write ``m.onnx`` in `directory`: y = x @ W for a (1, 64) input, with the 64x64 weight W in
    the external data file `location` beside it. Returns W. Needs the onnx package."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 100
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(directory / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return weight
