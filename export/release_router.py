"""Router graphs for a checkpoint imported from the authors' release (`aptp-import`).

The runtime's router contract is unchanged (encoder graph -> head graph -> argmax): the
encoder is the authors' prompt encoder (all-mpnet-base-v2) with mean pooling and *no*
normalisation, the head is their routing rule (`aptp.train.release.routing`) with the fixed
row-0 Gumbel noise as constants. The manifest's router entry says ``"kind": "authors"``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from aptp.errors import ArtifactError, ConfigError

from .onnx_configs import ReleaseRouterHeadOnnxConfig, RouterEncoderOnnxConfig
from .onnx_export import check_tolerance, export_and_validate

__all__ = ["export_release_router"]

logger = logging.getLogger(__name__)

_CHECK_PROMPTS = ("a photograph of an astronaut riding a horse", "close-up portrait of an old fisherman",
                  "a watercolor painting of a quiet harbour at dawn", "logo")


def _encoder_max_length(tokenizer: Any, model: Any) -> int:
    """The truncation length of the authors' ``tokenizer(..., truncation=True)``: the tokenizer's
    model_max_length, bounded by the positions the model has."""
    length = int(getattr(tokenizer, "model_max_length", 512) or 512)
    positions = int(getattr(model.config, "max_position_embeddings", length + 2)) - 2
    return max(1, min(length, positions))


def export_release_router(ctx: Any) -> dict[str, Any]:
    """Encoder and head graphs of an imported release; returns the manifest's router entry."""
    from transformers import AutoModel, AutoTokenizer

    from aptp.train.release.importer import load_release_router, encode_prompts

    head, config = load_release_router(ctx.checkpoint)
    encoder_dir = Path(config["encoder"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
        model = AutoModel.from_pretrained(str(encoder_dir)).eval()
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"the checkpoint's prompt encoder {encoder_dir} cannot be loaded ({first}); it is recorded "
                          f"in {ctx.checkpoint}/release_router/config.json") from error
    embed_dim = int(model.config.hidden_size)
    if embed_dim != int(config["input_dim"]):
        raise ArtifactError(f"prompt encoder {encoder_dir} gives {embed_dim}-d embeddings, the router takes "
                            f"{config['input_dim']}-d")
    router_dir = ctx.staging / "router"
    enc_config = RouterEncoderOnnxConfig({"batch": 2, "sequence": 16, "vocab_size": len(tokenizer),
                                          "embed_dim": embed_dim}, pooling_mode="mean", normalize=False)
    enc_graph = export_and_validate(model, enc_config, router_dir / "encoder.onnx")
    # And against the authors' own pooling on real prompts, tokenizer included.
    max_length = _encoder_max_length(tokenizer, model)
    tokens = tokenizer(list(_CHECK_PROMPTS), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    got = enc_graph.session.run(None, {"input_ids": tokens["input_ids"].astype(np.int64),
                                       "attention_mask": tokens["attention_mask"].astype(np.int64)})[0]
    want = encode_prompts(encoder_dir, list(_CHECK_PROMPTS)).numpy()
    enc_graph.session = None
    enc_error = max(enc_graph.max_abs_error, float(np.abs(got - want).max()))
    check_tolerance(enc_error, enc_config, enc_graph.path, against="the authors' mean pooling")
    tokenizer.save_pretrained(str(router_dir))
    if not (router_dir / "tokenizer.json").is_file():
        raise ArtifactError(f"the prompt encoder's tokenizer saved no tokenizer.json in {router_dir}")

    k = int(config["num_codes"])
    if k != int(ctx.info.num_codes):
        raise ArtifactError(f"{ctx.checkpoint}: the release router has {k} codes, checkpoint.json {ctx.info.num_codes}")
    head_config = ReleaseRouterHeadOnnxConfig({"batch": 2, "embed_dim": embed_dim, "num_codes": k})
    head_graph = export_and_validate(head.eval(), head_config, router_dir / "head.onnx")
    head_graph.session = None
    ctx.io["router_encoder"] = enc_config.io_spec()
    ctx.io["router_head"] = head_config.io_spec()
    pad = tokenizer.pad_token_id
    return {
        "kind": "authors",
        "name": str(encoder_dir),
        "encoder": {"file": ctx.rel(enc_graph.path), "tokenizer": "router/tokenizer.json", "max_length": max_length,
                    "pad_token_id": int(pad) if pad is not None else 0, "pooling": "mean", "normalized": False,
                    "embed_dim": embed_dim, "max_abs_error": enc_error},
        "head": {"file": ctx.rel(head_graph.path), "max_abs_error": head_graph.max_abs_error},
        "rule": {"layout_version": config["layout_version"], "temperature": config["temperature"],
                 "base": config["base"], "depth_order": config["depth_order"],
                 "non_zero_width": config["non_zero_width"], "noise": config["noise"],
                 "batch_independent": True},
    }
