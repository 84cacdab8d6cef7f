"""Dynamic against shape-specialised UNet sessions, side by side in one process (CPU).

    python -m aptp.benchmarks.latency.shape_sessions EXPORT [--batches 2 8] [--rounds 8] [--threads 2]

For each UNet of the export (experts, then dense) and each UNet batch: the dynamic session,
the same session specialised to the call's shape (`aptp.runtime.shape_sessions`) and the
dynamic session with onnxruntime's intra-op spinning off, timed interleaved (the order flips
each round) so that a loaded machine slows them alike. Prints medians, the spread (min-max),
each variant's ratio to the dense UNet's dynamic time against its MACs ratio, the
specialisation's creation time and the RSS it added. No hashes are checked (benchmarks time;
the runtime verifies).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from .backends import unet_inputs


def _engines(graph: Path, data: Path | None, threads: int) -> dict:
    from aptp.runtime.engine import OnnxRuntimeEngine
    from aptp.runtime.shape_sessions import ShapeSessionEngine

    external = [(data, None)] if data is not None else ()

    class NoSpin(OnnxRuntimeEngine):
        def _session_options(self, ort):
            options = super()._session_options(ort)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return options

    return {"dynamic": OnnxRuntimeEngine(graph, threads=threads, external_data=external),
            "specialised": ShapeSessionEngine(graph, threads=threads, external_data=external, min_calls=1),
            "dynamic-nospin": NoSpin(graph, threads=threads, external_data=external)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    root = Path(args.export)
    manifest = json.loads((root / "manifest.json").read_text())
    unets = [(f"expert_{e['code']}", e) for e in manifest["experts"]] + [("dense", manifest["dense"])]
    latent = manifest["image"]["height"] // 8
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, {args.threads} threads, "
          f"{latent}x{latent} latents, {args.rounds} interleaved rounds")
    medians: dict[tuple[str, int, str], float] = {}
    for name, entry in unets:
        data = root / entry["external_data"] if entry.get("external_data") else None
        engines = _engines(root / entry["unet"], data, args.threads)
        for engine in engines.values():
            engine.load()
        shapes = {i.name: i.shape for i in engines["dynamic"].session.get_inputs()}
        for batch in args.batches:
            feed = unet_inputs(batch, shapes["sample"][1], latent, latent, 77, shapes["encoder_hidden_states"][2])
            spec = engines["specialised"]
            before = spec.create_seconds
            reference = engines["dynamic"].infer(feed)["out_sample"]
            diff = float(np.abs(spec.infer(feed)["out_sample"] - reference).max())
            created = spec.create_seconds - before
            times: dict[str, list[float]] = {k: [] for k in engines}
            for r in range(args.rounds):
                for key in list(engines) if r % 2 == 0 else list(engines)[::-1]:
                    clock = time.perf_counter()
                    engines[key].infer(feed)
                    times[key].append(time.perf_counter() - clock)
            cells = []
            for key, t in times.items():
                medians[(name, batch, key)] = float(np.median(t))
                cells.append(f"{key} {np.median(t) * 1e3:.0f} ms [{min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}]")
            print(f"{name} b{batch}: " + ", ".join(cells) + f"; specialised in {created:.2f} s, "
                  f"+{spec.extra_bytes >> 20} MiB, max diff {diff:.1e}", flush=True)
        for engine in engines.values():
            engine.unload()
    print("ratio to dense (same variant) vs MACs ratio:")
    for name, entry in unets:
        for batch in args.batches:
            ratios = ", ".join(f"{key} {medians[(name, batch, key)] / medians[('dense', batch, key)]:.3f}"
                               for key in ("dynamic", "specialised", "dynamic-nospin"))
            print(f"  {name} b{batch} (MACs {entry.get('macs_ratio', 1.0):.3f}): {ratios}")


if __name__ == "__main__":
    main()
