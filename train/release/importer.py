"""Import a released APTP set into an ordinary aptp checkpoint (`aptp-import`).

The checkpoint is the one `aptp-train prune`/`finetune` write (checkpoint.json, gate_layout.json,
codes.safetensors, experts/expert_<k>/), with the router kept in the authors' form under
``release_router/`` (aptp's own ``router_head/`` is absent) and the provenance in ``release.json``.
Each expert is rebuilt from the base UNet config and the arch spec its code implies, and loaded
from that expert's own safetensors only, strictly: the keys and shapes must be exactly those the
code implies. Everything is checked before the first byte is written; the output is staged beside
the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aptp.errors import ArtifactError, ConfigError
from aptp.outputs import OutputKind, check_output_dir, ordinary_mode, staged_output

from ..checkpoint import CheckpointInfo, expert_dir, record_pretrained, save_codes, save_layout
from ..experts import save_expert
from ..slicing import ArchSpec, apply_kept_units, write_json_atomic
from .layout import AUTHORS_LAYOUT_VERSION, AuthorsLayout
from .reader import ReleaseSet, read_release
from .routing import ReleaseRouterHead

__all__ = ["IMPORT", "RELEASE_FILE", "RELEASE_ROUTER_DIR", "ImportReport", "import_release", "is_release_checkpoint",
           "load_release_router"]

logger = logging.getLogger(__name__)

RELEASE_FILE = "release.json"
RELEASE_FORMAT = "aptp-release-import"
RELEASE_ROUTER_DIR = "release_router"
ROUTER_WEIGHTS = "router.safetensors"



def _is_import(path: Path) -> bool:
    try:
        return json.loads((path / RELEASE_FILE).read_text()).get("format") == RELEASE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


IMPORT = OutputKind("aptp-import", "an aptp import of a released set", "--output", _is_import)


@dataclass
class ExpertReport:
    code: int
    step: int
    macs_ratio: float
    params: int
    release_bytes: int
    dtype: str
    share: float | None = None


@dataclass
class ImportReport:
    output: Path
    num_codes: int
    dim: int
    dense_macs: float
    dense_params: int
    experts: list[ExpertReport] = field(default_factory=list)
    prompts: int = 0


def is_release_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint routes with the authors' rule (written by `import_release`)."""
    return (Path(directory) / RELEASE_ROUTER_DIR / "config.json").is_file()


def _base_pipeline(base: Path) -> tuple[dict, int, int]:
    """(UNet config, VAE scale factor, text length) of a diffusers pipeline directory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer

    if not (base / "unet" / "config.json").is_file():
        raise ConfigError(f"--base {base} is not a diffusers pipeline directory (no unet/config.json); pass the "
                          "Stable Diffusion 2.1 folder the set was pruned from")
    try:
        config = dict(UNet2DConditionModel.load_config(str(base), subfolder="unet"))
        vae = AutoencoderKL.load_config(str(base), subfolder="vae")
        tokenizer = AutoTokenizer.from_pretrained(str(base), subfolder="tokenizer")
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"--base {base}: cannot read the pipeline's configs ({first})") from error
    factor = 2 ** (len(vae.get("block_out_channels", [1])) - 1)
    return config, factor, int(tokenizer.model_max_length)


def _meta_unet(config: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def _ff_gate_width(release: Path) -> int:
    """The feed-forward gate width the set's structure uses (a transformer's third width)."""
    path = release / "hypernet" / "config.json"
    try:
        structure = json.loads(path.read_text())["structure"]
        widths = [m for m in structure["width"] if isinstance(m, list) and len(m) >= 3]
        return int(widths[0][2]) if widths else 32
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise ArtifactError(f"hypernet config {path} is missing or holds no structure") from error


def _expected_shapes(base_config: dict, layout: AuthorsLayout, mask: torch.Tensor):
    """(meta expert UNet, ArchSpec, {key: shape}) that code `mask` implies."""
    unet = _meta_unet(base_config)
    gates = layout.gate_layout
    records = apply_kept_units(unet, gates, gates.kept_units(mask))
    spec = ArchSpec(ff_groups=gates.config.ff_groups, depth=gates.config.depth, sites=records)
    return unet, spec, {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def _check_expert_file(code: int, path: Path, expected: dict[str, tuple[int, ...]]) -> str:
    """Keys and shapes of the expert's safetensors against the code's; returns its dtype."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as error:  # safetensors raises its own errors for bad bytes
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArtifactError(f"expert {code}: {path} is not a readable safetensors file: {first}") from error
    for key, shape in expected.items():
        if key not in shapes:
            raise ArtifactError(f"expert {code}: key {key} is missing from {path} (the code implies shape "
                                f"{list(shape)})")
        if shapes[key] != shape:
            raise ArtifactError(f"expert {code}: key {key} has shape {list(shapes[key])} in {path}, the code implies "
                                f"{list(shape)}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ArtifactError(f"expert {code}: {path} holds key {extra[0]} (shape {list(shapes[extra[0]])}) that the "
                            f"code removes{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    floats = {"F32", "F16", "BF16", "float32", "float16", "bfloat16"}
    if not dtypes <= floats:
        raise ArtifactError(f"expert {code}: {path} holds tensors of type {sorted(dtypes - floats)}, not float")
    return ",".join(sorted(dtypes))


def _read_prompts(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--prompts {path}: cannot read it ({error})") from error
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"--prompts {path} holds no prompt (one per line)")
    return prompts


def encode_prompts(encoder_dir: Path, prompts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """Mean-pooled, unnormalised prompt embeddings (the authors' ``get_mpnet_embeddings``)."""
    from transformers import AutoModel, AutoTokenizer

    from .routing import mean_pool

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
        model = AutoModel.from_pretrained(str(encoder_dir)).eval()
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"--prompt-encoder {encoder_dir}: cannot load it ({first})") from error
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            tokens = tokenizer(list(prompts[start: start + batch]), padding=True, truncation=True, return_tensors="pt")
            hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])[0]
            out.append(mean_pool(hidden, tokens["attention_mask"]).float())
    return torch.cat(out)


def _check_encoder(encoder_dir: Path, input_dim: int) -> None:
    path = encoder_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"--prompt-encoder {encoder_dir} is not a transformers model directory (no config.json); "
                          "pass the all-mpnet-base-v2 folder")
    try:
        hidden = json.loads(path.read_text()).get("hidden_size")
    except (OSError, ValueError) as error:
        raise ConfigError(f"--prompt-encoder {path} is not readable JSON") from error
    if hidden != input_dim:
        raise ConfigError(f"--prompt-encoder {encoder_dir} gives {hidden}-d embeddings; the set's hypernet takes "
                          f"{input_dim}-d (all-mpnet-base-v2 is 768)")


def _save_router(directory: Path, release: ReleaseSet, layout: AuthorsLayout, encoder: Path) -> None:
    router = release.router
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "config.json", {
        "kind": "authors", "layout_version": AUTHORS_LAYOUT_VERSION, "structure": layout.structure(),
        "temperature": router.temperature, "base": router.base, "depth_order": router.depth_order,
        "non_zero_width": router.non_zero_width, "input_dim": router.input_dim, "num_codes": release.num_codes,
        "encoder": str(encoder), "pooling": "mean", "normalized": False, "noise": "row0-seed0",
    })
    tensors = {"head_weight": router.head_weight, "head_bias": router.head_bias,
               "embedding_gs": router.embedding_gs, "authors_to_aptp": layout.to_aptp}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / ROUTER_WEIGHTS))
    ordinary_mode(directory / ROUTER_WEIGHTS)


def load_release_router(checkpoint: str | os.PathLike) -> tuple[ReleaseRouterHead, dict]:
    """The checkpoint's authors' router as a `ReleaseRouterHead`, and its config."""
    from ..checkpoint import load_layout, read_tensors
    from .reader import ReleaseRouter

    directory = Path(checkpoint) / RELEASE_ROUTER_DIR
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{directory / 'config.json'} is missing or not JSON") from error
    tensors = read_tensors(directory / ROUTER_WEIGHTS, ("head_weight", "head_bias", "embedding_gs", "authors_to_aptp"),
                           "release router weights")
    base_config = json.loads((Path(checkpoint) / "experts" / "expert_0" / "base_config.json").read_text())
    gates = load_layout(Path(checkpoint))
    layout = AuthorsLayout(_meta_unet(base_config), ff_gate_width=int(gates.config.ff_groups))
    if layout.structure() != config.get("structure") or not torch.equal(layout.to_aptp, tensors["authors_to_aptp"]):
        raise ArtifactError(f"{directory}: its structure does not match the checkpoint's base UNet")
    router = ReleaseRouter(head_weight=tensors["head_weight"], head_bias=tensors["head_bias"],
                           embedding_gs=tensors["embedding_gs"], temperature=float(config["temperature"]),
                           base=float(config["base"]), depth_order=[int(i) for i in config["depth_order"]],
                           non_zero_width=bool(config["non_zero_width"]), input_dim=int(config["input_dim"]))
    return ReleaseRouterHead(router, layout).eval(), config


def import_release(release: str | os.PathLike, base: str | os.PathLike, encoder: str | os.PathLike,
                   output: str | os.PathLike, *, prompts: str | os.PathLike | None = None,
                   resolution: int | None = None, overwrite: bool = False) -> ImportReport:
    """Check a released set against `base`, then write the aptp checkpoint `output`.

    Raises:
        ArtifactError: anything in the set that does not match what the code and layout imply.
        ConfigError/OutputError: bad paths or options; nothing is written.
    """
    from ..macs import DeployShape, MacsModel

    release, base, encoder = (Path(p).expanduser().absolute() for p in (release, base, encoder))
    output = Path(output).expanduser().absolute()
    check_output_dir(output, IMPORT, allow_existing=overwrite,
                     inputs=[("--release", release), ("--base", base), ("--prompt-encoder", encoder)])
    if not release.is_dir():
        raise ArtifactError(f"--release {release} is not a directory")
    base_config, factor, text_length = _base_pipeline(base)
    meta = _meta_unet(base_config)
    layout = AuthorsLayout(meta, ff_gate_width=_ff_gate_width(release))
    release_set = read_release(release, layout, base_config)
    _check_encoder(encoder, release_set.router.input_dim)
    prompt_list = _read_prompts(Path(prompts).expanduser()) if prompts is not None else None

    masks, plans = [], []
    for expert in release_set.experts:
        empty = layout.empty_width_groups(expert.arch_vector)
        if empty:
            raise ArtifactError(f"expert {expert.code}: its arch vector keeps no unit of {empty[0]}; the authors' "
                                "pruning cannot build that expert either")
        mask = layout.hard_mask(expert.arch_vector)
        _, spec, shapes = _expected_shapes(base_config, layout, mask)
        dtype = _check_expert_file(expert.code, expert.weights_path, shapes)
        masks.append(mask)
        plans.append((spec, dtype))
    masks_t = torch.stack(masks)

    resolution = int(resolution or int(base_config.get("sample_size", 64)) * factor)
    if resolution % (factor * 2 ** (len(base_config["down_block_types"]) - 1)):
        raise ConfigError(f"--resolution {resolution} is not a multiple of the UNet's stride")
    shape = DeployShape(resolution // factor, resolution // factor, text_length)
    probe = meta.to_empty(device="cpu")
    with torch.no_grad():
        for param in probe.parameters():
            param.zero_()  # the count only reads shapes; zeros keep the probe forward finite
    macs = MacsModel(probe, layout.gate_layout, shape)
    ratios = macs.ratio(masks_t.float()).tolist()
    dense_params = sum(p.numel() for p in probe.parameters())
    del probe

    shares: list[float] = []
    if prompt_list is not None:
        head = ReleaseRouterHead(release_set.router, layout).eval()
        with torch.no_grad():
            codes = torch.cat([head.route(e.unsqueeze(0)) for e in encode_prompts(encoder, prompt_list)])
        counts = torch.bincount(codes, minlength=release_set.num_codes).double()
        shares = (counts / counts.sum()).tolist()

    report = ImportReport(output=output, num_codes=release_set.num_codes, dim=layout.dim,
                          dense_macs=macs.dense_macs, dense_params=dense_params,
                          prompts=len(prompt_list or []))
    with staged_output(output, IMPORT, what=f"importing {release}") as staging:
        save_layout(staging, layout.gate_layout)
        # Code "logits" such that sigmoid(logit + 0) >= 0.5 is the authors' keep rule.
        soft = torch.stack([e.arch_vector for e in release_set.experts]).clamp(1e-6, 1 - 1e-6)
        logits = torch.zeros(release_set.num_codes, layout.gate_layout.num_gates)
        logits[:, layout.to_aptp] = torch.log(soft) - torch.log1p(-soft)
        save_codes(staging, logits, masks_t)
        for expert, (spec, dtype), mask, ratio in zip(release_set.experts, plans, masks, ratios):
            from ..checkpoint import read_tensors

            unet, _, _ = _expected_shapes(base_config, layout, mask)
            state = {k: v.to(torch.float32) for k, v in read_tensors(expert.weights_path, what="expert weights").items()}
            unet.load_state_dict(state, strict=True, assign=True)
            info = {"code": expert.code, "finetuned": True, "source": "release",
                    "weights": str(expert.weights_path), "release_step": expert.step, "release_dtype": dtype}
            save_expert(expert_dir(staging, expert.code), unet, spec, base_config, info=info)
            params = sum(v.numel() for v in state.values())
            report.experts.append(ExpertReport(code=expert.code, step=expert.step, macs_ratio=float(ratio),
                                               params=params, release_bytes=expert.weights_path.stat().st_size,
                                               dtype=dtype, share=shares[expert.code] if shares else None))
            del unet, state
        _save_router(staging / RELEASE_ROUTER_DIR, release_set, layout, encoder)
        mean_ratio = float(sum(ratios) / len(ratios)) if not shares else float(
            sum(r * s for r, s in zip(ratios, shares)))
        CheckpointInfo(
            pretrained=record_pretrained(str(base), output), num_codes=release_set.num_codes, encoder=str(encoder),
            resolution=resolution, latent_height=shape.latent_height, latent_width=shape.latent_width,
            text_length=text_length, budget_target=mean_ratio, code_base=0.0, dense_macs=float(macs.dense_macs),
            code_macs_ratio=[float(r) for r in ratios], code_share=[float(s) for s in shares],
            step=max(e.step for e in release_set.experts),
        ).save(staging)
        write_json_atomic(staging / RELEASE_FILE, {
            "format": RELEASE_FORMAT, "version": 1, "release": str(release), "base": str(base),
            "prompt_encoder": str(encoder), "num_codes": release_set.num_codes, "dim": layout.dim,
            "layout_version": AUTHORS_LAYOUT_VERSION,
            "experts": [{"code": e.code, "folder": str(e.folder.relative_to(release)), "step": e.step}
                        for e in release_set.experts],
            "budget_target": "no budget in the release: the mean MACs ratio of the experts "
                             + ("weighted by the prompt shares" if shares else "(unweighted)"),
            "routing": "authors' rule for batch row 0 (fixed seed-0 noise as constants), see aptp.train.release.routing",
        })
    if any(not math.isfinite(r) for r in ratios):
        logger.warning("some MACs ratios are not finite: %s", ratios)
    return report
