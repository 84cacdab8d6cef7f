"""The premise of prompt routing, measured on the dense teacher: do prompt families degrade at
different rates under uniform pruning?

For each MACs ratio (default 0.8 / 0.6 / 0.4) one static mask keeps the same fraction of every
gate site (width pruning of the whole UNet, no fine-tuning), the units kept in a site being
those with the largest first-order importance |dL/dgate| (the denoising loss on training
renderings, accumulated over a few batches). The fraction is found by bisection so that the
analytic MACs ratio of the mask is the target. Each masked teacher (sliced, exactly equal to the
masked one) then renders the held-out prompts from the same noise as the dense teacher, and the
classifier scores every image. Reported per family: alignment with a bootstrap 95% interval, and
the paired drop from the dense teacher with its interval.

``aptp-bench quality --premise --output-dir DIR [--num-samples N] [--ratios 0.8 0.6 0.4]``
writes ``premise.json`` and ``premise.md`` there.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from aptp.train.uniform_masks import gate_importance, uniform_mask

from .paired import family_summary, paired_family_difference, per_prompt_alignment

logger = logging.getLogger(__name__)


def run_premise(args: Any) -> dict[str, Any]:
    from aptp.train.data import ProceduralCaptions
    from aptp.train.gates import GateLayout
    from aptp.train.macs import DeployShape, MacsModel
    from aptp.train.models import load_components, resolve_pretrained
    from aptp.train.slicing import slice_unet

    from .classifier import DEFAULT_WEIGHTS, load_classifier, target_attributes
    from .sampling import generate_images, save_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(args.classifier or DEFAULT_WEIGHTS)
    components = load_components(resolve_pretrained(args.pretrained))
    for module in (components.unet, components.vae, components.text_encoder):
        module.requires_grad_(False).eval()
    layout = GateLayout.from_unet(components.unet, ff_groups=args.ff_groups, depth=False)
    side = components.unet.config.sample_size
    macs = MacsModel(components.unet, layout, DeployShape(side, side, components.text_length))
    importance = gate_importance(components, layout)

    data = ProceduralCaptions(args.num_samples, 64, seed=args.prompt_seed)
    prompts = [data.caption(i) for i in range(len(data))]
    attrs = [data.attributes(i) for i in range(len(data))]
    families = [a["family"] for a in attrs]
    targets = [target_attributes(a) for a in attrs]

    rows: dict[str, Any] = {}
    scores: dict[str, np.ndarray] = {}
    for ratio in [1.0, *args.ratios]:
        name = "dense" if ratio == 1.0 else f"uniform_{ratio:g}"
        t0 = time.perf_counter()
        if ratio == 1.0:
            unet, achieved = components.unet, 1.0
        else:
            mask, achieved = uniform_mask(layout, macs, importance, ratio)
            unet, _ = slice_unet(components.unet, layout, mask.bool())
        images = generate_images(components, prompts, unet, seed=args.noise_seed, steps=args.steps, guidance=args.guidance)
        save_grid(images[:32], out / f"premise_{name}.png", captions=prompts[:32])
        scores[name] = per_prompt_alignment(classifier.predict(images), targets)
        rows[name] = {"target_ratio": ratio, "macs_ratio": achieved, "alignment": family_summary(scores[name], families),
                      "seconds": round(time.perf_counter() - t0, 1)}
        if name != "dense":
            rows[name]["drop_from_dense"] = paired_family_difference(scores["dense"], scores[name], families)
        logger.info("%s (MACs %.3f): %s", name, achieved, {f: round(v["mean"], 3) for f, v in rows[name]["alignment"].items()})
        result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows,
                  "per_prompt": {"family": families, **{k: v.round(3).tolist() for k, v in scores.items()}}}
        (out / "premise.json").write_text(json.dumps(result, indent=1))  # partial results survive
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out / "premise.json").write_text(json.dumps(result, indent=1))
    (out / "premise.md").write_text(premise_markdown(result))
    return result


def _ci(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def premise_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    fams = [f for f in next(iter(rows.values()))["alignment"] if f != "all"] + ["all"]
    counts = {f: next(iter(rows.values()))["alignment"][f]["n"] for f in fams}
    head = "| mask | MACs ratio | " + " | ".join(f"{f} (n={counts[f]})" for f in fams) + " |"
    lines = ["Alignment (mean per prompt of the 5 attributes read right; bootstrap 95% interval over prompts):", "",
             head, "|---|---|" + "---|" * len(fams)]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['macs_ratio']:.3f} | " + " | ".join(_ci(row["alignment"][f]) for f in fams) + " |")
    lines += ["", "Drop from the dense teacher (paired over the same prompts and noise; 95% interval):", "",
              "| mask | MACs ratio | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    for name, row in rows.items():
        if "drop_from_dense" in row:
            lines.append(f"| {name} | {row['macs_ratio']:.3f} | " + " | ".join(_ci(row["drop_from_dense"][f]) for f in fams) + " |")
    return "\n".join(lines) + "\n"


def check_ratios(ratios: Sequence[float]) -> None:
    from aptp.errors import ConfigError

    bad = [r for r in ratios if not 0.0 < r < 1.0]
    if bad:
        raise ConfigError(f"--ratios must lie in (0, 1), got {bad}")
