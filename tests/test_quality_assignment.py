"""Quality-aware assignment (`sinkhorn.quality_weight`): prompts that a small code hurts most go to
the large code, the per-prompt error level does not matter, and the errors are measured on the
real UNet through each code's mask."""

from __future__ import annotations

import pytest
import torch

from aptp.errors import ConfigError
from aptp.train.assignment import balanced_assignment
from aptp.train.config import load_config
from aptp.train.gates import GateLayout
from aptp.train.models import load_components, resolve_pretrained
from aptp.train.quality_assignment import RATIO_FLOOR, code_distillation_errors, quality_adjusted_scores

# Two codes, four prompts, router scores that prefer nothing: code 0 is small, code 1 large.
# Prompts 0 and 1 lose a factor 20 on the small code; prompts 2 and 3 barely notice it.
ERRORS = torch.tensor([[2.0, 0.1], [4.0, 0.2], [1.1, 1.0], [0.55, 0.5]])


def assign(scores: torch.Tensor) -> list[int]:
    # Enough Sinkhorn iterations for an exactly balanced plan: these tests are about the cost.
    return balanced_assignment(scores, epsilon=0.05, num_iters=50).tolist()


def test_sensitive_prompts_get_the_large_code():
    scores = torch.zeros(4, 2)
    assert assign(quality_adjusted_scores(scores, ERRORS, weight=1.0)) == [1, 1, 0, 0]


def test_weight_zero_is_the_similarity_alone():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
    assert torch.equal(quality_adjusted_scores(scores, ERRORS, weight=0.0), scores)
    # Without the quality term the router's preference decides: prompts 0 and 1 take code 0.
    assert assign(scores) == [0, 0, 1, 1]
    assert assign(quality_adjusted_scores(scores, ERRORS, weight=1.0)) == [1, 1, 0, 0]


def test_a_prompts_error_level_does_not_move_it():
    """A hard timestep scales all of a prompt's errors: only the ratio between codes may count."""
    scores = torch.zeros(4, 2)
    scaled = ERRORS * torch.tensor([[1e-3], [50.0], [7.0], [1e4]])
    plain = assign(quality_adjusted_scores(scores, ERRORS, 1.0))
    assert assign(quality_adjusted_scores(scores, scaled, 1.0)) == plain == [1, 1, 0, 0]


def test_a_code_equal_to_the_teacher_does_not_swamp_the_router():
    """Error 0 (a still-dense code) is floored: the term stays within [log floor, log K]."""
    errors = torch.tensor([[0.0, 1e-9, 3.0], [0.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    term = -quality_adjusted_scores(torch.zeros(3, 3), errors, weight=1.0)
    assert bool(torch.isfinite(term).all())
    assert float(term.min()) == pytest.approx(float(torch.log(torch.tensor(RATIO_FLOOR))))
    assert float(term.max()) <= float(torch.log(torch.tensor(3.0))) + 1e-6
    assert term[2].tolist() == [0.0, 0.0, 0.0], "a prompt every code renders exactly has no preference"


@pytest.mark.parametrize(
    "errors, weight, message",
    [
        (ERRORS, -1.0, "quality_weight must be >= 0"),
        (ERRORS[:3], 1.0, "expected the scores'"),
        (ERRORS * torch.tensor([[1.0], [-1.0], [1.0], [1.0]]), 1.0, "non-negative"),
        (ERRORS * torch.tensor([[1.0], [float("nan")], [1.0], [1.0]]), 1.0, "finite"),
    ],
)
def test_bad_errors_are_refused(errors, weight, message):
    with pytest.raises(ConfigError, match=message):
        quality_adjusted_scores(torch.zeros(4, 2), errors, weight)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sinkhorn.quality_weight=-0.5"], "sinkhorn.quality_weight must be >= 0"),
        (["sinkhorn.quality_weight=1.0", "sinkhorn.enabled=false"], "needs sinkhorn.enabled=true"),
    ],
)
def test_config_refuses_a_quality_weight_it_cannot_use(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_errors_are_zero_for_the_dense_mask_and_grow_with_pruning():
    torch.manual_seed(0)
    unet = load_components(resolve_pretrained("tiny")).unet.eval().requires_grad_(False)
    layout = GateLayout.from_unet(unet, ff_groups=8, depth=False)
    n = layout.num_gates
    half = torch.ones(n)
    half[: n // 2] = 0
    masks = torch.stack([torch.ones(n), half, torch.zeros(n)])
    noisy = torch.randn(3, unet.config.in_channels, 16, 16)
    timesteps = torch.tensor([10, 500, 900])
    context = torch.randn(3, 8, unet.config.cross_attention_dim)
    with torch.no_grad():
        teacher = unet(noisy, timesteps, encoder_hidden_states=context).sample
    errors = code_distillation_errors(unet, layout, masks, noisy, timesteps, context, teacher)
    assert errors.shape == (3, 3)
    assert float(errors[:, 0].max()) < 1e-10, "the all-keep code is the teacher"
    assert bool((errors[:, 1] > 1e-6).all()) and bool((errors[:, 2] > 1e-6).all())
    with pytest.raises(ConfigError, match="code_masks must be"):
        code_distillation_errors(unet, layout, masks[:, :-1], noisy, timesteps, context, teacher)
