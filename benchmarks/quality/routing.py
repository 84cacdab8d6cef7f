"""How a trained router splits prompts: shares with and without calibration, family purity, and
the geometry behind it (code norms and mutual cosines, how much the router vectors share).

Used by `aptp-bench quality` (routing of every pruned row) and on its own:
``python -m aptp.benchmarks.quality.routing CHECKPOINT_DIR [--num-prompts N] [--prompt-seed S]``.
With ``--refit-weights 1 100`` it also trains fresh router heads against the checkpoint's frozen
codes (the router's part of pruning only, `aptp.train.prune.router_step`) with each assignment
weight, and reports how they route without calibration: the effect of the weight on real codes
in seconds, without re-running pruning.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["family_purity", "router_geometry", "routing_report"]


def family_purity(codes: Sequence[int], families: Sequence[str], num_codes: int) -> dict[str, Any]:
    """Per family: prompts, share per code, purity (share of its most used code) and that code.

    Also the normalised mutual information between family and code (0: the code says nothing
    about the family; 1: the codes separate the families exactly).
    """
    codes = np.asarray(codes, dtype=int)
    families = np.asarray(families)
    if codes.shape != families.shape:
        raise ValueError(f"{codes.size} codes for {families.size} families")
    out: dict[str, Any] = {"families": {}}
    names = sorted(set(families.tolist()))
    joint = np.zeros((len(names), num_codes))
    for i, name in enumerate(names):
        counts = np.bincount(codes[families == name], minlength=num_codes).astype(float)
        joint[i] = counts
        share = counts / counts.sum()
        out["families"][name] = {"prompts": int(counts.sum()), "code_share": [round(float(s), 4) for s in share],
                                 "purity": float(share.max()), "dominant_code": int(share.argmax())}
    p = joint / joint.sum()
    pf, pc = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mutual = float((p[nz] * np.log(p[nz] / (pf @ pc)[nz])).sum())
    entropy = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())  # noqa: E731
    norm = np.sqrt(entropy(pf) * entropy(pc))
    out["nmi"] = mutual / norm if norm > 0 else 0.0
    return out


@torch.no_grad()
def router_geometry(router_vectors: torch.Tensor, code_logits: torch.Tensor, unit_weights: torch.Tensor) -> dict[str, Any]:
    """Why argmax routing does or does not spread prompts, in the router's own (weighted) space.

    - ``code_norm``: norm of each weighted code; ``code_cosine``: their mutual cosines.
    - ``router_common``: norm of the mean of the unit router vectors (1: every prompt has the
      same direction, so every prompt prefers the same code).
    - ``score_spread_within``: mean over prompts of (best - worst) similarity across codes;
      ``score_spread_across``: mean over codes of the std over prompts of its similarity.
    """
    w = unit_weights.to(router_vectors)
    router = F.normalize(router_vectors * w, dim=-1)
    codes = code_logits.to(router_vectors) * w
    unit_codes = F.normalize(codes, dim=-1)
    scores = router @ unit_codes.T
    return {
        "code_norm": [round(float(v), 3) for v in codes.norm(dim=-1)],
        "code_cosine": [[round(float(v), 3) for v in row] for row in unit_codes @ unit_codes.T],
        "router_common": float(router.mean(0).norm()),
        "score_spread_within": float((scores.max(1).values - scores.min(1).values).mean()),
        "score_spread_across": float(scores.std(0).mean()) if scores.shape[0] > 1 else 0.0,
    }


def routing_report(checkpoint_dir: str | Path, prompts: Sequence[str], families: Sequence[str]) -> dict[str, Any]:
    """Shares, expected MACs and family purity of a checkpoint's router with and without its
    calibrated per-code bias, plus `router_geometry`, for the given prompts."""
    from aptp.train.route import load_router

    info, encoder, head, logits, layout = load_router(Path(checkpoint_dir))
    sentence = encoder.encode(list(prompts))
    vectors = head(sentence)
    weights = layout.unit_weights
    calibrated = head.scores(sentence, logits, weights).detach()
    bias = head.code_bias.detach() if head.code_bias is not None else torch.zeros(info.num_codes)
    raw = calibrated - bias
    ratios = np.asarray(info.code_macs_ratio)
    report: dict[str, Any] = {"num_prompts": len(prompts), "code_macs_ratio": ratios.round(4).tolist(),
                              "code_bias": [round(float(b), 4) for b in bias]}
    for name, scores in (("uncalibrated", raw), ("calibrated", calibrated)):
        codes = scores.argmax(1).numpy()
        share = np.bincount(codes, minlength=info.num_codes) / len(codes)
        per_family = {}
        for fam in sorted(set(families)):
            mask = np.asarray(families) == fam
            per_family[fam] = float(ratios[codes[mask]].mean())
        report[name] = {"code_share": share.round(4).tolist(), "max_share": float(share.max()),
                        "macs_ratio": float(ratios[codes].mean()), "family_macs": per_family,
                        **family_purity(codes, families, info.num_codes)}
    report["geometry"] = router_geometry(vectors, logits, weights)
    return report


def refit_head(checkpoint_dir: str | Path, assignment_weight: float, seed: int, prompts: Sequence[str],
               families: Sequence[str], steps: int = 200, train_prompts: int = 512) -> dict[str, Any]:
    """Train a fresh router head against the checkpoint's frozen codes (its config, the given
    assignment weight) and route `prompts` with it, uncalibrated."""
    from aptp.train import checkpoint as ckpt
    from aptp.train.codes import ArchitectureCodes
    from aptp.train.config import load_config
    from aptp.train.data import ProceduralCaptions
    from aptp.train.prune import RouterAndCodes, router_step
    from aptp.train.router import RouterHead, SentenceEncoder

    directory = Path(checkpoint_dir)
    config = load_config(str(directory / "config.yaml"), [f"loss_weights.assignment={assignment_weight}"])
    logits, _ = ckpt.load_codes(directory)
    layout = ckpt.load_layout(directory)
    encoder = SentenceEncoder(config.router.encoder)
    data = ProceduralCaptions(train_prompts, seed=config.seed)
    train = encoder.encode([data.caption(i) for i in range(len(data))])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    k = logits.shape[0]
    head = RouterHead(train.shape[1], layout.num_gates, config.router.hidden_dim, k)
    codes = ArchitectureCodes(k, layout.num_gates, config.codes.base, config.codes.temperature)
    codes.logits.data.copy_(logits)
    codes.logits.requires_grad_(False)
    model = RouterAndCodes(head, codes)
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=config.prune.router_learning_rate,
                                  weight_decay=0.0)
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (config.prune.batch_size,), generator=generator)]
        losses = router_step(model, batch, layout.unit_weights, config)[4]
        total = sum(getattr(config.loss_weights, name) * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    with torch.no_grad():
        routed = model(encoder.encode(list(prompts)), layout.unit_weights)[2].argmax(1).numpy()
    share = np.bincount(routed, minlength=k) / len(routed)
    return {"assignment_weight": assignment_weight, "seed": seed, "steps": steps, "code_share": share.round(4).tolist(),
            "max_share": float(share.max()), **family_purity(routed, families, k)}


def main(argv: Sequence[str] | None = None) -> int:
    from aptp.train.data import ProceduralCaptions

    parser = argparse.ArgumentParser(prog="python -m aptp.benchmarks.quality.routing", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--prompt-seed", type=int, default=1)
    parser.add_argument("--refit-weights", type=float, nargs="*", default=[],
                        help="also refit router heads on the frozen codes with these assignment weights")
    parser.add_argument("--refit-seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    data = ProceduralCaptions(args.num_prompts, seed=args.prompt_seed)
    prompts = [data.caption(i) for i in range(len(data))]
    families = [data.attributes(i)["family"] for i in range(len(data))]
    report = routing_report(args.checkpoint, prompts, families)
    report["refit"] = [refit_head(args.checkpoint, w, seed, prompts, families) for w in args.refit_weights for seed in args.refit_seeds]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
