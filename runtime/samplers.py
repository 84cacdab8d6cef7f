"""Coefficient tables for any step count, built in numpy from the model's noise schedule.

An export made by this version stores, per sampler, the base model's ``alphas_cumprod`` and the
sampler's resolved diffusers config (both read off diffusers at export time, so they are exact);
this module turns them into a `SchedulerTable` for any step count, so a request may ask for
another sampler or step count than the one the export was made with. The formulas follow
diffusers' ``set_timesteps`` and ``step`` of ``DDIMScheduler`` (eta 0),
``EulerDiscreteScheduler`` (no churn), ``DPMSolverMultistepScheduler`` (DPM-Solver++, order 2)
and ``PNDMScheduler`` with ``skip_prk_steps`` (PLMS) and are written as the linear update the
runtime applies::

    x_{i+1} = coef_sample[i] x_i + coef_model[i] m_i + coef_prev_sample[i] x_{i-1} + coef_prev_model[i] m_{i-1}
              + sum_k coef_older_models[i][k] m_{i-2-k}            (PLMS only)

Only the config options that keep the update deterministic and this short are supported
(`check_config` names the offending key otherwise); the exporter cross-checks every table built
here against diffusers' own ``step`` before it lists a sampler as available.

numpy only: the runtime never imports torch or diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aptp.errors import ArtifactError

from .scheduler import MAX_OLDER_MODELS, TABLE_FORMAT, SchedulerTable

__all__ = ["MAX_STEPS", "MIN_STEPS", "SAMPLER_CLASSES", "add_noise_levels", "build_table", "check_config",
           "prediction_terms"]

#: The documented step range of per-request tables.
MIN_STEPS = 1
MAX_STEPS = 150

#: aptp sampler name -> the diffusers class whose schedule and step it reproduces.
SAMPLER_CLASSES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}

_PREDICTIONS = ("epsilon", "v_prediction", "sample")

# key -> values this module reproduces (anything else makes the sampler unavailable).
_COMMON = {
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "prediction_type": _PREDICTIONS,
    "thresholding": (False, None),
}
_SUPPORTED: dict[str, dict[str, tuple]] = {
    "ddim": {**_COMMON, "clip_sample": (False, None)},
    "euler": {
        **_COMMON,
        "interpolation_type": ("linear", None),
        "use_karras_sigmas": (False, None),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "timestep_type": ("discrete", None),
        "final_sigmas_type": ("zero", "sigma_min", None),
    },
    "dpmpp_2m": {
        **_COMMON,
        "algorithm_type": ("dpmsolver++",),
        "solver_order": (2,),
        "solver_type": ("midpoint", "heun"),
        "variance_type": (None,),
        "use_karras_sigmas": (False, None),
        "use_lu_lambdas": (False, None),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "use_flow_sigmas": (False, None),
        "final_sigmas_type": ("zero", "sigma_min", None),
    },
    # PRK warm-up steps are not reproduced (SD's config skips them); diffusers' PNDM knows no "sample".
    "pndm": {"timestep_spacing": _COMMON["timestep_spacing"], "prediction_type": ("epsilon", "v_prediction"),
             "skip_prk_steps": (True,)},
}


def check_config(name: str, config: Mapping[str, Any]) -> None:
    """Refuse a sampler config this module cannot reproduce exactly.

    Raises:
        ArtifactError: an unknown sampler name, or a config key with an unsupported value.
    """
    if name not in _SUPPORTED:
        raise ArtifactError(f"unknown sampler {name!r}; known: {', '.join(sorted(_SUPPORTED))}")
    if not isinstance(config, Mapping):
        raise ArtifactError(f"sampler {name}: config must be a JSON object, got {type(config).__name__}")
    for key, allowed in _SUPPORTED[name].items():
        value = config.get(key)
        if value not in allowed:
            raise ArtifactError(f"sampler {name}: {key}={value!r} is not supported by the runtime's table builder "
                                f"(supported: {', '.join(repr(a) for a in allowed if a is not None)})")
    if not isinstance(config.get("num_train_timesteps"), int) or config["num_train_timesteps"] < 2:
        raise ArtifactError(f"sampler {name}: num_train_timesteps must be an integer >= 2, "
                            f"got {config.get('num_train_timesteps')!r}")


def _leading_offset(config: Mapping[str, Any]) -> int:
    return int(config.get("steps_offset") or 0)


def _ddim_timesteps(config: Mapping[str, Any], n: int) -> np.ndarray:
    train = config["num_train_timesteps"]
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, train - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (train // n)).round()[::-1].astype(np.int64) + _leading_offset(config)
    return np.round(np.arange(train, 0, -train / n)).astype(np.int64) - 1


def _euler_timesteps(config: Mapping[str, Any], n: int) -> np.ndarray:
    train = config["num_train_timesteps"]
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        steps = (np.arange(0, n) * (train // n)).round()[::-1].astype(np.float32)
        return steps + np.float32(_leading_offset(config))
    return np.arange(train, 0, -train / n).round().astype(np.float32) - np.float32(1)


def _dpm_timesteps(config: Mapping[str, Any], n: int, alphas_cumprod: np.ndarray) -> np.ndarray:
    train = config["num_train_timesteps"]
    clip = config.get("lambda_min_clipped", -math.inf)
    clip = -math.inf if clip is None else float(clip)
    # diffusers: searchsorted over the flipped (ascending) log-SNR, lambda = log(alpha) - log(sigma).
    alpha = np.sqrt(alphas_cumprod.astype(np.float32))
    sigma = np.sqrt(np.float32(1) - alphas_cumprod.astype(np.float32))
    with np.errstate(divide="ignore"):
        lambdas = (np.log(alpha) - np.log(sigma)).astype(np.float32)
    last = train - int(np.searchsorted(lambdas[::-1], np.float32(clip), side="left"))
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + _leading_offset(config)
    return np.arange(last, 0, -train / n).round().astype(np.int64) - 1


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """diffusers' Karras-style sigmas of every training timestep, float32 as diffusers has them."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1) - ac) / ac).astype(np.float32)


def _sigma_last(config: Mapping[str, Any], alphas_cumprod: np.ndarray) -> float:
    if config.get("final_sigmas_type") == "sigma_min":
        return float(_train_sigmas(alphas_cumprod)[0])
    return 0.0


def prediction_terms(prediction: str, alpha: float, sigma: float) -> tuple[float, float]:
    """``x0 = a * x + b * m`` for a VP sample ``x = alpha x0 + sigma eps`` and model output ``m``."""
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "v_prediction":
        return alpha, -sigma
    return 0.0, 1.0


def _ddim(config: Mapping[str, Any], n: int, ac: np.ndarray, start: int = 0) -> dict[str, Any]:
    timesteps = _ddim_timesteps(config, n)
    train = config["num_train_timesteps"]
    final = 1.0 if config.get("set_alpha_to_one", True) else float(ac[0])
    coefs = np.zeros((n, 2))
    for i, t in enumerate(timesteps):
        a = float(ac[t])
        prev = int(t) - train // n
        a_prev = float(ac[prev]) if prev >= 0 else final
        # x0 = p * x + q * m and eps = r * x + s * m, then x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
        p, q = prediction_terms(config["prediction_type"], math.sqrt(a), math.sqrt(1 - a))
        if config["prediction_type"] == "epsilon":
            r, s = 0.0, 1.0
        elif config["prediction_type"] == "v_prediction":
            r, s = math.sqrt(1 - a), math.sqrt(a)
        else:
            r, s = 1 / math.sqrt(1 - a), -math.sqrt(a) / math.sqrt(1 - a)
        coefs[i] = (math.sqrt(a_prev) * p + math.sqrt(1 - a_prev) * r, math.sqrt(a_prev) * q + math.sqrt(1 - a_prev) * s)
    return {"timesteps": timesteps.tolist(), "init_noise_sigma": 1.0, "input_scale": [1.0] * n,
            "coef_sample": coefs[:, 0].tolist(), "coef_model": coefs[:, 1].tolist(),
            "coef_prev_sample": [0.0] * n, "coef_prev_model": [0.0] * n}


def _euler(config: Mapping[str, Any], n: int, ac: np.ndarray, start: int = 0) -> dict[str, Any]:
    timesteps = _euler_timesteps(config, n)
    train_sigmas = _train_sigmas(ac)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [_sigma_last(config, ac)]]).astype(np.float32).astype(np.float64)
    if config["timestep_spacing"] in ("linspace", "trailing"):
        init_sigma = float(sigmas.max())
    else:
        init_sigma = float(np.float32((np.float32(sigmas.max()) ** 2 + 1) ** 0.5))
    coefs = np.zeros((n, 2))
    for i in range(n):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        prediction = config["prediction_type"]
        if prediction == "epsilon":  # derivative = m
            coefs[i] = (1.0, dt)
        elif prediction == "v_prediction":
            coefs[i] = (1.0 + dt * sigma / (sigma**2 + 1), dt / math.sqrt(sigma**2 + 1))
        else:  # derivative = (x - m) / sigma
            coefs[i] = (1.0 + dt / sigma, -dt / sigma)
    return {"timesteps": [float(t) for t in timesteps], "init_noise_sigma": init_sigma,
            "input_scale": (1.0 / np.sqrt(sigmas[:n] ** 2 + 1)).tolist(),
            "coef_sample": coefs[:, 0].tolist(), "coef_model": coefs[:, 1].tolist(),
            "coef_prev_sample": [0.0] * n, "coef_prev_model": [0.0] * n}


def _dpmpp_2m(config: Mapping[str, Any], n: int, ac: np.ndarray, start: int = 0) -> dict[str, Any]:
    timesteps = _dpm_timesteps(config, n, ac)
    train_sigmas = _train_sigmas(ac)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [_sigma_last(config, ac)]]).astype(np.float32).astype(np.float64)
    alphas = 1.0 / np.sqrt(sigmas**2 + 1)  # VP alpha_t; VP sigma_t = sigma * alpha_t
    vp_sigmas = sigmas * alphas
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(vp_sigmas)
    prediction = config["prediction_type"]
    x0 = [prediction_terms(prediction, alphas[i], vp_sigmas[i]) for i in range(n)]
    lower_final = bool(config.get("euler_at_final")) or (bool(config.get("lower_order_final")) and n < 15) \
        or config.get("final_sigmas_type", "zero") == "zero"
    out = np.zeros((n, 4))
    for i in range(n):
        sigma_s, sigma_t, alpha_t = vp_sigmas[i], vp_sigmas[i + 1], alphas[i + 1]
        h = lambdas[i + 1] - lambdas[i]
        # x_t = (sigma_t / sigma_s) x + c0 * D0 (+ c1 * D1); exp(-h) is 0 at a final sigma of zero.
        decay = math.exp(-h) if math.isfinite(h) else 0.0
        c0 = -alpha_t * (decay - 1.0)
        a0, b0 = x0[i]
        # diffusers counts lower-order steps from the first step it runs (img2img: `start`).
        first_order = i == start or (i == n - 1 and lower_final)
        if first_order:
            out[i] = (sigma_t / sigma_s + c0 * a0, c0 * b0, 0.0, 0.0)
            continue
        r0 = (lambdas[i] - lambdas[i - 1]) / h
        if config["solver_type"] == "midpoint":
            c1 = 0.5 * c0
        else:
            c1 = alpha_t * ((decay - 1.0) / h + 1.0)
        # D0 = x0_i, D1 = (x0_i - x0_{i-1}) / r0
        a1, b1 = x0[i - 1]
        d = c1 / r0
        out[i] = (sigma_t / sigma_s + (c0 + d) * a0, (c0 + d) * b0, -d * a1, -d * b1)
    return {"timesteps": timesteps.tolist(), "init_noise_sigma": 1.0, "input_scale": [1.0] * n,
            "coef_sample": out[:, 0].tolist(), "coef_model": out[:, 1].tolist(),
            "coef_prev_sample": out[:, 2].tolist(), "coef_prev_model": out[:, 3].tolist()}


def _pndm_timesteps(config: Mapping[str, Any], n: int) -> np.ndarray:
    """diffusers' ``plms_timesteps``: the spaced timesteps, descending, the second one repeated."""
    train = config["num_train_timesteps"]
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        ascending = np.linspace(0, train - 1, n).round().astype(np.int64)
    elif spacing == "leading":
        ascending = (np.arange(0, n) * (train // n)).round().astype(np.int64) + _leading_offset(config)
    else:
        ascending = np.round(np.arange(train, 0, -train / n))[::-1].astype(np.int64) - 1
    return np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].astype(np.int64)


# PLMS (Adams-Bashforth) weights of the kept model outputs, newest first, by how many are kept.
_PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _plms_calls(n_calls: int) -> list[tuple[dict[int, float], int]]:
    """Per model call j: {call index k: weight of m_k} and the call index of the sample stepped.

    diffusers' ``step_plms``: call 1 redoes call 0's step from x_0 with the mean of m_0 and m_1
    (m_1 is then dropped); every other call appends m_j to the kept outputs (at most 4).
    """
    kept: list[int] = []
    out = []
    for j in range(n_calls):
        if j == 1:
            out.append(({0: 0.5, 1: 0.5}, 0))
            continue
        kept = [*kept[-3:], j]
        weights = _PLMS_WEIGHTS[len(kept)]
        out.append(({k: w for k, w in zip(reversed(kept), weights)}, j))
    return out


def _pndm(config: Mapping[str, Any], n: int, ac: np.ndarray, start: int = 0) -> dict[str, Any]:
    # img2img: diffusers slices the timesteps and its PLMS counter restarts at the first kept call.
    timesteps = _pndm_timesteps(config, n)[start:]
    train = config["num_train_timesteps"]
    ratio = train // n  # diffusers steps by train // n whatever the spacing
    final = 1.0 if config.get("set_alpha_to_one", False) else float(ac[0])
    calls = len(timesteps)
    depth = min(MAX_OLDER_MODELS, max(0, calls - 2))
    coefs = np.zeros((calls, 4 + depth))  # x_j, m_j, x_{j-1}, m_{j-1}, m_{j-2}, ...
    for j, (weights, source) in enumerate(_plms_calls(calls)):
        t, prev = int(timesteps[j]), int(timesteps[j]) - ratio
        if j == 1:  # the repeated timestep: step from t + ratio to t
            t, prev = t + ratio, t
        if not 0 <= t < train:
            raise ValueError(f"pndm at {n} steps reads timestep {t}, outside [0, {train}): diffusers cannot run it")
        a = float(ac[t])
        a_prev = float(ac[prev]) if prev >= 0 else final
        # _get_prev_sample: x' = sqrt(a_prev / a) x - g eps with
        # g = (a_prev - a) / (a sqrt(1 - a_prev) + sqrt(a (1 - a) a_prev)), where eps is the PLMS
        # mix itself (epsilon) or sqrt(a) mix + sqrt(1 - a) x (v_prediction).
        g = (a_prev - a) / (a * math.sqrt(1 - a_prev) + math.sqrt(a * (1 - a) * a_prev))
        c_x, c_m = math.sqrt(a_prev / a), -g
        if config["prediction_type"] == "v_prediction":
            c_x, c_m = c_x - g * math.sqrt(1 - a), -g * math.sqrt(a)
        coefs[j, 0 if source == j else 2] = c_x
        for k, w in weights.items():
            coefs[j, 1 + 2 * (j - k) if j - k < 2 else 2 + j - k] += c_m * w
    fields = {"timesteps": timesteps.tolist(), "init_noise_sigma": 1.0, "input_scale": [1.0] * calls,
              "coef_sample": coefs[:, 0].tolist(), "coef_model": coefs[:, 1].tolist(),
              "coef_prev_sample": coefs[:, 2].tolist(), "coef_prev_model": coefs[:, 3].tolist()}
    if calls != n - start:
        fields["model_calls"] = calls
    if depth:
        fields["coef_older_models"] = coefs[:, 4:].tolist()
    return fields


_BUILDERS = {"ddim": _ddim, "euler": _euler, "dpmpp_2m": _dpmpp_2m, "pndm": _pndm}


def _cut(name: str, fields: dict[str, Any], start: int) -> dict[str, Any]:
    """The rows from `start` on of a table whose rows depend on their own timestep only (the
    history coefficients of the first kept row are already first order)."""
    if start == 0 or name == "pndm":  # PNDM slices its own timesteps
        return fields
    return {k: (v[start:] if isinstance(v, list) else v) for k, v in fields.items()}


def _sigmas(name: str, config: Mapping[str, Any], ac: np.ndarray, n: int) -> np.ndarray:
    """The Karras-style sigmas of Euler's or DPM++'s `n` steps, float32 values as diffusers holds them."""
    timesteps = _euler_timesteps(config, n) if name == "euler" else _dpm_timesteps(config, n, ac)
    train_sigmas = _train_sigmas(ac)
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas).astype(np.float32).astype(np.float64)


def add_noise_levels(name: str, config: Mapping[str, Any], alphas_cumprod: Sequence[float] | np.ndarray,
                     num_inference_steps: int, start: int = 0) -> np.ndarray:
    """``(calls, 2)``: per model call from `start` on, the ``(signal, noise)`` weights of diffusers'
    ``scheduler.add_noise`` at that call's timestep: ``x = signal * x0 + noise * eps``.

    DDIM and PNDM: ``sqrt(alphas_cumprod[t])``, ``sqrt(1 - alphas_cumprod[t])``; Euler:
    ``1, sigma``; DPM++: ``alpha_t, sigma_t`` of its sigma (what img2img noises the start
    with, and what inpainting re-noises the known region with after each call).
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    n = int(num_inference_steps)
    if name in ("euler", "dpmpp_2m"):
        sigmas = _sigmas(name, config, ac, n)[start:]
        if name == "euler":
            return np.stack([np.ones_like(sigmas), sigmas], axis=1)
        alphas = 1.0 / np.sqrt(sigmas**2 + 1)
        return np.stack([alphas, sigmas * alphas], axis=1)
    timesteps = (_ddim_timesteps(config, n) if name == "ddim" else _pndm_timesteps(config, n))[start:]
    a = ac[timesteps]
    return np.stack([np.sqrt(a), np.sqrt(1.0 - a)], axis=1)


def build_table(name: str, config: Mapping[str, Any], alphas_cumprod: Sequence[float] | np.ndarray,
                num_inference_steps: int, start: int = 0) -> SchedulerTable:
    """The `SchedulerTable` of sampler `name` for `num_inference_steps` steps.

    Args:
        name: ``"ddim"``, ``"euler"``, ``"dpmpp_2m"`` or ``"pndm"`` (PLMS: ``num_inference_steps + 1``
            model calls, so the table has that many rows).
        config: the sampler's resolved diffusers config (as the export stores it).
        alphas_cumprod: the noise schedule, one value per training timestep.
        num_inference_steps: any integer in ``[1, num_train_timesteps]`` (the runtime's request
            range is narrower: `MIN_STEPS`..`MAX_STEPS` unless the export says otherwise).
        start: img2img's cut (diffusers' ``t_start``): the table runs the steps from `start` on,
            as diffusers' img2img does after ``get_timesteps``; its ``num_inference_steps`` is
            the number kept, ``num_inference_steps - start``.

    Raises:
        ArtifactError: an unsupported config or a malformed schedule.
        ValueError: a step count outside ``[1, num_train_timesteps]``, or one diffusers' own
            sampler cannot run (a timestep outside the schedule).
    """
    check_config(name, config)
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    train = config["num_train_timesteps"]
    if ac.shape != (train,) or not np.all(np.isfinite(ac)) or not (np.all(ac[:-1] > 0) and np.all(ac < 1)):
        raise ArtifactError(f"sampler {name}: alphas_cumprod must be {train} numbers in (0, 1)")
    if ac[-1] <= 0 and not (ac[-1] == 0 and name == "ddim" and config["prediction_type"] != "epsilon"):
        # Zero terminal SNR: diffusers' DDIM keeps the last value at exactly 0, which v- and
        # sample-prediction step through (x0 = -v at t = T); an epsilon model cannot (x0 = x / 0),
        # and the sigma-based samplers need it above 0 (diffusers sets 2**-24 for them).
        raise ArtifactError(f"sampler {name}: alphas_cumprod must be {train} numbers in (0, 1) (the last may be 0 "
                            "only for DDIM with v- or sample-prediction: zero terminal SNR)")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or not 1 <= num_inference_steps <= train:
        raise ValueError(f"num_inference_steps must be an integer in [1, {train}], got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start < n:
        raise ValueError(f"start must be an integer in [0, {n}), got {start!r}")
    fields = _cut(name, _BUILDERS[name](config, n, ac, int(start)), int(start))
    return SchedulerTable.from_dict({
        "format": TABLE_FORMAT,
        "scheduler": SAMPLER_CLASSES[name],
        "name": name,
        "prediction_type": config["prediction_type"],
        "num_inference_steps": n - int(start),
        **fields,
        "config": dict(config),
    }, source=f"{name} table for {n} steps")
