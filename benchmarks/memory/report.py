"""Reports of the memory suite: ``memory.json``, ``memory.md`` (tables) and ``memory.png``
(RSS over time per budget and precision; throughput against budget)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..machine import machine_lines
from ..report_files import save_figure, write_report_files
from .ratios import peak_over_budget, pinned_rss, throughput_vs_reference

__all__ = ["write_memory_reports", "memory_markdown", "memory_plot"]

GiB = 1024**3


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GiB:.2f}"


def _budget(run: Mapping[str, Any]) -> str:
    if run["budget_bytes"] is None:
        return "unlimited"
    return f"{run['budget_label']} ({_gib(run['budget_bytes'])} GiB)"


def memory_markdown(results: Mapping[str, Any]) -> str:
    s = results["settings"]
    arrivals = "backlog" if not s["arrival_gap_s"] else f"mean gap {s['arrival_gap_s']} s"
    lines = [
        f"# Memory: {Path(results['artifacts']).name}", "",
        *machine_lines(results["machine"], {**s, "repeats": s.get("step_repeats"), "warmup": s.get("step_warmup"),
                                              "interleaved": True, "statistic": "step latency: median"}),
        f"- Workload: {s['requests']} requests, seed {s['seed']}, experts assigned {s['assignment']}, shuffled "
        f"arrivals ({arrivals}); "
        f"{s['image']['height']} px, {s['steps']} steps, guidance {s['guidance_scale'] or 'the export default'}, "
        f"max_batch {s['max_batch']}, max_wait {s['max_wait']} s, max_wait_s {s['max_wait_s']} s",
        "- Each run is a fresh process; RSS sampled every "
        f"{s['sample_interval']} s in it; 'pinned loaded' = RSS with router, text encoder and VAE decoder "
        "loaded, before any request; 'pinned at work' = the highest RSS before the first UNet load began "
        "(those parts having run on the first batch); the budget covers the UNet sessions only", "",
        "| precision | round | budget | peak RSS (GiB) | mean RSS (GiB) | pinned loaded / at work (GiB) | "
        "peak - pinned at work / budget | "
        "throughput (req/s) | vs reference (same round) | p50 latency (s) | p95 latency (s) | loads | evictions | "
        "swaps | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = results["checks"]
    runs = list(results["runs"])
    for run in runs:
        frac = peak_over_budget(run)
        st = run["stats"]
        lines.append(
            f"| {run['precision']} | {run.get('round', 0)} | {_budget(run)} | {_gib(run['peak_rss_bytes'])} | "
            f"{_gib(run['mean_rss_bytes'])} | {_gib(run['baseline_rss_bytes'])} / {_gib(pinned_rss(run))} | "
            f"{'n/a' if frac is None else f'{frac:.2f}'} | {run['throughput_rps']:.4f} | "
            f"{throughput_vs_reference(run, runs):.2f}x | {run['latency_s']['p50']:.1f} | "
            f"{run['latency_s']['p95']:.1f} | {st['loads']} | {st['evictions']} | {st['expert_swaps']} | "
            f"{st['batch_size_mean']:.2f} |")
    notes = {r["budget_note"] for r in results["runs"] if r.get("budget_note")}
    lines += [""] + [f"Note: {n}." for n in sorted(notes)] + [""]
    for precision, check in checks.items():
        lines.append(f"- {precision}: latents identical across budgets: {check['identical_latents_across_budgets']} "
                     f"(reference run: {check['reference']})")
        for label, c in check["runs"].items():
            if c["peak_over_pinned_vs_budget"] is None:
                continue
            lines.append(
                f"  - {label}: throughput {c['throughput_vs_reference']:.2f}x the reference (median over "
                f"{len(c.get('throughput_vs_reference_by_round', [0]))} round(s)); peak RSS within budget + pinned "
                f"parts in every round: {c['peak_rss_within_budget_plus_pinned']} (worst (peak - pinned) / budget "
                f"{c['peak_over_pinned_vs_budget']:.2f})")
    lines += ["", "| UNet | MACs ratio | share | fp32 MiB | int8 MiB | int8 method | fp32 step (s) | int8 step (s) | "
              "int8 speedup | latents mean abs err | pixels mean abs err (0-255) | pixels max |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for u in results["unets"]:
        err = u.get("int8_error") or {}

        def f(v: Any, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        method = (u.get("int8_method") or "n/a").split(" (")[0]
        lines.append(
            f"| {u['key']} | {f(u['macs_ratio'], '.3f')} | {f(u['share'], '.2f')} | {u['fp32_bytes'] / 2**20:.0f} | "
            f"{f(None if u['int8_bytes'] is None else u['int8_bytes'] / 2**20, '.0f')} | {method} | "
            f"{f(u['fp32_step_s'], '.3f')} | {f(u['int8_step_s'], '.3f')} | {f(u['int8_speedup'], '.2f')} | "
            f"{f(err.get('latents_mean_abs'), '.4f')} | {f(err.get('pixels_mean_abs'), '.2f')} | "
            f"{f(err.get('pixels_max_abs'), 'd')} |")
    ops = {json.dumps(u["int8_ops"], sort_keys=True) for u in results["unets"] if u.get("int8_ops")}
    if ops:
        lines += ["", f"int8 quantized op types (node counts, per UNet): {'; '.join(sorted(ops))}"]
    lines += _op_profile_lines(results["unets"])
    return "\n".join(lines) + "\n"


def _op_profile_lines(unets: list[Mapping[str, Any]], top: int = 14) -> list[str]:
    """Seconds per op type of one UNet step, fp32 against int8, summed over the profiled UNets."""
    profiled = [u for u in unets if u.get("ops")]
    if not profiled:
        return []
    totals: dict[str, list[float]] = {}
    for u in profiled:
        for column, precision in enumerate(("fp32", "int8")):
            for op, seconds in u["ops"][precision].items():
                totals.setdefault(op, [0.0, 0.0])[column] += seconds
    fp32_all, int8_all = (sum(t[i] for t in totals.values()) for i in (0, 1))
    lines = ["", f"Per-op profile (onnxruntime's profiler; seconds of one step, summed over {len(profiled)} UNets; "
             f"total {fp32_all:.3f} s fp32 vs {int8_all:.3f} s int8):", "",
             "| op type | fp32 (s) | int8 (s) | int8 / fp32 |", "|---|---|---|---|"]
    for op, (a, b) in sorted(totals.items(), key=lambda kv: -max(kv[1]))[:top]:
        lines.append(f"| {op} | {a:.4f} | {b:.4f} | {'n/a' if not a else f'{b / a:.2f}'} |")
    return lines


def memory_plot(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    styles = {"fp32": "-", "int8": "--"}
    for i, run in enumerate(results["runs"]):
        t = [p[0] for p in run["rss_timeline"]]
        v = [p[1] / GiB for p in run["rss_timeline"]]
        left.plot(t, v, styles.get(run["precision"], "-"), color=plt.cm.tab10(i % 10),
                  label=f"{run['precision']} {_budget(run)}")
        if run["budget_bytes"] is not None:
            left.axhline((run["budget_bytes"] + run["baseline_rss_bytes"]) / GiB, color=plt.cm.tab10(i % 10),
                         linewidth=0.6, linestyle=":")
    left.set_xlabel("seconds since the first request")
    left.set_ylabel("RSS of the serving process (GiB)")
    left.set_title("RSS over time (dotted: budget + pinned parts)", fontsize=9)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    for precision in sorted({r["precision"] for r in results["runs"]}):
        runs = [r for r in results["runs"] if r["precision"] == precision]
        xs = [(r["budget_bytes"] or 0) / GiB for r in runs]
        ref = max(x for x in xs) * 1.25 or 1.0
        xs = [x if r["budget_bytes"] is not None else ref for x, r in zip(xs, runs)]
        right.plot(xs, [r["throughput_rps"] for r in runs], "o" + styles.get(precision, "-"), label=precision)
        for x, r in zip(xs, runs):
            right.annotate(r["budget_label"], (x, r["throughput_rps"]), fontsize=7)
    right.set_xlabel("UNet memory budget (GiB; rightmost = unlimited)")
    right.set_ylabel("throughput (requests / s)")
    right.set_title("throughput vs budget", fontsize=9)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(f"{Path(results['artifacts']).name}: serving under a memory budget", fontsize=10)
    return save_figure(fig, path)


def write_memory_reports(results: Mapping[str, Any], directory: str | os.PathLike) -> dict[str, Path]:
    """memory.json (atomic), memory.md and memory.png in `directory`."""
    return write_report_files(results, directory, ("memory.json", "memory.md", "memory.png"), memory_markdown, memory_plot)
