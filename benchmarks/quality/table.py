"""`aptp-bench quality`: the reduced replication of the APTP paper's quality table, offline.

Rows (each pruned and fine-tuned by aptp's own trainer, with the same step counts):

- ``dense``: the teacher (the ``tiny`` pipeline), no pruning.
- ``aptp``: prompt-routed pruning, K codes (default 4) at a MACs budget (default 0.6).
- ``static``: the paper's baseline, one architecture for every prompt: the same code with
  ``codes.num_codes=1`` (same budget, data and steps).
- ``aptp_no_ot``: APTP without the optimal-transport (Sinkhorn) assignment during training
  (``sinkhorn.enabled=false``); skipped, with the reason, if the trainer has no such switch.
- ``static_long``: the static baseline fine-tuned K times longer, so that it receives as many
  fine-tuning updates as APTP's K experts together (APTP fine-tunes each expert for
  ``--finetune-steps`` on its share of the prompts). It prunes exactly as ``static`` does, so it
  copies ``static``'s pruning when that row is trained (`aptp.benchmarks.quality.rows`).
- ``aptp_quality`` (only when named): APTP whose balanced assignment also weighs each code's
  distillation error on each prompt (``sinkhorn.quality_weight``, ``--quality-weight``), so
  that prompts a small code hurts most go to the larger codes.
- ``aptp_sensitivity`` (only when named): APTP whose balanced assignment also pairs the prompts
  that a uniform mask at the budget hurts most (measured once before pruning) with the codes of
  more MACs (``sinkhorn.sensitivity_weight``, ``--sensitivity-weight``).
- ``static_lower`` / ``static_upper`` (only when named): ``static`` at ``--target`` minus / plus
  ``--static-spread``. With ``static`` and ``dense`` they measure each family's alignment-vs-MACs
  curve, from which `aptp.benchmarks.quality.allocation` bounds what routing by family could gain.
  With a small spread, ``static_upper`` is the static baseline at APTP's mean MACs (APTP lands
  above its target), and the ``aptp - static_upper`` pair is the equal-MACs comparison.

Every row generates one image per held-out procedural prompt (``ProceduralCaptions`` seed
``--prompt-seed``, never trained on), with the same initial noise per prompt in every row, and
is scored against the real rendering of the same prompts:

- MACs ratio: mean over the prompts of the MACs ratio of the expert each prompt is routed to.
- FID-like: Frechet distance in the feature space of the procedural classifier
  (`aptp.benchmarks.quality.classifier`), generated versus real images.
- CMMD: unbiased RBF-kernel MMD (x1000) in the same feature space, with the bandwidth set once
  from the real features (median pairwise distance) and shared by every row.
- Alignment: the classifier reads shape, colour, position, count and word off each generated
  image; accuracy against the prompt's attributes (mean over attributes, and all five right).
- Routing: share of prompts per code, and mean MACs of text prompts versus shape-only prompts.

It also routes PartiPrompts through the APTP router and reports mean MACs per Challenge.
Outputs: ``quality.json``, ``quality.md`` and a sample grid per row, in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from aptp.errors import AptpError, ConfigError
from aptp.outputs import BENCH_QUALITY, claim_in_place

from .options import (ALL_ROWS, EVALUATION_SETTINGS, EXTRA_ROWS, PAIRS, PARTI_DEFAULT, ROWS,  # noqa: F401  (the suite's names)
                      build_parser, saved_setting)
from .rows import sinkhorn_switch_available, train_rows
from .sampling import generate_images, prompt_noise, save_grid  # noqa: F401  (prompt_noise: the suite's name)

logger = logging.getLogger(__name__)

ROW_TITLES = {
    "dense": "dense teacher",
    "aptp": "APTP (K={k})",
    "static": "static pruned (K=1)",
    "static_long": "static pruned (K=1), {k}x fine-tuning",
    "aptp_no_ot": "APTP without OT (K={k})",
    "aptp_k8": "APTP (K=8)",
    "aptp_quality": "APTP, quality-aware OT (K={k})",
    "aptp_sensitivity": "APTP, sensitivity prior (K={k})",
    "static_lower": "static pruned (K=1) at {lower:g} MACs",
    "static_upper": "static pruned (K=1) at {upper:g} MACs",
}


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def _real_versus_real(real_features: np.ndarray, args: argparse.Namespace, extractor: Any, sigma: float) -> dict[str, float]:
    """FID-like and CMMD between the real images and as many real images of other prompts
    (seed ``prompt_seed + 1000``): the noise floor of both metrics at this sample size."""
    from aptp.train.data import ProceduralCaptions

    from .metrics import cmmd, fid_from_features

    other = ProceduralCaptions(args.num_samples, 64, seed=args.prompt_seed + 1000)
    images = torch.stack([other[i]["pixel_values"] for i in range(len(other))]) * 0.5 + 0.5
    features = extractor(images)
    return {"fid_like": fid_from_features(features, real_features), "cmmd": cmmd(features, real_features, sigma=sigma)}


def median_bandwidth(features: np.ndarray) -> float:
    """Median pairwise Euclidean distance (the usual RBF bandwidth heuristic)."""
    sq = np.sum(features**2, axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * features @ features.T, 0.0))
    return float(np.median(dist[np.triu_indices(len(features), k=1)]))


def score_row(images: torch.Tensor, real_features: np.ndarray, targets: list[dict], extractor: Any, classifier: Any,
              sigma: float) -> dict[str, Any]:
    from .metrics import alignment_accuracy, cmmd, fid_from_features

    from .paired import per_prompt_alignment

    features = extractor(images)
    predicted = classifier.predict(images)
    return {
        "fid_like": fid_from_features(features, real_features),
        "cmmd": cmmd(features, real_features, sigma=sigma),
        "alignment": alignment_accuracy(predicted, targets),
        "per_prompt_alignment": per_prompt_alignment(predicted, targets).round(4).tolist(),
    }


def routing_stats(codes: Sequence[int], ratios: Sequence[float], is_text: Sequence[bool]) -> dict[str, Any]:
    """Expected MACs ratio, share per code, mean MACs of text versus shape-only prompts."""
    per_prompt = np.array([ratios[c] for c in codes])
    text = np.array(is_text, dtype=bool)
    counts = np.bincount(np.asarray(codes, dtype=int), minlength=len(ratios))
    return {
        "macs_ratio": float(per_prompt.mean()),
        "code_macs_ratio": [round(float(r), 4) for r in ratios],
        "code_share": [round(float(c) / len(codes), 4) for c in counts],
        "text_macs": float(per_prompt[text].mean()) if text.any() else None,
        "shape_macs": float(per_prompt[~text].mean()) if (~text).any() else None,
    }


def parti_routing(directory: Path, parti_path: Path) -> dict[str, Any] | None:
    """Mean MACs ratio and code shares per PartiPrompts Challenge, through a row's router."""
    from aptp.train.data import load_parti_prompts
    from aptp.train.prune import route_texts
    from aptp.train.route import load_router

    if not parti_path.is_file():
        logger.warning("no PartiPrompts file at %s: routing analysis skipped", parti_path)
        return None
    rows = load_parti_prompts(parti_path)
    info, encoder, head, logits, layout = load_router(directory)
    codes = route_texts([r["prompt"] for r in rows], encoder, head, logits, layout.unit_weights).tolist()
    by_challenge: dict[str, list[int]] = defaultdict(list)
    for row, code in zip(rows, codes):
        by_challenge[row["challenge"]].append(code)
    ratios = info.code_macs_ratio
    result = {}
    for challenge, group in sorted(by_challenge.items()):
        counts = np.bincount(group, minlength=info.num_codes)
        result[challenge] = {"prompts": len(group), "mean_macs": float(np.mean([ratios[c] for c in group])),
                             "code_share": [round(float(c) / len(group), 3) for c in counts]}
    return {"num_prompts": len(rows), "overall_mean_macs": float(np.mean([ratios[c] for c in codes])), "challenges": result}


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " / ".join(f"{v:.2f}" for v in value)
    return f"{value:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    """The quality table (and the PartiPrompts routing table) as Markdown."""
    lines = [
        "| row | MACs ratio | FID-like (lower better) | CMMD (lower better) | alignment mean | all 5 right | share per code | MACs per code | text-prompt MACs | shape-prompt MACs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    real = results.get("real_reference")
    if real:
        fid, mmd = _fmt(real.get("fid_like"), 2), _fmt(real.get("cmmd"), 1)
        lines.append(f"| real renderings (alignment ceiling; FID/CMMD: against renderings of other prompts, the noise floor) | - | {fid} | {mmd} | {_fmt(real['alignment']['mean'])} | "
                     f"{_fmt(real['alignment']['all'])} | - | - | - | - |")
    vae = results.get("vae_reference")
    if vae:
        lines.append(f"| real images through the VAE (ceiling for any UNet) | - | {_fmt(vae['fid_like'], 2)} | {_fmt(vae['cmmd'], 1)} | "
                     f"{_fmt(vae['alignment']['mean'])} | {_fmt(vae['alignment']['all'])} | - | - | - | - |")
    for name, row in results["rows"].items():
        if "skipped" in row:
            lines.append(f"| {row['title']} | skipped: {row['skipped']} |||||||||")
            continue
        r = row["routing"]
        lines.append(
            f"| {row['title']} | {_fmt(r['macs_ratio'])} | {_fmt(row['fid_like'], 2)} | {_fmt(row['cmmd'], 1)} | "
            f"{_fmt(row['alignment']['mean'])} | {_fmt(row['alignment']['all'])} | {_fmt(r['code_share'])} | "
            f"{_fmt(r['code_macs_ratio'])} | {_fmt(r['text_macs'])} | {_fmt(r['shape_macs'])} |"
        )
    attrs = [a for a in next((row["alignment"] for row in results["rows"].values() if "alignment" in row), {}) if a not in ("mean", "all")]
    if attrs:
        lines += ["", "Alignment per attribute:", "", "| row | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs)]
        if real:
            lines.append("| real renderings | " + " | ".join(_fmt(real["alignment"][a]) for a in attrs) + " |")
        if vae:
            lines.append("| real through the VAE | " + " | ".join(_fmt(vae["alignment"][a]) for a in attrs) + " |")
        for row in results["rows"].values():
            if "alignment" in row:
                lines.append(f"| {row['title']} | " + " | ".join(_fmt(row["alignment"][a]) for a in attrs) + " |")
    lines += family_markdown(results)
    parti = results.get("parti_routing")
    if parti:
        lines += ["", f"PartiPrompts routed by the APTP router ({parti['num_prompts']} prompts, mean MACs ratio "
                      f"{parti['overall_mean_macs']:.3f}):", "", "| Challenge | prompts | mean MACs ratio | share per code |", "|---|---|---|---|"]
        for challenge, stats in sorted(parti["challenges"].items(), key=lambda kv: -kv[1]["mean_macs"]):
            lines.append(f"| {challenge} | {stats['prompts']} | {stats['mean_macs']:.3f} | {_fmt(stats['code_share'])} |")
    return "\n".join(lines) + "\n"


def _ci(stat: dict[str, float] | None) -> str:
    return "-" if not stat else f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def family_markdown(results: dict[str, Any]) -> list[str]:
    """Per-family alignment and routed MACs (95% intervals over prompts), and the paired differences."""
    rows = {n: r for n, r in results["rows"].items() if "family_alignment" in r}
    if not rows:
        return []
    fams = list(next(iter(rows.values()))["family_alignment"])
    lines = ["", "Alignment per prompt family (bootstrap 95% interval over prompts):", "",
             "| row | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    lines += [f"| {r['title']} | " + " | ".join(_ci(r["family_alignment"].get(f)) for f in fams) + " |" for r in rows.values()]
    lines += ["", "Mean routed MACs ratio per prompt family:", "", "| row | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    lines += [f"| {r['title']} | " + " | ".join(_ci(r["routing"].get("family_macs", {}).get(f)) for f in fams) + " |"
              for r in rows.values()]
    routers = {n: r["router"] for n, r in rows.items() if "router" in r}
    if routers:
        lines += ["", "Router on the held-out prompts, without / with the calibrated per-code bias:", "",
                  "| row | share per code (uncalibrated) | share per code (calibrated) | family NMI (uncal. / cal.) | purity per family (calibrated) |",
                  "|---|---|---|---|---|"]
        for n, rep in routers.items():
            purity = ", ".join(f"{f} {v['purity']:.2f}" for f, v in rep["calibrated"]["families"].items())
            lines.append(f"| {rows[n]['title']} | {_fmt(rep['uncalibrated']['code_share'])} | {_fmt(rep['calibrated']['code_share'])} | "
                         f"{rep['uncalibrated']['nmi']:.3f} / {rep['calibrated']['nmi']:.3f} | {purity} |")
    paired = results.get("paired") or {}
    if paired:
        lines += ["", "Paired alignment differences (first minus second row, same prompts and noise; 95% interval):", "",
                  "| pair | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
        lines += [f"| {pair} | " + " | ".join(_ci(d.get(f)) for f in fams) + " |" for pair, d in paired.items()]
    return lines


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) the rows, sample, score, and write quality.json / quality.md."""
    from aptp.train import checkpoint as ckpt
    from aptp.train.data import ProceduralCaptions
    from aptp.train.experts import load_expert
    from aptp.train.models import load_components, resolve_pretrained
    from aptp.train.prune import route_texts
    from aptp.train.route import load_router

    from .classifier import DEFAULT_WEIGHTS, load_classifier, procedural_extractor, target_attributes
    from .paired import family_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_samples < 2:
        raise ConfigError(f"--num-samples must be at least 2 (CMMD needs two images), got {args.num_samples}")
    if {"static_lower", "static_upper"} & set(args.rows) and not 0 < args.static_spread < min(args.target, 1 - args.target):
        raise ConfigError(f"--static-spread must leave both static budgets inside (0, 1): got {args.static_spread} "
                          f"around --target {args.target}")
    started = time.perf_counter()
    out = Path(args.output_dir).expanduser().absolute()
    claim_in_place(out, BENCH_QUALITY, allow_existing=True)  # rows are retrained in place: never a user's folder
    trained = train_rows(args, out / "rows", ALL_ROWS)
    if args.train_only:
        return {"rows": trained, "wall_seconds": round(time.perf_counter() - started, 1)}
    classifier = load_classifier(args.classifier or DEFAULT_WEIGHTS)
    extractor = procedural_extractor(classifier)

    dataset = ProceduralCaptions(args.num_samples, 64, seed=args.prompt_seed)
    prompts = [dataset.caption(i) for i in range(len(dataset))]
    attributes = [dataset.attributes(i) for i in range(len(dataset))]
    targets = [target_attributes(a) for a in attributes]
    is_text = [a["is_text"] for a in attributes]
    families = [a["family"] for a in attributes]
    real = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))]) * 0.5 + 0.5
    real_features = extractor(real)
    sigma = median_bandwidth(real_features)
    save_grid(real[:32], out / "samples_real.png", captions=prompts[:32])
    from .metrics import alignment_accuracy

    results: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pretrained": resolve_pretrained(args.pretrained), "feature_extractor": extractor.name, "cmmd_sigma": sigma,
        "real_reference": {"alignment": alignment_accuracy(classifier.predict(real), targets),
                           **_real_versus_real(real_features, args, extractor, sigma)},
        "rows": {},
    }
    kept_rows, kept_parti = _scored_rows_to_keep(out, args)
    results["rows"].update(kept_rows)
    if kept_parti is not None:
        results["parti_routing"] = kept_parti
    components = load_components(args.pretrained)
    with torch.no_grad():  # what the VAE alone keeps of the real images: a ceiling for every row
        pixels = real * 2 - 1
        decoded = torch.cat([components.vae.decode(components.vae.encode(chunk).latent_dist.mean).sample
                             for chunk in pixels.split(64)])
    through_vae = (decoded * 0.5 + 0.5).clamp(0, 1)
    results["vae_reference"] = score_row(through_vae, real_features, targets, extractor, classifier, sigma)

    def evaluate(name: str, title: str, unets: Any, codes: list[int], ratios: list[float]) -> dict[str, Any]:
        t0 = time.perf_counter()
        images = generate_images(components, prompts, unets, codes, seed=args.noise_seed, steps=args.steps, guidance=args.guidance)
        save_grid(images[:32], out / f"samples_{name}.png", captions=prompts[:32])
        row = {"title": title, **score_row(images, real_features, targets, extractor, classifier, sigma),
               "routing": routing_stats(codes, ratios, is_text), "sampling_seconds": round(time.perf_counter() - t0, 1)}
        row["family_alignment"] = family_summary(np.array(row["per_prompt_alignment"]), families)
        row["routing"]["family_macs"] = family_summary(np.array([ratios[c] for c in codes], dtype=float), families)
        logger.info("%s: %s", name, {k: row[k] for k in ("fid_like", "cmmd")} | {"align": row["alignment"]["mean"]})
        return row

    for name in args.rows:
        title = ROW_TITLES[name].format(k=args.num_codes, lower=args.target - args.static_spread, upper=args.target + args.static_spread)
        if name == "dense":
            results["rows"][name] = evaluate(name, title, components.unet, [0] * len(prompts), [1.0])
            continue
        if name == "aptp_no_ot" and not sinkhorn_switch_available():
            results["rows"][name] = {"title": title, "skipped": "the trainer has no sinkhorn.enabled switch yet"}
            continue
        directory = out / "rows" / name
        training = trained[name]
        info, encoder, head, logits, layout = load_router(directory)
        codes = route_texts(prompts, encoder, head, logits, layout.unit_weights).tolist()
        experts = {k: load_expert(ckpt.expert_dir(directory, k)) for k in sorted(set(codes))}
        row = evaluate(name, title, experts, codes, info.code_macs_ratio)
        row["training"] = training
        if info.num_codes > 1:  # how the router splits the held-out prompts with and without its calibrated bias
            from .routing import routing_report

            row["router"] = routing_report(directory, prompts, families)
        results["rows"][name] = row
        if name == "aptp":
            results["parti_routing"] = parti_routing(directory, Path(args.parti))
        (out / "quality.json").write_text(json.dumps(results, indent=1))  # partial results survive a later failure

    results["rows"] = {name: results["rows"][name] for name in ALL_ROWS if name in results["rows"]}
    results["paired"] = paired_comparisons(results["rows"], families)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    (out / "quality.md").write_text(markdown_table(results))
    return results


def paired_comparisons(rows: dict[str, Any], families: Sequence[str]) -> dict[str, Any]:
    """Per-family paired differences of per-prompt alignment (first row minus second, same prompts
    and noise; bootstrap 95% intervals over prompts) for every pair of rows present."""
    from .paired import paired_family_difference

    out = {}
    for a, b in PAIRS:
        ra, rb = rows.get(a, {}), rows.get(b, {})
        if "per_prompt_alignment" in ra and "per_prompt_alignment" in rb and len(ra["per_prompt_alignment"]) == len(families):
            out[f"{a} - {b}"] = paired_family_difference(np.array(ra["per_prompt_alignment"]),
                                                         np.array(rb["per_prompt_alignment"]), families)
    return out


def _scored_rows_to_keep(out: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """With --reuse, the rows of an earlier quality.json in `out` scored under the same settings
    and not named by --rows (so a row can be added to a table without re-scoring the others)."""
    saved_path = out / "quality.json"
    if not args.reuse or not saved_path.is_file():
        return {}, None
    saved = json.loads(saved_path.read_text())
    now = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if any(saved_setting(saved.get("settings", {}), k) != now.get(k) for k in EVALUATION_SETTINGS):
        logger.info("%s was scored under other settings: not reusing its rows", saved_path)
        return {}, None
    kept = {name: row for name, row in saved.get("rows", {}).items() if name not in args.rows}
    if kept:
        logger.info("keeping rows %s scored earlier in %s", sorted(kept), saved_path)
    # The PartiPrompts analysis belongs to the APTP row's router.
    parti = saved.get("parti_routing") if "aptp" in kept else None
    return kept, parti


def main_quality(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aptp-bench quality`` (and ``python -m aptp.benchmarks.quality.table``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.over_seeds:
            from .seeds import run_over_seeds, seeds_markdown

            print(seeds_markdown(run_over_seeds(args.over_seeds, args.output_dir)))
            print(f"wrote {Path(args.output_dir) / 'seeds.json'} and seeds.md")
            return 0
        if args.premise:
            from .premise import check_ratios, premise_markdown, run_premise

            check_ratios(args.ratios)
            result = run_premise(args)
            print(premise_markdown(result))
            print(f"wrote {Path(args.output_dir) / 'premise.json'} and premise.md ({result['wall_seconds']:.0f} s)")
            return 0
        results = run_quality(args)
    except AptpError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.train_only:
        print(json.dumps(results, indent=1))
        return 0
    print(markdown_table(results))
    print(f"wrote {Path(args.output_dir) / 'quality.json'} and quality.md ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main_quality())
