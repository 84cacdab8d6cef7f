"""Scheduler coefficient tables: diffusers' sampling read off as per-step numbers.

The runtime must reproduce diffusers' sampling without torch, so the exporter stores, per
model call ``i``, the coefficients of the linear update that the fused C++/CUDA kernel and
the numpy oracle (`aptp.runtime.scheduler`) apply::

    model_input_i = input_scale[i] * x_i
    x_{i+1} = coef_sample[i] * x_i + coef_model[i] * m_i
              + coef_prev_sample[i] * x_{i-1} + coef_prev_model[i] * m_{i-1}
              + sum_k coef_older_models[i][k] * m_{i-2-k}        (PLMS only)

with ``m_i`` the guided model output and the initial latents ``init_noise_sigma * noise``.
PNDM with ``skip_prk_steps`` (PLMS) is the one sampler with older model terms (its linear
multistep keeps up to four outputs) and with ``num_inference_steps + 1`` model calls.

The coefficients are never re-derived from each scheduler's formulas: they are *measured* by
running diffusers' own ``set_timesteps`` / ``scale_model_input`` / ``step`` on probe lanes.
Scheduler steps are elementwise, so one tensor carries many independent probes: per call, unit
lanes read off the coefficients, a zero lane shows there is no constant (noise) term, and
random lanes with random older history confirm the update really is linear in this form.
A scheduler that fails any of these checks is rejected with a `ConfigError` naming it.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from aptp.errors import ConfigError

logger = logging.getLogger(__name__)

TABLE_FORMAT = 1

# Names are the CLI's `--scheduler` values.
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}

# Config entries forced on top of the pipeline's scheduler config: they define the sampler
# itself (a pipeline shipping an SDE or third-order DPM-Solver config still gets DPM++ 2M).
SCHEDULER_OVERRIDES: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
    # PLMS: the PRK warm-up (four model calls per step) is not reproduced; SD's own config skips it.
    "pndm": {"skip_prk_steps": True},
}
#: Samplers that make one more model call than they have steps (diffusers' PLMS repeats a timestep).
EXTRA_CALL = {"pndm"}

ALIASES: dict[str, str] = {
    "ddim_scheduler": "ddim",
    "euler_discrete": "euler",
    "dpm++_2m": "dpmpp_2m",
    "dpmpp2m": "dpmpp_2m",
    "dpm_solver_pp_2m": "dpmpp_2m",
    "dpmsolver++": "dpmpp_2m",
    "dpm_solver++": "dpmpp_2m",
    "plms": "pndm",
    "pndm_scheduler": "pndm",
}

# Well-known samplers that draw fresh noise every step: the two-step linear update has no
# noise term, so name the reason instead of answering "unknown scheduler".
_STOCHASTIC = {"euler_a", "euler_ancestral", "ddpm", "dpmpp_2m_sde", "dpm++_2m_sde", "dpmpp_sde", "lcm"}

# Probe lanes per model call: one zero lane, seven unit lanes (x_i, m_i, x_{i-1}, m_{i-1} and the
# older m_{i-2}, m_{i-3}, m_{i-4} PLMS reads), and random lanes whose whole history is random
# (they catch longer histories and nonlinearity).
_ZERO = 0
# (probed array, steps back) per unit lane, in the table's coefficient order.
_UNITS = (("x", 0), ("m", 0), ("x", 1), ("m", 1), ("m", 2), ("m", 3), ("m", 4))
_OLDER = len(_UNITS) - 4
_CHECK_LANES = 3
_LANES = 1 + len(_UNITS) + _CHECK_LANES
# Random probes are O(this): large enough that clipping or thresholding of x0 shows up.
_PROBE_SCALE = 3.0
# diffusers upcasts Euler and DPM-Solver steps to float32, so probes carry float32 rounding.
_RTOL = 2e-5
_ATOL = 1e-9


def _canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """Build the sampler `name` from the pipeline's scheduler config.

    Betas, prediction type and timestep spacing come from `base_config` (the model's own
    ``scheduler/scheduler_config.json``); only the entries that define the sampler itself
    (`SCHEDULER_OVERRIDES`) are forced.

    Raises:
        ConfigError: `name` is not a known sampler, or `base_config` is not a mapping.
    """
    if not isinstance(base_config, Mapping):
        raise ConfigError(
            f"base_config must be the pipeline's scheduler config (a mapping), got {type(base_config).__name__}"
        )
    key = _canonical_name(name)
    if key not in SCHEDULERS:
        known = ", ".join(sorted(SCHEDULERS))
        if key in _STOCHASTIC:
            raise ConfigError(
                f"scheduler {name!r} is stochastic (it adds fresh noise every step), which the exported "
                f"linear update cannot reproduce; use one of: {known}"
            )
        aliases = ", ".join(sorted(ALIASES))
        raise ConfigError(f"unknown scheduler {name!r}; known schedulers: {known} (aliases: {aliases})")
    if key == "pndm" and base_config.get("rescale_betas_zero_snr"):
        # from_config would drop the key silently and sample another noise schedule than the model's.
        raise ConfigError("pndm: diffusers' PNDMScheduler has no zero-terminal-SNR rescaling "
                          "(rescale_betas_zero_snr), so it cannot sample this model's schedule exactly; "
                          "use another sampler")
    return SCHEDULERS[key].from_config(dict(base_config), **SCHEDULER_OVERRIDES.get(key, {}))


def short_name(scheduler: SchedulerMixin) -> str:
    """The `SCHEDULERS` name whose class and overrides match `scheduler`, else its class name."""
    for key, cls in SCHEDULERS.items():
        overrides = SCHEDULER_OVERRIDES.get(key, {})
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return key
    return type(scheduler).__name__


def _check_steps(num_inference_steps: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")


def _probe_inputs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-call (sample, model output) values for every probe lane, shape (n, n * _LANES).

    Lanes `i * _LANES + j` belong to call i: they are zero after call i (unused), a unit lane
    is 1 at its role's call and 0 elsewhere, and only the random check lanes have other history.
    """
    samples = np.zeros((n, n * _LANES))
    models = np.zeros((n, n * _LANES))
    for i in range(n):
        base = i * _LANES
        for lane, (kind, back) in enumerate(_UNITS, start=1):
            if i - back >= 0:
                (samples if kind == "x" else models)[i - back, base + lane] = 1.0
        checks = slice(base + 1 + len(_UNITS), base + _LANES)
        samples[: i + 1, checks] = _PROBE_SCALE * rng.standard_normal((i + 1, _CHECK_LANES))
        models[: i + 1, checks] = _PROBE_SCALE * rng.standard_normal((i + 1, _CHECK_LANES))
    return samples, models


def _as_lanes(values: np.ndarray) -> torch.Tensor:
    # A latent-shaped tensor (batch 1, one channel per lane) so no scheduler trips on the rank.
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).reshape(1, -1, 1, 1)


def _from_lanes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).reshape(-1).cpu().numpy()


def _not_linear(label: str, step: int, what: str) -> ConfigError:
    return ConfigError(
        f"scheduler {label} is not linear in (x_i, m_i, x_(i-1), m_(i-1), m_(i-2..i-4)) at step {step}: "
        f"{what}. The exported runtime only reproduces deterministic samplers with that much "
        "history (DDIM with eta=0, Euler, DPM-Solver++ 2M, PLMS); disable clipping/thresholding or "
        f"choose one of: {', '.join(sorted(SCHEDULERS))}"
    )


def _check_lanes(label: str, step: int, got: np.ndarray, terms: np.ndarray) -> None:
    """`got` (lanes,) against the linear prediction whose per-lane terms are `terms` (lanes, 4)."""
    predicted = terms.sum(axis=1)
    tol = _RTOL * (np.abs(terms).sum(axis=1) + np.abs(got)) + _ATOL
    # A non-finite output counts as the worst mismatch.
    excess = np.where(np.isfinite(got), np.abs(got - predicted) - tol, np.inf)
    if np.any(excess > 0):
        worst = int(np.argmax(excess))
        raise _not_linear(
            label,
            step,
            f"a random probe gave {got[worst]:.6g}, the fitted linear form predicts {predicted[worst]:.6g} "
            "(it needs a longer history, or clips/thresholds its prediction)",
        )


def scheduler_table(scheduler: SchedulerMixin, num_inference_steps: int, *, seed: int = 0) -> dict[str, Any]:
    """Read the per-step linear update of `scheduler` off diffusers by probing it.

    The scheduler passed in is left untouched: the probes run on a fresh copy built from its
    config. `seed` only picks the random check probes.

    Returns:
        A JSON-serialisable dict: ``format``, ``scheduler`` (class name), ``name`` (short name),
        ``prediction_type``, ``num_inference_steps``, ``init_noise_sigma``, ``timesteps``,
        ``input_scale``, ``coef_sample``, ``coef_model``, ``coef_prev_sample``,
        ``coef_prev_model`` (one entry per model call), ``config`` (the scheduler's config) and,
        for PLMS only, ``model_calls`` (steps + 1) and ``coef_older_models`` (per call, the
        weights of m_(i-2), m_(i-3), m_(i-4)).

    Raises:
        ConfigError: `num_inference_steps` < 1 or rejected by the scheduler, or the scheduler is
            not linear in that form (stochastic, longer history, clipping...).
    """
    _check_steps(num_inference_steps)
    n = int(num_inference_steps)
    label = type(scheduler).__name__
    probe = type(scheduler).from_config(scheduler.config)
    try:
        probe.set_timesteps(n, device="cpu")
    except (ValueError, IndexError) as err:
        raise ConfigError(f"{label}.set_timesteps({n}) failed: {err}") from err
    timesteps = probe.timesteps
    calls = len(timesteps)
    if calls != n and not (short_name(scheduler) in EXTRA_CALL and calls == n + 1):
        # e.g. second-order schedulers (Heun, KDPM2) run the model twice per step.
        raise ConfigError(
            f"scheduler {label} makes {calls} model calls for {n} inference steps; "
            f"only one model call per step (PLMS: one more in all) is supported ({', '.join(sorted(SCHEDULERS))})"
        )
    init_noise_sigma = float(probe.init_noise_sigma)

    rng = np.random.default_rng(seed)
    samples, models = _probe_inputs(calls, rng)
    outputs = np.zeros_like(samples)
    input_scale = np.zeros(calls)
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            # Probe scale_model_input on its own lanes: [0, 1, random...].
            scale_in = np.concatenate([[0.0, 1.0], _PROBE_SCALE * rng.standard_normal(_CHECK_LANES)])
            scaled = _from_lanes(probe.scale_model_input(_as_lanes(scale_in), t))
            input_scale[i] = scaled[1]
            if scaled[0] != 0.0:
                raise _not_linear(label, i, f"scale_model_input(0) = {scaled[0]:.6g}, not 0")
            _check_lanes(label, i, scaled[2:], (scale_in[2:] * input_scale[i])[:, None])
            try:
                out = probe.step(_as_lanes(models[i]), t, _as_lanes(samples[i])).prev_sample
            except IndexError as err:  # e.g. DDIM with steps_offset=1 at as many steps as training had
                raise ConfigError(f"{label} cannot run {n} inference steps (step {i}, timestep {float(t):g}: "
                                  f"{err}); use fewer steps") from err
            outputs[i] = _from_lanes(out)

    coefs = np.zeros((calls, len(_UNITS)))
    for i in range(calls):
        base = i * _LANES
        got = outputs[i, base : base + _LANES]
        if abs(got[_ZERO]) > _ATOL:
            raise _not_linear(label, i, f"zero inputs give {got[_ZERO]:.6g} (a noise or constant term)")
        coefs[i] = got[1 : 1 + len(_UNITS)]
        # A unit lane whose role is before call 0 is all zeros: a weight there is a constant term.
        absent = [lane for lane, (_, back) in enumerate(_UNITS) if back > i]
        if np.any(coefs[i, absent] != 0.0):
            raise _not_linear(label, i, "the step depends on inputs given before the first call")
        lanes = slice(base + 1 + len(_UNITS), base + _LANES)
        inputs = np.stack(
            [(samples if kind == "x" else models)[i - back, lanes] if i >= back else np.zeros(_CHECK_LANES)
             for kind, back in _UNITS],
            axis=1,
        )
        _check_lanes(label, i, got[1 + len(_UNITS):], inputs * coefs[i])

    integral = not torch.is_floating_point(timesteps)
    table = {
        "format": TABLE_FORMAT,
        "scheduler": label,
        "name": short_name(scheduler),
        "prediction_type": str(probe.config.get("prediction_type", "epsilon")),
        "num_inference_steps": n,
        "init_noise_sigma": init_noise_sigma,
        "timesteps": [int(t) if integral else float(t) for t in timesteps.tolist()],
        "input_scale": input_scale.tolist(),
        "coef_sample": coefs[:, 0].tolist(),
        "coef_model": coefs[:, 1].tolist(),
        "coef_prev_sample": coefs[:, 2].tolist(),
        "coef_prev_model": coefs[:, 3].tolist(),
        "config": json_config(probe),
    }
    # Written only where they exist (PLMS), so every other table reads exactly as before.
    if calls != n:
        table["model_calls"] = calls
    depth = max((k + 1 for k in range(_OLDER) if np.any(coefs[:, 4 + k] != 0.0)), default=0)
    if depth:
        table["coef_older_models"] = coefs[:, 4 : 4 + depth].tolist()
    logger.debug("scheduler table for %s, %d steps: init_noise_sigma %.6g", label, n, init_noise_sigma)
    return table


def json_config(scheduler: SchedulerMixin) -> dict[str, Any]:
    """The scheduler's config as strict JSON (what the manifest may hold).

    ``to_json_string`` turns tensors/arrays (trained_betas) into plain values; a non-finite
    number (DPM-Solver's ``lambda_min_clipped=-inf``) is not JSON, so it is left out when it is
    the class default, which ``from_config`` restores.

    Raises:
        ConfigError: a non-finite value that is not the default (it cannot be stored).
    """
    config = json.loads(scheduler.to_json_string())
    defaults = inspect.signature(type(scheduler).__init__).parameters
    for key, value in list(config.items()):
        if isinstance(value, float) and not math.isfinite(value):
            default = defaults[key].default if key in defaults else None
            if not (isinstance(default, float) and default == value):
                raise ConfigError(f"{type(scheduler).__name__}: {key}={value} is not a finite number and not "
                                  "the default, so it cannot be stored in the manifest's JSON")
            del config[key]
    return config


def build_scheduler_table(name: str, base_config: Mapping[str, Any], num_inference_steps: int) -> dict[str, Any]:
    """`make_scheduler` then `scheduler_table`: what the exporter writes for ``--scheduler name``."""
    return scheduler_table(make_scheduler(name, base_config), num_inference_steps)


# -- per-request samplers ------------------------------------------------------------------------

#: Format of the manifest's ``samplers`` section (read by `aptp.runtime.scheduler.SamplerLibrary`).
SAMPLERS_FORMAT = 1
#: Step counts at which every runtime-built table is checked against diffusers' own step at export.
CHECK_STEPS = (1, 2, 3, 7, 20, 50, 150)
# Relative to each coefficient array's largest magnitude: diffusers steps Euler and DPM-Solver in
# float32, the runtime builds in float64 (DPM-Solver's Heun term loses ~1e-4 to cancellation).
_CROSS_CHECK_RTOL = 1e-3


def _cross_check(name: str, scheduler: SchedulerMixin, spec: Mapping[str, Any], steps: int) -> float:
    """Largest relative difference between the runtime's numpy table and diffusers' probed one."""
    from aptp.runtime.samplers import build_table

    want = scheduler_table(scheduler, steps)
    got = build_table(name, spec["config"], spec["alphas_cumprod"], steps).to_dict()
    if len(got["timesteps"]) != len(want["timesteps"]):
        return math.inf  # a different number of model calls: nothing else is comparable
    worst = 0.0
    for key in ("timesteps", "input_scale", "coef_sample", "coef_model", "coef_prev_sample", "coef_prev_model",
                "coef_older_models"):
        a, b = _padded(got.get(key), want.get(key), len(want["timesteps"]))
        worst = max(worst, float(np.max(np.abs(a - b))) / max(1e-12, float(np.max(np.abs(b)))))
    sigma = abs(got["init_noise_sigma"] - want["init_noise_sigma"]) / want["init_noise_sigma"]
    return max(worst, sigma)


def _padded(a: Any, b: Any, calls: int) -> tuple[np.ndarray, np.ndarray]:
    """Two per-call arrays of one shape; an absent or narrower ``coef_older_models`` is zeros."""
    arrays = [np.asarray(v if v is not None else np.zeros((calls, 0)), dtype=np.float64) for v in (a, b)]
    if arrays[0].ndim == 2 or arrays[1].ndim == 2:
        width = max(1, *(v.shape[1] for v in arrays))
        arrays = [np.pad(v, ((0, 0), (0, width - v.shape[1]))) for v in arrays]
    return arrays[0], arrays[1]


def sampler_specs(base_config: Mapping[str, Any], *, min_steps: int = 1, max_steps: int = 150,
                  check_steps: tuple[int, ...] = CHECK_STEPS) -> dict[str, Any]:
    """The manifest's ``samplers`` section: what the runtime needs to build any sampler's table
    for any step count in ``[min_steps, max_steps]``.

    Per sampler: its resolved diffusers config and its ``alphas_cumprod`` (read off the diffusers
    scheduler built from `base_config`, so betas, trained betas and zero-SNR rescaling come out
    exactly as diffusers has them). Each sampler's numpy table (`aptp.runtime.samplers`) is
    checked against diffusers' probed one at `check_steps`; a sampler whose config the runtime
    cannot reproduce is listed under ``unavailable`` with the reason instead.

    Raises:
        ConfigError: a bad step range.
    """
    from aptp.errors import ArtifactError
    from aptp.runtime.samplers import check_config

    if not 1 <= min_steps <= max_steps:
        raise ConfigError(f"sampler step range must satisfy 1 <= min <= max, got [{min_steps}, {max_steps}]")
    available: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    errors: dict[str, float] = {}
    for name in SCHEDULERS:
        try:
            scheduler = make_scheduler(name, base_config)  # pndm refuses zero-SNR configs here
            config = json_config(scheduler)
            spec = {"config": config, "alphas_cumprod": scheduler.alphas_cumprod.to(torch.float64).tolist()}
            check_config(name, config)
            if max_steps > config["num_train_timesteps"]:
                raise ConfigError(f"max_steps {max_steps} exceeds num_train_timesteps {config['num_train_timesteps']}")
            steps = sorted({s for s in check_steps if min_steps <= s <= max_steps} | {min_steps, max_steps})
            errors[name] = max(_cross_check(name, scheduler, spec, s) for s in steps)
            if errors[name] > _CROSS_CHECK_RTOL:
                raise ConfigError(f"its runtime table differs from diffusers by {errors[name]:.2g} (relative)")
        except (ArtifactError, ConfigError) as err:
            logger.warning("sampler %s will not be available per request: %s", name, err)
            unavailable[name] = str(err)
            continue
        available[name] = spec
    logger.info("per-request samplers %s, steps %d-%d; largest relative coefficient difference to diffusers %s",
                sorted(available), min_steps, max_steps, {k: f"{v:.1e}" for k, v in errors.items()})
    return {"format": SAMPLERS_FORMAT, "min_steps": int(min_steps), "max_steps": int(max_steps),
            "available": available, "unavailable": unavailable,
            "checked_steps": list(check_steps), "max_relative_error": errors}
