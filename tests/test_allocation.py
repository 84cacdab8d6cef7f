"""The family-router bound (aptp.benchmarks.quality.allocation): the linear program checked by hand,
the estimates on synthetic scores whose answer is known, refusals, and the CLI on the committed premise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aptp.benchmarks.quality.allocation import (Candidate, allocation_bound, best_allocation, candidates_from_runs,
                                                main)
from aptp.errors import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "assets"
MACS = np.array([0.4, 0.6, 0.8])


def test_a_steep_family_takes_the_capacity_a_flat_family_gives():
    # Family 0 is flat (0.70 at every size), family 1 gains 0.2 per 0.2 MACs; equal shares.
    means = np.array([[0.70, 0.40], [0.70, 0.60], [0.70, 0.80]])
    x = best_allocation(means, MACS, np.array([0.5, 0.5]), budget=0.6)
    np.testing.assert_allclose(x[:, 0], [1, 0, 0], atol=1e-6)  # the flat family to the smallest model
    np.testing.assert_allclose(x[:, 1], [0, 0, 1], atol=1e-6)  # the steep one to the largest
    assert (MACS @ x) @ [0.5, 0.5] == pytest.approx(0.6)


def test_equal_concave_curves_leave_nothing_to_reallocate():
    means = np.array([[0.40, 0.50], [0.60, 0.70], [0.65, 0.75]])  # +0.2 then +0.05: concave, alike
    x = best_allocation(means, MACS, np.array([0.3, 0.7]), budget=0.6)
    assert (x * means).sum(axis=0) @ [0.3, 0.7] == pytest.approx(0.3 * 0.60 + 0.7 * 0.70)


def test_focus_keeps_the_other_families_at_their_floors():
    means = np.array([[0.50, 0.40], [0.70, 0.60], [0.75, 0.80]])
    shares = np.array([0.5, 0.5])
    free = best_allocation(means, MACS, shares, budget=0.6, focus=1)
    assert (free * means).sum(axis=0)[0] == pytest.approx(0.50)  # unconstrained: family 0 pays
    held = best_allocation(means, MACS, shares, budget=0.6, focus=1, floors=means[1])
    got = (held * means).sum(axis=0)
    assert got[0] >= 0.70 - 1e-6
    assert got[1] == pytest.approx(0.60)  # family 0 loses 0.2 per 0.2 MACs below 0.6: no room left


def test_a_budget_below_every_model_is_infeasible():
    means = np.array([[0.5, 0.5], [0.6, 0.6], [0.7, 0.7]])
    assert best_allocation(means, MACS, np.array([0.5, 0.5]), budget=0.3) is None


def _synthetic(steep_gain: float, n: int = 300, seed: int = 0) -> tuple[list[Candidate], list[str]]:
    """Per-prompt 0/1 scores, paired as the quality runs' are (one latent draw per prompt shared by
    every model): `easy` right with probability 0.7 at every size, `hard` with 0.6 -/+ steep_gain."""
    rng = np.random.default_rng(seed)
    families = ["easy"] * (n // 2) + ["hard"] * (n - n // 2)
    latent = rng.random(n)
    candidates = []
    for name, macs, level in (("small", 0.4, -1), ("static", 0.6, 0), ("large", 0.8, 1)):
        p = np.where(np.array(families) == "easy", 0.7, 0.6 + level * steep_gain)
        candidates.append(Candidate(name, macs, (latent < p).astype(float)))
    return candidates, families


def test_a_real_difference_in_slopes_is_found_out_of_sample():
    candidates, families = _synthetic(steep_gain=0.25)
    result = allocation_bound(candidates, families, "static", resamples=100)
    best = result["objectives"]["all"]
    assert best["family_macs"]["hard"] > 0.7 > 0.5 > best["family_macs"]["easy"]
    assert best["gain_cross_fitted"]["all"]["low"] > 0
    assert best["gain_in_sample"]["hard"]["mean"] > 0.1


def test_equal_models_gain_nothing_out_of_sample():
    candidates, families = _synthetic(steep_gain=0.0)
    result = allocation_bound(candidates, families, "static", resamples=100)
    crossed = result["objectives"]["all"]["gain_cross_fitted"]["all"]
    assert crossed["low"] < 0 < crossed["high"] or abs(crossed["mean"]) < 0.01
    assert result["objectives"]["all"]["gain_in_sample"]["all"]["mean"] >= 0  # the reference itself is feasible
    assert result["budget"] == pytest.approx(0.6)
    assert result["families"] == {"easy": 150, "hard": 150, "all": 300}


def test_bad_candidates_are_refused():
    candidates, families = _synthetic(0.1)
    with pytest.raises(ConfigError, match="reference model 'dense'"):
        allocation_bound(candidates, families, "dense")
    with pytest.raises(ConfigError, match="at least 2 models"):
        allocation_bound(candidates[1:2], families, "static")
    with pytest.raises(ConfigError, match="299 prompt families"):
        allocation_bound(candidates, families[:-1], "static")


def test_runs_give_single_models_only():
    run = json.loads((ASSETS / "quality_teacher2_prune1000_seed0.json").read_text())
    got = candidates_from_runs([run, run], ["static", "static_long"])
    assert got[0].macs == pytest.approx(run["rows"]["static"]["routing"]["macs_ratio"])
    np.testing.assert_allclose(got[0].scores, run["rows"]["static"]["per_prompt_alignment"])
    with pytest.raises(ConfigError, match="routes between several experts"):
        candidates_from_runs([run], ["aptp"])
    with pytest.raises(ConfigError, match="row aptp_quality is not scored"):
        candidates_from_runs([run], ["aptp_quality"])


def test_cli_on_the_committed_premise(tmp_path, capsys):
    assert main([str(ASSETS / "premise_tiny.json"), "--output-dir", str(tmp_path), "--resamples", "20"]) == 0
    result = json.loads((tmp_path / "allocation.json").read_text())
    assert result["reference"] == "uniform_0.6" and result["kind"] == "premise"
    assert set(result["curve"]) == {"dense", "uniform_0.8", "uniform_0.6", "uniform_0.4"}
    assert "Best family router" in (tmp_path / "allocation.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.json"), "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "missing.json does not exist" in capsys.readouterr().err
