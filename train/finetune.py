"""`aptp-train finetune`: train one expert on the prompts routed to it, distilling the dense UNet.

The expert starts from the dense weights sliced by its code's hard mask (never from a fresh
initialisation) and its finished weights replace the expert directory of the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from aptp.errors import ConfigError, DatasetError

from . import checkpoint as ckpt
from .config import load_config
from .experts import save_expert
from .gates import capture_block_outputs
from .losses import denoising_loss, distillation_loss
from .macs import DeployShape
from .models import load_components
from .prune import diffusion_inputs, route_texts
from .route import load_router
from .slicing import slice_unet
from .training import (
    JsonlLog, StepBatchSampler, build_dataset, dataset_texts, latest_state, load_state, make_accelerator, make_loader,
    save_state, step_generator,
)

logger = logging.getLogger(__name__)


def run_finetune(checkpoint_dir: Path, expert: int, max_steps: int | None = None, resume: bool = False,
                 overrides: list[str] | tuple[str, ...] = ()) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    info, encoder, head, logits, layout = load_router(checkpoint_dir)
    if not 0 <= expert < info.num_codes:
        raise ConfigError(f"--expert {expert} is out of range: the checkpoint has experts 0..{info.num_codes - 1}")
    config = load_config(str(checkpoint_dir / "config.yaml"), overrides)
    cfg = config.finetune
    steps = cfg.max_steps if max_steps is None else max_steps
    if steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {steps}")

    dataset = build_dataset(config)
    routed = route_texts(dataset_texts(dataset), encoder, head, logits, layout.unit_weights)
    subset = torch.nonzero(routed == expert).flatten().tolist()
    if not subset:
        raise DatasetError(f"no training prompt is routed to expert {expert}; nothing to fine-tune it on")

    accelerator = make_accelerator(config, config.prune.mixed_precision)
    device = accelerator.device
    # The base model the checkpoint recorded (train.checkpoint.record_pretrained: "tiny", a hub
    # id, or a path relative to the checkpoint), not the config's: the teacher must match it.
    components = load_components(info.base_model(checkpoint_dir), config.model.revision)
    for module in (components.unet, components.vae, components.text_encoder):
        module.requires_grad_(False).eval().to(device)
    teacher = components.unet
    _, hard = ckpt.load_codes(checkpoint_dir)
    student, spec = slice_unet(teacher, layout, hard[expert])
    student.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    student, optimizer = accelerator.prepare(student, optimizer)

    work = checkpoint_dir / "finetune" / f"expert_{expert}"
    start_step = 0
    if resume:
        found = latest_state(work)
        if found is None:
            raise ConfigError(f"--resume: no saved fine-tuning state for expert {expert} in {work}")
        load_state(accelerator, found[0])
        start_step = found[1] + 1
    work.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(work / "log.jsonl", start_step - 1 if resume else None, accelerator.is_main_process)
    shape = DeployShape(info.latent_height, info.latent_width, info.text_length)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, config.seed, start_step, steps,
                               accelerator.num_processes, accelerator.process_index, subset=subset)
    weights = config.loss_weights
    progress = tqdm(total=steps, initial=start_step, desc=f"finetune expert {expert}", disable=not accelerator.is_local_main_process)
    for step, batch in zip(range(start_step, steps), make_loader(dataset, sampler, config.data.num_workers)):
        generator = step_generator(config.seed + 7919 * (expert + 1), step, accelerator.process_index, device)
        noisy, timesteps, noise, latents, context = diffusion_inputs(components, batch, device, shape.text_length, generator)
        with torch.no_grad(), capture_block_outputs(teacher) as teacher_blocks:
            target = teacher(noisy, timesteps, encoder_hidden_states=context).sample
        inner = accelerator.unwrap_model(student)
        with capture_block_outputs(inner) as student_blocks:
            pred = student(noisy, timesteps, encoder_hidden_states=context).sample
        denoise = denoising_loss(pred, noise, latents, timesteps, components.noise_scheduler, config.prune.snr_gamma)
        out_mse, block_mse = distillation_loss(pred, target, student_blocks, teacher_blocks)
        total = weights.denoise * denoise + weights.distill_output * out_mse + weights.distill_blocks * block_mse
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(total)
        optimizer.step()
        log.write({"step": step, "denoise": float(denoise.detach()), "distill_output": float(out_mse.detach()),
                   "distill_blocks": float(block_mse.detach()), "total": float(total.detach())})
        progress.update(1)
        progress.set_postfix(loss=f"{float(total.detach()):.4f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            save_state(accelerator, work, step)
    progress.close()

    accelerator.wait_for_everyone()
    target_dir = ckpt.expert_dir(checkpoint_dir, expert)
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(student).eval()
        save_expert(target_dir, trained, spec, teacher.config,
                    info={"code": expert, "macs_ratio": info.code_macs_ratio[expert], "finetuned": True,
                          "finetune_steps": steps, "train_prompts": len(subset)})
        print(f"expert {expert}: fine-tuned {steps} steps on {len(subset)} routed prompts -> {target_dir}")
    return target_dir
