"""Time the dense ONNX UNet and every expert under onnxruntime (CPU), side by side in one run.

    python -m aptp.benchmarks.latency.expert_speed --artifacts A [--repeats 20] [--warmup 3] [--batch 2]
                                           [--threads N] [--resolution PX] [--json FILE]

All sessions are loaded first; after each model's warm-up calls, the timed calls go round-robin
over the models (dense, expert 0, expert 1, ...) so that background load hits them equally.
Per model it reports the median latency and the latency ratio to the dense UNet next to the
MACs ratio from the manifest: with a CPU backend the two should roughly agree, and where they
do not (small layers, memory-bound ops) that is the finding. torch-free: numpy, onnxruntime
and the manifest reader only.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aptp.errors import AptpError, ArtifactError

__all__ = ["benchmark", "format_table", "main"]

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _inputs(manifest: dict[str, Any], batch: int, seed: int, resolution: int | None = None) -> dict[str, np.ndarray]:
    """UNet inputs at the manifest's nominal latent size (or `resolution` pixels) and text length."""
    rng = np.random.default_rng(seed)
    io = manifest.get("io", {}).get("unet", {}).get("inputs", {})
    dtype = _NUMPY_DTYPES[io.get("sample", {}).get("dtype", "float32")]
    latent = dict(manifest["latent"])
    if resolution:
        multiple = int(manifest["image"].get("size_multiple", manifest["vae"]["scale_factor"]))
        if resolution % multiple:
            raise ArtifactError(f"--resolution {resolution} is not a multiple of {multiple} for this export")
        latent["height"] = latent["width"] = resolution // int(manifest["vae"]["scale_factor"])
    length = int(manifest["tokenizer"]["max_length"])
    hidden = int(manifest["text_encoder"]["hidden_size"])
    steps = manifest["scheduler"]["timesteps"]
    return {
        "sample": rng.standard_normal((batch, latent["channels"], latent["height"], latent["width"])).astype(dtype),
        "timestep": np.full((batch,), float(steps[len(steps) // 2]), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, length, hidden)).astype(dtype),
    }


def benchmark(artifacts: str | Path, repeats: int = 20, warmup: int = 3, batch: int = 2,
              threads: int | None = None, seed: int = 0, resolution: int | None = None) -> list[dict[str, Any]]:
    """Median latency of every UNet of an export; one row per model, dense first.

    `resolution` (pixels) overrides the export's nominal size; the graphs are dynamic, but the
    manifest's MACs ratios were counted at the checkpoint's resolution.

    Each row: ``name``, ``macs_ratio``, ``median_ms``, ``min_ms``, ``latency_ratio`` (median over
    the dense median; None without a dense UNet), ``repeats``.
    """
    from aptp.export.manifest import read_manifest

    if repeats < 1 or warmup < 0 or batch < 1:
        raise ArtifactError(f"need repeats >= 1, warmup >= 0, batch >= 1 (got {repeats}, {warmup}, {batch})")
    root = Path(artifacts)
    manifest = read_manifest(root, verify=False)
    models: list[tuple[str, float, Any]] = []
    if manifest.get("dense"):
        models.append(("dense", 1.0, _session(root / manifest["dense"]["unet"], threads)))
    for entry in manifest["experts"]:
        models.append((f"expert_{entry['code']}", float(entry["macs_ratio"]), _session(root / entry["unet"], threads)))
    feed = _inputs(manifest, batch, seed, resolution)
    for _, _, session in models:
        for _ in range(warmup):
            session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name, _, _ in models}
    for _ in range(repeats):
        for name, _, session in models:
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    dense_median = statistics.median(times["dense"]) if "dense" in times else None
    rows = []
    for name, macs, _ in models:
        median = statistics.median(times[name])
        rows.append({
            "name": name,
            "macs_ratio": macs,
            "median_ms": median,
            "min_ms": min(times[name]),
            "latency_ratio": median / dense_median if dense_median else None,
            "repeats": repeats,
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of `benchmark` rows."""
    lines = [f"{'model':<10} {'MACs ratio':>10} {'median ms':>10} {'min ms':>8} {'latency ratio':>13}"]
    for row in rows:
        ratio = "n/a" if row["latency_ratio"] is None else f"{row['latency_ratio']:.3f}"
        lines.append(f"{row['name']:<10} {row['macs_ratio']:>10.3f} {row['median_ms']:>10.2f} "
                     f"{row['min_ms']:>8.2f} {ratio:>13}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onnx_expert_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True, metavar="DIR", help="an aptp-export directory")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per model first (default: 3)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one prompt with guidance)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    parser.add_argument("--resolution", type=int, default=None, metavar="PX",
                        help="image size to time at (default: the export's nominal size)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        rows = benchmark(args.artifacts, args.repeats, args.warmup, args.batch, args.threads,
                         resolution=args.resolution)
    except AptpError as error:
        print(f"onnx_expert_speed: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
