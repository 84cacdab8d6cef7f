"""How UNet calls share the cores: three side-by-side measurements behind `aptp.runtime.dispatch`.

    python -m aptp.benchmarks.latency.dispatch_probe EXPORT [--batch 4] [--steps 4] [--rounds 4]
                                                          [--threads 2] [--pairs 4]

* switch: onnxruntime sessions whose threads keep spinning after a run (onnxruntime's default)
  against sessions that stop them (what the runtime sets): the first call after another
  session ran, and the calls after it. Each setting runs in its own process (a spinning
  session slows every other session of its process), the two alternating ``--pairs`` times,
  because this kind of machine drifts between processes.
* groups: every expert's sampling loop (``--steps`` calls of ``--batch`` rows), one after
  another on sessions with every thread, against ``2`` at once on sessions with half of them.
* split: one call of ``--batch`` rows with every thread, against its two row halves at once on
  half-thread sessions (what a request with fewer runs than workers does).

Prints medians per variant and their ratio; nothing is asserted. No hashes are checked
(benchmarks time; the runtime verifies).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .backends import unet_inputs

WORKERS = 2


def _unets(root: Path) -> tuple[dict[str, tuple[Path, Path | None]], int]:
    """Each UNet's graph and weight file by name, and the export's latent size."""
    manifest = json.loads((root / "manifest.json").read_text())
    entries = [(f"expert_{e['code']}", e) for e in manifest["experts"]] + [("dense", manifest["dense"])]
    return ({name: (root / e["unet"], root / e["external_data"] if e.get("external_data") else None)
             for name, e in entries}, int(manifest["latent"]["height"]))


def _engine(paths: tuple[Path, Path | None], threads: int, keep_spinning: bool = False) -> Any:
    from aptp.runtime.engine import STOP_SPINNING_AFTER_RUN, OnnxRuntimeEngine

    class Spinning(OnnxRuntimeEngine):
        def _session_options(self, ort: Any) -> Any:
            options = super()._session_options(ort)
            options.add_session_config_entry(STOP_SPINNING_AFTER_RUN, "0")  # onnxruntime's default
            return options

    graph, data = paths
    engine = (Spinning if keep_spinning else OnnxRuntimeEngine)(
        graph, threads=threads, external_data=[(data, None)] if data is not None else ())
    engine.load()
    return engine


def _feed(engine: Any, latent: int, batch: int) -> dict[str, np.ndarray]:
    shapes = {i.name: i.shape for i in engine.session.get_inputs()}
    return unet_inputs(batch, shapes["sample"][1], latent, latent, 77, shapes["encoder_hidden_states"][2])


def _timed(call: Any) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def switch_child(root: Path, batch: int, rounds: int, threads: int, keep_spinning: bool) -> dict[str, Any]:
    """One process: dense and the smallest expert, turns of 3 calls; first call vs the others."""
    unets, latent = _unets(root)
    names = ["expert_0", "dense"]
    engines = {n: _engine(unets[n], threads, keep_spinning) for n in names}
    feeds = {n: _feed(engines[n], latent, batch) for n in names}
    first: dict[str, list[float]] = {n: [] for n in names}
    after: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            times = [_timed(lambda: engines[n].infer(feeds[n])) for _ in range(3)]
            first[n].append(times[0])
            after[n] += times[1:]
    return {n: {"first_ms": 1e3 * statistics.median(first[n]), "in_a_row_ms": 1e3 * statistics.median(after[n])}
            for n in names}


def switch(root: Path, batch: int, rounds: int, threads: int, pairs: int) -> None:
    print(f"switch: batch {batch}, {threads} threads, one process per setting, {pairs} alternating pairs")
    for pair in range(pairs):
        for setting in ("spinning", "stopped"):
            out = subprocess.run([sys.executable, "-m", __spec__.name, str(root), "--child", setting,
                                  "--batch", str(batch), "--rounds", str(rounds), "--threads", str(threads)],
                                 check=True, capture_output=True, text=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            cells = ", ".join(f"{n} first {v['first_ms']:.1f} / in a row {v['in_a_row_ms']:.1f} ms "
                              f"(+{v['first_ms'] - v['in_a_row_ms']:.1f})" for n, v in got.items())
            print(f"  pair {pair + 1} {setting:>8}: {cells}", flush=True)


def groups(root: Path, batch: int, steps: int, rounds: int, threads: int) -> None:
    unets, latent = _unets(root)
    experts = [n for n in unets if n.startswith("expert_")]
    whole = {n: _engine(unets[n], threads) for n in experts}
    half = {n: _engine(unets[n], max(1, threads // WORKERS)) for n in experts}
    feeds = {n: _feed(whole[n], latent, batch) for n in experts}

    def loop(engine: Any, feed: dict[str, np.ndarray]) -> None:
        for _ in range(steps):
            engine.infer(feed)

    pool = ThreadPoolExecutor(WORKERS)
    variants = {
        "one after another": lambda: [loop(whole[n], feeds[n]) for n in experts],
        f"{WORKERS} at once": lambda: list(pool.map(lambda n: loop(half[n], feeds[n]), experts[::-1])),
    }
    _compare(f"groups: {len(experts)} experts x {steps} calls of {batch} rows", variants, rounds)
    pool.shutdown()


def split(root: Path, batch: int, rounds: int, threads: int) -> None:
    unets, latent = _unets(root)
    pool = ThreadPoolExecutor(WORKERS - 1)
    for name in ("expert_0", "dense"):
        whole, half = _engine(unets[name], threads), _engine(unets[name], max(1, threads // WORKERS))
        feed = _feed(whole, latent, batch)
        middle = batch // 2
        parts = [{k: v[:middle] for k, v in feed.items()}, {k: v[middle:] for k, v in feed.items()}]

        def halves() -> None:
            other = pool.submit(half.infer, parts[1])
            half.infer(parts[0])
            other.result()

        _compare(f"split: {name}, {batch} rows", {"one call": lambda: whole.infer(feed), "halves at once": halves},
                 rounds, in_a_row=3)
    pool.shutdown()


def _compare(title: str, variants: dict[str, Any], rounds: int, in_a_row: int = 1) -> None:
    for call in variants.values():
        call()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for key in list(variants) if r % 2 == 0 else list(variants)[::-1]:
            times[key] += [_timed(variants[key]) for _ in range(in_a_row)]
    medians = {k: statistics.median(v) for k, v in times.items()}
    first, second = list(medians)
    print(f"{title}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in medians.items())
          + f"; {second} {medians[first] / medians[second]:.2f}x faster", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--batch", type=int, default=4, help="UNet rows per call (4: two prompts with guidance)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--child", choices=["spinning", "stopped"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(switch_child(args.export, args.batch, args.rounds, args.threads, args.child == "spinning")))
        return
    switch(args.export, args.batch, args.rounds, args.threads, args.pairs)
    groups(args.export, args.batch, args.steps, args.rounds, args.threads)
    split(args.export, args.batch, args.rounds, args.threads)


if __name__ == "__main__":
    main()
