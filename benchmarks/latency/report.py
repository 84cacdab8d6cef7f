"""Reports of the latency suite: ``results.json`` (every figure and the machine), ``results.md``
(tables) and ``latency_vs_macs.png`` (latency ratio against MACs ratio, with the ideal line).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from ..machine import machine_lines
from ..report_files import save_figure, write_report_files
from .options import FIXED

__all__ = ["JSON_FILE", "MARKDOWN_FILE", "PLOT_FILE", "markdown", "plot", "write_reports"]

JSON_FILE = "results.json"
MARKDOWN_FILE = "results.md"
PLOT_FILE = "latency_vs_macs.png"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1e3 * seconds:.1f}"


def _ratio(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _variant_order(name: str) -> tuple[int, int, bool]:
    fixed, name = name.endswith(FIXED), name.removesuffix(FIXED)
    if name == "dense":
        return (0, 0, fixed)
    if name.startswith("expert_"):
        return (1, int(name.split("_")[1]), fixed)
    if name == "static":
        return (2, 0, fixed)
    return (3, int(name.split("_")[1]) if "_" in name else 0, fixed)


def markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report: model, machine, one UNet-step table per backend and resolution,
    end-to-end throughput, overheads, gaps with their profiles, and the checks."""
    model, settings = results["model"], results["settings"]
    lines = [f"# aptp-bench latency: {Path(results['artifacts']).name}", ""]
    synthetic = model.get("synthetic")
    lines.append(f"- Export: `{results['artifacts']}` ({model['num_codes']} experts, nominal "
                 f"{model['nominal_resolution']} px, text length {model['text_length']}, {model.get('precision')})")
    if synthetic:
        lines.append(f"- **Synthetic**: {synthetic.get('config')} config with {synthetic.get('weights')}; routing "
                     f"{synthetic.get('routing')}")
    lines += machine_lines(results["machine"], settings)
    lines.append(f"- Created {results['created']}; batch = {settings.get('batch_meaning')}")
    for note in results.get("notes", []):
        lines.append(f"- Note: {note}")
    lines.append("")

    rows_by = defaultdict(list)
    for row in results["unet_step"]:
        rows_by[(row["backend"], row["resolution"])].append(row)
    lines.append("## UNet step latency")
    lines.append("")
    lines.append("Per cell: median ms (IQR ms) | latency ratio to dense | latency ratio / MACs ratio "
                 "(1.00 = exactly MACs-proportional). `masked_k`: the full UNet under expert k's mask; `+fixed`: "
                 "the same graph through a session specialised to the call's shapes, its ratio against dense+fixed.")
    for (backend, resolution), rows in rows_by.items():
        batches = sorted({r["batch"] for r in rows})
        lines += ["", f"### {backend}, {resolution} px", ""]
        lines.append("| variant | MACs ratio | " + " | ".join(f"batch {b}" for b in batches) + " |")
        lines.append("|---|---|" + "---|" * len(batches))
        by_variant = defaultdict(dict)
        for r in rows:
            by_variant[r["variant"]][r["batch"]] = r
        for variant in sorted(by_variant, key=_variant_order):
            cells = by_variant[variant]
            any_row = next(iter(cells.values()))
            macs = _ratio(any_row.get("macs_ratio"))
            out = []
            for b in batches:
                r = cells.get(b)
                if r is None:
                    out.append("")
                    continue
                flag = " **!**" if r.get("within_threshold") is False else ""
                out.append(f"{_ms(r['median_s'])} ({_ms(r['iqr_s'])}) \\| {_ratio(r['latency_ratio'], 2)} \\| "
                           f"{_ratio(r.get('latency_per_macs'), 2)}{flag}")
            lines.append(f"| {variant} | {macs} | " + " | ".join(out) + " |")
    lines += ["", f"**!**: latency ratio more than {100 * settings.get('gap_threshold', 0.15):.0f}% away from the "
              "MACs ratio (see Gaps).", ""]
    fits = results.get("fixed_cost_fits") or []
    if fits:
        switches = _switch_costs(results["unet_step"])
        lines += ["Fixed per-call cost, from a least-squares fit latency = fixed + slope x MACs ratio over the "
                  "sliced models (dense, experts, static) of each configuration and kind of session: the share of a "
                  "step that slicing cannot remove. Switch: what the first call after another model ran costs over a "
                  f"call in a row (median over the models; {settings.get('calls_in_a_row', 1)} calls per turn).", "",
                  "| backend | px | batch | sessions | fixed ms | share of dense | switch ms |",
                  "|---|---|---|---|---|---|---|"]
        for f in fits:
            kind = f.get("sessions", "dynamic")
            switch = switches.get((f["backend"], f["resolution"], f["batch"], kind))
            lines.append(f"| {f['backend']} | {f['resolution']} | {f['batch']} | {kind} | {1e3 * f['fixed_s']:.1f} | "
                         f"{100 * f['fixed_share']:.0f}% | {'n/a' if switch is None else f'{1e3 * switch:+.1f}'} |")
        lines.append("")
    fixed = [r for r in results["unet_step"] if r.get("speed_vs_dynamic") is not None]
    if fixed:
        lines += ["Sessions specialised to the call's shapes (`--fixed-shapes`, what `--shape-sessions` runs) "
                  "against the dynamic session of the same graph, interleaved: speed (dynamic / fixed median), the "
                  "time to create one, and memory: the RSS a specialised session added, and what the dynamic "
                  "session plus one specialised session hold against the dynamic session alone (weights and arena).",
                  "", "| variant | px | batch | speed vs dynamic | created in s | RSS added MiB | memory vs dynamic |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(fixed, key=lambda r: (r["resolution"], r["batch"], _variant_order(r["variant"]))):
            added = r.get("specialised_bytes")
            lines.append(f"| {r['variant'].removesuffix(FIXED)} | {r['resolution']} | {r['batch']} | "
                         f"{r['speed_vs_dynamic']:.3f}x | {_ratio(r.get('specialised_s'), 2)} | "
                         f"{'n/a' if added is None else added >> 20} | {_ratio(r.get('memory_vs_dynamic'), 2)} |")
        lines.append("")

    e2e = results.get("end_to_end") or []
    if e2e:
        first = e2e[0]
        routing = results.get("routing", {})
        lines += ["## End to end", "",
                  f"{first['batch']} mixed prompts per request, {first['steps']} sampler steps, guidance "
                  f"{first['guidance_scale']}, {first['resolution']} px, {first['backend']}; routing: "
                  f"{routing.get('method')}; assignment per expert: "
                  f"{next((r['assignment'] for r in e2e if r['variant'] == 'routed'), None)}.", "",
                  "`@Nw`: N expert groups at once (`--workers N`), each UNet with threads/N threads; denoise sums "
                  "the groups' times, so it exceeds the wall time when they overlap.", "",
                  "| model | MACs ratio | median s/request (IQR) | images/s | speedup vs dense | vs static | "
                  "rows per UNet call, one step | tokenise+route / text / denoise / decode (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            st = r.get("stages_median_s", {})
            stages = " / ".join(_ratio(st.get(k), 3) for k in ("route", "text_encode", "denoise", "decode"))
            vs_static = f"{r['speed_vs_static']:.2f}x" if r.get("speed_vs_static") is not None else ""
            calls = " + ".join(str(n) for n in r.get("unet_calls_per_step") or [])
            lines.append(f"| {r['variant']} | {_ratio(r['macs_ratio'])} | {r['median_s']:.3f} ({r['iqr_s']:.3f}) | "
                         f"{r['images_per_s']:.2f} | {r['speedup_vs_dense']:.2f}x | {vs_static} | {calls} | {stages} |")
        routed = next((r for r in e2e if r["variant"] == "routed"), None)
        if routed:
            lines += ["", f"Router (tokenise + encoder + head): {1e3 * routed['router_s']:.1f} ms "
                      f"({100 * routed['router_share']:.2f}% of the routed request); dispatch (grouping, gathers, "
                      f"scatters): {1e3 * routed['dispatch_s']:.3f} ms ({100 * routed['dispatch_share']:.3f}%); "
                      f"together {100 * routed['overhead_share']:.2f}%."]
        lines.append("")

    gaps = results.get("gaps") or []
    if gaps:
        lines += ["## Gaps between latency and MACs (onnxruntime profiles)", ""]
        for g in gaps:
            lines.append(f"- **{g['variant']}** ({g['resolution']} px, batch {g['batch']}): {g['explanation']}")
            top = g["op_types"][:6]
            lines += ["", "  | op type | dense ms | expert ms | time ratio | excess ms |", "  |---|---|---|---|---|"]
            for op in top:
                lines.append(f"  | {op['op_type']} | {_ms(op['dense_s'])} | {_ms(op['expert_s'])} | "
                             f"{_ratio(op['ratio'], 2)} | {1e3 * op['excess_s']:+.2f} |")
            lines.append("")
    checks = results.get("checks") or {}
    if checks:
        lines += ["## Checks (reported, never asserted)", ""]
        lines.append(f"- onnxruntime expert rows within {100 * settings.get('gap_threshold', 0.15):.0f}% of their MACs "
                     f"ratio: {checks.get('onnxruntime_expert_rows_within_threshold')} of "
                     f"{checks.get('onnxruntime_expert_rows')}; profiled gaps: {', '.join(checks.get('gaps_profiled') or []) or 'none'}")
        if checks.get("routed_speedup_vs_dense") is not None:
            lines.append(f"- routed end-to-end speedup vs dense: {checks['routed_speedup_vs_dense']:.2f}x at MACs ratio "
                         f"{checks['routed_macs_ratio']:.3f} (>= 1.4x: {checks['routed_speedup_at_least_1.4']}); "
                         f"static: {_ratio(checks.get('static_speedup_vs_dense'), 2)}x")
        versus = {w: v for w, v in (checks.get("routed_speed_vs_static") or {}).items() if v is not None}
        speed, memory = checks.get("fixed_shapes_speed_vs_dynamic"), checks.get("fixed_shapes_memory_vs_dynamic")
        if speed:
            lines.append(f"- fixed-shape sessions: {speed[0]:.3f}-{speed[1]:.3f}x the dynamic ones; memory with one per "
                         f"UNet up to {_ratio(memory, 2)}x the dynamic session's")
        if versus:
            lines.append("- routed vs static at equal workers: " + ", ".join(
                f"{v:.2f}x ({w} worker{'s' if w != '1' else ''})" for w, v in versus.items())
                + f"; fastest routed setting on this machine: --workers {checks.get('fastest_routed_workers')}")
        lines.append("")
    backends = results.get("backends", {})
    skipped = [f"{name} ({info['reason']})" for name, info in backends.items() if not info.get("available")]
    if skipped:
        lines += [f"Backends not run: {'; '.join(skipped)}.", ""]
    return "\n".join(lines)


def _switch_costs(rows: list[Mapping[str, Any]]) -> dict[tuple[str, int, int, str], float]:
    """Per (backend, resolution, batch, sessions), the median switch cost over the models that report one."""
    found: dict[tuple[str, int, int, str], list[float]] = defaultdict(list)
    for r in rows:
        if r.get("switch_s") is not None:
            found[(r["backend"], r["resolution"], r["batch"], r.get("sessions", "dynamic"))].append(float(r["switch_s"]))
    return {key: sorted(values)[len(values) // 2] for key, values in found.items()}


def plot(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Latency ratio against MACs ratio per expert (and the static model), one marker per
    backend, one colour per variant, all batch sizes and resolutions; the ideal y = x line and
    the +-threshold band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threshold = float(results["settings"].get("gap_threshold", 0.15))
    rows = [r for r in results["unet_step"] if (r["variant"].startswith("expert_") or r["variant"] == "static")
            and not r["variant"].endswith(FIXED)]
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    line = [0.0, 1.05]
    ax.plot(line, line, "k--", linewidth=1, label="ideal (latency = MACs)")
    ax.fill_between(line, [x * (1 - threshold) for x in line], [x * (1 + threshold) for x in line], color="0.9",
                    label=f"±{100 * threshold:.0f}%")
    markers = dict(zip(["onnxruntime", "onnxruntime-cuda", "tensorrt", "torch", "torch-compile", "torch-cuda"],
                       "os^DvP"))
    variants = sorted({r["variant"] for r in rows}, key=_variant_order)
    colours = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    seen = set()
    for r in rows:
        key = (r["backend"], r["variant"])
        label = f"{r['variant']} [{r['backend']}]" if key not in seen else None
        seen.add(key)
        ax.scatter(r["macs_ratio"], r["latency_ratio"], marker=markers.get(r["backend"], "o"),
                   color=colours[r["variant"]], s=14 + 6 * r["batch"], alpha=0.8, label=label)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, max([1.05] + [r["latency_ratio"] * 1.05 for r in rows]))
    ax.set_xlabel("MACs ratio (expert / dense)")
    ax.set_ylabel("latency ratio (expert / dense, median)")
    ax.set_title(f"{Path(results['artifacts']).name}: latency vs MACs (marker size = batch)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def write_reports(results: Mapping[str, Any], directory: str | os.PathLike) -> dict[str, Path]:
    """Write the three reports into `directory`; returns their paths by kind."""
    return write_report_files(results, directory, (JSON_FILE, MARKDOWN_FILE, PLOT_FILE), markdown, plot)
