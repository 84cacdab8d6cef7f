"""Reports of `aptp-bench serve`: ``serve.json``, ``serve.md`` and ``serve_latency.png``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ..report_files import save_figure, write_report_files

__all__ = ["checks", "markdown", "plot", "write_reports"]

JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "serve.json", "serve.md", "serve_latency.png"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _peak(results: Mapping[str, Any], server: str, variant: str) -> float | None:
    values = [r["throughput"] for r in results["runs"]
              if r["server"] == server and r["variant"] == variant and r["throughput"]]
    return max(values) if values else None


def checks(results: Mapping[str, Any]) -> dict[str, Any]:
    """The ratios the serving suite exists to show (GenerationServer, same run)."""
    sustained = results["sustained_rate"]
    local = "GenerationServer"
    ray = results.get("ray") or {}
    return {
        "routed_vs_dense_sustained": _ratio(sustained.get(f"{local}/routed"), sustained.get(f"{local}/dense")),
        "routed_vs_static_sustained": _ratio(sustained.get(f"{local}/routed"), sustained.get(f"{local}/static")),
        "routed_vs_dense_peak_throughput": _ratio(_peak(results, local, "routed"), _peak(results, local, "dense")),
        "routed_vs_static_peak_throughput": _ratio(_peak(results, local, "routed"), _peak(results, local, "static")),
        "ray_identical_images": (ray.get("identity") or {}).get("identical_images"),
        "ray_identity_requests": (ray.get("identity") or {}).get("requests"),
        "ray_overhead_s": (ray.get("overhead") or {}).get("overhead_s"),
        "ray_vs_server_sustained": _ratio(sustained.get("ray/routed"), sustained.get(f"{local}/routed")),
        # Results made before the local mode existed carry no "local" entry: their checks stay as they were.
        **({"local_identical_images": (results["local"].get("identity") or {}).get("identical_images"),
            "local_overhead_s": (results["local"].get("overhead") or {}).get("overhead_s"),
            "local_vs_ray_sustained": _ratio(sustained.get("local/routed"), sustained.get("ray/routed"))}
           if results.get("local") else {}),
    }


def _f(value: Any, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _loads(values: Any) -> str:
    return ", ".join(f"{v:.1f}" for v in values) if values else "-"


def _batches(run: Mapping[str, Any]) -> str:
    parts = [f"{k}: {v['mean_batch']:.2f}" for k, v in sorted(run["batches"].items())]
    return ", ".join(parts) or "-"


def markdown(results: Mapping[str, Any]) -> str:
    model, settings, c = results["model"], results["settings"], results["checks"]
    cal = settings["calibration"]
    lines = [
        f"# aptp-bench serve: {Path(results['artifacts']).name}",
        "",
        f"- {model['num_codes']} experts, shares {[round(s, 3) for s in model['shares']]}, {model['nominal_resolution']} px, "
        f"{model['steps']} steps, max batch {model['max_batch']}; routing: {model['routing']}, "
        f"assignment {model['assignment']}",
        f"- MACs: routed prompt mix {model['mixture_macs_ratio']:.3f}, static "
        f"{_f(model['static_macs_ratio'], '{:.3f}')}, dense 1.000",
        f"- Open loop: seeded Poisson arrivals, at most {settings['count']} requests and {settings['max_seconds']} s "
        f"of arrivals per run, same arrivals for every model at a rate, models interleaved per rate; "
        f"batch wait {settings['max_wait_s']} s; {settings['threads']} threads",
        f"- Dense alone: {cal['dense_single_s']:.3f} s per request, {cal['dense_capacity_per_s']:.2f} requests/s "
        f"at full batches; SLO: p95 <= {settings['slo_p95_s']:.2f} s ({settings['slo_rule']})",
        f"- Load average (1/5/15 min) before: {_loads(results['machine'].get('load_average'))}; after: "
        f"{_loads(results['machine'].get('load_average_after'))}; 1-min load at the end of each run in the table",
        "",
        "| server | model | offered /s | throughput /s | p50 s | p95 s | p99 s | done | mean batch per expert | SLO | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results["runs"], key=lambda r: (r["server"], r["variant"], r["offered_rate"])):
        lines.append(f"| {r['server']} | {r['variant']} | {r['offered_rate']:.3f} | {_f(r['throughput'])} | "
                     f"{_f(r['p50_s'])} | {_f(r['p95_s'])} | {_f(r['p99_s'])} | {r['completed']}/{r['requests']} | "
                     f"{_batches(r)} | {'yes' if r['sustained'] else 'no'} | {_f(r.get('load_1min'), '{:.1f}')} |")
    lines += ["", "Highest rate sustained (p95 within the SLO at it and every lower rate):", ""]
    lines += [f"- {name}: {_f(rate, '{:.3f}')} requests/s" for name, rate in results["sustained_rate"].items()]
    lines += ["", "Ratios (same run, GenerationServer):", "",
              f"- routed vs dense, sustained rate: {_f(c['routed_vs_dense_sustained'])}x; peak throughput: "
              f"{_f(c['routed_vs_dense_peak_throughput'])}x",
              f"- routed vs static, sustained rate: {_f(c['routed_vs_static_sustained'])}x; peak throughput: "
              f"{_f(c['routed_vs_static_peak_throughput'])}x"]
    ray = results.get("ray") or {}
    if ray.get("skipped"):
        lines += ["", f"Ray Serve: skipped ({ray['skipped']})."]
    else:
        ident, over = ray.get("identity", {}), ray.get("overhead", {})
        lines += ["", f"Ray Serve (loopback-only network namespace, startup {_f(ray.get('startup_s'), '{:.0f}')} s, "
                  f"replica threads {ray.get('replica_threads')}):", "",
                  f"- images identical to in-process: {ident.get('identical_images')}/{ident.get('requests')} "
                  f"(max pixel difference {ident.get('max_abs_pixel_diff')}), same expert "
                  f"{ident.get('same_expert')}/{ident.get('requests')}",
                  f"- low load, one request at a time: Ray {_f(over.get('ray_median_s'), '{:.3f}')} s vs "
                  f"GenerationServer {_f(over.get('server_median_s'), '{:.3f}')} s per request (median of "
                  f"{over.get('requests')}): overhead {_f((over.get('overhead_s') or 0) * 1e3, '{:.0f}')} ms "
                  f"({_f(over.get('overhead_ratio'))}x)"]
    local = results.get("local")
    if local:
        ident, over = local.get("identity", {}), local.get("overhead", {})
        lines += ["", f"Local mode (aptp-serve's default: uvicorn + GenerationServer in one process, {local.get('url')}, "
                  f"startup {_f(local.get('startup_s'), '{:.1f}')} s):", "",
                  f"- images identical to in-process: {ident.get('identical_images')}/{ident.get('requests')} "
                  f"(max pixel difference {ident.get('max_abs_pixel_diff')})",
                  f"- low load, one request at a time: HTTP {_f(over.get('http_median_s'), '{:.3f}')} s vs the "
                  f"pipeline called directly {_f(over.get('direct_median_s'), '{:.3f}')} s (median of "
                  f"{over.get('requests')}): overhead {_f((over.get('overhead_s') or 0) * 1e3, '{:.0f}')} ms "
                  f"({_f(over.get('overhead_ratio'))}x)",
                  f"- routed sustained rate, local vs Ray: {_f(c.get('local_vs_ray_sustained'))}x"]
    for note in results.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """p95 latency (solid) and p50 (dotted) against offered rate, per server and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results["runs"]:
        series.setdefault((r["server"], r["variant"]), []).append(r)
    for (server, variant), runs in sorted(series.items()):
        runs = sorted((r for r in runs if r["p95_s"] is not None), key=lambda r: r["offered_rate"])
        x = [r["offered_rate"] for r in runs]
        line, = ax.plot(x, [r["p95_s"] for r in runs], marker="o", label=f"{server} {variant} p95")
        ax.plot(x, [r["p50_s"] for r in runs], linestyle=":", color=line.get_color())
    ax.axhline(results["settings"]["slo_p95_s"], color="grey", linestyle="--", label="SLO (p95)")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (s); dotted: p50")
    ax.set_yscale("log")
    ax.set_title(f"{Path(results['artifacts']).name}: latency vs load", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_reports(results: Mapping[str, Any], directory: str | os.PathLike) -> dict[str, Path]:
    """Write the three reports into `directory` (the JSON through a temp file and a rename)."""
    results["machine"]["load_average_after"] = list(os.getloadavg())  # type: ignore[index]
    return write_report_files(results, directory, (JSON_FILE, MARKDOWN_FILE, PLOT_FILE), markdown, plot)
