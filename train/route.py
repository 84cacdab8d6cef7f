"""`aptp-train route`: send every prompt of a dataset to a code and write the split."""

from __future__ import annotations

import logging
from pathlib import Path

from aptp.errors import DatasetError

from . import checkpoint as ckpt
from .config import load_config
from .data import load_dataset
from .prune import route_texts
from .router import SentenceEncoder
from .slicing import write_json_atomic
from .training import build_dataset, dataset_texts

logger = logging.getLogger(__name__)


def load_router(checkpoint_dir: Path):
    """(info, encoder, head, code logits, layout) of a pruning checkpoint."""
    info = ckpt.CheckpointInfo.load(checkpoint_dir)
    layout = ckpt.load_layout(checkpoint_dir)
    logits, _ = ckpt.load_codes(checkpoint_dir)
    head = ckpt.load_router_head(Path(checkpoint_dir)).eval()
    return info, SentenceEncoder(info.encoder), head, logits, layout


def routing_summary(codes: list[int], num_codes: int, ratios: list[float], target: float) -> dict:
    counts = [codes.count(k) for k in range(num_codes)]
    share = [c / len(codes) for c in counts]
    expected = sum(s * r for s, r in zip(share, ratios))
    return {"num_prompts": len(codes), "counts": counts, "share": share, "code_macs_ratio": ratios,
            "expected_macs_ratio": expected, "budget_target": target, "meets_budget": expected <= target + 1e-6}


def run_route(checkpoint_dir: Path, prompts: list[str] | None = None, data_format: str | None = None,
              data_path: str | None = None, output: Path | None = None) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    info, encoder, head, logits, layout = load_router(checkpoint_dir)
    config = load_config(str(checkpoint_dir / "config.yaml"))
    if prompts is not None:
        texts, source = list(prompts), "prompts"
    elif data_format is not None:
        texts, source = dataset_texts(load_dataset(data_format, data_path, config.model.resolution)), f"{data_format}:{data_path}"
    else:
        texts, source = dataset_texts(build_dataset(config)), "training data"
    if not texts:
        raise DatasetError(f"no prompt to route in {source}")
    codes = route_texts(texts, encoder, head, logits, layout.unit_weights).tolist()
    summary = routing_summary(codes, info.num_codes, info.code_macs_ratio, info.budget_target)
    output = Path(output) if output is not None else checkpoint_dir / ckpt.ROUTING_FILE
    write_json_atomic(output, {"format": 1, "source": source, **summary,
                               "assignments": [{"text": t, "code": c} for t, c in zip(texts, codes)]})
    print(f"routed {len(texts)} prompts from {source} -> {output}")
    for k in range(info.num_codes):
        print(f"  code {k}: {summary['counts'][k]:5d} prompts ({summary['share'][k]:.1%}), MACs ratio {info.code_macs_ratio[k]:.3f}")
    print(f"  expected MACs ratio of the mixture: {summary['expected_macs_ratio']:.3f} (target {info.budget_target:.3f})")
    return output
