"""What the training signal sees: how much more each code of a pruning checkpoint hurts each
prompt family, in the per-step distillation error that pruning trains on.

The quality-aware assignment (`aptp.train.quality_assignment`) can send a family to larger
codes only if this error says that the family suffers more from small codes. This measures it on
held-out procedural prompts: for every prompt and timestep, each code's distillation error
relative to the prompt's mean over codes (in log), and per family the gap between the smallest and
the largest code, with a bootstrap 95% interval over prompts and per timestep. Beside it, the mean
MACs of the codes the checkpoint's router sends each family to.

``python -m aptp.benchmarks.quality.sensitivity CHECKPOINT_DIR [--num-prompts N] [--timesteps ...]``
prints the report as JSON.

With ``--prior``, for a checkpoint pruned with ``sinkhorn.sensitivity_weight``, it reports the
prior that pruning measured (`aptp.train.prompt_sensitivity`) instead: its mean z-score per
family of the training prompts, and whether the trained router sends the prompts the prior calls
sensitive to the codes of more MACs (Spearman correlation of z and routed MACs, per family too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .paired import family_summary

__all__ = ["relative_log_errors", "family_gaps", "code_sensitivity", "prior_report"]

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


def relative_log_errors(errors: torch.Tensor) -> torch.Tensor:
    """``log(e_ik / mean_k e_ik)`` for ``(B, K)`` positive errors: the quality term before its floor."""
    from aptp.train.quality_assignment import relative_errors

    return torch.log(relative_errors(errors))


def family_gaps(relative: np.ndarray, ratios: Sequence[float], families: Sequence[str]) -> dict[str, Any]:
    """Per family, from ``(n, K, T)`` relative log errors: mean per code, and the smallest-minus-largest
    code gap (mean with bootstrap interval, and per timestep index)."""
    relative = np.asarray(relative, dtype=float)
    ratios = np.asarray(ratios, dtype=float)
    if relative.ndim != 3 or relative.shape[1] != len(ratios) or relative.shape[0] != len(families):
        raise ValueError(f"relative errors of shape {relative.shape} for {len(families)} prompts and {len(ratios)} codes")
    small, large = int(np.argmin(ratios)), int(np.argmax(ratios))
    gap = relative[:, small, :] - relative[:, large, :]  # (n, T)
    summary = family_summary(gap.mean(axis=1), families)
    out: dict[str, Any] = {"smallest_code": small, "largest_code": large, "families": {}}
    for family in sorted(set(families)):
        mask = np.asarray(families) == family
        out["families"][family] = {
            "relative_log_error_per_code": relative[mask].mean(axis=(0, 2)).round(4).tolist(),
            "gap": summary[family],
            "gap_per_timestep": gap[mask].mean(axis=0).round(4).tolist(),
        }
    out["all_gap"] = summary["all"]
    return out


@torch.no_grad()
def code_sensitivity(checkpoint_dir: str | Path, num_prompts: int = 512, prompt_seed: int = 1,
                     timesteps: Sequence[int] = DEFAULT_TIMESTEPS, batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """The report for one pruning checkpoint (its recorded teacher, codes and router)."""
    from aptp.train import checkpoint as ckpt
    from aptp.train.data import ProceduralCaptions
    from aptp.train.models import load_components
    from aptp.train.prune import encode_latents, route_texts
    from aptp.train.quality_assignment import code_distillation_errors
    from aptp.train.route import load_router

    directory = Path(checkpoint_dir)
    info, encoder, head, logits, layout = load_router(directory)
    _, hard = ckpt.load_codes(directory)
    components = load_components(ckpt.resolve_recorded_pretrained(info.pretrained, directory))
    unet = components.unet.eval().requires_grad_(False)
    data = ProceduralCaptions(num_prompts, info.latent_height * components.vae_scale_factor, seed=prompt_seed)
    families = [data.attributes(i)["family"] for i in range(num_prompts)]
    routed = route_texts([data.caption(i) for i in range(num_prompts)], encoder, head, logits, layout.unit_weights).numpy()
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for start in range(0, num_prompts, batch_size):
        items = [data[i] for i in range(start, min(num_prompts, start + batch_size))]
        latents = encode_latents(components, torch.stack([it["pixel_values"] for it in items]), generator)
        context = components.encode_prompts([it["text"] for it in items], "cpu", max_length=info.text_length)
        per_step = []
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator)
            steps = torch.full((len(items),), int(t), dtype=torch.long)
            noisy = components.noise_scheduler.add_noise(latents, noise, steps)
            teacher = unet(noisy, steps, encoder_hidden_states=context).sample
            errors = code_distillation_errors(unet, layout, hard, noisy, steps, context, teacher)
            per_step.append(relative_log_errors(errors.clamp(min=1e-30)))
        parts.append(torch.stack(per_step, dim=2))
    relative = torch.cat(parts).numpy()
    ratios = np.asarray(info.code_macs_ratio)
    report = {"checkpoint": str(directory), "num_prompts": num_prompts, "prompt_seed": prompt_seed,
              "timesteps": [int(t) for t in timesteps], "code_macs_ratio": ratios.round(4).tolist(),
              **family_gaps(relative, ratios, families)}
    for family in report["families"]:
        mask = np.asarray(families) == family
        report["families"][family]["routed_macs"] = float(ratios[routed[mask]].mean())
    return report


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho with tied values ranked alike (routed MACs take only K values); nan if
    either side is constant."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def prior_report(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The sensitivity prior of a checkpoint pruned with it, per family of its training prompts,
    against the MACs its router sends each training prompt to."""
    from aptp.errors import ArtifactError
    from aptp.train.config import load_config
    from aptp.train.prune import SENSITIVITY_FILE, route_texts
    from aptp.train.route import load_router
    from aptp.train.training import build_dataset, dataset_texts

    directory = Path(checkpoint_dir)
    if not (directory / SENSITIVITY_FILE).is_file():
        raise ArtifactError(f"{directory / SENSITIVITY_FILE} does not exist: was it pruned with sinkhorn.sensitivity_weight > 0?")
    prior = json.loads((directory / SENSITIVITY_FILE).read_text())["sensitivity"]
    dataset = build_dataset(load_config(str(directory / "config.yaml")))
    texts = dataset_texts(dataset)
    families = ([dataset.attributes(i)["family"] for i in range(len(dataset))] if hasattr(dataset, "attributes")
                else ["unknown"] * len(dataset))  # only the procedural set records families
    info, encoder, head, logits, layout = load_router(directory)
    routed = np.asarray(info.code_macs_ratio)[route_texts(texts, encoder, head, logits, layout.unit_weights).numpy()]
    z = np.array([prior[t] for t in texts])
    report: dict[str, Any] = {"checkpoint": str(directory), "prompts": len(texts), "code_macs_ratio": info.code_macs_ratio,
                              "z_by_family": family_summary(z, families), "routed_macs_by_family": family_summary(routed, families),
                              "spearman_z_routed_macs": {"all": _spearman(z, routed)}}
    for family in sorted(set(families)):
        mask = np.asarray(families) == family
        report["spearman_z_routed_macs"][family] = _spearman(z[mask], routed[mask])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aptp.benchmarks.quality.sensitivity", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--prompt-seed", type=int, default=1)
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    parser.add_argument("--prior", action="store_true", help="report the checkpoint's sensitivity prior instead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prior:
        from aptp.errors import AptpError

        try:
            print(json.dumps(prior_report(args.checkpoint), indent=1))
        except AptpError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    print(json.dumps(code_sensitivity(args.checkpoint, args.num_prompts, args.prompt_seed, args.timesteps), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
