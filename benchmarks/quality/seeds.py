"""`aptp-bench quality --over-seeds RUN [RUN ...]`: one table over training seeds.

Each quality run (one training seed) has paired intervals over prompts; those say how sure one
seed's comparison is, not whether another seed would agree. Given the runs of several training
seeds (same prompts, noise and settings otherwise), this reports per row the per-seed values
with their mean and spread, per pair of rows the per-seed paired differences and how many seeds
put the whole interval on each side of zero, a pooled difference (each prompt's difference
averaged over the seeds, bootstrapped over prompts: it treats the trained models as fixed, so
the spread over seeds is reported beside it, not folded in), and per routed row the MACs each
prompt family is routed to in every seed.

Writes ``seeds.json`` and ``seeds.md`` in ``--output-dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from aptp.errors import ConfigError

from .paired import family_summary, paired_family_difference

__all__ = ["load_runs", "prompt_families", "family_order", "seed_summary", "seeds_markdown", "run_over_seeds"]


def load_runs(paths: Sequence[str | Path], shared_settings: Sequence[str],
              setting: Callable[[dict[str, Any], str], Any] = lambda settings, key: settings.get(key),
              caller: str = "--over-seeds", minimum: int = 2) -> list[dict[str, Any]]:
    """The quality.json of each path (the file or the run directory holding it), at least
    `minimum` of them, checked to share `shared_settings` (read by `setting`) and to come from
    distinct training seeds; sorted by training seed. Errors name `caller`."""
    if len(paths) < minimum:
        raise ConfigError(f"{caller} needs the runs of at least {minimum} training seeds, got {len(paths)}")
    runs = []
    for path in paths:
        path = Path(path)
        file = path / "quality.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{caller}: {file} does not exist (pass a quality run's directory or its quality.json)")
        run = json.loads(file.read_text())
        if "settings" not in run or "rows" not in run:
            raise ConfigError(f"{caller}: {file} is not an aptp-bench quality result (no settings or rows)")
        run["source"] = str(file)
        runs.append(run)
    first = runs[0]
    for run in runs[1:]:
        differing = [k for k in shared_settings if setting(run["settings"], k) != setting(first["settings"], k)]
        if differing:
            raise ConfigError(f"{caller}: {run['source']} and {first['source']} differ in {', '.join(differing)}; "
                              "only the training seed may differ")
    seeds = [run["settings"]["train_seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{caller}: training seeds repeat ({seeds}); pass one run per seed")
    return sorted(runs, key=lambda run: run["settings"]["train_seed"])


def prompt_families(settings: dict[str, Any]) -> list[str]:
    """The family of each held-out prompt of a run (the prompts are regenerated from its settings)."""
    from aptp.train.data import ProceduralCaptions

    dataset = ProceduralCaptions(settings["num_samples"], 64, seed=settings["prompt_seed"])
    return [dataset.attributes(i)["family"] for i in range(len(dataset))]


def family_order(families: Sequence[str]) -> list[str]:
    """The families present, easiest first (`aptp.train.data.procedural.FAMILIES`), others after."""
    from aptp.train.data.procedural import FAMILIES

    present = set(families)
    return [f for f in FAMILIES if f in present] + sorted(present - set(FAMILIES))


def _spread(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {"per_seed": values, "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def seed_summary(runs: list[dict[str, Any]], families: Sequence[str], pairs: Sequence[tuple[str, str]],
                 row_order: Sequence[str]) -> dict[str, Any]:
    """Per row, per pair and per routed row, over the runs (see the module docstring)."""
    scored = [name for name in row_order
              if all("per_prompt_alignment" in run["rows"].get(name, {}) for run in runs)]
    for run in runs:
        for name in scored:
            if len(run["rows"][name]["per_prompt_alignment"]) != len(families):
                raise ConfigError(f"--over-seeds: row {name} of {run['source']} scored "
                                  f"{len(run['rows'][name]['per_prompt_alignment'])} prompts, expected {len(families)}")
    names = family_order(families) + ["all"]
    counts = {f: int(sum(1 for x in families if x == f)) for f in names[:-1]}
    for run in runs:  # families are regenerated from the settings: they must be the ones scored
        for name in scored:
            recorded = {f: v["n"] for f, v in run["rows"][name].get("family_alignment", {}).items() if f != "all"}
            if recorded and recorded != counts:
                raise ConfigError(f"--over-seeds: the held-out prompts regenerated for {run['source']} have families "
                                  f"{counts}, but row {name} was scored on {recorded}")
    per_prompt = {name: np.array([run["rows"][name]["per_prompt_alignment"] for run in runs]) for name in scored}
    rows: dict[str, Any] = {}
    for name in scored:
        alignment = [family_summary(scores, families) for scores in per_prompt[name]]
        rows[name] = {
            "title": runs[0]["rows"][name]["title"],
            "alignment": {f: _spread([a[f]["mean"] for a in alignment]) for f in names},
            "fid_like": _spread([run["rows"][name]["fid_like"] for run in runs]),
            "cmmd": _spread([run["rows"][name]["cmmd"] for run in runs]),
            "macs_ratio": _spread([run["rows"][name]["routing"]["macs_ratio"] for run in runs]),
            "routed_macs": {f: _spread([run["rows"][name]["routing"]["family_macs"][f]["mean"] for run in runs]) for f in names},
        }
        if all(len(run["rows"][name]["routing"]["code_macs_ratio"]) > 1 for run in runs):  # routed rows only
            rows[name]["routed_macs_minus_mean"] = {
                f: _spread([run["rows"][name]["routing"]["family_macs"][f]["mean"] - run["rows"][name]["routing"]["macs_ratio"]
                            for run in runs]) for f in names if f != "all"}
    out_pairs: dict[str, Any] = {}
    for a, b in pairs:
        if a not in per_prompt or b not in per_prompt:
            continue
        per_seed = [paired_family_difference(x, y, families) for x, y in zip(per_prompt[a], per_prompt[b])]
        pooled = family_summary((per_prompt[a] - per_prompt[b]).mean(axis=0), families)
        out_pairs[f"{a} - {b}"] = {
            f: {"per_seed": [s[f] for s in per_seed], "pooled": pooled[f],
                "seed_sd": _spread([s[f]["mean"] for s in per_seed])["sd"],
                "seeds_above_zero": sum(s[f]["low"] > 0 for s in per_seed),
                "seeds_below_zero": sum(s[f]["high"] < 0 for s in per_seed)}
            for f in names}
    return {"train_seeds": [run["settings"]["train_seed"] for run in runs], "sources": [run["source"] for run in runs],
            "families": counts,
            "rows": rows, "pairs": out_pairs}


def _cell(entry: dict[str, Any], digits: int = 3) -> str:
    return f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"


def seeds_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: rows (mean ± sd over seeds), pairs, and routed MACs per family."""
    families = list(summary["families"]) + ["all"]
    seeds = ", ".join(str(s) for s in summary["train_seeds"])
    lines = [f"Training seeds {seeds}: mean ± sd over seeds.", "",
             "| row | MACs | " + " | ".join(f"alignment {f}" for f in families) + " | FID-like | CMMD |",
             "|---|---|" + "---|" * len(families) + "---|---|"]
    for row in summary["rows"].values():
        lines.append(f"| {row['title']} | {_cell(row['macs_ratio'])} | "
                     + " | ".join(_cell(row["alignment"][f]) for f in families)
                     + f" | {_cell(row['fid_like'], 1)} | {_cell(row['cmmd'], 1)} |")
    lines += ["", "Paired alignment differences: per seed (95% interval over prompts), pooled over seeds, and how many "
              "seeds have the whole interval above / below zero.", "",
              "| pair | family | " + " | ".join(f"seed {s}" for s in summary["train_seeds"]) + " | pooled | seeds > 0 / < 0 |",
              "|---|---|" + "---|" * len(summary["train_seeds"]) + "---|---|"]
    for pair, by_family in summary["pairs"].items():
        for f in families:
            entry = by_family[f]
            cells = " | ".join(f"{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]" for s in entry["per_seed"])
            p = entry["pooled"]
            lines.append(f"| {pair} | {f} | {cells} | {p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] | "
                         f"{entry['seeds_above_zero']} / {entry['seeds_below_zero']} |")
    routed = {name: row for name, row in summary["rows"].items() if "routed_macs_minus_mean" in row}
    if routed:
        lines += ["", "Mean routed MACs per family, per seed (a family above its row's mean MACs gets the larger experts):", "",
                  "| row | family | " + " | ".join(f"seed {s}" for s in summary["train_seeds"]) + " | above the mean in |",
                  "|---|---|" + "---|" * len(summary["train_seeds"]) + "---|"]
        for row in routed.values():
            for f in summary["families"]:
                macs, above = row["routed_macs"][f], row["routed_macs_minus_mean"][f]
                count = sum(d > 0 for d in above["per_seed"])
                lines.append(f"| {row['title']} | {f} | " + " | ".join(
                    f"{m:.3f} ({d:+.3f})" for m, d in zip(macs["per_seed"], above["per_seed"]))
                    + f" | {count} of {len(above['per_seed'])} |")
    return "\n".join(lines) + "\n"


def run_over_seeds(paths: Sequence[str | Path], output_dir: Path) -> dict[str, Any]:
    """Load the runs, summarise them, write ``seeds.json`` / ``seeds.md`` in `output_dir`."""
    from aptp.train.slicing import write_json_atomic
    from aptp.train.training import atomic_write_text

    from .options import ALL_ROWS, EVALUATION_SETTINGS, PAIRS, saved_setting

    runs = load_runs(paths, [k for k in EVALUATION_SETTINGS if k != "train_seed"], saved_setting)
    families = prompt_families(runs[0]["settings"])
    summary = seed_summary(runs, families, PAIRS, ALL_ROWS)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "seeds.json", summary)
    atomic_write_text(output_dir / "seeds.md", seeds_markdown(summary))
    return summary
