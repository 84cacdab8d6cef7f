"""Uniform static masks for the premise measurement, and the paired per-family bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aptp.benchmarks.quality.paired import bootstrap_mean, family_summary, paired_family_difference, per_prompt_alignment


def test_bootstrap_interval_and_pairing():
    rng = np.random.default_rng(0)
    values = rng.random(200)
    stat = bootstrap_mean(values)
    assert stat["low"] < stat["mean"] < stat["high"] and stat["n"] == 200
    families = ["easy"] * 100 + ["hard"] * 100
    a = values
    b = values - np.r_[np.zeros(100), np.full(100, 0.2)]  # a is 0.2 better than b on the hard prompts
    diff = paired_family_difference(a, b, families)
    assert diff["easy"]["mean"] == pytest.approx(0.0) and diff["easy"]["low"] == diff["easy"]["high"] == pytest.approx(0.0)
    assert diff["hard"]["low"] == pytest.approx(0.2) and diff["all"]["mean"] == pytest.approx(0.1)
    assert set(family_summary(values, families)) == {"easy", "hard", "all"}
    with pytest.raises(ValueError):
        paired_family_difference(a, b[:10], families)


def test_per_prompt_alignment():
    targets = [{"shape": "circle", "count": 2}, {"shape": None, "count": 1}]
    predicted = [{"shape": "circle", "count": 3, "word": None}, {"shape": None, "count": 1, "word": "CAT"}]
    assert per_prompt_alignment(predicted, targets).tolist() == [0.5, 1.0]


def test_uniform_masks_meet_their_macs_ratio():
    from aptp.train.uniform_masks import uniform_mask
    from aptp.train.gates import GateLayout
    from aptp.train.macs import DeployShape, MacsModel
    from aptp.train.models import load_components, resolve_pretrained

    unet = load_components(resolve_pretrained("tiny")).unet
    layout = GateLayout.from_unet(unet, ff_groups=8, depth=False)
    macs = MacsModel(unet, layout, DeployShape(16, 16, 32))
    importance = torch.rand(layout.num_gates, generator=torch.Generator().manual_seed(0))
    for target in (0.8, 0.6, 0.4):
        mask, ratio = uniform_mask(layout, macs, importance, target)
        assert abs(ratio - target) < 0.03 and ratio == pytest.approx(float(macs.ratio(mask)))
        for site in layout.sites:  # every site keeps its most important units, at least one
            span = layout.site_slice(site)
            kept = mask[span].bool()
            assert kept.any()
            if not kept.all():
                assert importance[span][kept].min() >= importance[span][~kept].max()
