"""Plain ONNX Stable Diffusion pipeline directories: the dense model or one expert, loadable by
``diffusers.OnnxStableDiffusionPipeline.from_pretrained(<dir>)`` with no aptp code.

Layout (what that loader reads)::

    model_index.json
    text_encoder/model.onnx     input_ids (int32) -> last_hidden_state   (+ config.json)
    unet/model.onnx             sample, timestep, encoder_hidden_states -> out_sample   (+ config.json)
    vae_decoder/model.onnx      latent_sample -> sample   (+ config.json)
    vae_encoder/model.onnx      sample -> latent_sample   (+ config.json)
    tokenizer/                  the diffusion model's own tokenizer files
    scheduler/scheduler_config.json

The same directories are laid out for optimum's ``ORTStableDiffusionPipeline`` too, which
reads a ``config.json`` beside every graph (diffusers' loader ignores them): the base UNet's
config (an expert's ONNX graph has narrower layers; the config's shapes at its boundary are
the same), the text encoder's transformers config, and the VAE's config for both VAE graphs.

Choices, each the least surprising one we found:
- ``vae_encoder`` is exported although text-to-image never calls it: the loader treats every
  component but ``safety_checker`` and ``feature_extractor`` as required. It outputs the
  posterior mean (deterministic), not a sample. ``safety_checker`` and ``feature_extractor``
  are left out (``requires_safety_checker: false``).
- The pipeline hard-codes Stable Diffusion's latent scale: it decodes ``latents / 0.18215``
  and img2img encodes to ``0.18215 * latents``. A model whose VAE has another
  ``scaling_factor`` gets ``0.18215 / scaling_factor`` folded into its decoder graph and
  ``scaling_factor / 0.18215`` into its encoder graph (both 1 for SD's own VAE), so images come
  out right.
- The VAE configs' ``scaling_factor`` is ``0.18215`` whatever the model's: optimum divides the
  latents by the config's value before the decoder (diffusers by a hard-coded 0.18215), and the
  decoder graph already folds ``0.18215 / scaling_factor`` in, so both loaders decode
  ``latents / scaling_factor``; likewise for the encoder. The model's own value is kept under
  ``_aptp_model_scaling_factor``.
- The tokenizer entry of ``model_index.json`` names the class that really loads the saved files,
  the tokenizers-backed one (``BertTokenizerFast`` for the tiny pipeline): the export saves only
  ``tokenizer.json``, which transformers 4's slow ``BertTokenizer`` (optimum's environment)
  cannot read; in transformers 5 ``BertTokenizerFast`` is the same class as ``BertTokenizer``.
  The pipeline's ``CLIPTokenizer`` annotation is not enforced, and a CLIP class would misread a
  WordPiece vocabulary.
- The scheduler is the exported sampler when the pipeline can run it (``PIPELINE_SCHEDULERS``:
  DDIM and DPM-Solver++ 2M), else DDIM from the model's own scheduler config: diffusers'
  Euler scheduler keeps ``init_noise_sigma`` as a tensor, which the pipeline multiplies into
  numpy latents and fails (TypeError).
- The pipeline also assumes a VAE factor of 8 and 4 latent channels (``height // 8``): the tiny
  pipeline (factor 4) therefore yields images of half the requested size.
- Large files are hard links to the export's own graphs where the filesystem allows (no second
  copy on disk); external weight files keep their names because the graphs reference them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from aptp.errors import ArtifactError

__all__ = [
    "PIPELINE_CLASS",
    "PIPELINE_SCHEDULERS",
    "SD_LATENT_SCALE",
    "link_or_copy",
    "loadable_tokenizer_class",
    "model_index",
    "pipeline_latent_scales",
    "vae_pipeline_config",
    "write_pipeline_dir",
]

logger = logging.getLogger(__name__)

PIPELINE_CLASS = "OnnxStableDiffusionPipeline"
#: The latent scale diffusers' ONNX pipelines hard-code (Stable Diffusion's VAE).
SD_LATENT_SCALE = 0.18215
ONNX_WEIGHTS_NAME = "model.onnx"
#: Samplers (aptp-export --scheduler names) that diffusers' ONNX pipeline runs; the first is
#: the fallback for the others.
PIPELINE_SCHEDULERS = ("ddim", "dpmpp_2m")


def pipeline_latent_scales(scaling_factor: float) -> tuple[float, float]:
    """``(decoder scale, encoder scale)`` to fold into a pipeline directory's VAE graphs."""
    if scaling_factor <= 0:
        raise ArtifactError(f"VAE scaling_factor must be positive, got {scaling_factor}")
    return SD_LATENT_SCALE / scaling_factor, scaling_factor / SD_LATENT_SCALE


def model_index(tokenizer_class: str, scheduler_class: str, diffusers_version: str) -> dict[str, Any]:
    """The ``model_index.json`` of an ONNX Stable Diffusion pipeline directory."""
    onnx_model = ["diffusers", "OnnxRuntimeModel"]
    return {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": onnx_model,
        "tokenizer": ["transformers", tokenizer_class],
        "unet": onnx_model,
        "vae_decoder": onnx_model,
        "vae_encoder": onnx_model,
    }


def loadable_tokenizer_class(class_name: str) -> str:
    """The transformers class name that loads a saved ``tokenizer.json`` in transformers 4 and
    5 alike: the ``...Fast`` name where transformers has one."""
    import transformers

    if class_name.endswith("Fast"):
        return class_name
    fast = f"{class_name}Fast"
    return fast if hasattr(transformers, fast) else class_name


def vae_pipeline_config(vae_config: Mapping[str, Any]) -> dict[str, Any]:
    """A VAE graph's ``config.json``: the model's VAE config with ``scaling_factor`` set to the
    pipelines' 0.18215, which the graphs already compensate for (see the module notes)."""
    config = dict(vae_config)
    config["_aptp_model_scaling_factor"] = config.get("scaling_factor")
    config["scaling_factor"] = SD_LATENT_SCALE
    return config


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link `src` to `dst` (same filesystem), else copy it."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _place_graph(files: Sequence[Path], component: Path) -> None:
    """First file is the graph (renamed model.onnx); the rest are its external data files."""
    graph, *data = [Path(f) for f in files]
    link_or_copy(graph, component / ONNX_WEIGHTS_NAME)
    for extra in data:
        link_or_copy(extra, component / extra.name)


def write_pipeline_dir(
    directory: str | os.PathLike,
    *,
    unet: Sequence[Path],
    text_encoder: Sequence[Path],
    vae_decoder: Sequence[Path],
    vae_encoder: Sequence[Path],
    tokenizer_dir: str | os.PathLike,
    tokenizer_class: str,
    scheduler_config: Mapping[str, Any],
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write one pipeline directory from already exported and validated graphs.

    Each graph argument is ``[graph.onnx, *external data files]``. `scheduler_config` is a
    diffusers scheduler config with its ``_class_name``. `configs` maps component names
    (``unet``, ``text_encoder``, ``vae_decoder``, ``vae_encoder``) to the ``config.json`` each
    gets (for optimum's loader; VAE configs as `vae_pipeline_config` makes them).
    """
    import diffusers

    directory = Path(directory)
    if directory.exists():
        raise ArtifactError(f"pipeline directory {directory} already exists")
    directory.mkdir(parents=True)
    for name, files in (("unet", unet), ("text_encoder", text_encoder), ("vae_decoder", vae_decoder),
                        ("vae_encoder", vae_encoder)):
        _place_graph(files, directory / name)
        if configs and name in configs:
            (directory / name / "config.json").write_text(json.dumps(dict(configs[name]), indent=2, default=list))
    shutil.copytree(tokenizer_dir, directory / "tokenizer")
    scheduler_class = scheduler_config.get("_class_name")
    if not scheduler_class:
        raise ArtifactError("scheduler config has no _class_name")
    (directory / "scheduler").mkdir()
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(scheduler_config), indent=2))
    index = model_index(loadable_tokenizer_class(tokenizer_class), scheduler_class, diffusers.__version__)
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    logger.info("wrote ONNX pipeline directory %s", directory)
    return directory
