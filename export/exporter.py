"""Training checkpoint -> export directory: experts, ONNX graphs, engines, manifest.

`export_checkpoint` checks its inputs first (checkpoint format, options, a writable output),
then writes everything into a staging directory beside the target and renames it into place
only once ``manifest.json`` (written last) is complete. An existing export at the target is
renamed aside, replaced, then deleted: at no point does the target hold half an export, and an
interrupted run (error, Ctrl-C, kill) leaves the old export, or nothing, at the target.

Export directory layout::

    manifest.json                 see aptp.export.manifest (format "aptp-export", version 1)
    experts/expert_<k>/           base_config.json, arch_spec.json, safetensors weights
                                  (aptp.export.load_expert reloads them), unet.onnx
                                  [+ unet.onnx.data], unet.plan with TensorRT
    dense/unet.onnx               the unpruned UNet (unless --no-dense)
    text_encoder/model.onnx       input_ids (int32) -> last_hidden_state
    tokenizer/                    the diffusion model's tokenizer (tokenizer.json)
    vae_decoder/model.onnx        latent_sample (final latents, unscaled) -> sample in [-1, 1]
    vae_encoder/model.onnx        sample in [-1, 1] -> latent_mean, latent_std (scaled; img2img)
    router/encoder.onnx           input_ids, attention_mask -> sentence_embedding
    router/head.onnx              sentence_embedding -> scores (B, K); route = argmax (for a
                                  checkpoint from aptp-import: the authors' rule, kind "authors")
    router/tokenizer.json         the router encoder's tokenizer
    tensorrt/timing.cache         with TensorRT
    pipelines/{dense,expert_<k>}/ with --pipeline-dirs: diffusers ONNX pipeline directories
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from aptp.errors import ArtifactError, ConfigError
from aptp.outputs import EXPORT, check_output_dir, staged_output

from .manifest import write_manifest
from .onnx_configs import (
    RouterEncoderOnnxConfig,
    RouterHeadOnnxConfig,
    TextEncoderOnnxConfig,
    UNetOnnxConfig,
    VaeDecoderOnnxConfig,
    VaeEncoderOnnxConfig,
    VaePosteriorOnnxConfig,
)
from .onnx_export import (
    EXTERNAL_DATA_THRESHOLD,
    ExportedGraph,
    check_tolerance,
    compare_onnx,
    export_and_validate,
)
from .scheduler_tables import build_scheduler_table, make_scheduler, sampler_specs
from .tensorrt import Engine, pad_group_norm_widths, tensorrt_status

__all__ = ["ExportOptions", "export_checkpoint"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# Prompts for the router encoder's check against sentence-transformers' own `encode`.
_ROUTER_CHECK_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "close-up portrait of an old fisherman, dramatic light",
    "a watercolor painting of a quiet harbour at dawn",
    "logo",
)


@dataclass
class ExportOptions:
    """What `aptp-export` can change (defaults: the CLI's).

    Attributes:
        precision: ``fp32`` or ``fp16`` for the UNets, text encoder and VAE decoder (the router
            is always fp32: its argmax must match training).
        resolution: nominal image size in pixels (default: the checkpoint's).
        min_resolution, max_resolution: the dynamic range recorded in the manifest and used for
            TensorRT profiles (default: the nominal resolution).
        max_batch: prompts per UNet call; TensorRT profiles cover twice that (guidance).
        scheduler, steps: the sampler and step count whose coefficient table is stored.
        tensorrt: also build one fp16 engine per UNet where TensorRT and a GPU are present.
        pipeline_dirs: also write diffusers ONNX pipeline directories.
        dense: also export the unpruned UNet.
        guidance_scale: the default recorded for the runtime.
        external_data_threshold: graphs with more weight bytes store them externally.
        unet_external_data: UNet graphs (experts and dense) always keep their weights in a
            ``.data`` file beside the graph. An onnxruntime session of an inline graph holds
            its weights twice (measured: 270 MiB of RSS for a 119 MiB expert, against 153 MiB
            with external weights), which is what a memory budget must pay for each expert.
        signing_key: an Ed25519 private key (PEM file) to sign the manifest with
            (`aptp.export.signing`); ``None`` leaves the export unsigned.
    """

    precision: str = "fp32"
    resolution: int | None = None
    min_resolution: int | None = None
    max_resolution: int | None = None
    max_batch: int = 4
    scheduler: str = "ddim"
    steps: int = 50
    tensorrt: bool = False
    pipeline_dirs: bool = False
    dense: bool = True
    guidance_scale: float = 7.5
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    unet_external_data: bool = True
    signing_key: str | os.PathLike | None = None

    def check(self) -> None:
        """Raise `ConfigError` for values no export can use (model-dependent checks come later)."""
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("resolution", "min_resolution", "max_resolution"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise ConfigError(f"{name.replace('_', '-')} must be a positive number of pixels, got {value!r}")
        # The ranges the runtime accepts in a manifest: never export what it would refuse.
        from aptp.runtime.artifacts import LIMITS

        low, high = LIMITS["image_size"]
        for name in ("resolution", "min_resolution", "max_resolution"):
            value = getattr(self, name)
            if value is not None and not low <= int(value) <= high:
                raise ConfigError(f"{name.replace('_', '-')} must be {low:g}..{high:g} pixels, got {value}")
        low, high = LIMITS["max_batch"]
        if not low <= int(self.max_batch) <= high:
            raise ConfigError(f"max-batch must be {low:g}..{high:g}, got {self.max_batch}")
        if int(self.steps) < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        low, high = LIMITS["guidance_scale"]
        if not low <= self.guidance_scale <= high:
            raise ConfigError(f"guidance scale must be {low:g}..{high:g}, got {self.guidance_scale}")
        make_scheduler(self.scheduler, {})  # unknown names fail here, before any model is loaded
        if self.signing_key is not None:
            from .signing import load_private_key

            load_private_key(self.signing_key)  # an unusable key fails now, not after the export


@dataclass
class _Context:
    """Everything the export steps share."""

    checkpoint: Path
    staging: Path
    options: ExportOptions
    info: Any
    layout: Any
    code_logits: torch.Tensor
    hard_masks: torch.Tensor
    shares: list[float | None]
    components: Any = None
    latent_height: int = 0
    latent_width: int = 0
    latent_range: tuple[int, int] = (0, 0)
    text_length: int = 0
    graphs: dict[str, ExportedGraph] = field(default_factory=dict)
    unet_graphs: dict[str, ExportedGraph] = field(default_factory=dict)
    io: dict[str, Any] = field(default_factory=dict)
    trt: dict[str, Any] | None = None

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.staging).as_posix()


# -- input checks ----------------------------------------------------------------------------


def _read_checkpoint(checkpoint: Path) -> tuple[Any, Any, torch.Tensor, torch.Tensor, list[float | None]]:
    from aptp.train import checkpoint as ckpt

    if not checkpoint.exists():
        raise ArtifactError(f"checkpoint {checkpoint} does not exist; pass the directory aptp-train prune wrote")
    if not checkpoint.is_dir():
        raise ArtifactError(f"checkpoint {checkpoint} is not a directory; pass the directory aptp-train prune wrote")
    info = ckpt.CheckpointInfo.load(checkpoint)
    layout = ckpt.load_layout(checkpoint)
    logits, masks = ckpt.load_codes(checkpoint)
    k = int(info.num_codes)
    if logits.shape[0] != k or masks.shape[0] != k or len(info.code_macs_ratio) != k:
        raise ArtifactError(
            f"checkpoint {checkpoint} is inconsistent: checkpoint.json says K={k}, codes hold {logits.shape[0]} "
            f"logits and {masks.shape[0]} masks, {len(info.code_macs_ratio)} MACs ratios"
        )
    if logits.shape[1] != layout.num_gates or masks.shape[1] != layout.num_gates:
        raise ArtifactError(
            f"checkpoint {checkpoint}: codes have {logits.shape[1]} gates, the gate layout {layout.num_gates}"
        )
    if not torch.isfinite(logits).all():
        raise ArtifactError(f"checkpoint {checkpoint}: codes.safetensors holds non-finite code logits")
    for code in range(k):
        kept = layout.kept_units(masks[code])
        empty = [site.name for site, units, needed in zip(layout.sites, kept, layout.site_nonempty.tolist())
                 if needed and not units]
        if empty:
            raise ArtifactError(f"checkpoint {checkpoint}: code {code}'s hard mask keeps no unit at {len(empty)} "
                                f"site(s), e.g. {empty[0]}; training never writes such a mask")
    for name in ("code_macs_ratio", "code_share"):
        bad = [v for v in getattr(info, name) if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ArtifactError(f"checkpoint {checkpoint}: checkpoint.json '{name}' holds {bad[0]!r}; "
                                "expected finite numbers >= 0")
    from aptp.train.release.importer import is_release_checkpoint, load_release_router

    if is_release_checkpoint(checkpoint):
        load_release_router(checkpoint)  # the authors' router (aptp-import): checked now, not after the experts
    else:
        ckpt.load_router_head(checkpoint)  # a missing or corrupt head fails now, not after the experts
    routing = ckpt.load_routing(checkpoint)
    shares: list[float | None]
    if routing and len(routing.get("share", [])) == k and all(0 <= float(v) <= 1 for v in routing["share"]):
        shares = [float(s) for s in routing["share"]]
    elif len(info.code_share) == k:
        shares = [float(s) for s in info.code_share]
    else:
        logger.warning("checkpoint %s records no prompt shares; the manifest's shares are null", checkpoint)
        shares = [None] * k
    return info, layout, logits, masks, shares


def _latent_sizes(ctx: _Context) -> None:
    """Nominal latent size and range from the options, checked against the model's strides."""
    comps, opts, info = ctx.components, ctx.options, ctx.info
    factor = comps.vae_scale_factor
    multiple = 2 ** (len(comps.unet.config.down_block_types) - 1)
    step = factor * multiple
    resolution = int(opts.resolution or info.resolution)
    from aptp.runtime.artifacts import LIMITS

    if not opts.resolution and not LIMITS["image_size"][0] <= resolution <= LIMITS["image_size"][1]:
        raise ArtifactError(f"checkpoint {ctx.checkpoint}: resolution {resolution} in checkpoint.json is not a usable "
                            "image size; pass --resolution")
    low = int(opts.min_resolution or resolution)
    high = int(opts.max_resolution or resolution)
    for name, value in (("resolution", resolution), ("min-resolution", low), ("max-resolution", high)):
        if value % step:
            raise ConfigError(
                f"--{name} {value} is not a multiple of {step} (VAE factor {factor} x UNet downsampling {multiple})"
            )
    if not low <= resolution <= high:
        raise ConfigError(f"need --min-resolution {low} <= --resolution {resolution} <= --max-resolution {high}")
    ctx.latent_height = ctx.latent_width = resolution // factor
    ctx.latent_range = (low // factor, high // factor)
    ctx.text_length = int(comps.text_length)
    if ctx.text_length != int(info.text_length):
        logger.warning("tokenizer length %d differs from the checkpoint's text length %d", ctx.text_length, info.text_length)


# -- steps (module-level so that tests can interrupt any of them) -----------------------------


class _MaskedUNet(nn.Module):
    """The full UNet under one hard mask: the reference an expert must reproduce."""

    def __init__(self, unet: nn.Module, layout: Any, mask: torch.Tensor):
        super().__init__()
        self.unet, self.layout, self.mask = unet, layout, mask.float()

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False):
        from aptp.train.gates import apply_gates

        with apply_gates(self.unet, self.layout, self.mask):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=return_dict)


def _unet_config(ctx: _Context, unet: nn.Module, precision: str | None = None) -> UNetOnnxConfig:
    return UNetOnnxConfig.from_unet(unet, ctx.latent_height, ctx.latent_width, ctx.text_length,
                                    batch=2, precision=precision or ctx.options.precision)


def load_checkpoint_expert(ctx: _Context, code: int) -> tuple[nn.Module, Any, dict]:
    """Code `code`'s expert as (UNet, ArchSpec, info): the checkpoint's expert directory when
    there is one (sliced or fine-tuned weights), else the dense UNet sliced by the hard mask."""
    from aptp.train import checkpoint as ckpt
    from aptp.train.experts import ARCH_SPEC, expert_info, load_expert
    from aptp.train.slicing import ArchSpec, slice_unet

    mask = ctx.hard_masks[code]
    source = ckpt.expert_dir(ctx.checkpoint, code)
    if source.is_dir():
        unet = load_expert(source)
        spec = ArchSpec.load(source / ARCH_SPEC)
        info = expert_info(source)
        if spec.kept_units() != ctx.layout.kept_units(mask):
            raise ArtifactError(
                f"{source}: its arch spec does not match code {code}'s hard mask in the checkpoint; "
                "the expert was sliced from another code (re-run aptp-train prune or finetune)"
            )
    else:
        logger.info("checkpoint has no %s; slicing the dense UNet by code %d's mask", source, code)
        unet, spec = slice_unet(ctx.components.unet, ctx.layout, mask)
        info = {"code": code, "finetuned": False}
    return unet.eval(), spec, info


def _finetuned(info: dict) -> bool:
    """Whether an expert's weights were fine-tuned (training writes a boolean `finetuned`)."""
    return bool(info.get("finetuned", False))


def _check_macs(ctx: _Context) -> None:
    """Recompute the codes' MACs ratios; the manifest keeps the checkpoint's, a mismatch warns."""
    from aptp.train.macs import DeployShape, MacsModel

    shape = DeployShape(int(ctx.info.latent_height), int(ctx.info.latent_width), int(ctx.info.text_length))
    ratios = MacsModel(ctx.components.unet, ctx.layout, shape).ratio(ctx.hard_masks.float()).tolist()
    for code, (mine, theirs) in enumerate(zip(ratios, ctx.info.code_macs_ratio)):
        if abs(mine - float(theirs)) > 1e-4 * max(1.0, abs(float(theirs))):
            logger.warning("code %d: MACs ratio recomputed %.5f, checkpoint says %.5f", code, mine, theirs)


def _tensorrt_profile(ctx: _Context, config: UNetOnnxConfig) -> dict[str, Any]:
    low, high = ctx.latent_range
    batch_max = 2 * int(ctx.options.max_batch)  # classifier-free guidance doubles the batch
    dims = {
        "min": {"batch": 1, "steps": 1, "height": low, "width": low},
        "opt": {"batch": 2, "steps": 2, "height": ctx.latent_height, "width": ctx.latent_width},
        "max": {"batch": batch_max, "steps": batch_max, "height": high, "width": high},
    }
    return {"dims": dims, "shapes": config.input_profile(dims["min"], dims["opt"], dims["max"])}


def build_unet_engine(ctx: _Context, name: str, unet: nn.Module, directory: Path) -> dict[str, Any]:
    """fp16 TensorRT engine for one UNet, from a GroupNorm-padded fp32 ONNX graph that is first
    validated against the unpadded PyTorch model. Returns the manifest fields."""
    import copy

    padded = copy.deepcopy(unet)
    padding = pad_group_norm_widths(padded, ctx.components.unet.config)
    config = _unet_config(ctx, unet, precision="fp32")
    scratch = Path(tempfile.mkdtemp(prefix=".trt-", dir=ctx.staging))
    try:
        graph = export_and_validate(padded, config, scratch / "unet.onnx")
        check_tolerance(compare_onnx(unet, config, graph.path, session=graph.session), config, graph.path,
                        against="the unpadded expert")
        profile = _tensorrt_profile(ctx, config)
        ctx.trt["profile"] = profile["dims"]
        plan = Engine(directory / "unet.plan").build(graph.path, profile["shapes"], fp16=True,
                                                      timing_cache=ctx.staging / "tensorrt" / "timing.cache")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("%s: TensorRT engine %s (%d GroupNorm widths padded)", name, plan, len(padding))
    return {"tensorrt": ctx.rel(plan), "group_norm_padding": padding}


def _unet_threshold(options: ExportOptions) -> int:
    """Weight bytes above which a UNet graph stores its weights externally (0: always)."""
    return 0 if options.unet_external_data else options.external_data_threshold


def export_experts(ctx: _Context) -> list[dict[str, Any]]:
    """One expert per code: PyTorch artifact, ONNX UNet checked against the sliced expert and
    against the masked full UNet, and an engine with TensorRT."""
    from aptp.train.experts import save_expert

    entries = []
    base_config = dict(ctx.components.unet.config)
    for code in tqdm(range(int(ctx.info.num_codes)), desc="export experts", leave=False):
        unet, spec, info = load_checkpoint_expert(ctx, code)
        directory = ctx.staging / "experts" / f"expert_{code}"
        save_expert(directory, unet, spec, base_config, info={**info, "code": code})
        config = _unet_config(ctx, unet)
        graph = export_and_validate(unet, config, directory / "unet.onnx",
                                    external_data_threshold=_unet_threshold(ctx.options))
        masked = _MaskedUNet(ctx.components.unet, ctx.layout, ctx.hard_masks[code])
        vs_masked = compare_onnx(masked, config, graph.path, session=graph.session)
        finetuned = _finetuned(info)
        if not finetuned:
            # Sliced weights: the exact masked/sliced equivalence must survive the export.
            check_tolerance(vs_masked, config, graph.path, against=f"the full UNet masked by code {code}")
        entry = {
            "code": code,
            "unet": ctx.rel(graph.path),
            "external_data": ctx.rel(graph.external_data) if graph.external_data else None,
            "macs_ratio": float(ctx.info.code_macs_ratio[code]),
            "share": ctx.shares[code],
            "arch_spec": ctx.rel(directory / "arch_spec.json"),
            "weights": str(info.get("weights", "")),
            "finetuned": finetuned,
            "max_abs_error": graph.max_abs_error,
            "max_abs_error_vs_masked": vs_masked,
            "tensorrt": None,
        }
        if ctx.trt is not None:
            entry.update(build_unet_engine(ctx, f"expert {code}", unet, directory))
        graph.session = None  # the session holds the weights; K of them would not fit for real models
        ctx.unet_graphs[f"expert_{code}"] = graph
        entries.append(entry)
        del unet
    ctx.io["unet"] = _unet_config(ctx, ctx.components.unet).io_spec()
    return entries


def export_dense(ctx: _Context) -> dict[str, Any]:
    """The unpruned UNet, the baseline every expert's latency is compared with."""
    unet = ctx.components.unet
    config = _unet_config(ctx, unet)
    graph = export_and_validate(unet, config, ctx.staging / "dense" / "unet.onnx",
                                external_data_threshold=_unet_threshold(ctx.options))
    graph.session = None
    ctx.unet_graphs["dense"] = graph
    entry = {"unet": ctx.rel(graph.path),
             "external_data": ctx.rel(graph.external_data) if graph.external_data else None,
             "macs_ratio": 1.0, "max_abs_error": graph.max_abs_error, "tensorrt": None}
    if ctx.trt is not None:
        entry.update(build_unet_engine(ctx, "dense", unet, ctx.staging / "dense"))
    return entry


def export_text_encoder(ctx: _Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """Text encoder graph and the tokenizer files; returns (text_encoder, tokenizer) entries."""
    comps = ctx.components
    config = TextEncoderOnnxConfig.from_model(comps.text_encoder, ctx.text_length, precision=ctx.options.precision)
    graph = export_and_validate(comps.text_encoder, config, ctx.staging / "text_encoder" / "model.onnx",
                                external_data_threshold=ctx.options.external_data_threshold)
    graph.session = None
    ctx.graphs["text_encoder"] = graph
    ctx.io["text_encoder"] = config.io_spec()
    tokenizer_dir = ctx.staging / "tokenizer"
    comps.tokenizer.save_pretrained(str(tokenizer_dir))
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ArtifactError(
            f"the tokenizer {type(comps.tokenizer).__name__} saved no tokenizer.json: the runtime needs a fast "
            "(tokenizers) tokenizer"
        )
    pad = comps.tokenizer.pad_token_id
    tokenizer = {"dir": "tokenizer", "file": "tokenizer/tokenizer.json", "class": type(comps.tokenizer).__name__,
                 "max_length": ctx.text_length, "pad_token_id": int(pad) if pad is not None else None}
    entry = {"file": ctx.rel(graph.path), "hidden_size": int(comps.text_encoder.config.hidden_size),
             "max_abs_error": graph.max_abs_error, "dtype": config.io_spec()["outputs"]["last_hidden_state"]["dtype"]}
    return entry, tokenizer


def _export_vae_graph(ctx: _Context, vae: Any, config: Any, name: str) -> Any:
    """Export and validate one VAE graph as ``<name>/model.onnx``, recording it and its I/O."""
    graph = export_and_validate(vae, config, ctx.staging / name / "model.onnx",
                                external_data_threshold=ctx.options.external_data_threshold)
    graph.session = None
    ctx.graphs[name] = graph
    ctx.io[name] = config.io_spec()
    return graph


def export_vae_decoder(ctx: _Context) -> dict[str, Any]:
    """VAE decoder with ``1 / scaling_factor`` folded in: it takes the sampler's final latents."""
    vae = ctx.components.vae
    config = VaeDecoderOnnxConfig.from_vae(vae, ctx.latent_height, ctx.latent_width,
                                           1.0 / float(vae.config.scaling_factor), precision=ctx.options.precision)
    graph = _export_vae_graph(ctx, vae, config, "vae_decoder")
    return {"file": ctx.rel(graph.path), "max_abs_error": graph.max_abs_error, "applies_scaling_factor": True,
            "output_range": [-1.0, 1.0]}


def export_vae_encoder(ctx: _Context) -> dict[str, Any]:
    """VAE encoder posterior (mean, std) with ``scaling_factor`` folded in, for img2img and
    inpainting: the runtime draws the sample ``mean + std * eps`` from the request's seed."""
    vae = ctx.components.vae
    config = VaePosteriorOnnxConfig.from_vae(vae, ctx.latent_height, ctx.latent_width,
                                             float(vae.config.scaling_factor), precision=ctx.options.precision)
    graph = _export_vae_graph(ctx, vae, config, "vae_encoder")
    return {"file": ctx.rel(graph.path), "max_abs_error": graph.max_abs_error, "applies_scaling_factor": True,
            "outputs": ["latent_mean", "latent_std"], "input_range": [-1.0, 1.0]}


def export_router(ctx: _Context) -> dict[str, Any]:
    """Router encoder (transformer + pooling + L2 norm) and head (+ code lookup) graphs."""
    from aptp.train import checkpoint as ckpt
    from aptp.train.router import SentenceEncoder

    router_dir = ctx.staging / "router"
    encoder = SentenceEncoder(ctx.info.encoder, device="cpu")
    enc_config = RouterEncoderOnnxConfig.from_encoder(encoder)
    enc_graph = export_and_validate(encoder.transformer, enc_config, router_dir / "encoder.onnx")
    # Also against sentence-transformers' own encode on real prompts (tokenizer included).
    session = enc_graph.session
    tokens = encoder.tokenizer(list(_ROUTER_CHECK_PROMPTS), padding=True, truncation=True,
                               max_length=encoder.max_seq_length, return_tensors="np")
    got = session.run(None, {"input_ids": tokens["input_ids"].astype("int64"),
                             "attention_mask": tokens["attention_mask"].astype("int64")})[0]
    want = encoder.encode(list(_ROUTER_CHECK_PROMPTS)).cpu().numpy()
    enc_graph.session = session = None
    enc_error = max(enc_graph.max_abs_error, float(abs(got - want).max()))
    check_tolerance(enc_error, enc_config, enc_graph.path, against="SentenceTransformer.encode")
    encoder.tokenizer.save_pretrained(str(router_dir))
    if not (router_dir / "tokenizer.json").is_file():
        raise ArtifactError(f"the router encoder's tokenizer saved no tokenizer.json in {router_dir}")

    head = ckpt.load_router_head(ctx.checkpoint).eval()
    if head.config.embed_dim != encoder.dim or head.config.num_gates != ctx.layout.num_gates:
        raise ArtifactError(
            f"router head expects {head.config.embed_dim}-d embeddings and {head.config.num_gates} gates; the encoder "
            f"gives {encoder.dim}-d, the gate layout has {ctx.layout.num_gates} gates"
        )
    unit_weights = ctx.layout.unit_weights
    head_config = RouterHeadOnnxConfig({"batch": 2, "embed_dim": encoder.dim, "num_codes": int(ctx.info.num_codes)})
    head_graph = export_and_validate((head, ctx.code_logits, unit_weights), head_config, router_dir / "head.onnx")
    ctx.io["router_encoder"] = enc_config.io_spec()
    ctx.io["router_head"] = head_config.io_spec()
    pad = encoder.tokenizer.pad_token_id
    return {
        "name": encoder.name_or_path,
        "encoder": {"file": ctx.rel(enc_graph.path), "tokenizer": "router/tokenizer.json",
                    "max_length": encoder.max_seq_length, "pad_token_id": int(pad) if pad is not None else 0,
                    "pooling": enc_config.pooling_mode, "embed_dim": encoder.dim, "max_abs_error": enc_error},
        "head": {"file": ctx.rel(head_graph.path), "max_abs_error": head_graph.max_abs_error},
        "code_table": ctx.code_logits.float().tolist(),
        "unit_weights": unit_weights.float().tolist(),
    }


def _scheduler_config(ctx: _Context) -> dict[str, Any]:
    """The pipeline's own scheduler config (all its keys), else the loaded training scheduler's."""
    from diffusers import DDIMScheduler

    try:
        return dict(DDIMScheduler.load_config(ctx.components.pretrained, subfolder="scheduler"))
    except (OSError, ValueError):
        return dict(ctx.components.noise_scheduler.config)


def export_pipeline_dirs(ctx: _Context, names: list[str]) -> dict[str, Any]:
    """diffusers ONNX pipeline directories for the dense UNet and every expert."""
    from .pipeline_dirs import PIPELINE_SCHEDULERS, pipeline_latent_scales, vae_pipeline_config, write_pipeline_dir
    from .scheduler_tables import short_name

    vae = ctx.components.vae
    decoder_scale, encoder_scale = pipeline_latent_scales(float(vae.config.scaling_factor))
    shared = ctx.staging / "pipelines" / ".shared"
    try:
        decoder = export_and_validate(
            vae, VaeDecoderOnnxConfig.from_vae(vae, ctx.latent_height, ctx.latent_width, decoder_scale,
                                               precision=ctx.options.precision),
            shared / "vae_decoder.onnx", external_data_threshold=ctx.options.external_data_threshold)
        encoder = export_and_validate(
            vae, VaeEncoderOnnxConfig.from_vae(vae, ctx.latent_height, ctx.latent_width, encoder_scale,
                                               precision=ctx.options.precision),
            shared / "vae_encoder.onnx", external_data_threshold=ctx.options.external_data_threshold)
        scheduler = make_scheduler(ctx.options.scheduler, _scheduler_config(ctx))
        if short_name(scheduler) not in PIPELINE_SCHEDULERS:
            logger.warning("diffusers' OnnxStableDiffusionPipeline cannot run the %s sampler; the pipeline "
                           "directories get %s", short_name(scheduler), PIPELINE_SCHEDULERS[0])
            scheduler = make_scheduler(PIPELINE_SCHEDULERS[0], _scheduler_config(ctx))
        scheduler_config = json.loads(scheduler.to_json_string())
        vae_config = vae_pipeline_config(json.loads(vae.to_json_string()))
        configs = {"unet": json.loads(ctx.components.unet.to_json_string()),
                   "text_encoder": json.loads(ctx.components.text_encoder.config.to_json_string()),
                   "vae_decoder": vae_config, "vae_encoder": vae_config}
        dirs = {}
        for name in names:
            directory = write_pipeline_dir(
                ctx.staging / "pipelines" / name,
                unet=ctx.unet_graphs[name].files(),
                text_encoder=ctx.graphs["text_encoder"].files(),
                vae_decoder=decoder.files(),
                vae_encoder=encoder.files(),
                tokenizer_dir=ctx.staging / "tokenizer",
                tokenizer_class=type(ctx.components.tokenizer).__name__,
                scheduler_config=scheduler_config,
                configs={**configs, "unet": {**configs["unet"], "_aptp_unet": name}},
            )
            dirs[name] = ctx.rel(directory)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    if ctx.components.vae_scale_factor != 8:
        logger.warning("diffusers' ONNX pipeline assumes a VAE factor of 8; this model's is %d, so its images "
                       "come out at %d/8 of the requested size", ctx.components.vae_scale_factor,
                       ctx.components.vae_scale_factor)
    return {"scheduler": short_name(scheduler), "dirs": dirs}


# -- the whole export --------------------------------------------------------------------------


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike,
                      options: ExportOptions | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    """Export a training checkpoint to the directory `output`; returns the manifest written.

    `output` must be a new path, an empty directory or, with ``overwrite=True``, a previous
    aptp export (replaced whole once the new one is complete); it may not overlap the
    checkpoint.

    Raises:
        ArtifactError: missing checkpoint, another checkpoint format, inconsistent or corrupt
            contents, or a graph that fails its validation.
        ConfigError: bad options (precision, scheduler, sizes).
        OutputError: an output that is not new or a previous export (or one without
            `overwrite`), overlaps the checkpoint, or cannot be written.
        StorageError: a read or write failed on the way (disk full...); `output` is as it was.
    """
    from aptp.train.models import load_components
    from aptp.train.release.importer import is_release_checkpoint

    from .release_router import export_release_router

    options = options or ExportOptions()
    options.check()
    checkpoint = Path(checkpoint).expanduser()
    output = Path(output).expanduser().absolute()
    # Refuse an output that would delete the user's files or the checkpoint before any work.
    check_output_dir(output, EXPORT, allow_existing=overwrite, inputs=[("checkpoint", checkpoint)])
    info, layout, logits, masks, shares = _read_checkpoint(checkpoint)
    with staged_output(output, EXPORT, what=f"exporting {checkpoint}") as staging:
        ctx = _Context(checkpoint=checkpoint, staging=staging, options=options, info=info, layout=layout,
                       code_logits=logits, hard_masks=masks, shares=shares)
        trt_note = None
        if options.tensorrt:
            available, detail = tensorrt_status()
            if available:
                ctx.trt = {"built": True, "version": detail, "precision": "fp16",
                           "timing_cache": "tensorrt/timing.cache"}
            else:
                logger.warning("--tensorrt: TensorRT is unavailable (%s); exporting ONNX only", detail)
                trt_note = {"built": False, "reason": detail}
        ctx.components = load_components(info.base_model(checkpoint))
        _latent_sizes(ctx)
        _check_macs(ctx)
        scheduler_table = build_scheduler_table(options.scheduler, _scheduler_config(ctx), int(options.steps))
        # What the runtime needs to build any sampler's table per request (steps 1-150).
        samplers = sampler_specs(_scheduler_config(ctx))

        experts = export_experts(ctx)
        dense = export_dense(ctx) if options.dense else None
        text_encoder, tokenizer = export_text_encoder(ctx)
        vae_decoder = export_vae_decoder(ctx)
        vae_encoder = export_vae_encoder(ctx)
        router = export_release_router(ctx) if is_release_checkpoint(checkpoint) else export_router(ctx)
        pipelines = None
        if options.pipeline_dirs:
            names = (["dense"] if dense else []) + [f"expert_{e['code']}" for e in experts]
            pipelines = export_pipeline_dirs(ctx, names)

        comps = ctx.components
        vae = comps.vae
        manifest = {
            # Resolved (what load_components loads here), as consumers such as aptp-bench need it;
            # the checkpoint's own (portable) reference is kept under checkpoint.base_model.
            "base_model": str(comps.pretrained),
            "num_codes": int(info.num_codes),
            "precision": options.precision,
            "image": {"height": ctx.latent_height * comps.vae_scale_factor, "width": ctx.latent_width * comps.vae_scale_factor,
                      "min_size": ctx.latent_range[0] * comps.vae_scale_factor,
                      "max_size": ctx.latent_range[1] * comps.vae_scale_factor,
                      "size_multiple": comps.vae_scale_factor * 2 ** (len(comps.unet.config.down_block_types) - 1)},
            "latent": {"channels": int(comps.unet.config.in_channels), "height": ctx.latent_height,
                       "width": ctx.latent_width},
            "vae": {"scaling_factor": float(vae.config.scaling_factor), "scale_factor": comps.vae_scale_factor},
            "tokenizer": tokenizer,
            "text_encoder": text_encoder,
            "router": router,
            "experts": experts,
            "dense": dense,
            "vae_decoder": vae_decoder,
            "vae_encoder": vae_encoder,
            "scheduler": scheduler_table,
            "samplers": samplers,
            "guidance_scale": float(options.guidance_scale),
            "max_batch": int(options.max_batch),
            "io": ctx.io,
            "checkpoint": {"path": str(checkpoint.absolute()), "base_model": str(info.pretrained), "step": int(info.step),
                           "budget_target": float(info.budget_target), "resolution": int(info.resolution)},
            "tensorrt": ctx.trt if ctx.trt is not None else trt_note,
            "pipelines": pipelines,
        }
        write_manifest(staging, manifest, signing_key=options.signing_key)
        written = json.loads((staging / "manifest.json").read_text())
    logger.info("export written to %s (%d experts%s)", output, len(experts), ", dense" if dense else "")
    return written
