"""Per-request samplers: numpy tables for any step count against diffusers' own sampling loop.

The export stores each sampler's diffusers config and noise schedule
(`aptp.export.scheduler_tables.sampler_specs`); `aptp.runtime.samplers.build_table` turns them into
a coefficient table for any step count. A fake nonlinear model stands in for the UNet: it is
enough to test the tables (a wrong coefficient at any step moves the final latents), and lets
every sampler run at 1, 2, 7, 20, 50 and 150 steps in a few seconds.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from aptp.errors import ArtifactError, RuntimeInputError
from aptp.export.scheduler_tables import SCHEDULERS, build_scheduler_table, make_scheduler, sampler_specs
from aptp.runtime.samplers import build_table, check_config
from aptp.runtime.sampler_library import SamplerLibrary, canonical_sampler
from aptp.runtime.scheduler import SchedulerTable
from test_scheduler_tables import BASE_CONFIG, diffusers_loop, table_loop

ATOL = 1e-3  # the tolerance on final latents
STEP_COUNTS = (1, 2, 7, 20, 50, 150)


@pytest.fixture(scope="module")
def specs() -> dict:
    # Through JSON, as the manifest stores it.
    return json.loads(json.dumps(sampler_specs(BASE_CONFIG), allow_nan=False))  # strict JSON, as manifests are


@pytest.fixture(scope="module")
def library(specs) -> SamplerLibrary:
    default = SchedulerTable.from_dict(build_scheduler_table("ddim", BASE_CONFIG, 25))
    return SamplerLibrary.from_manifest(specs, default)


def test_every_sampler_is_available_and_cross_checked(specs):
    assert sorted(specs["available"]) == sorted(SCHEDULERS) and specs["unavailable"] == {}
    assert specs["min_steps"] == 1 and specs["max_steps"] == 150
    for name, error in specs["max_relative_error"].items():
        assert error < 1e-3, (name, error)
        assert len(specs["available"][name]["alphas_cumprod"]) == 1000


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_runtime_table_final_latents_match_diffusers(library, name, steps):
    noise = np.random.default_rng(steps).standard_normal((2, 4, 6, 6)).astype(np.float32)
    expected = diffusers_loop(make_scheduler(name, BASE_CONFIG), steps, noise)
    table = library.table(name, steps)
    assert table.name == name and table.num_steps == steps
    got = table_loop(table, noise)
    error = float(np.abs(got - expected).max())
    # Within the tolerance, and small against how far the loop moved the latents (one
    # leading-spaced DDIM step runs at t=1 and barely moves them).
    moved = float(np.abs(expected - noise).max())
    assert error < ATOL and error < 0.01 * moved, (name, steps, error, moved)


@pytest.mark.parametrize("overrides", [
    {"prediction_type": "v_prediction"},
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace", "prediction_type": "sample"},
], ids=["v_prediction", "trailing", "linspace_sample"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_other_configs_match_diffusers(name, overrides):
    config = {**BASE_CONFIG, **overrides}
    specs = sampler_specs(config, check_steps=(1, 7))
    if name == "pndm" and config["prediction_type"] == "sample":  # diffusers' PNDM raises on it too
        assert "prediction_type='sample' is not supported" in specs["unavailable"]["pndm"]
        return
    spec = specs["available"][name]
    for steps in (3, 30):
        noise = np.random.default_rng(steps).standard_normal((1, 4, 5, 5)).astype(np.float32)
        expected = diffusers_loop(make_scheduler(name, config), steps, noise)
        got = table_loop(build_table(name, spec["config"], spec["alphas_cumprod"], steps), noise)
        assert np.abs(got - expected).max() < ATOL, (name, overrides, steps)


def test_stored_table_is_the_default_and_tables_are_cached(library):
    assert library.table("ddim", 25) is library.default
    first = library.table("DPM++-2M", 13)
    assert library.table("dpmpp_2m", 13) is first
    # A runtime-built table of the export's own settings equals the probed one it stores.
    built = build_table("ddim", library.specs["ddim"]["config"], library.specs["ddim"]["alphas_cumprod"], 25)
    assert built.timesteps.tolist() == library.default.timesteps.tolist()
    np.testing.assert_allclose(built.coef_model, library.default.coef_model, rtol=1e-5)
    assert canonical_sampler(" Euler-Discrete ") == "euler"


@pytest.mark.parametrize("name, steps, message", [
    ("euler", 0, "between 1 and 150, got 0"),
    ("euler", 151, "between 1 and 150, got 151"),
    ("ddim", 2.0, "positive integer"),
    ("heun", 10, "unknown sampler 'heun'; this export runs: ddim, dpmpp_2m, euler, pndm"),
    ("euler_a", 10, "unknown sampler 'euler_a'"),
    (None, 10, "sampler name"),
])
def test_bad_sampler_or_steps_is_one_clear_error(library, name, steps, message):
    with pytest.raises(RuntimeInputError, match=message) as info:
        library.table(name, steps)
    assert "\n" not in str(info.value)


def test_unavailable_sampler_says_why(specs):
    section = copy.deepcopy(specs)
    del section["available"]["euler"]
    section["unavailable"]["euler"] = "use_karras_sigmas=True is not supported"
    lib = SamplerLibrary.from_manifest(section, SchedulerTable.from_dict(build_scheduler_table("ddim", BASE_CONFIG, 4)))
    with pytest.raises(RuntimeInputError, match="'euler' is not available in this export: use_karras_sigmas"):
        lib.check("euler", 10)


def test_unsupported_config_is_listed_unavailable_at_export():
    specs = sampler_specs({**BASE_CONFIG, "use_karras_sigmas": True}, check_steps=(2,))
    # DDIM and PNDM have no Karras option; Euler and DPM-Solver++ with Karras sigmas are not reproduced.
    assert sorted(specs["available"]) == ["ddim", "pndm"]
    assert "use_karras_sigmas=True" in specs["unavailable"]["euler"]
    assert "use_karras_sigmas=True" in specs["unavailable"]["dpmpp_2m"]
    with pytest.raises(ArtifactError, match="clip_sample=True"):
        check_config("ddim", {**specs["available"]["ddim"]["config"], "clip_sample": True})


def test_export_without_samplers_runs_only_its_table():
    table = SchedulerTable.from_dict(build_scheduler_table("euler", BASE_CONFIG, 25))
    lib = SamplerLibrary.from_manifest(None, table)
    assert lib.table("euler", 25) is table
    with pytest.raises(RuntimeInputError, match="stores only its 25-step euler table .* re-export"):
        lib.check("euler", 30)
    with pytest.raises(RuntimeInputError, match="stores only its 25-step euler table"):
        lib.check("ddim", 25)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.update(format=2), "format 2"),
    (lambda s: s.update(max_steps=0), "min_steps/max_steps"),
    (lambda s: s["available"]["ddim"]["alphas_cumprod"].pop(), "alphas_cumprod must be 1000 numbers"),
    (lambda s: s["available"]["euler"]["config"].update(prediction_type="v_prediction"), "prediction type"),
    (lambda s: s["available"]["dpmpp_2m"]["config"].update(solver_order=3), "solver_order=3"),
    (lambda s: s["available"].update(ddim=[1, 2]), "needs 'config' and 'alphas_cumprod'"),
])
def test_tampered_samplers_section_is_artifact_error(specs, mutate, message):
    section = copy.deepcopy(specs)
    mutate(section)
    default = SchedulerTable.from_dict(build_scheduler_table("ddim", BASE_CONFIG, 4))
    with pytest.raises(ArtifactError, match=message):
        SamplerLibrary.from_manifest(section, default)


def test_stored_configs_are_strict_json():
    """DPM-Solver's default lambda_min_clipped is -inf: left out (from_config restores it)."""
    table = build_scheduler_table("dpmpp_2m", BASE_CONFIG, 5)
    json.dumps(table, allow_nan=False)
    assert "lambda_min_clipped" not in table["config"]
    assert make_scheduler("dpmpp_2m", table["config"]).config.lambda_min_clipped == float("-inf")


# ---- PNDM (PLMS) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm_tables_match_diffusers_step_on_random_inputs(prediction_type):
    """Random samples and model outputs at every call (no model in the loop): each call's
    x_(i+1) from the runtime table against diffusers' PNDMScheduler.step given the same history."""
    import torch

    config = {**BASE_CONFIG, "prediction_type": prediction_type}
    spec = sampler_specs(config, check_steps=(1, 4))["available"]["pndm"]
    rng = np.random.default_rng(26)
    for steps in (1, 2, 3, 4, 7, 25, 50):
        table = build_table("pndm", spec["config"], spec["alphas_cumprod"], steps)
        scheduler = make_scheduler("pndm", config)
        scheduler.set_timesteps(steps)
        # diffusers' PLMS repeats a timestep: one more model call than steps (from 2 steps on).
        assert table.num_calls == len(scheduler.timesteps) == (steps + 1 if steps > 1 else 1)
        assert table.timesteps.tolist() == scheduler.timesteps.tolist()
        assert table.history_depth == min(3, max(0, table.num_calls - 2))
        samples, models, worst = [], [], 0.0
        for i, t in enumerate(scheduler.timesteps):
            x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
            m = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
            want = scheduler.step(torch.from_numpy(m), t, torch.from_numpy(x)).prev_sample.numpy()
            got = table.step(m, i, x, samples[-1] if samples else None, models[-1] if models else None,
                             models[::-1][1:])
            worst = max(worst, float(np.abs(got - want).max()) / float(np.abs(want).max()))
            samples.append(x)
            models.append(m)
        assert worst < 1e-5, (prediction_type, steps, worst)


def test_pndm_reads_older_model_outputs_and_repeats_a_timestep():
    spec = sampler_specs(BASE_CONFIG, check_steps=(5,))["available"]["pndm"]
    table = build_table("pndm", spec["config"], spec["alphas_cumprod"], 25)
    assert table.num_steps == 25 and table.num_calls == 26 and table.timesteps[1] == table.timesteps[2]
    # Call 1 redoes call 0's step from x_0 with the mean of m_0 and m_1.
    assert table.coef_sample[1] == 0.0 and table.coef_prev_sample[1] == pytest.approx(table.coef_sample[0])
    assert table.coef_model[1] == pytest.approx(table.coef_prev_model[1]) == pytest.approx(table.coef_model[0] / 2)
    # Fourth order from call 4 on: m_0 at call 4 (m_1 was dropped), then m_(i-1..i-3).
    assert table.older_coefficients(4)[2] != 0.0 and table.older_coefficients(4)[1] == 0.0
    assert all(c != 0.0 for c in table.older_coefficients(5)[:2]) and table.older_coefficients(5)[2] == 0.0
    assert SchedulerTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    assert canonical_sampler("PLMS") == canonical_sampler("PNDMScheduler") == "pndm"


def test_pndm_refuses_zero_snr_configs_in_one_line():
    from aptp.errors import ConfigError

    config = {**BASE_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing"}
    with pytest.raises(ConfigError, match="PNDMScheduler has no zero-terminal-SNR rescaling") as info:
        make_scheduler("pndm", config)
    assert "\n" not in str(info.value)
    specs = sampler_specs(config, check_steps=(2,))
    assert "pndm" not in specs["available"] and "rescale_betas_zero_snr" in specs["unavailable"]["pndm"]
    assert {"euler", "dpmpp_2m"} <= set(specs["available"])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(model_calls=3), "model_calls must be num_inference_steps or one more"),
    (lambda d: d.update(model_calls=True), "model_calls must be"),
    (lambda d: d.pop("model_calls"), "expected \\(4,\\) for num_inference_steps=4"),
    (lambda d: d["coef_older_models"].pop(), "'coef_older_models' has shape \\(4, 3\\)"),
    (lambda d: d.update(coef_older_models=[[0.0] * 4] * 5), "expected \\(5, 1 to 3\\)"),
    (lambda d: d["coef_older_models"][1].__setitem__(0, 0.5), "weights m_\\(i-2\\) before step 2"),
    (lambda d: d["coef_older_models"][3].__setitem__(2, 0.5), "weights m_\\(i-4\\) before step 4"),
    (lambda d: d["coef_older_models"][4].__setitem__(0, float("nan")), "non-finite"),
])
def test_tampered_pndm_table_is_artifact_error(mutate, message):
    good = build_scheduler_table("pndm", BASE_CONFIG, 4)
    assert good["model_calls"] == 5 and len(good["coef_older_models"]) == 5
    d = copy.deepcopy(good)
    mutate(d)
    with pytest.raises(ArtifactError, match=message):
        SchedulerTable.from_dict(d)
