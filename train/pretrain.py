"""Train the tiny text-to-image pipeline from scratch on procedural data (the dense teacher).

No pretrained diffusion weights can be downloaded offline, so the ``tiny`` pipeline that pruning
starts from is trained here, in two stages, with the trainer's own step machinery
(`StepBatchSampler`, `step_generator`, `make_loader`) and its denoising loss:

1. **VAE**: the random `AutoencoderKL` of `build_tiny_pipeline` learns to reconstruct procedural
   images (L1 + MSE + a small KL term), then its ``scaling_factor`` is recalibrated so that
   scaled latents have unit variance, as SD's 0.18215 does.
2. **UNet and text encoder**: trained together, densely, on the frozen VAE's latents with
   `aptp.train.losses.denoising_loss` (min-SNR weighting, the scheduler's prediction type).
   A fraction of captions is replaced by the empty prompt so that classifier-free guidance works.
   The config's ``scheduler`` section may change the noise schedule first (`SchedulerChanges`).

Every ``checkpoint_every`` steps and at the end of each stage a resumable training state is
written under ``<output>/.pretrain-state/`` (`aptp.train.pretrain_state`); ``resume=True``
(``--resume``) continues from the latest one with bitwise the same result as an uninterrupted run.

The result is a diffusers pipeline directory (``StableDiffusionPipeline.save_pretrained``) that
`aptp.train.models.load_components` loads; commit it at `aptp.train.models.TINY_WEIGHTS` to make
it the default ``tiny`` model. Config: `PretrainConfig`, read from YAML with `load_pretrain_config`
(preset ``train/presets/tiny_teacher.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from aptp.errors import ArtifactError, ConfigError
from aptp.outputs import PIPELINE, check_output_dir, claim_in_place, commit_dir, ordinary_tree

from .config import check_type, parse_yaml  # the training config's type check and YAML reading, same messages
from .data import ProceduralCaptions
from .losses import denoising_loss
from .models import build_tiny_pipeline, load_components
from .pretrain_state import (
    MODULES,
    STAGES,
    TrainingState,
    TrainLog,
    check_same_run,
    clean_temp,
    has_state,
    latest_state,
    load_ema,
    load_modules,
    load_optimizer,
    restore_rng,
    run_identity,
    save_state,
    state_root,
)
from .training import StepBatchSampler, make_loader, step_generator

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "tiny_teacher"


@dataclass
class VaeStageConfig:
    """Autoencoder stage: reconstruction of procedural images."""

    max_steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    # Weight of the KL term against the per-pixel reconstruction terms (kept small: the latents
    # must stay informative; the unit-variance scaling factor absorbs their scale).
    kl_weight: float = 1e-3


@dataclass
class UnetStageConfig:
    """Denoiser stage: UNet (and text encoder) on the frozen VAE's latents."""

    max_steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    text_encoder_learning_rate: float = 3e-4
    train_text_encoder: bool = True
    # Probability of training on the empty prompt, for classifier-free guidance.
    uncond_probability: float = 0.1
    snr_gamma: float | None = 5.0
    # Cosine decay to this fraction of the rate, after a linear warm-up.
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    # Exponential moving average of the UNet weights (what is saved); 0 disables it.
    ema_decay: float = 0.999


# What `SchedulerChanges` may set, as diffusers names them (DDPMScheduler / DDIMScheduler config keys).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class SchedulerChanges:
    """Changes to the starting pipeline's noise schedule, made before the UNet stage and saved with the
    pipeline (None: keep the starting pipeline's value).

    SD's ``scaled_linear`` schedule leaves signal at the last timestep (sqrt(alpha_bar) 0.068 at
    t=999, 0.090 at DDIM's first step t=951), so a model can read the layout from x_T instead of
    the prompt and then place objects wherever the sampling noise says; ``rescale_betas_zero_snr``
    with ``v_prediction`` and ``trailing`` spacing removes it (Lin et al. 2024, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed").
    """

    prediction_type: str | None = None
    rescale_betas_zero_snr: bool | None = None
    timestep_spacing: str | None = None

    def changes(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass
class PretrainConfig:
    """Everything `run_pretrain` needs. Build with `load_pretrain_config` or directly."""

    resolution: int = 64
    text_length: int = 32
    # Procedural training set: ProceduralCaptions(num_samples, seed=data_seed).
    num_samples: int = 50000
    data_seed: int = 0
    text_fraction: float = 0.25
    seed: int = 0
    num_threads: int | None = 2
    # Save a resumable training state every this many steps of a stage (0: only at the end of
    # each stage, where one is always saved). It cannot change the result, so a resumed run
    # may use another value.
    checkpoint_every: int = 500
    vae: VaeStageConfig = field(default_factory=VaeStageConfig)
    unet: UnetStageConfig = field(default_factory=UnetStageConfig)
    scheduler: SchedulerChanges = field(default_factory=SchedulerChanges)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_pretrain_config(name_or_path: str = DEFAULT_PRESET, overrides: Sequence[str] = ()) -> PretrainConfig:
    """A `PretrainConfig` from a preset name (``tiny_teacher``) or a YAML path, with ``a.b=value`` overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"pretrain config '{name_or_path}' not found (looked for {path}); pass a YAML file or 'tiny_teacher'")
    raw = parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': {part} is a value, not a section")
        node[leaf] = parse_yaml(value, f"override '{item}'")
    return pretrain_config_from_dict(raw, source=str(path))


def pretrain_config_from_dict(raw: dict[str, Any], source: str = "config") -> PretrainConfig:
    """Build a `PretrainConfig`, refusing unknown keys with the list of known ones."""
    def build(cls: type, values: dict[str, Any], section: str) -> Any:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown} in {section or 'top level'}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            nested = ({"vae": VaeStageConfig, "unet": UnetStageConfig, "scheduler": SchedulerChanges}.get(name)
                      if cls is PretrainConfig else None)
            if nested:
                if value is not None and not isinstance(value, dict):
                    raise ConfigError(f"{source}: {name} must be a mapping of keys, got {type(value).__name__}")
                kwargs[name] = build(nested, value or {}, name)
            else:
                kwargs[name] = check_type(value, hints[name], f"{source}: {section + '.' if section else ''}{name}")
        return cls(**kwargs)

    config = build(PretrainConfig, dict(raw), "")
    for name in ("seed", "data_seed"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise ConfigError(f"{source}: {name} must be an integer in [0, 2**63), got {value!r}")
    if config.checkpoint_every < 0:
        raise ConfigError(f"{source}: checkpoint_every must be >= 0 (0: a state only at the end of each stage)")
    if config.resolution % 16:
        raise ConfigError(f"{source}: resolution {config.resolution} must be a multiple of 16")
    for stage in (config.vae, config.unet):
        if stage.max_steps < 0 or stage.batch_size < 1:
            raise ConfigError(f"{source}: max_steps must be >= 0 and batch_size >= 1")
    _check_scheduler_changes(config.scheduler, source)
    return config


def _check_scheduler_changes(changes: SchedulerChanges, source: str) -> None:
    for key, allowed in (("prediction_type", PREDICTION_TYPES), ("timestep_spacing", TIMESTEP_SPACINGS)):
        value = getattr(changes, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{source}: scheduler.{key} must be one of {', '.join(allowed)}, got {value!r}")


def run_pretrain(
    config: PretrainConfig,
    output_dir: str | Path,
    *,
    init_from: str | Path | None = None,
    stages: Sequence[str] = ("vae", "unet"),
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Train the tiny pipeline and write it to ``output_dir`` as a diffusers pipeline directory.

    Args:
        config: the training recipe.
        output_dir: where the pipeline goes (written to a sibling temp directory, then renamed).
            While training it holds the resumable state (``.pretrain-state/``), which the
            finished pipeline replaces.
        init_from: a pipeline directory to start from; default: a fresh random tiny pipeline
            (`build_tiny_pipeline` with ``config.seed``). Use it to run the stages separately.
        stages: which of ``"vae"`` and ``"unet"`` to train (in that order).
        overwrite: replace an existing ``output_dir`` (a pipeline or an unfinished run), starting over.
        resume: continue the unfinished run in ``output_dir`` from its latest state; the config,
            stages and `init_from` must be those it started with.

    Returns:
        ``output_dir``. Logs go to ``output_dir/pretrain_log.jsonl`` (one line per step).
    """
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown pretrain stage(s) {unknown}; choose from 'vae' and 'unet'")
    _check_schedule_is_trainable(config.scheduler, stages, init_from)
    output_dir = Path(output_dir).expanduser().absolute()
    if resume and overwrite:
        raise ConfigError(f"--resume and --overwrite exclude each other: --resume continues the run in {output_dir}, "
                          "--overwrite starts it over; pass one of them")
    unfinished = has_state(output_dir)
    hint = ("it holds an unfinished run: pass --resume to continue it or --overwrite to start over" if unfinished
            else "pass overwrite=True (--overwrite) to replace it or choose another directory")
    # Only a pipeline (or run) this command wrote is replaced or continued; never a user's folder.
    existed = check_output_dir(output_dir, PIPELINE, allow_existing=overwrite or resume, existing_hint=hint)
    identity = run_identity(config, stages, init_from)
    state = latest_state(output_dir) if resume and existed else None
    if resume:
        if state is None:
            finished = " (it is a finished pipeline)" if (output_dir / "model_index.json").is_file() else ""
            raise ConfigError(f"cannot resume: {output_dir} holds no pretrain training state{finished}; a run saves "
                              "one every checkpoint_every steps and at the end of each stage; run without --resume")
        check_same_run(state, identity)
        logger.info("resuming from %s (%s)", state.describe(), state.path)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)

    created = not output_dir.exists()
    claim_in_place(output_dir, PIPELINE, allow_existing=True)  # the states live in it while training
    clean_temp(output_dir)
    if not resume:
        shutil.rmtree(state_root(output_dir), ignore_errors=True)  # ours: an earlier run's, started over
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        if init_from is None:
            init_from = build_tiny_pipeline(staging / "init", seed=config.seed, resolution=config.resolution,
                                            text_length=config.text_length)
        components = load_components(str(init_from))
        _apply_scheduler_changes(components, config.scheduler)
        dataset = ProceduralCaptions(config.num_samples, config.resolution, seed=config.data_seed,
                                     text_fraction=config.text_fraction)
        # A fresh run keeps the history of stages trained before (run separately).
        log = TrainLog(output_dir, state, history=Path(init_from) / "pretrain_log.jsonl")
        checkpoints = _Checkpoints(output_dir, identity, config.checkpoint_every, log, components)
        if state is not None:
            load_modules(state, {name: getattr(components, name) for name in MODULES})
            components.vae.register_to_config(scaling_factor=state.info["vae_scaling_factor"])
        try:
            for stage, train in (("vae", train_vae), ("unet", train_unet)):
                if stage not in stages or (state is not None and STAGES.index(stage) < STAGES.index(state.stage)):
                    continue
                if state is not None and stage == state.stage and state.done:
                    restore_rng(state)  # where the uninterrupted run stood when the next stage began
                    continue
                train(components, dataset, config, log, checkpoints, state if state and stage == state.stage else None)
        except KeyboardInterrupt:
            last = latest_state(output_dir)
            logger.warning("interrupted; %s", f"the state at {last.describe()} is kept in {last.path.parent}: "
                           "continue with --resume" if last else "no training state was saved yet")
            raise
        save_pipeline(components, staging / "pipeline", scheduler_source=init_from, changes=config.scheduler.changes())
        shutil.copyfile(log.path, staging / "pipeline" / "pretrain_log.jsonl")
        (staging / "pipeline" / "pretrain_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        ordinary_tree(staging / "pipeline")
        # Replaces the run's folder (its states included) with the finished pipeline.
        commit_dir(staging / "pipeline", output_dir, PIPELINE)
    except BaseException:
        if created and latest_state(output_dir) is None:
            # Refused or failed before any state was saved: the folder this call made holds
            # nothing worth keeping (only its marker and log), so it goes as if never made.
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote the trained pipeline to %s", output_dir)
    return output_dir


def _check_schedule_is_trainable(changes: SchedulerChanges, stages: Sequence[str], init_from: str | Path | None) -> None:
    """Refuse, before anything is written, schedule changes that would leave a broken pipeline."""
    if not changes.changes():
        return
    if "unet" not in stages:
        raise ConfigError("scheduler changes need the unet stage: a UNet trained under one noise schedule or "
                          "prediction type gives wrong images under another; add 'unet' to the stages")
    prediction = changes.prediction_type
    if prediction is None:
        # A fresh tiny pipeline predicts epsilon (`build_tiny_pipeline`); a starting pipeline says what it predicts.
        config_path = None if init_from is None else Path(init_from) / "scheduler" / "scheduler_config.json"
        starting = json.loads(config_path.read_text()) if config_path is not None and config_path.is_file() else {}
        prediction = starting.get("prediction_type", "epsilon")
    if changes.rescale_betas_zero_snr and prediction == "epsilon":
        # At zero SNR x_T holds no signal: the epsilon target there is the input itself and says nothing of the image.
        raise ConfigError("scheduler.rescale_betas_zero_snr needs prediction_type v_prediction (or sample), and the "
                          "pipeline predicts epsilon: set scheduler.prediction_type too")


def _apply_scheduler_changes(components: Any, changes: SchedulerChanges) -> None:
    """Train under the changed schedule: the training scheduler is rebuilt from the changed config."""
    if not changes.changes():
        return
    scheduler = components.noise_scheduler
    components.noise_scheduler = type(scheduler).from_config(scheduler.config, **changes.changes())
    logger.info("training under the changed noise schedule: %s", changes.changes())


class _Checkpoints:
    """Saves the run's training states: every ``every`` steps of a stage and at its end."""

    def __init__(self, output_dir: Path, identity: dict[str, Any], every: int, log: TrainLog, components: Any):
        self.output_dir, self.identity, self.every, self.log, self.components = output_dir, identity, every, log, components

    def due(self, done: int, total: int) -> bool:
        """After `done` steps of `total`; the last step is covered by the end-of-stage state."""
        return self.every > 0 and done % self.every == 0 and done < total

    def save(self, stage: str, step: int, done: bool, elapsed_s: float, optimizer: Any = None, schedule: Any = None,
             emas: dict[str, _Ema] | None = None) -> None:
        emas = {name: ema for name, ema in (emas or {}).items() if ema is not None}
        save_state(
            self.output_dir, stage=stage, step=step, done=done, identity=self.identity,
            modules={name: getattr(self.components, name) for name in MODULES},
            emas={name: ema.state_dict() for name, ema in emas.items()},
            ema_updates={name: ema.updates for name, ema in emas.items()},
            optimizer=optimizer, schedule=schedule,
            extra={"vae_scaling_factor": float(self.components.vae.config.scaling_factor),
                   "log_bytes": self.log.size(), "elapsed_s": elapsed_s},
        )


def _cosine_rate(step: int, total: int, warmup: int, final_fraction: float) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to `final_fraction`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _stage_steps(stage: str, resume: TrainingState | None, optimizer: Any, schedule: Any,
                 dataset: ProceduralCaptions, batch_size: int, seed: int, total: int) -> tuple[Any, Any, float]:
    """The (step, batch) pairs a stage still has to train, its progress bar and its start time,
    with the optimiser, schedule and RNGs of `resume` (if any) put back first."""
    start, elapsed = 0, 0.0
    if resume is not None:
        load_optimizer(resume, optimizer, schedule)
        start, elapsed = resume.step, float(resume.info.get("elapsed_s", 0.0))
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, total)
    # The loader's iterator draws its base seed from the global RNG: create it before restoring it.
    batches = iter(make_loader(dataset, sampler, 0))
    if resume is not None:
        restore_rng(resume)
    progress = tqdm(total=total, initial=start, desc=f"pretrain {stage}")
    return zip(range(start, total), batches), progress, time.perf_counter() - elapsed


def train_vae(components: Any, dataset: ProceduralCaptions, config: PretrainConfig, log: Any,
              checkpoints: _Checkpoints | None = None, resume: TrainingState | None = None) -> None:
    """Stage 1: the VAE reconstructs procedural images; then its scaling factor is recalibrated.

    `resume`: a state saved during this stage, to continue from (weights already loaded)."""
    cfg = config.vae
    vae = components.vae
    # A fresh encoder's log-variance is ~0, so the sampled latents are mostly noise and the decoder
    # first learns to output the mean image (a long plateau). Starting the posterior narrow
    # (std ~0.02) lets reconstruction drive learning from the first step; what matters
    # downstream is that `latent_dist.sample()` stays close to the mean, as it does for SD's VAE.
    if resume is None:  # a resumed run's weights already have it
        with torch.no_grad():
            latent_channels = vae.config.latent_channels
            vae.quant_conv.bias[latent_channels:] -= 8.0
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_rate(s, cfg.max_steps, 50, 0.05))
    steps, progress, started = _stage_steps("vae", resume, optimizer, schedule, dataset, cfg.batch_size,
                                            config.seed, cfg.max_steps)
    for step, batch in steps:
        generator = step_generator(config.seed, step, 0)
        pixels = batch["pixel_values"]
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        l1 = F.l1_loss(recon, pixels)
        mse = F.mse_loss(recon, pixels)
        # KL summed over a latent, per image pixel value: on the scale of the per-pixel terms.
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = l1 + mse + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log.write({"stage": "vae", "step": step, "l1": l1.item(), "mse": mse.item(), "kl": kl.item(),
                   "elapsed_s": round(time.perf_counter() - started, 1)})
        progress.update(1)
        progress.set_postfix(l1=f"{l1.item():.4f}", mse=f"{mse.item():.4f}")
        if checkpoints is not None and checkpoints.due(step + 1, cfg.max_steps):
            checkpoints.save("vae", step + 1, False, time.perf_counter() - started, optimizer, schedule)
    progress.close()
    vae.requires_grad_(False).eval()
    scale = calibrate_scaling_factor(vae, dataset)
    vae.register_to_config(scaling_factor=scale)
    logger.info("VAE trained %d steps; scaling_factor %.5f", cfg.max_steps, scale)
    if checkpoints is not None:
        checkpoints.save("vae", cfg.max_steps, True, time.perf_counter() - started)


@torch.no_grad()
def calibrate_scaling_factor(vae: Any, dataset: ProceduralCaptions, num_images: int = 256) -> float:
    """``1 / std`` of the VAE's latent means on the first images of `dataset` (SD's 0.18215 recipe)."""
    count = min(num_images, len(dataset))
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(count)])
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(64)])
    return round(float(1.0 / latents.std()), 5)


def train_unet(components: Any, dataset: ProceduralCaptions, config: PretrainConfig, log: Any,
               checkpoints: _Checkpoints | None = None, resume: TrainingState | None = None) -> None:
    """Stage 2: UNet (and text encoder) trained from scratch with `denoising_loss` on VAE latents.

    `resume`: a state saved during this stage, to continue from (weights already loaded)."""
    cfg = config.unet
    unet, text_encoder, vae, scheduler = components.unet, components.text_encoder, components.vae, components.noise_scheduler
    vae.requires_grad_(False).eval()
    unet.requires_grad_(True).train()
    groups = [{"params": list(unet.parameters()), "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        text_encoder.requires_grad_(True).train()
        groups.append({"params": list(text_encoder.parameters()), "lr": cfg.text_encoder_learning_rate})
    else:
        text_encoder.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_rate(s, cfg.max_steps, cfg.warmup_steps, cfg.final_lr_fraction))
    ema = _Ema(unet, cfg.ema_decay) if cfg.ema_decay > 0 else None
    ema_text = _Ema(text_encoder, cfg.ema_decay) if cfg.ema_decay > 0 and cfg.train_text_encoder else None
    averages = {"unet": ema, "text_encoder": ema_text}
    if resume is not None:
        for name, average in averages.items():
            if average is not None:
                average.load_state_dict(*load_ema(resume, name))
    num_timesteps = scheduler.config.num_train_timesteps
    scale = vae.config.scaling_factor
    steps, progress, started = _stage_steps("unet", resume, optimizer, schedule, dataset, cfg.batch_size,
                                            config.seed + 1, cfg.max_steps)
    for step, batch in steps:
        generator = step_generator(config.seed + 1, step, 0)
        with torch.no_grad():
            posterior = vae.encode(batch["pixel_values"]).latent_dist
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)) * scale
        drop = torch.rand(len(batch["text"]), generator=generator) < cfg.uncond_probability
        texts = ["" if d else t for d, t in zip(drop.tolist(), batch["text"])]
        context = text_encoder(components.tokenize(texts, config.text_length))[0]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = denoising_loss(pred, noise, latents, timesteps, scheduler, cfg.snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        schedule.step()
        for average in (ema, ema_text):
            if average is not None:
                average.update()
        log.write({"stage": "unet", "step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0],
                   "elapsed_s": round(time.perf_counter() - started, 1)})
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoints is not None and checkpoints.due(step + 1, cfg.max_steps):
            checkpoints.save("unet", step + 1, False, time.perf_counter() - started, optimizer, schedule, averages)
    progress.close()
    for average in (ema, ema_text):
        if average is not None:
            average.copy_to_model()
    unet.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    if checkpoints is not None:
        checkpoints.save("unet", cfg.max_steps, True, time.perf_counter() - started)


class _Ema:
    """Exponential moving average of a module's parameters, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay, self.updates = module, decay, 0
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # Early on the average would be dominated by the random initialisation: shorten its memory.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, param in zip(self.shadow, self.module.parameters()):
            shadow.lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for shadow, param in zip(self.shadow, self.module.parameters()):
            param.copy_(shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (saved with the training state)."""
        return {name: shadow for (name, _), shadow in zip(self.module.named_parameters(), self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, shadows: dict[str, torch.Tensor], updates: int) -> None:
        names = [name for name, _ in self.module.named_parameters()]
        if sorted(names) != sorted(shadows):
            raise ArtifactError("cannot resume: the saved EMA averages do not match the model's parameters")
        for name, shadow in zip(names, self.shadow):
            shadow.copy_(shadows[name])
        self.updates = updates


def save_pipeline(components: Any, directory: str | Path, scheduler_source: str | Path,
                  changes: dict[str, Any] | None = None) -> Path:
    """Write the components as a `StableDiffusionPipeline` directory, with the sampling scheduler of
    the pipeline at ``scheduler_source`` and the config's scheduler ``changes`` (see `SchedulerChanges`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_pretrained(str(scheduler_source), subfolder="scheduler", **(changes or {}))
    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    return Path(directory)
