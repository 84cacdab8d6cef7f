"""``summary.md`` of the GPU check: steps, UNet-step ratio tables per column, end-to-end rows."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["summary_markdown"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:.2f}"


def summary_markdown(results: Mapping[str, Any]) -> str:
    """The check's results as Markdown (every figure also in ``gpu_check.json``)."""
    env = results.get("environment") or {}
    machine = env.get("machine") or {}
    lines = [f"# aptp GPU check{' (DRY RUN: tiny shapes on the CPU, not GPU figures)' if results['dry_run'] else ''}",
             "", f"Created {results['created']}; torch: {env.get('torch')}; onnxruntime: {env.get('onnxruntime')}; "
             f"TensorRT: {env.get('tensorrt')}; CPU: {machine.get('cpu_model')}; GPU: {machine.get('gpu')}.", "",
             "## Steps", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, step in results["steps"].items():
        detail = step.get("error") or step.get("reason") or ""
        lines.append(f"| {name} | {step.get('status')} | {step.get('seconds', '-')} | {str(detail)[:200]} |")
    ext = results.get("cuda_extension")
    if ext:
        lines += ["", f"`aptp._C_cuda`: imported={ext.get('imported')}; {ext.get('status_line')}"]
    tests = results.get("cuda_tests")
    if tests:
        lines += ["", f"CUDA tests: {tests}"]
    if results.get("models"):
        lines += ["", "## MACs ratios", "", "```", str(results["models"]["macs_ratio"]), "```"]
    rows = [r for r in results["unet_step"] if "variant" in r]
    for column in sorted({r["column"] for r in rows}):
        lines += ["", f"## UNet step: {column}", "",
                  "median ms (IQR) per call; latency ratio vs dense / MACs ratio; gap = latency/MACs - 1", "",
                  "| px | batch | variant | provider | median ms | IQR ms | latency ratio | MACs ratio | gap |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["column"] == column):
            gap = "-" if "gap" not in r else f"{100 * r['gap']:+.1f}%"
            lines.append(f"| {r['resolution']} | {r['batch']} | {r['variant']} | {r['provider']} | {_ms(r['median_s'])} "
                         f"| {_ms(r['iqr_s'])} | {r['latency_ratio']:.3f} | {r['macs_ratio']:.3f} | {gap} |")
    skipped = [r for r in results["unet_step"] if "skipped" in r]
    if skipped:
        lines += ["", f"Skipped cells (time budget): {[(r['column'], r['resolution'], r['batch']) for r in skipped]}"]
    if results["end_to_end"]:
        lines += ["", "## End to end", "",
                  "| prompts | variant | provider | px | steps | median s | images/s | vs dense | vs static | MACs | "
                  "assignment |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["end_to_end"]:
            if "variant" not in r:
                lines.append(f"| {r['prompts']} | skipped: {r.get('skipped')} |||||||||")
                continue
            lines.append(f"| {r['prompts']} | {r['variant']} | {r['provider']} | {r['resolution']} | {r['steps']} | "
                         f"{r['median_s']:.3f} | {r['images_per_s']:.2f} | {r['speed_vs_dense']:.2f}x | "
                         f"{r['speed_vs_static']:.2f}x | {r['macs_ratio']:.3f} | {r.get('assignment', '')} |")
    if results.get("checks"):
        lines += ["", "## Goals (computed, not asserted)", ""]
        lines += [f"- {k}: {v}" for k, v in results["checks"].items()]
    lines += ["", *[f"Note: {n}" for n in results.get("notes", [])]]
    return "\n".join(lines) + "\n"
