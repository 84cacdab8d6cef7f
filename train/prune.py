"""`aptp-train prune`: train the prompt router and the K architecture codes under a MACs budget.

The UNet, VAE and text encoder stay frozen; the dense UNet (no gates) is the distillation
teacher. Each step: prompts -> sentence embeddings -> router vectors -> similarity to the codes
-> balanced (Sinkhorn) assignment over the global batch -> each prompt's code, relaxed with
Gumbel noise, gates the UNet -> denoising + distillation + resource + contrastive +
assignment losses. The first `router_warmup_steps` train the router alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from aptp.errors import ConfigError
from aptp.outputs import CHECKPOINT, check_output_dir

from . import checkpoint as ckpt
from .assignment import global_balanced_assignment, route_argmax
from .codes import ArchitectureCodes, relaxed_gates
from .config import TrainConfig
from .experts import save_expert
from .gates import GateLayout, apply_gates, capture_block_outputs
from .losses import assignment_loss, contrastive_loss, denoising_loss, distillation_loss, resource_loss
from .macs import DeployShape, MacsModel
from .models import DiffusionComponents, load_components, resolve_pretrained
from .prompt_sensitivity import measure_prompt_errors, sensitivity_adjusted_scores, standardised_sensitivity
from .quality_assignment import code_distillation_errors, quality_adjusted_scores
from .router import RouterHead, SentenceEncoder, calibrate_code_bias, group_weighted_cosine
from .slicing import slice_unet, write_json_atomic
from .training import (
    JsonlLog, StepBatchSampler, build_dataset, check_resume_config, dataset_texts, latest_state, load_state,
    make_accelerator, make_loader, save_state, step_generator,
)
from .uniform_masks import gate_importance, uniform_mask

logger = logging.getLogger(__name__)

# Similarity logits for the router's assignment cross-entropy: cosines live in [-1, 1], so a
# small temperature turns them into confident class scores.
ASSIGNMENT_TEMPERATURE = 0.1


class RouterAndCodes(nn.Module):
    """The trainable part of pruning, as one module so accelerate wraps it once.

    Everything trainable is computed in `forward`, so DistributedDataParallel sees it.
    """

    def __init__(self, head: RouterHead, codes: ArchitectureCodes):
        super().__init__()
        self.head = head
        self.codes = codes

    def forward(self, sentence: torch.Tensor, unit_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router vectors (B, N), code logits (K, N), similarity scores (B, K))."""
        router_vectors = self.head(sentence)
        logits = self.codes.logits
        # The router moves towards the codes, not the codes towards the router: through the
        # (scale-free) cosine the codes would get a large, sign-noisy gradient that drowns the
        # budget and quality signal they must follow.
        return router_vectors, logits, group_weighted_cosine(router_vectors, logits.detach(), unit_weights)


def router_step(model: nn.Module, sentence: torch.Tensor, unit_weights: torch.Tensor, config: TrainConfig,
                accelerator=None, code_errors: torch.Tensor | None = None,
                sensitivity: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The router's part of one pruning step: vectors, codes, scores, the training assignment
    (balanced over the global batch, or argmax without optimal transport) and the router losses.

    ``code_errors`` ``(B, K)``, when given, are each code's distillation error per prompt: the
    balanced assignment then also weighs them (``sinkhorn.quality_weight``, see
    `quality_adjusted_scores`). ``sensitivity``, when given, is ``(z (B,), code MACs ratios (K,))``
    for the sensitivity prior (``sinkhorn.sensitivity_weight``, see `sensitivity_adjusted_scores`).
    The router's own scores and losses are unchanged by either.

    Returns ``(router_vectors, code_logits, scores, assignment, {"contrastive", "assignment"})``;
    the losses are unweighted (``config.loss_weights`` weighs them with the others).
    """
    router_vectors, code_logits, scores = model(sentence, unit_weights)
    if config.sinkhorn.enabled:
        target_scores = scores.detach()
        if code_errors is not None:
            target_scores = quality_adjusted_scores(target_scores, code_errors, config.sinkhorn.quality_weight)
        if sensitivity is not None:
            target_scores = sensitivity_adjusted_scores(target_scores, *sensitivity, config.sinkhorn.sensitivity_weight)
        assignment = global_balanced_assignment(target_scores, accelerator, config.sinkhorn.epsilon, config.sinkhorn.iterations)
    else:
        assignment = route_argmax(scores.detach())
    losses = {
        "contrastive": contrastive_loss(router_vectors, sentence, config.router.contrastive_temperature),
        "assignment": assignment_loss(scores, assignment, ASSIGNMENT_TEMPERATURE),
    }
    return router_vectors, code_logits, scores, assignment, losses


def effective_warmup(warmup: int, max_steps: int) -> int:
    """Router warm-up steps actually used: a run shorter than its warm-up would never prune, so
    such a run warms up for its first tenth instead (the reference's 500 of 5000)."""
    if warmup < max_steps:
        return warmup
    scaled = max_steps // 10
    logger.warning("router warm-up (%d steps) is not shorter than the run (%d steps): warming up for %d steps instead",
                   warmup, max_steps, scaled)
    return scaled


def deploy_shape(config: TrainConfig, components: DiffusionComponents) -> DeployShape:
    side = config.model.resolution // components.vae_scale_factor
    if side < 1 or config.model.resolution % components.vae_scale_factor:
        raise ConfigError(
            f"model.resolution {config.model.resolution} is not a multiple of the VAE factor {components.vae_scale_factor}"
        )
    length = config.model.text_length or components.text_length
    if length > components.text_length:
        raise ConfigError(f"model.text_length {length} is longer than the text encoder reads ({components.text_length} "
                          f"tokens, its tokenizer's model_max_length); set at most {components.text_length} or null")
    return DeployShape(side, side, length)


def encode_latents(components: DiffusionComponents, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        dist = components.vae.encode(pixels).latent_dist
        return dist.sample(generator=generator) * components.vae.config.scaling_factor


def diffusion_inputs(components: DiffusionComponents, batch: dict, device, text_length: int, generator: torch.Generator):
    """Noisy latents, timesteps, noise, clean latents and text context for one batch."""
    pixels = batch["pixel_values"].to(device)
    latents = encode_latents(components, pixels, generator)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    steps = components.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=device)
    noisy = components.noise_scheduler.add_noise(latents, noise, timesteps)
    context = components.encode_prompts(batch["text"], device, max_length=text_length)
    return noisy, timesteps, noise, latents, context


@dataclass
class DensePass:
    """One step's UNet inputs and the dense teacher's outputs on them."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    latents: torch.Tensor
    context: torch.Tensor
    teacher: torch.Tensor
    teacher_blocks: list[torch.Tensor]


def dense_pass(components: DiffusionComponents, batch: dict, device, text_length: int, generator: torch.Generator) -> DensePass:
    """Draw the step's diffusion inputs and run the dense UNet on them (no gradient)."""
    noisy, timesteps, noise, latents, context = diffusion_inputs(components, batch, device, text_length, generator)
    with torch.no_grad(), capture_block_outputs(components.unet) as teacher_blocks:
        teacher = components.unet(noisy, timesteps, encoder_hidden_states=context).sample
    return DensePass(noisy, timesteps, noise, latents, context, teacher, teacher_blocks)


def _refuse_to_overwrite(output_dir: Path, resume: bool) -> None:
    """A new or empty --output-dir, or (with --resume) a pruning run's own; never a folder
    holding anything else, nor one that is or sits under a file (aptp.outputs)."""
    existed = check_output_dir(output_dir, CHECKPOINT, allow_existing=resume,
                               existing_hint="pass --resume to continue it or choose another --output-dir")
    if resume and not existed:
        raise ConfigError(f"--resume: {output_dir} holds no pruning run to resume; drop --resume to start one")


def run_prune(config: TrainConfig, output_dir: Path, resume: bool = False) -> None:
    output_dir = Path(output_dir)
    _refuse_to_overwrite(output_dir, resume)
    if resume and (output_dir / ckpt.CHECKPOINT_FILE).is_file():
        check_resume_config(output_dir / "config.yaml", config)
        done = ckpt.CheckpointInfo.load(output_dir).step
        if done >= config.prune.max_steps:
            logger.info("%s already finished pruning (%d steps); nothing to resume", output_dir, done)
            return
    accelerator = make_accelerator(config, config.prune.mixed_precision)
    device = accelerator.device
    torch.manual_seed(config.seed)

    dataset = build_dataset(config)
    components = load_components(resolve_pretrained(config.model.pretrained), config.model.revision)
    for module in (components.unet, components.vae, components.text_encoder):
        module.requires_grad_(False).eval().to(device)
    unet = components.unet
    shape = deploy_shape(config, components)
    layout = GateLayout.from_unet(unet, ff_groups=config.gates.ff_groups, depth=config.gates.depth)
    macs = MacsModel(unet, layout, shape).to(device)
    encoder = SentenceEncoder(config.router.encoder, device=device)

    head = RouterHead(embed_dim=encoder.dim, num_gates=layout.num_gates, hidden_dim=config.router.hidden_dim,
                      num_codes=config.codes.num_codes)
    codes = ArchitectureCodes(config.codes.num_codes, layout.num_gates, base=config.codes.base, temperature=config.codes.temperature)
    model = RouterAndCodes(head, codes)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.head.parameters(), "lr": config.prune.router_learning_rate},
            {"params": model.codes.parameters(), "lr": config.prune.learning_rate},
        ],
        weight_decay=0.0,
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step = 0
    if resume:
        check_resume_config(output_dir / "config.yaml", config)
        found = latest_state(output_dir)
        if found is None:
            raise ConfigError(f"--resume: {output_dir} has no saved training state to resume from")
        path, saved_step = found
        load_state(accelerator, path)
        start_step = saved_step + 1
        logger.info("resuming from step %d (%s)", saved_step, path)
    elif accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir / "config.yaml")
        layout.save_config(str(output_dir))
    accelerator.wait_for_everyone()
    prompt_z = None
    if config.sinkhorn.sensitivity_weight > 0:  # deterministic, so a resumed run measures the same again
        prompt_z = prompt_sensitivity_prior(components, layout, macs, dataset, config)
        if accelerator.is_main_process:
            write_json_atomic(output_dir / SENSITIVITY_FILE, {"sensitivity": prompt_z})

    log = JsonlLog(output_dir / "log.jsonl", start_step - 1 if resume else None, accelerator.is_main_process)
    cfg = config.prune
    warmup = effective_warmup(cfg.router_warmup_steps, cfg.max_steps)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, config.seed, start_step, cfg.max_steps,
                               accelerator.num_processes, accelerator.process_index)
    loader = make_loader(dataset, sampler, config.data.num_workers)
    weights = config.loss_weights
    unit_weights = layout.unit_weights.to(device)
    unit_site, site_nonempty = layout.unit_site.to(device), layout.site_nonempty.to(device)

    progress = tqdm(total=cfg.max_steps, initial=start_step, desc="prune", disable=not accelerator.is_local_main_process)
    for step, batch in zip(range(start_step, cfg.max_steps), loader):
        generator = step_generator(config.seed, step, accelerator.process_index, device)
        inner = accelerator.unwrap_model(model)
        sentence = encoder.encode(batch["text"]).to(device)
        record: dict = {"step": step, "phase": "warmup" if step < warmup else "prune"}
        dense, code_errors = None, None
        if step >= warmup and config.sinkhorn.quality_weight > 0:
            # The assignment needs every code's error on this step's inputs, so they are drawn
            # first here; without the quality term they are drawn after the gates' noise, as
            # before, so such runs reproduce earlier ones.
            dense = dense_pass(components, batch, device, shape.text_length, generator)
            code_errors = code_distillation_errors(unet, layout, inner.codes.hard_masks(unit_site, site_nonempty),
                                                   dense.noisy, dense.timesteps, dense.context, dense.teacher)
        sensitivity = None
        if step >= warmup and prompt_z is not None:
            with torch.no_grad():
                code_ratios = macs.ratio(inner.codes.hard_masks(unit_site, site_nonempty).float())
            sensitivity = (torch.tensor([prompt_z[text] for text in batch["text"]], device=device), code_ratios)
        router_vectors, code_logits, scores, assignment, losses = router_step(model, sentence, unit_weights, config,
                                                                              accelerator, code_errors, sensitivity)
        if code_errors is not None:
            record["code_log_error"] = [round(float(e), 4) for e in code_errors.clamp(min=1e-12).log().mean(dim=0)]
        if step >= warmup:
            # Straight-through: the gates take the assigned code's values, and the router
            # receives the task gradient as if its own vector had been used.
            logits = code_logits[assignment] + (router_vectors - router_vectors.detach())
            gates = relaxed_gates(logits, inner.codes.base, inner.codes.temperature, generator)
            if dense is None:
                dense = dense_pass(components, batch, device, shape.text_length, generator)
            noisy, timesteps, noise, latents, context = dense.noisy, dense.timesteps, dense.noise, dense.latents, dense.context
            teacher, teacher_blocks = dense.teacher, dense.teacher_blocks
            with apply_gates(unet, layout, gates), capture_block_outputs(unet) as student_blocks:
                student = unet(noisy, timesteps, encoder_hidden_states=context).sample
            losses["denoise"] = denoising_loss(student, noise, latents, timesteps, components.noise_scheduler, cfg.snr_gamma)
            losses["distill_output"], losses["distill_blocks"] = distillation_loss(student, teacher, student_blocks, teacher_blocks)
            sample_ratio = macs.ratio(gates).float()
            code_ratio = macs.ratio(torch.sigmoid(code_logits + inner.codes.base)).float()
            losses["resource"] = resource_loss(sample_ratio, code_ratio, config.budget.target, config.budget.spread_weight)
            record["batch_macs_ratio"] = float(sample_ratio.detach().mean())
        total = sum(getattr(weights, name) * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(total)
        optimizer.step()

        with torch.no_grad():
            hard = inner.codes.hard_masks(unit_site, site_nonempty)
            record["code_macs_ratio"] = [round(float(r), 5) for r in macs.ratio(hard.float())]
            counts = torch.bincount(assignment, minlength=inner.codes.num_codes).float()
            record["code_share"] = [round(float(c), 4) for c in (counts / counts.sum())]
        record.update({k: float(v.detach()) for k, v in losses.items()}, total=float(total.detach()))
        log.write(record)
        progress.update(1)
        progress.set_postfix(loss=f"{record['total']:.3f}", macs=f"{sum(record['code_macs_ratio']) / len(record['code_macs_ratio']):.2f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
            save_state(accelerator, output_dir, step)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        write_pruned_checkpoint(output_dir, config, components, layout, macs, shape, encoder, dataset, inner, cfg.max_steps)
    accelerator.wait_for_everyone()


SENSITIVITY_FILE = "prompt_sensitivity.json"


def prompt_sensitivity_prior(components: DiffusionComponents, layout: GateLayout, macs: MacsModel, dataset,
                             config: TrainConfig) -> dict[str, float]:
    """Caption -> standardised sensitivity of every training prompt to a uniform mask at the
    budget (`aptp.train.prompt_sensitivity`), measured on the frozen teacher before pruning."""
    per_batch = max(1, min(16, len(dataset) // 4))
    importance = gate_importance(components, layout, batches=min(4, len(dataset) // per_batch), batch_size=per_batch,
                                 seed=config.seed, dataset=dataset)
    mask, achieved = uniform_mask(layout, macs, importance, config.budget.target)
    errors = measure_prompt_errors(components, layout, mask, dataset, seed=config.seed, batch_size=config.prune.batch_size)
    logger.info("prompt sensitivity: uniform mask at MACs ratio %.3f, %d prompts", achieved, errors.shape[0])
    return standardised_sensitivity(errors, dataset_texts(dataset))


@torch.no_grad()
def routing_scores(texts: list[str], encoder: SentenceEncoder, head: RouterHead, code_logits: torch.Tensor,
                   unit_weights: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(n, K) inference routing scores (similarity plus the head's calibrated bias)."""
    out = []
    for i in range(0, len(texts), batch_size):
        sentence = encoder.encode(texts[i : i + batch_size]).to(code_logits.device)
        out.append(head.scores(sentence, code_logits, unit_weights))
    return torch.cat(out) if out else torch.zeros(0, code_logits.shape[0])


def route_texts(texts: list[str], encoder: SentenceEncoder, head: RouterHead, code_logits: torch.Tensor,
                unit_weights: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Inference routing (argmax of the scores) for many prompts."""
    return route_argmax(routing_scores(texts, encoder, head, code_logits, unit_weights, batch_size)).long()


def write_pruned_checkpoint(output_dir: Path, config: TrainConfig, components: DiffusionComponents, layout: GateLayout,
                            macs: MacsModel, shape: DeployShape, encoder: SentenceEncoder, dataset,
                            model: RouterAndCodes, step: int) -> None:
    """Codes, router head, one sliced expert per code, and checkpoint.json with MACs and shares."""
    device = model.codes.logits.device
    hard = model.codes.hard_masks(layout.unit_site.to(device), layout.site_nonempty.to(device))
    ratios = [float(r) for r in macs.ratio(hard.float())]
    ckpt.save_codes(output_dir, model.codes.logits, hard)
    texts = dataset_texts(dataset)
    scores = routing_scores(texts, encoder, model.head, model.codes.logits, layout.unit_weights.to(device)).cpu()
    k = model.codes.num_codes
    raw_share = (torch.bincount(scores.argmax(dim=1), minlength=k).float() / len(texts)).tolist()
    # Argmax routing should reproduce the balanced split training used (see calibrate_code_bias).
    with torch.no_grad():
        model.head.code_bias.copy_(calibrate_code_bias(scores))
    routed = (scores + model.head.code_bias.cpu()).argmax(dim=1)
    share = (torch.bincount(routed, minlength=k).float() / len(texts)).tolist()
    model.head.save_pretrained(str(output_dir / ckpt.ROUTER_HEAD_DIR))
    unet = components.unet.to("cpu")
    for k in tqdm(range(model.codes.num_codes), desc="slice experts", leave=False):
        sliced, spec = slice_unet(unet, layout, hard[k].cpu())
        save_expert(ckpt.expert_dir(output_dir, k), sliced, spec, unet.config,
                    info={"code": k, "macs_ratio": ratios[k], "finetuned": False})
    info = ckpt.CheckpointInfo(
        pretrained=ckpt.record_pretrained(config.model.pretrained, output_dir), num_codes=model.codes.num_codes, encoder=encoder.name_or_path,
        resolution=config.model.resolution, latent_height=shape.latent_height, latent_width=shape.latent_width,
        text_length=shape.text_length, budget_target=config.budget.target, code_base=model.codes.base,
        dense_macs=macs.dense_macs, code_macs_ratio=ratios, code_share=share, code_share_uncalibrated=raw_share, step=step,
    )
    info.save(output_dir)  # written last: its presence marks a complete checkpoint
    expected = sum(s * r for s, r in zip(share, ratios))
    raw_expected = sum(s * r for s, r in zip(raw_share, ratios))
    logger.info("codes' MACs ratios %s; argmax shares %s (expected MACs ratio %.3f) -> calibrated shares %s "
                "(expected MACs ratio %.3f, target %.3f)", [round(r, 3) for r in ratios], [round(s, 3) for s in raw_share],
                raw_expected, [round(s, 3) for s in share], expected, config.budget.target)
    if expected > config.budget.target + 0.02:
        logger.warning("the routed mixture's expected MACs ratio %.3f is above the target %.3f", expected, config.budget.target)
