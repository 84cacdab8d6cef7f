"""Per-op-type profiles (onnxruntime's profiler) and the explanation of a latency-vs-MACs gap."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm


from .backends import unet_inputs
from .model import BenchModel
from .options import DENSE, FIXED, LatencyOptions, STATIC


def profile_by_op(paths: Sequence[Path], shape: Mapping[str, int], batch: int, height: int, width: int,
                  threads: int, repeats: int, directory: Path) -> list[dict[str, float]]:
    """Seconds per ONNX op type for each graph in `paths`, from onnxruntime's profiler.

    The graphs' runs alternate (A, B, A, B, ...) so that background load hits them alike, as in
    the timings; the first run of each (allocations) is dropped, and each op type keeps its
    least disturbed run (the minimum): kernel times are wall times, and a preemption lands on
    whichever op happened to run.
    """
    import onnxruntime as ort

    directory.mkdir(parents=True, exist_ok=True)
    sessions, feeds = [], []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.log_severity_level = 3
        options.profile_file_prefix = str(directory / Path(path).parent.name)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = unet_inputs(batch, shape["channels"], height, width, shape["text_length"], shape["hidden"])
        types = {i.name: i.type for i in session.get_inputs()}
        feeds.append({k: v.astype(np.float16 if types.get(k) == "tensor(float16)" else v.dtype)
                      for k, v in feed.items()})
        sessions.append(session)
    for _ in range(repeats + 1):
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    profiles = []
    for session in sessions:
        events = json.loads(Path(session.end_profiling()).read_text())
        starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
        per_run: list[dict[str, float]] = [defaultdict(float) for _ in starts]
        for event in events:
            if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
                continue
            run = max((i for i, t in enumerate(starts) if t <= event["ts"]), default=0)
            per_run[run][event.get("args", {}).get("op_name", "?")] += float(event.get("dur", 0)) * 1e-6
        kept = per_run[1:] or per_run
        ops = set().union(*kept) if kept else set()
        per_op = {op: min(run.get(op, 0.0) for run in kept) for op in ops}
        profiles.append(dict(sorted(per_op.items(), key=lambda kv: -kv[1])))
    return profiles


def fixed_cost_fit(rows: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Least-squares ``latency = fixed + slope * MACs ratio`` over the sliced models (dense,
    experts, static) of one backend, resolution, batch and kind of session (all dynamic or all
    ``+fixed``): `fixed` is the per-call cost that slicing cannot remove (op dispatch,
    memory-bound and fixed-width ops)."""
    sliced = [r for r in rows if (base := r["variant"].removesuffix(FIXED)) == DENSE or base.startswith("expert_")
              or base == STATIC]
    points = [(float(r["macs_ratio"]), float(r["median_s"])) for r in sliced]
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    slope, fixed = np.polyfit(xs, ys, 1)
    dense = float(next(r["median_s"] for r in sliced if r["variant"].removesuffix(FIXED) == DENSE))
    return {"fixed_s": float(fixed), "slope_s": float(slope), "fixed_share": float(fixed) / dense,
            "points": len(points)}


def explain_gap(expert_ops: Mapping[str, float], dense_ops: Mapping[str, float], macs_ratio: float,
                latency_ratio: float, fit: Mapping[str, float] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Per op type: dense and expert seconds, their ratio, and the excess over MACs-proportional
    time; a sentence naming the op types that account for most of the gap."""
    rows = []
    for op in sorted(set(expert_ops) | set(dense_ops)):
        d, e = dense_ops.get(op, 0.0), expert_ops.get(op, 0.0)
        rows.append({"op_type": op, "dense_s": d, "expert_s": e, "ratio": e / d if d else None,
                     "excess_s": e - macs_ratio * d})
    rows.sort(key=lambda r: -abs(r["excess_s"]))
    total_dense = sum(dense_ops.values()) or 1.0
    total_excess = sum(r["excess_s"] for r in rows)
    direction = "slower" if latency_ratio > macs_ratio else "faster"
    top = [r for r in rows[:4] if abs(r["excess_s"]) > 0]
    parts = []
    for r in top:
        share = 100.0 * r["dense_s"] / total_dense
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        parts.append(f"{r['op_type']} ({share:.0f}% of dense op time, time ratio {ratio}, "
                     f"excess {1e3 * r['excess_s']:+.2f} ms)")
    profiled = sum(expert_ops.values()) / total_dense
    text = (f"latency ratio {latency_ratio:.3f} vs MACs ratio {macs_ratio:.3f}: the expert is {direction} than "
            f"MACs-proportional. ")
    if fit is not None:
        share = min(max(fit["fixed_share"], 0.0), 1.0)
        text += (f"A linear fit of latency against MACs over the sliced models at this size gives a fixed cost of "
                 f"{1e3 * fit['fixed_s']:.2f} ms per call ({100 * fit['fixed_share']:.0f}% of dense), which slicing "
                 f"cannot remove: with it the expected latency ratio is {share + (1 - share) * macs_ratio:.3f}. ")
    # The profile ran at other moments than the timing: say so when its excess has the other sign.
    agrees = (total_excess > 0) == (latency_ratio > macs_ratio)
    text += (f"The profile (op time ratio {profiled:.3f}) puts the excess over MACs-proportional time at "
             f"{1e3 * total_excess:+.2f} ms per step"
             + ("" if agrees else f" ({'below' if total_excess < 0 else 'above'} it, unlike the timing: profile and "
                "timing ran at different moments; the timing is the figure to read)")
             + ", led by " + "; ".join(parts) + ". Op types whose time ratio exceeds the MACs ratio do "
            "not shrink with width (fixed-cost ops such as GroupNorm, Softmax, reshapes and elementwise "
            "kernels, or GEMMs at widths that tile poorly); a time ratio below it means that op got more "
            "efficient.")
    return rows, text


def profile_gaps(model: BenchModel, results: Mapping[str, Any], static: dict[str, Any] | None, threads: int,
                 options: LatencyOptions, out: Path) -> list[dict[str, Any]]:
    worst: dict[str, dict[str, Any]] = {}
    for row in results["unet_step"]:
        if (row["backend"] != "onnxruntime" or row.get("sessions", "dynamic") != "dynamic"
                or "within_threshold" not in row or row["within_threshold"]):
            continue
        if row["variant"] not in worst or row["deviation"] > worst[row["variant"]]["deviation"]:
            worst[row["variant"]] = row
    gaps = []
    paths = {DENSE: model.root / model.manifest["dense"]["unet"],
             **{f"expert_{e['code']}": model.root / e["unet"] for e in model.manifest["experts"]}}
    if static:
        paths[STATIC] = Path(static["onnx"])
    for name, row in tqdm(sorted(worst.items()), desc="profiles", leave=False):
        latent = row["resolution"] // model.vae_factor
        dense_ops, ops = profile_by_op([paths[DENSE], paths[name]], model.shape, row["batch"], latent, latent,
                                       threads, options.profile_repeats, out / "profiles")
        peers = [r for r in results["unet_step"] if (r["backend"], r["resolution"], r["batch"], r.get("sessions")) ==
                 (row["backend"], row["resolution"], row["batch"], row.get("sessions"))]
        fit = fixed_cost_fit(peers)
        table, text = explain_gap(ops, dense_ops, row["macs_ratio"], row["latency_ratio"], fit)
        gaps.append({"backend": row["backend"], "variant": name, "resolution": row["resolution"], "batch": row["batch"],
                     "latency_ratio": row["latency_ratio"], "macs_ratio": row["macs_ratio"],
                     "deviation": row["deviation"], "profiled_ratio": sum(ops.values()) / (sum(dense_ops.values()) or 1),
                     "fixed_cost_fit": fit, "op_types": table, "explanation": text})
    return gaps
