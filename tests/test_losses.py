"""Losses of aptp.train: known values on constructed inputs, and where gradients flow."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from aptp.errors import ConfigError
from aptp.train.assignment import balanced_assignment, sinkhorn_plan
from aptp.train.codes import ArchitectureCodes
from aptp.train.losses import (
    assignment_loss,
    contrastive_loss,
    denoising_loss,
    distillation_loss,
    resource_loss,
)
from aptp.train.router import RouterHead, group_weighted_cosine


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 4, 4, generator=gen)
    noise = torch.randn(2, 4, 4, 4, generator=gen)
    timesteps = torch.tensor([0, 999])  # SNR far above and far below gamma
    return latents, noise, timesteps


# ---------------------------------------------------------------- denoising
def test_denoising_target_follows_the_scheduler_prediction_type():
    latents, noise, timesteps = _batch()
    eps = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    vpred = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    velocity = vpred.get_velocity(latents, noise, timesteps)

    assert denoising_loss(noise, noise, latents, timesteps, eps) == 0
    assert denoising_loss(velocity, noise, latents, timesteps, vpred) == 0
    # The other target is wrong under each config.
    assert denoising_loss(velocity, noise, latents, timesteps, eps, snr_gamma=None) > 0.1
    assert denoising_loss(noise, noise, latents, timesteps, vpred, snr_gamma=None) > 0.1


def test_denoising_min_snr_weights_match_hang_et_al():
    latents, noise, timesteps = _batch()
    gamma = 5.0
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        offsets = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # per-sample MSE 1 and 4
        pred = target + offsets

        alpha_bar = scheduler.alphas_cumprod[timesteps].double()
        snr = alpha_bar / (1 - alpha_bar)
        denom = snr if prediction_type == "epsilon" else snr + 1
        weights = torch.minimum(snr, torch.full_like(snr, gamma)) / denom
        expected = float((torch.tensor([1.0, 4.0], dtype=torch.float64) * weights).mean())

        got = denoising_loss(pred, noise, latents, timesteps, scheduler, snr_gamma=gamma)
        assert got.dim() == 0
        assert math.isclose(float(got), expected, rel_tol=1e-4)
        assert math.isclose(float(denoising_loss(pred, noise, latents, timesteps, scheduler, None)), 2.5, rel_tol=1e-5)


def test_denoising_gradient_and_errors():
    latents, noise, timesteps = _batch()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    pred = torch.zeros_like(noise, requires_grad=True)
    denoising_loss(pred, noise, latents, timesteps, scheduler).backward()
    assert pred.grad.abs().sum() > 0

    with pytest.raises(ConfigError, match="prediction_type"):
        denoising_loss(pred, noise, latents, timesteps, DDPMScheduler(prediction_type="flow"))
    with pytest.raises(ConfigError, match="shape"):
        denoising_loss(pred[:, :2], noise, latents, timesteps, scheduler)


# ---------------------------------------------------------------- resource
def test_resource_loss_known_values():
    spread_codes = torch.tensor([0.3, 0.6, 0.9])  # std 0.245 > margin: no spread penalty
    at_target = resource_loss(torch.tensor([0.5, 0.7]), spread_codes, target=0.6)
    assert float(at_target) == pytest.approx(0.0, abs=1e-6)

    half = resource_loss(torch.tensor([0.2, 0.4]), spread_codes, target=0.6)
    assert float(half) == pytest.approx(math.log(2.0), rel=1e-5)
    double = resource_loss(torch.tensor([0.3]), spread_codes, target=0.15)
    assert float(double) == pytest.approx(math.log(2.0), rel=1e-5)

    # Identical codes pay the full (bounded) spread term: spread_weight * 1.
    same = resource_loss(torch.tensor([0.6]), torch.full((4,), 0.6), target=0.6, spread_weight=0.1)
    assert float(same) == pytest.approx(0.1, rel=1e-5)
    # One code: nothing to spread.
    assert float(resource_loss(torch.tensor([0.6]), torch.tensor([0.6]), target=0.6)) == pytest.approx(0.0, abs=1e-6)


def test_resource_loss_gradients_are_bounded_and_push_codes_apart():
    samples = torch.tensor([0.8, 0.9], requires_grad=True)
    codes = torch.tensor([0.58, 0.6, 0.62], requires_grad=True)
    resource_loss(samples, codes, target=0.6).backward()
    assert bool((samples.grad > 0).all())  # over budget: lower the sample costs
    assert codes.grad[0] > 0 and codes.grad[2] < 0  # the cheapest gets cheaper, the dearest dearer

    far = torch.tensor([0.1, 0.6, 1.0], requires_grad=True)
    resource_loss(torch.tensor([0.6]), far, target=0.6).backward()
    assert far.grad is None or bool((far.grad == 0).all())  # past the margin: no push

    with pytest.raises(ConfigError, match="target"):
        resource_loss(torch.tensor([0.5]), codes, target=0.0)


# ---------------------------------------------------------------- contrastive
def _entropy_of_target(emb, tau):
    normed = torch.nn.functional.normalize(emb, dim=-1)
    logits = normed @ normed.T / tau
    logits.fill_diagonal_(float("-inf"))
    p = logits.softmax(-1)
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


def test_contrastive_loss_is_minimal_when_structures_match():
    torch.manual_seed(0)
    emb = torch.randn(6, 5)
    tau = 0.5
    matched = contrastive_loss(emb.clone(), emb, temperature=tau)
    assert float(matched) == pytest.approx(_entropy_of_target(emb, tau), rel=1e-5)
    # Same structure in another space (rotation + scale) is just as good.
    rotation, _ = torch.linalg.qr(torch.randn(5, 5))
    assert float(contrastive_loss(3 * emb @ rotation, emb, temperature=tau)) == pytest.approx(float(matched), rel=1e-4)
    # A different structure is worse.
    assert contrastive_loss(torch.randn(6, 5), emb, temperature=tau) > matched + 1e-3


def test_contrastive_loss_known_value_and_unit_weights():
    # Two pairs: with one other prompt per row the softmax over off-diagonal entries of a batch
    # of 2 is 1 -> the loss is exactly 0.
    assert float(contrastive_loss(torch.randn(2, 3), torch.randn(2, 4))) == pytest.approx(0.0, abs=1e-6)
    # unit_weights scale the router vectors before the cosine.
    router, emb, weights = torch.randn(5, 4), torch.randn(5, 3), torch.tensor([1.0, 1.0, 0.1, 0.1])
    torch.testing.assert_close(
        contrastive_loss(router, emb, 0.1, unit_weights=weights), contrastive_loss(router * weights, emb, 0.1)
    )
    # One prompt has no pair.
    single = torch.randn(1, 4, requires_grad=True)
    loss = contrastive_loss(single, torch.randn(1, 3))
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_router_gets_gradient_from_contrastive_and_assignment_not_from_sinkhorn():
    torch.manual_seed(0)
    head = RouterHead(embed_dim=6, num_gates=8, hidden_dim=16)
    codes = ArchitectureCodes(num_codes=3, num_gates=8, init_std=1.0)
    unit_weights = torch.ones(8) / 2.0
    emb = torch.nn.functional.normalize(torch.randn(9, 6), dim=-1)

    vectors = head(emb)
    loss = contrastive_loss(vectors, emb, temperature=0.03, unit_weights=unit_weights)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    head.zero_grad()

    scores = group_weighted_cosine(head(emb), codes.logits, unit_weights)
    plan = sinkhorn_plan(scores)
    assignment = balanced_assignment(scores)
    assert not plan.requires_grad and not assignment.requires_grad and plan.grad_fn is None

    assignment_loss(scores, assignment, temperature=0.1).backward()
    grads = [p.grad.clone() for p in head.parameters()]
    assert all(g.abs().sum() > 0 for g in grads)
    # The same loss against a freshly built constant target with the same values gives the same
    # gradient: nothing flowed back through the Sinkhorn solve.
    head.zero_grad()
    codes.zero_grad()
    scores = group_weighted_cosine(head(emb), codes.logits, unit_weights)
    assignment_loss(scores, torch.tensor(assignment.tolist()), temperature=0.1).backward()
    for g, p in zip(grads, head.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_contrastive_target_side_gets_no_gradient():
    router = torch.randn(4, 6, requires_grad=True)
    emb = torch.randn(4, 3, requires_grad=True)
    contrastive_loss(router, emb, temperature=0.1).backward()
    assert router.grad.abs().sum() > 0
    assert emb.grad is None


# ---------------------------------------------------------------- assignment loss
def test_assignment_loss_known_values():
    uniform = torch.zeros(4, 5)
    assert float(assignment_loss(uniform, torch.tensor([0, 1, 2, 3]), 0.1)) == pytest.approx(math.log(5), rel=1e-6)
    confident = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert float(assignment_loss(confident, torch.tensor([0, 1]), 0.05)) < 1e-6
    assert float(assignment_loss(confident, torch.tensor([1, 0]), 0.05)) == pytest.approx(40.0, rel=1e-5)
    with pytest.raises(ConfigError):
        assignment_loss(uniform, torch.tensor([0, 1]), 0.1)


# ---------------------------------------------------------------- distillation
def test_distillation_loss_known_values_and_teacher_is_constant():
    teacher = torch.randn(2, 4, 3, 3, requires_grad=True)
    blocks_t = [torch.randn(2, 8, 2, 2, requires_grad=True), torch.randn(2, 4, 1, 1, requires_grad=True)]
    student = (teacher.detach() + 1.0).requires_grad_(True)
    blocks_s = [blocks_t[0].detach() + 2.0, blocks_t[1].detach().clone()]
    out_mse, block_mse = distillation_loss(student, teacher, blocks_s, blocks_t)
    assert float(out_mse.detach()) == pytest.approx(1.0, rel=1e-6)
    assert float(block_mse.detach()) == pytest.approx((4.0 + 0.0) / 2, rel=1e-6)
    (out_mse + block_mse).backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None and all(t.grad is None for t in blocks_t)

    zero_out, zero_blocks = distillation_loss(teacher.detach(), teacher, [], [])
    assert float(zero_out) == 0.0 and float(zero_blocks) == 0.0
    with pytest.raises(ConfigError, match="block"):
        distillation_loss(student, teacher, blocks_s[:1], blocks_t)
