"""Scheduler tables: probed from diffusers at export, replayed by the torch-free runtime."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from aptp.errors import ArtifactError, ConfigError, RuntimeInputError
from aptp.export.scheduler_tables import SCHEDULERS, build_scheduler_table, make_scheduler, scheduler_table
from aptp.runtime.scheduler import SchedulerTable

# An SD-like scheduler config (as in stable-diffusion-2-1's scheduler_config.json).
BASE_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "prediction_type": "epsilon",
}
SHAPE = (2, 4, 6, 6)


def fake_model_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic nonlinear stand-in for the guided UNet output."""
    return 0.5 * torch.tanh(x) + 0.01 * float(t) / 1000.0


def fake_model_numpy(x: np.ndarray, t: float) -> np.ndarray:
    return (0.5 * np.tanh(x) + 0.01 * float(t) / 1000.0).astype(x.dtype, copy=False)


def diffusers_loop(scheduler, steps: int, noise: np.ndarray) -> np.ndarray:
    """diffusers' own sampling loop, as StableDiffusionPipeline runs it (float32)."""
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = fake_model_torch(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_output, t, x).prev_sample
    return x.numpy()


def table_loop(table: SchedulerTable, noise: np.ndarray) -> np.ndarray:
    """The table's update per model call, with every model output kept (PLMS reads m_(i-4))."""
    x = table.initial_latents(noise)
    prev_x, models = None, []
    for i, t in enumerate(table.timesteps):
        m = fake_model_numpy(table.scale_model_input(x, i), t)
        older = models[::-1][1:]  # m_(i-2), m_(i-3), ...
        x, prev_x = table.step(m, i, x, prev_x, models[-1] if models else None, older), x
        models.append(m)
    return x


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_table_reproduces_diffusers_sampling(name, prediction_type, steps):
    config = {**BASE_CONFIG, "prediction_type": prediction_type}
    noise = np.random.default_rng(steps).standard_normal(SHAPE).astype(np.float32)
    expected = diffusers_loop(make_scheduler(name, config), steps, noise)

    # Through JSON, as the manifest stores it.
    table = SchedulerTable.from_dict(json.loads(json.dumps(build_scheduler_table(name, config, steps))))
    assert table.num_steps == steps and table.prediction_type == prediction_type and table.name == name

    got64 = table_loop(table, noise.astype(np.float64))
    got32 = table_loop(table, noise)
    assert got32.dtype == np.float32 and got64.dtype == np.float64
    np.testing.assert_allclose(got64, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got32, expected, atol=1e-4, rtol=0)
    # The fake model makes the loop sensitive: a wrong coefficient anywhere would show.
    assert np.abs(expected - noise).max() > 0.1


def test_history_terms_match_scheduler_kind():
    """DDIM and Euler are one-step; DPM-Solver++ 2M uses its history after the first step."""
    ddim = build_scheduler_table("ddim", BASE_CONFIG, 10)
    euler = build_scheduler_table("euler", BASE_CONFIG, 10)
    dpm = build_scheduler_table("dpmpp_2m", BASE_CONFIG, 10)
    for table in (ddim, euler):
        assert not any(table["coef_prev_sample"]) and not any(table["coef_prev_model"])
    assert dpm["coef_prev_model"][0] == 0.0 and all(abs(c) > 1e-3 for c in dpm["coef_prev_model"][1:-1])
    assert euler["init_noise_sigma"] > 1.0 and ddim["init_noise_sigma"] == 1.0
    assert all(s < 1.0 for s in euler["input_scale"]) and all(s == 1.0 for s in ddim["input_scale"])


def test_scheduler_table_leaves_the_given_scheduler_untouched():
    scheduler = make_scheduler("dpmpp_2m", BASE_CONFIG)
    scheduler_table(scheduler, 7)
    assert scheduler.num_inference_steps is None
    assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.solver_order == 2


def test_table_is_json_round_trippable():
    table = build_scheduler_table("dpmpp_2m", {**BASE_CONFIG, "prediction_type": "v_prediction"}, 10)
    text = json.dumps(table)
    assert json.loads(text) == table
    loaded = SchedulerTable.from_dict(json.loads(text))
    assert loaded.to_dict() == table
    assert SchedulerTable.from_dict(json.loads(json.dumps(loaded.to_dict()))) == loaded
    assert loaded.config["algorithm_type"] == "dpmsolver++"


def test_make_scheduler_names_and_aliases():
    assert isinstance(make_scheduler("DPM++-2M", BASE_CONFIG), DPMSolverMultistepScheduler)
    assert make_scheduler("euler_discrete", BASE_CONFIG).config.beta_schedule == "scaled_linear"
    assert make_scheduler("PLMS", {**BASE_CONFIG, "skip_prk_steps": False}).config.skip_prk_steps is True
    with pytest.raises(ConfigError, match="known schedulers: ddim, dpmpp_2m, euler, pndm"):
        make_scheduler("plms_fancy", BASE_CONFIG)
    with pytest.raises(ConfigError, match="stochastic"):
        make_scheduler("euler_a", BASE_CONFIG)
    with pytest.raises(ConfigError, match="mapping"):
        make_scheduler("ddim", "scheduler_config.json")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_step_count_is_config_error(steps):
    with pytest.raises(ConfigError, match="num_inference_steps"):
        scheduler_table(make_scheduler("ddim", BASE_CONFIG), steps)


@pytest.mark.parametrize(
    "scheduler, reason",
    [
        (lambda: EulerAncestralDiscreteScheduler.from_config(BASE_CONFIG), "noise or constant"),
        (lambda: DPMSolverMultistepScheduler.from_config(BASE_CONFIG, solver_order=3), "longer history"),
        (lambda: DDIMScheduler.from_config({**BASE_CONFIG, "clip_sample": True}), "clips"),
        (
            lambda: DPMSolverMultistepScheduler.from_config(BASE_CONFIG, algorithm_type="sde-dpmsolver++"),
            "noise or constant",
        ),
    ],
    ids=["euler_ancestral", "dpm_order3", "ddim_clip", "dpm_sde"],
)
def test_non_linear_schedulers_are_rejected_by_name(scheduler, reason):
    scheduler = scheduler()
    with pytest.raises(ConfigError, match=type(scheduler).__name__) as info:
        scheduler_table(scheduler, 10)
    assert reason in str(info.value)


@pytest.fixture(scope="module")
def good_table() -> dict:
    return build_scheduler_table("dpmpp_2m", BASE_CONFIG, 6)


def _tamper(table: dict, key: str, value) -> dict:
    bad = copy.deepcopy(table)
    if value is KeyError:
        del bad[key]
    else:
        bad[key] = value
    return bad


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("format", 2, "format 2"),
        ("format", None, "format None"),
        ("coef_model", "short", "shape"),
        ("coef_sample", KeyError, "missing coef_sample"),
        ("num_inference_steps", 0, "num_inference_steps"),
        ("init_noise_sigma", float("nan"), "init_noise_sigma"),
        ("prediction_type", 3, "prediction_type"),
    ],
)
def test_tampered_table_is_artifact_error(good_table, key, value, message):
    if value == "short":
        value = good_table[key][:-1]
    with pytest.raises(ArtifactError, match=message):
        SchedulerTable.from_dict(_tamper(good_table, key, value))


@pytest.mark.parametrize("key", ["timesteps", "input_scale", "coef_prev_model"])
def test_non_finite_or_non_numeric_values_are_artifact_errors(good_table, key):
    for poison in (float("nan"), float("inf"), "x"):
        values = list(good_table[key])
        values[3] = poison
        with pytest.raises(ArtifactError, match=key):
            SchedulerTable.from_dict(_tamper(good_table, key, values))


def test_history_at_step_zero_is_rejected(good_table):
    values = list(good_table["coef_prev_sample"])
    values[0] = 0.5
    with pytest.raises(ArtifactError, match="no history at step 0"):
        SchedulerTable.from_dict(_tamper(good_table, "coef_prev_sample", values))
    with pytest.raises(ArtifactError, match="JSON object"):
        SchedulerTable.from_dict([good_table])


def test_runtime_step_is_the_linear_update(good_table):
    table = SchedulerTable.from_dict(good_table)
    rng = np.random.default_rng(1)
    x, m, px, pm = (rng.standard_normal((3, 5)).astype(np.float32) for _ in range(4))
    cs, cm, cps, cpm = table.coefficients(2)
    keys = ("coef_sample", "coef_model", "coef_prev_sample", "coef_prev_model")
    assert (cs, cm, cps, cpm) == tuple(good_table[k][2] for k in keys)
    out = table.step(m, 2, x, px, pm)
    assert out.dtype == np.float32 and out.shape == x.shape
    expected = cs * x.astype(np.float64) + cm * m + cps * px + cpm * pm
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # Zero history and absent history are the same thing.
    np.testing.assert_array_equal(table.step(m, 0, x), table.step(m, 0, x, np.zeros_like(x), np.zeros_like(m)))
    assert table.scale_model_input(x, 1).dtype == np.float32
    with pytest.raises(RuntimeInputError, match=r"\[0, 6\)"):
        table.step(m, 6, x)
    with pytest.raises(RuntimeInputError, match="prev_model has shape"):
        table.step(m, 1, x, px, pm[:2])


def test_runtime_scheduler_imports_no_torch():
    code = (
        "import sys, aptp.runtime.scheduler; "
        "bad = [m for m in ('torch', 'diffusers', 'aptp.train') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("steps", [1, 4, 7, 25])
def test_ddim_with_zero_terminal_snr_runs_at_any_step_count(steps):
    """diffusers' DDIM keeps alphas_cumprod[-1] at exactly 0 under rescale_betas_zero_snr; with
    v-prediction it steps through it (x0 = -v at t = T), and so does the table."""
    from aptp.runtime.samplers import build_table

    config = {**BASE_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing", "steps_offset": 0}
    scheduler = DDIMScheduler.from_config(config)
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    noise = np.random.default_rng(steps).standard_normal(SHAPE).astype(np.float32)
    expected = diffusers_loop(DDIMScheduler.from_config(config), steps, noise)
    ac = scheduler.alphas_cumprod.to(torch.float64).tolist()
    resolved = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    table = build_table("ddim", resolved, ac, steps)
    np.testing.assert_allclose(table_loop(table, noise.astype(np.float64)), expected, atol=1e-4, rtol=0)
    with pytest.raises(ArtifactError, match="the last may be 0 only for DDIM with v- or sample-prediction"):
        build_table("ddim", {**resolved, "prediction_type": "epsilon"}, ac, steps)
