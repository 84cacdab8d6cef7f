"""The sensitivity prior (`sinkhorn.sensitivity_weight`): each training prompt's error under a
uniform mask, measured once on fixed timesteps and noise, standardised, and paired with the
codes' MACs in the balanced assignment."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aptp.errors import ConfigError
from aptp.train.assignment import balanced_assignment
from aptp.train.config import load_config
from aptp.train.data import ProceduralCaptions
from aptp.train.gates import GateLayout
from aptp.train.models import load_components, resolve_pretrained
from aptp.train.prompt_sensitivity import measure_prompt_errors, sensitivity_adjusted_scores, standardised_sensitivity


def assign(scores: torch.Tensor) -> list[int]:
    return balanced_assignment(scores, epsilon=0.05, num_iters=50).tolist()


def test_standardised_sensitivity_by_hand():
    # Timestep 1's errors are 10x timestep 0's: relative to the mean per timestep they weigh the same.
    errors = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0], [2.0, 20.0]])
    z = standardised_sensitivity(errors, ["a", "b", "c", "b"])
    assert set(z) == {"a", "b", "c"}
    raw = {"a": math.log(1.0), "b": math.log(2.0), "c": math.log(4.0)}  # up to a shared constant
    mean = sum(raw.values()) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in raw.values()) / 2)
    assert z == pytest.approx({k: (v - mean) / sd for k, v in raw.items()})
    # Timesteps that disagree average out: a prompt first worst then best sits in the middle.
    mixed = standardised_sensitivity(torch.tensor([[4.0, 1.0], [1.0, 4.0], [2.0, 2.0]]), ["x", "y", "z"])
    assert mixed["x"] == pytest.approx(mixed["y"]) and mixed["z"] == pytest.approx(mixed["x"])


@pytest.mark.parametrize("errors, texts, message", [
    (torch.tensor([[1.0, 0.0], [1.0, 1.0]]), ["a", "b"], "positive"),
    (torch.tensor([[1.0, float("inf")], [1.0, 1.0]]), ["a", "b"], "finite"),
    (torch.ones(3, 2), ["a", "b"], "for 2 captions"),
    (torch.ones(1, 2), ["a"], "prompts >= 2"),
])
def test_bad_errors_are_refused(errors, texts, message):
    with pytest.raises(ConfigError, match=message):
        standardised_sensitivity(errors, texts)


def test_sensitive_prompts_are_paired_with_the_large_codes():
    z = torch.tensor([1.5, 0.5, -0.5, -1.5])
    ratios = torch.tensor([0.4, 0.8])
    scores = torch.zeros(4, 2)
    assert assign(sensitivity_adjusted_scores(scores, z, ratios, 1.0)) == [1, 1, 0, 0]
    # Weight 0 and codes of equal MACs leave the router's scores alone.
    preferred = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
    assert torch.equal(sensitivity_adjusted_scores(preferred, z, ratios, 0.0), preferred)
    assert torch.equal(sensitivity_adjusted_scores(preferred, z, torch.tensor([0.6, 0.6]), 5.0), preferred)
    assert assign(preferred) == [0, 0, 1, 1] and assign(sensitivity_adjusted_scores(preferred, z, ratios, 1.0)) == [1, 1, 0, 0]
    # The term is weight * z * standardised MACs: codes 0.4 / 0.8 are -1/sqrt(2) and +1/sqrt(2).
    term = sensitivity_adjusted_scores(scores, z, ratios, 2.0)
    assert term[0].tolist() == pytest.approx([-2 * 1.5 / math.sqrt(2), 2 * 1.5 / math.sqrt(2)])
    with pytest.raises(ConfigError, match="sensitivity_weight must be >= 0"):
        sensitivity_adjusted_scores(scores, z, ratios, -1.0)
    with pytest.raises(ConfigError, match="do not match"):
        sensitivity_adjusted_scores(scores, z[:3], ratios, 1.0)


@pytest.mark.parametrize("overrides, message", [
    (["sinkhorn.sensitivity_weight=-1"], "sinkhorn.sensitivity_weight must be >= 0"),
    (["sinkhorn.sensitivity_weight=1", "sinkhorn.enabled=false"], "needs sinkhorn.enabled=true"),
])
def test_config_refuses_a_sensitivity_weight_it_cannot_use(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_errors_on_the_real_unet_are_zero_dense_positive_pruned_and_repeatable():
    components = load_components(resolve_pretrained("tiny"))
    for module in (components.unet, components.vae, components.text_encoder):
        module.requires_grad_(False).eval()
    layout = GateLayout.from_unet(components.unet, ff_groups=8, depth=False)
    dataset = ProceduralCaptions(6, 64, seed=0)
    half = torch.ones(layout.num_gates)
    half[::2] = 0
    dense = measure_prompt_errors(components, layout, torch.ones(layout.num_gates), dataset, batch_size=4, progress=False)
    pruned = measure_prompt_errors(components, layout, half, dataset, batch_size=4, progress=False)
    again = measure_prompt_errors(components, layout, half, dataset, batch_size=4, progress=False)
    assert dense.shape == pruned.shape == (6, 5)
    assert float(dense.abs().max()) < 1e-10 and bool((pruned > 1e-6).all())
    assert torch.equal(pruned, again), "fixed timesteps and noise: the prior does not depend on when it is measured"


def test_pruning_with_the_prior_writes_it_and_reproduces(tmp_path):
    from aptp.train.prune import run_prune

    # A large code learning rate: the codes' MACs part within the few steps, so the prior acts.
    overrides = ["prune.max_steps=6", "prune.router_warmup_steps=2", "prune.batch_size=4", "data.num_samples=16",
                 "prune.checkpoint_every=1000", "prune.learning_rate=1.0", "sinkhorn.sensitivity_weight=1.0"]
    config = load_config("tiny", overrides)
    run_prune(config, tmp_path / "a")
    prior = json.loads((tmp_path / "a" / "prompt_sensitivity.json").read_text())["sensitivity"]
    captions = {ProceduralCaptions(16, 64, seed=config.seed).caption(i) for i in range(16)}
    assert set(prior) == captions
    values = torch.tensor(list(prior.values()), dtype=torch.float64)
    assert float(values.mean()) == pytest.approx(0.0, abs=1e-9) and float(values.std()) == pytest.approx(1.0)
    run_prune(load_config("tiny", overrides), tmp_path / "b")
    assert (tmp_path / "b" / "prompt_sensitivity.json").read_text() == (tmp_path / "a" / "prompt_sensitivity.json").read_text()
    logs = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("a", "b")]
    # What the prior says per family, and whether the router follows it (the diagnostic's --prior).
    from aptp.benchmarks.quality.sensitivity import main as sensitivity_main, prior_report

    report = prior_report(tmp_path / "a")
    assert report["prompts"] == 16 and report["z_by_family"]["all"]["n"] == 16
    assert set(report["z_by_family"]) - {"all"} <= {"easy", "medium", "hard"}
    rho = report["spearman_z_routed_macs"]["all"]
    assert math.isnan(rho) or -1.0 <= rho <= 1.0
    assert sensitivity_main([str(tmp_path / "b"), "--prior"]) == 0
    shares = [[json.loads(line)["code_share"] for line in log] for log in logs]
    assert shares[0] == shares[1]
    # Without the prior the same run assigns differently once the codes differ in MACs.
    run_prune(load_config("tiny", overrides[:-1]), tmp_path / "plain")
    plain = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert not (tmp_path / "plain" / "prompt_sensitivity.json").exists()
    assert sensitivity_main([str(tmp_path / "plain"), "--prior"]) == 2
    assert [r["code_share"] for r in plain] != shares[0]
