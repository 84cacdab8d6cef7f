"""What routing by prompt family could gain at all, given the pruned models one can route to.

APTP's premise is that prompt families need different capacity. At a fixed mean MACs budget,
routing can only help if moving MACs from one family to another gains the receiving family more
alignment than it costs the giving one. Given several models at different MACs, scored on the
same held-out prompts from the same noise (the ``static_lower`` / ``static`` / ``static_upper``
rows of a quality run, the dense teacher, or the premise's uniform masks), each family's
alignment-vs-MACs curve is measured, and a linear program finds the best *family router*: the
fraction of each family sent to each model, with mean MACs no higher than the reference model's.
This is an oracle that knows every prompt's family, so what it gains bounds what any router
choosing among these models could gain by reallocating capacity (not what fine-tuning an expert
on its own prompts adds on top; that is the APTP row's difference from static).

Two objectives:
- ``all``: the best overall alignment;
- ``focus <family>``: the best alignment of one family with every other family no worse than
  under the reference model (the issue's goal: better on the hard family, no worse on the easy).

Each is reported in sample (the optimum on all prompts; biased upwards, since the allocation is
fitted to the same scores it is judged on) and cross-fitted (fitted on half the prompts, judged on
the other half, both ways), each with a bootstrap 95% interval over prompts.

    python -m aptp.benchmarks.quality.allocation RUN [RUN ...] --output-dir DIR
    python -m aptp.benchmarks.quality.allocation premise.json --output-dir DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aptp.errors import AptpError, ConfigError

__all__ = ["Candidate", "best_allocation", "allocation_bound", "candidates_from_runs", "candidates_from_premise",
           "allocation_markdown", "main"]

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("static_lower", "static", "static_upper", "dense")


@dataclasses.dataclass
class Candidate:
    """A model a family router may send prompts to: its MACs ratio and its per-prompt alignment."""

    name: str
    macs: float
    scores: np.ndarray


def best_allocation(means: np.ndarray, macs: np.ndarray, shares: np.ndarray, budget: float,
                    focus: int | None = None, floors: np.ndarray | None = None) -> np.ndarray | None:
    """The fractions ``x[m, f]`` of family f sent to model m that maximise the overall alignment
    (``focus=None``) or family `focus`'s, with mean MACs at most `budget` and, where `floors` is
    given, every family but `focus` at least at its floor. None if no allocation is feasible.

    `means` is (models, families) alignment, `macs` (models,), `shares` (families,) summing to 1.
    """
    from scipy.optimize import linprog

    num_models, num_families = means.shape
    if focus is None:
        objective = (means * shares[None, :]).ravel()
    else:
        objective = np.zeros_like(means)
        objective[:, focus] = means[:, focus]
        objective = objective.ravel()
    each_family_once = np.zeros((num_families, num_models * num_families))
    for f in range(num_families):
        each_family_once[f, f::num_families] = 1.0
    upper = [(macs[:, None] * shares[None, :]).ravel()]
    bounds = [budget]
    if floors is not None:
        for f in range(num_families):
            if f != focus:
                row = np.zeros_like(means)
                row[:, f] = -means[:, f]
                upper.append(row.ravel())
                bounds.append(-floors[f])
    result = linprog(-objective, A_ub=np.array(upper), b_ub=np.array(bounds), A_eq=each_family_once,
                     b_eq=np.ones(num_families), bounds=(0, 1), method="highs")
    if not result.success:
        return None
    return np.clip(result.x.reshape(num_models, num_families), 0.0, 1.0)


def _family_means(scores: np.ndarray, family_index: np.ndarray, num_families: int) -> np.ndarray:
    """(models, families) mean alignment of `scores` (models, prompts)."""
    return np.stack([scores[:, family_index == f].mean(axis=1) for f in range(num_families)], axis=1)


def _fit(scores: np.ndarray, family_index: np.ndarray, macs: np.ndarray, shares: np.ndarray, reference: int,
         focus: int | None) -> np.ndarray | None:
    means = _family_means(scores, family_index, len(shares))
    floors = None if focus is None else means[reference]
    return best_allocation(means, macs, shares, float(macs[reference]), focus, floors)


def _gains(allocation: np.ndarray, scores: np.ndarray, family_index: np.ndarray, shares: np.ndarray,
           reference: int) -> np.ndarray:
    """(families + 1,) alignment of the allocation minus the reference's, per family then overall."""
    means = _family_means(scores, family_index, len(shares))
    per_family = (allocation * means).sum(axis=0) - means[reference]
    return np.append(per_family, float(per_family @ shares))


def _stratified_resample(family_index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.choice(np.flatnonzero(family_index == f), (family_index == f).sum())
                           for f in np.unique(family_index)])


def _stratified_halves(indices: np.ndarray, family_index: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    first, second = [], []
    for f in np.unique(family_index[indices]):
        members = rng.permutation(indices[family_index[indices] == f])
        first.append(members[: len(members) // 2])
        second.append(members[len(members) // 2:])
    return np.concatenate(first), np.concatenate(second)


def _interval(draws: np.ndarray, estimate: np.ndarray | None = None) -> list[dict[str, float]]:
    """Per column: `estimate` (default: the draws' mean) and the percentile 95% interval of
    bootstrap draws (rows). Rounded to 1e-6 so that solver round-off does not print as -0.000."""
    def clean(value: float) -> float:
        return round(float(value), 6) + 0.0

    centre = draws.mean(axis=0) if estimate is None else estimate
    return [{"mean": clean(c), "low": clean(np.percentile(col, 2.5)), "high": clean(np.percentile(col, 97.5))}
            for c, col in zip(centre, draws.T)]


def allocation_bound(candidates: Sequence[Candidate], families: Sequence[str], reference: str,
                     resamples: int = 500, seed: int = 0) -> dict[str, Any]:
    """The family curves, and per objective the best family router's allocation and its gains over
    `reference` (in sample and cross-fitted, with bootstrap 95% intervals over prompts)."""
    names = [c.name for c in candidates]
    if reference not in names:
        raise ConfigError(f"the reference model {reference!r} is not among the candidates {names}")
    if len(candidates) < 2:
        raise ConfigError(f"a family router needs at least 2 models to choose from, got {names}")
    scores = np.stack([np.asarray(c.scores, dtype=float) for c in candidates])
    if scores.shape[1] != len(families):
        raise ConfigError(f"{scores.shape[1]} per-prompt scores for {len(families)} prompt families")
    from .seeds import family_order

    order = family_order(families)
    family_index = np.array([order.index(f) for f in families])
    shares = np.bincount(family_index, minlength=len(order)) / len(families)
    macs = np.array([c.macs for c in candidates], dtype=float)
    ref = names.index(reference)
    rng = np.random.default_rng(seed)
    columns = order + ["all"]

    def labelled(values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(columns, values))

    objectives: dict[str, Any] = {}
    for label, focus in [("all", None)] + [(f"focus {f}", i) for i, f in enumerate(order)]:
        allocation = _fit(scores, family_index, macs, shares, ref, focus)
        if allocation is None:
            objectives[label] = {"feasible": False}
            continue
        in_sample, cross_fitted = [], []
        for _ in range(resamples):
            drawn = _stratified_resample(family_index, rng)
            refit = _fit(scores[:, drawn], family_index[drawn], macs, shares, ref, focus)
            if refit is not None:
                in_sample.append(_gains(refit, scores[:, drawn], family_index[drawn], shares, ref))
            halves = _stratified_halves(np.arange(len(drawn)), family_index[drawn], rng)
            both_ways = []
            for fit_on, judge_on in (halves, halves[::-1]):
                fitted = _fit(scores[:, drawn[fit_on]], family_index[drawn[fit_on]], macs, shares, ref, focus)
                if fitted is not None:
                    both_ways.append(_gains(fitted, scores[:, drawn[judge_on]], family_index[drawn[judge_on]], shares, ref))
            if both_ways:
                cross_fitted.append(np.mean(both_ways, axis=0))
        objectives[label] = {
            "feasible": True,
            "fractions": {name: labelled((allocation[m].round(4) + 0.0).tolist()) for m, name in enumerate(names)},
            "family_macs": labelled((macs @ allocation).round(4).tolist() + [float(macs @ allocation @ shares)]),
            "gain_in_sample": labelled(_interval(np.array(in_sample), _gains(allocation, scores, family_index, shares, ref)))
            if in_sample else None,
            "gain_cross_fitted": labelled(_interval(np.array(cross_fitted))) if cross_fitted else None,
        }
    from .paired import family_summary

    curve = {c.name: {"macs": c.macs, "alignment": family_summary(np.asarray(c.scores, dtype=float), families)}
             for c in candidates}
    return {"reference": reference, "families": labelled(np.bincount(family_index, minlength=len(order)).tolist() + [len(families)]),
            "budget": float(macs[ref]), "resamples": resamples, "curve": curve, "objectives": objectives}


def candidates_from_runs(runs: Sequence[dict[str, Any]], names: Sequence[str]) -> list[Candidate]:
    """The named rows of quality runs (one per training seed; K=1 rows) as candidates: per-prompt
    alignment and MACs averaged over the runs."""
    out = []
    for name in names:
        missing = [run.get("source", "?") for run in runs if "per_prompt_alignment" not in run["rows"].get(name, {})]
        if missing:
            raise ConfigError(f"row {name} is not scored in {', '.join(missing)} (train and score it with aptp-bench quality --rows {name})")
        rows = [run["rows"][name] for run in runs]
        if any(len(row["routing"]["code_macs_ratio"]) != 1 for row in rows):
            raise ConfigError(f"row {name} routes between several experts; a family router's candidates are single models")
        out.append(Candidate(name, float(np.mean([row["routing"]["macs_ratio"] for row in rows])),
                             np.mean([row["per_prompt_alignment"] for row in rows], axis=0)))
    return out


def candidates_from_premise(premise: dict[str, Any]) -> tuple[list[Candidate], list[str]]:
    """The premise's dense teacher and uniform masks as candidates, and the prompts' families."""
    per_prompt = premise["per_prompt"]
    names = [name for name in per_prompt if name != "family"]
    return [Candidate(name, float(premise["rows"][name]["macs_ratio"]), np.array(per_prompt[name])) for name in names], \
        list(per_prompt["family"])


def _ci(entry: dict[str, float]) -> str:
    return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def allocation_markdown(result: dict[str, Any]) -> str:
    """The curves and the best family routers as Markdown tables."""
    columns = list(result["families"])
    families = columns[:-1]
    lines = ["Alignment per family for each model (95% interval over prompts):", "",
             "| model | MACs | " + " | ".join(f"{f} (n={result['families'][f]})" for f in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for name, entry in sorted(result["curve"].items(), key=lambda item: item[1]["macs"]):
        lines.append(f"| {name} | {entry['macs']:.3f} | " + " | ".join(
            f"{entry['alignment'][f]['mean']:.3f} [{entry['alignment'][f]['low']:.3f}, {entry['alignment'][f]['high']:.3f}]"
            for f in columns) + " |")
    lines += ["", f"Best family router at mean MACs <= {result['budget']:.3f} ({result['reference']}'s), gain over "
              f"{result['reference']}: in sample (the optimum on all prompts, biased upwards) and cross-fitted (fitted on half the prompts, judged on the "
              f"other half), 95% intervals over {result['resamples']} bootstrap resamples of the prompts:", "",
              "| objective | routed MACs " + " / ".join(families) + " | estimate | " + " | ".join(columns) + " |",
              "|---|---|---|" + "---|" * len(columns)]
    for label, entry in result["objectives"].items():
        if not entry["feasible"]:
            lines.append(f"| {label} | infeasible | | " + " | ".join("" for _ in columns) + " |")
            continue
        routed = " / ".join(f"{entry['family_macs'][f]:.3f}" for f in families)
        for estimate in ("gain_in_sample", "gain_cross_fitted"):
            if entry[estimate] is None:
                continue
            name = "in sample" if estimate == "gain_in_sample" else "cross-fitted"
            lines.append(f"| {label} | {routed} | {name} | " + " | ".join(_ci(entry[estimate][f]) for f in columns) + " |")
    return "\n".join(lines) + "\n"


def _load(paths: Sequence[Path]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """One premise JSON (and no runs), or the quality runs of one or more training seeds."""
    from .seeds import load_runs
    from .options import EVALUATION_SETTINGS, saved_setting

    first = paths[0] / "quality.json" if paths[0].is_dir() else paths[0]
    if not first.is_file():
        raise ConfigError(f"{first} does not exist (pass a quality run's directory, its quality.json, or a premise.json)")
    premise = json.loads(first.read_text())
    if "per_prompt" in premise:
        if len(paths) > 1:
            raise ConfigError("pass one premise.json alone (its masks are the candidates)")
        premise["source"] = str(first)
        return premise, []
    return None, load_runs(paths, [k for k in EVALUATION_SETTINGS if k != "train_seed"], saved_setting, "allocation", minimum=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aptp.benchmarks.quality.allocation", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quality runs of one or more training seeds (pooled), or one premise.json")
    parser.add_argument("--output-dir", type=Path, required=True, help="writes allocation.json and allocation.md here")
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), help="rows of the quality runs to route between")
    parser.add_argument("--reference", default=None, help="the model whose MACs are the budget (default: static, or uniform_0.6 for a premise)")
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.resamples < 1:
            raise ConfigError(f"--resamples must be at least 1, got {args.resamples}")
        premise, runs = _load(args.runs)
        if premise is not None:
            candidates, families = candidates_from_premise(premise)
            source: dict[str, Any] = {"sources": [premise["source"]], "kind": "premise"}
        else:
            from .seeds import prompt_families

            candidates, families = candidates_from_runs(runs, args.candidates), prompt_families(runs[0]["settings"])
            source = {"sources": [run["source"] for run in runs], "train_seeds": [run["settings"]["train_seed"] for run in runs],
                      "kind": "quality"}
        reference = args.reference or ("uniform_0.6" if premise is not None else "static")
        result = {**source, **allocation_bound(candidates, families, reference, args.resamples, args.seed)}
        if len(runs) > 1:  # whether each seed's models alone tell the same
            result["per_seed"] = {str(run["settings"]["train_seed"]): allocation_bound(
                candidates_from_runs([run], args.candidates), families, reference, args.resamples, args.seed) for run in runs}
    except AptpError as error:
        parser.exit(2, f"error: {error}\n")
    from aptp.train.slicing import write_json_atomic
    from aptp.train.training import atomic_write_text

    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output_dir / "allocation.json", result)
    text = allocation_markdown(result) + "".join(
        f"\n### Training seed {seed} alone\n\n" + allocation_markdown(alone) for seed, alone in result.get("per_seed", {}).items())
    atomic_write_text(args.output_dir / "allocation.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
