"""CPU graphs: every UNet optimised once at export, so that a CPU session need not redo it.

    aptp-export --checkpoint runs/tiny --output runs/tiny-export --cpu-graphs

onnxruntime optimises a graph each time a session is created (constant folding, shape
inference, fusions). Creating a session on the narrow SD 2.1 export's expert 0 at 128 px took
0.74 s from the exported graph and 0.32 s from one optimised beforehand (dense UNet: 0.95 ->
0.50 s; 2 cores, onnxruntime 1.32, 2026-12-06), with outputs bit for bit equal. That matters wherever sessions come and go: the runtime's memory budget loads and
evicts UNets, and every load is a session creation.

`optimize_unet` writes ``unet.cpu.onnx`` (+ ``unet.cpu.onnx.data``) beside each UNet at
onnxruntime's *extended* level: constant folding, shape inference and the CPU fusions
(FusedMatMul, FusedConv, QuickGelu, ...), which run on any x86-64 or arm64 CPU. The *all*
level adds layout transforms tied to the CPU's vector width; the runtime's session still
applies them when it loads the graph, so the file stays portable between CPUs. The fused
operators are onnxruntime's CPU kernels, so these graphs are for ``device="cpu"`` only: CUDA
and TensorRT keep the exported graphs. Parity: the optimised graph's output on a seeded feed
must equal the exported graph's within `MAX_DIFF` (it is recorded in the manifest).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from aptp.errors import ArtifactError
from aptp.outputs import ordinary_mode

from .manifest import file_sha256, open_fp32_export, replace_manifest, unet_entries

__all__ = ["CPU_GRAPH_FILE", "MAX_DIFF", "optimize_export", "optimize_unet"]

logger = logging.getLogger(__name__)

CPU_GRAPH_FILE = "unet.cpu.onnx"
#: Largest absolute difference allowed between the exported and the optimised graph's output.
MAX_DIFF = 1e-4
_LEVEL = "ORT_ENABLE_EXTENDED"


def _session(ort: Any, path: Path, level: Any, save: Path | None = None, threads: int | None = None) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if save is not None:
        options.optimized_model_filepath = str(save)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         save.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _probe_feed(session: Any, latent: int, text_length: int, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for inp in session.get_inputs():
        if inp.name == "sample":
            feed[inp.name] = rng.standard_normal((batch, int(inp.shape[1]), latent, latent), dtype=np.float32)
        elif inp.name == "timestep":
            feed[inp.name] = np.full((batch,), 500, dtype=np.int64 if "int64" in inp.type else np.float32)
        elif inp.name == "encoder_hidden_states":
            feed[inp.name] = rng.standard_normal((batch, text_length, int(inp.shape[2])), dtype=np.float32)
        else:
            raise ArtifactError(f"UNet input {inp.name!r} is not one aptp exports (sample, timestep, "
                                "encoder_hidden_states)")
    return feed


def optimize_unet(graph: str | os.PathLike, output: str | os.PathLike, latent: int, text_length: int,
                  threads: int | None = None) -> dict[str, Any]:
    """Write `graph` optimised for CPU sessions to `output` (+ ``.data``), after checking that
    its output equals the exported graph's; returns what the manifest records.

    Raises:
        ArtifactError: the optimised graph's output differs by more than `MAX_DIFF`.
    """
    import onnx
    import onnxruntime as ort

    graph, output = Path(graph), Path(output)
    with tempfile.TemporaryDirectory(prefix=".cpu-graph-", dir=output.parent) as tmp:
        staged = Path(tmp) / output.name
        _session(ort, graph, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, save=staged, threads=threads)
        reference = _session(ort, graph, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads=threads)
        optimised = _session(ort, staged, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads=threads)
        feed = _probe_feed(reference, latent, text_length)
        diff = float(np.abs(reference.run(None, feed)[0] - optimised.run(None, feed)[0]).max())
        if not diff <= MAX_DIFF:
            raise ArtifactError(f"{graph}: the graph optimised for CPU differs from it by {diff:.3g} (more than "
                                f"{MAX_DIFF:g}); export without --cpu-graphs")
        nodes = [len(onnx.load(str(p), load_external_data=False).graph.node) for p in (graph, staged)]
        written = sorted(Path(tmp).iterdir())
        for path in written:
            ordinary_mode(path)
        for path in written:  # the graph last: a graph never points at data not yet in place
            if path != staged:
                os.replace(path, output.parent / path.name)
        os.replace(staged, output)
    return {"level": _LEVEL, "tool": f"onnxruntime {ort.__version__}", "nodes": nodes, "max_abs_diff": diff}


def optimize_export(root: str | os.PathLike, *, keys: Sequence[int | str] | None = None,
                    threads: int | None = None, signing_key: Any = None) -> dict[str, Any]:
    """Add a CPU graph beside every UNet of the export at `root` and list it in the manifest
    (``cpu_graph`` in each UNet's entry); returns the new manifest.

    Raises:
        ConfigError: a signed export without `signing_key` (its manifest changes).
        ArtifactError: the export is incomplete or modified (checked first), or a graph's parity fails.
    """
    root, manifest, signing_key = open_fp32_export(root, signing_key, "adding CPU graphs", "--cpu-graphs",
                                                   "CPU graphs are for fp32 exports (onnxruntime's CPU kernels)")
    latent, text_length = int(manifest["latent"]["height"]), int(manifest["tokenizer"]["max_length"])
    files = dict(manifest["files"])
    for key, entry in tqdm([(k, e) for k, e in unet_entries(manifest) if keys is None or k in keys],
                           desc="CPU graphs", leave=False):
        out = (root / entry["unet"]).with_name(CPU_GRAPH_FILE)
        info = optimize_unet(root / entry["unet"], out, latent, text_length, threads)
        data = out.with_name(out.name + ".data")
        written = [out] + ([data] if data.is_file() else [])
        for path in written:
            files[path.relative_to(root).as_posix()] = file_sha256(path)
        rel = out.relative_to(root).as_posix()
        entry["cpu_graph"] = {"unet": rel, "external_data": data.relative_to(root).as_posix() if data.is_file() else None,
                              "bytes": sum(p.stat().st_size for p in written), "sha256": files[rel], **info}
        logger.info("%s: CPU graph, %d -> %d nodes, max abs diff %.2g", key, *info["nodes"], info["max_abs_diff"])
    manifest["files"] = files
    return replace_manifest(root, manifest, signing_key)
