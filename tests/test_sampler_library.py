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
from aptp.runtime.scheduler import SamplerLibrary, SchedulerTable, canonical_sampler
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
    spec = sampler_specs(config, check_steps=(1, 7))["available"][name]
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
    ("heun", 10, "unknown sampler 'heun'; this export runs: ddim, dpmpp_2m, euler"),
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
    # DDIM has no Karras option; Euler and DPM-Solver++ with Karras sigmas are not reproduced.
    assert sorted(specs["available"]) == ["ddim"]
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
