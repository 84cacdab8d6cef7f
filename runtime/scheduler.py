"""Torch-free sampling from an exported scheduler coefficient table.

`aptp.export.scheduler_tables` reads diffusers' DDIM / Euler / DPM-Solver++ 2M / PNDM (PLMS)
steps off as per-model-call coefficients; this module validates such a table and applies it::

    model_input_i = input_scale[i] * x_i
    x_{i+1} = coef_sample[i] * x_i + coef_model[i] * m_i
              + coef_prev_sample[i] * x_{i-1} + coef_prev_model[i] * m_{i-1}
              + sum_k coef_older_models[i][k] * m_{i-2-k}

where ``m_i`` is the guided model output and the history is zero at ``i = 0``. Only PLMS has the
older model terms (its 4-step linear multistep); it also makes ``num_inference_steps + 1`` model
calls (diffusers repeats one timestep at the start), so a table has ``model_calls`` rows. `SchedulerTable.step`
is the plain numpy form of the update; the fused C++/CUDA kernel is tested against it.

numpy only: the runtime never imports torch or diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aptp.errors import ArtifactError, RuntimeInputError

TABLE_FORMAT = 1
COEFFICIENT_KEYS = ("coef_sample", "coef_model", "coef_prev_sample", "coef_prev_model")
PER_STEP_KEYS = ("timesteps", "input_scale", *COEFFICIENT_KEYS)
#: Older model outputs (m_{i-2}, m_{i-3}, m_{i-4}) a table may weight: PLMS's 4th order needs three.
MAX_OLDER_MODELS = 3
REQUIRED_KEYS = (
    "format",
    "scheduler",
    "name",
    "prediction_type",
    "num_inference_steps",
    "init_noise_sigma",
    *PER_STEP_KEYS,
)


def _frozen(values: np.ndarray) -> np.ndarray:
    values = np.array(values, dtype=np.float64)
    values.flags.writeable = False
    return values


def _per_step(d: Mapping[str, Any], key: str, n: int, where: str, steps: int | None = None) -> np.ndarray:
    raw = d[key]
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__"):
        raise ArtifactError(f"{where}: {key!r} must be a list of {n} numbers, got {type(raw).__name__}")
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: {key!r} must be a list of numbers ({err})") from err
    if values.shape != (n,):
        what = f"num_inference_steps={n}" if steps in (None, n) else f"model_calls={n} ({steps} inference steps)"
        raise ArtifactError(
            f"{where}: {key!r} has shape {values.shape}, expected ({n},) for {what}; "
            "the table is truncated or tampered with: re-export it"
        )
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ArtifactError(f"{where}: {key!r}[{bad}] is {values[bad]}, not a finite number; re-export the table")
    return values


def _older_models(d: Mapping[str, Any], calls: int, where: str) -> np.ndarray:
    """``coef_older_models`` as a (calls, K) array; absent means K = 0."""
    raw = d.get("coef_older_models")
    if raw is None:
        return np.zeros((calls, 0))
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: 'coef_older_models' must be a list of lists of numbers ({err})") from err
    if values.ndim != 2 or values.shape[0] != calls or not 1 <= values.shape[1] <= MAX_OLDER_MODELS:
        raise ArtifactError(f"{where}: 'coef_older_models' has shape {values.shape}, expected ({calls}, 1 to "
                            f"{MAX_OLDER_MODELS}); the table is truncated or tampered with: re-export it")
    if not np.all(np.isfinite(values)):
        raise ArtifactError(f"{where}: 'coef_older_models' holds a non-finite number; re-export the table")
    # m_{i-2-k} does not exist before step 2 + k: a weight there reads history that is not there.
    for k in range(values.shape[1]):
        if np.any(values[: min(calls, 2 + k), k] != 0.0):
            raise ArtifactError(f"{where}: coef_older_models weights m_(i-{2 + k}) before step {2 + k}, "
                                "where it does not exist")
    return values


@dataclass(frozen=True, eq=False)
class SchedulerTable:
    """One exported sampler: per-model-call timesteps, input scales and update coefficients.

    Build it with `from_dict` (which validates); arrays are read-only float64. The per-call
    arrays have `num_calls` rows: `num_inference_steps` except for PLMS (one more).
    """

    scheduler: str
    name: str
    prediction_type: str
    num_inference_steps: int
    init_noise_sigma: float
    timesteps: np.ndarray
    input_scale: np.ndarray
    coef_sample: np.ndarray
    coef_model: np.ndarray
    coef_prev_sample: np.ndarray
    coef_prev_model: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    #: (num_calls, K) weights of m_{i-2}, ..., m_{i-1-K}; K = 0 for every sampler but PLMS.
    coef_older_models: np.ndarray = field(default_factory=lambda: _frozen(np.zeros((0, 0))))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "scheduler table") -> SchedulerTable:
        """Validate and load a table as written by the exporter (`source` names it in errors).

        Raises:
            ArtifactError: not a mapping, another format version, a missing key, a per-step list
                whose length is not ``num_inference_steps``, or a non-finite value.
        """
        if not isinstance(d, Mapping):
            raise ArtifactError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != TABLE_FORMAT:
            raise ArtifactError(
                f"{source}: format {d.get('format')!r}, this runtime reads format {TABLE_FORMAT}; "
                "re-export with a matching aptp version"
            )
        missing = [key for key in REQUIRED_KEYS if key not in d]
        if missing:
            raise ArtifactError(f"{source}: missing {', '.join(missing)}; re-export the table")
        n = d["num_inference_steps"]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ArtifactError(f"{source}: num_inference_steps must be an integer >= 1, got {n!r}")
        n = int(n)
        try:
            sigma = float(d["init_noise_sigma"])
        except (TypeError, ValueError) as err:
            raise ArtifactError(
                f"{source}: init_noise_sigma must be a number, got {d['init_noise_sigma']!r}"
            ) from err
        if not math.isfinite(sigma) or sigma <= 0.0:
            raise ArtifactError(f"{source}: init_noise_sigma must be finite and > 0, got {sigma}")
        for key in ("scheduler", "name", "prediction_type"):
            if not isinstance(d[key], str):
                raise ArtifactError(f"{source}: {key!r} must be a string, got {d[key]!r}")
        config = d.get("config", {})
        if not isinstance(config, Mapping):
            raise ArtifactError(f"{source}: 'config' must be a JSON object, got {type(config).__name__}")
        calls = d.get("model_calls", n)
        # PLMS runs one extra call (diffusers repeats a timestep); nothing runs fewer than its steps.
        if isinstance(calls, bool) or not isinstance(calls, (int, np.integer)) or not n <= calls <= n + 1:
            raise ArtifactError(f"{source}: model_calls must be num_inference_steps or one more, got {calls!r}")
        calls = int(calls)
        arrays = {key: _frozen(_per_step(d, key, calls, source, n)) for key in PER_STEP_KEYS}
        # There is no step -1: history terms at step 0 would multiply values that do not exist.
        for key in ("coef_prev_sample", "coef_prev_model"):
            if arrays[key][0] != 0.0:
                raise ArtifactError(f"{source}: {key}[0] is {arrays[key][0]}, must be 0 (no history at step 0)")
        return cls(
            scheduler=d["scheduler"],
            name=d["name"],
            prediction_type=d["prediction_type"],
            num_inference_steps=n,
            init_noise_sigma=sigma,
            config=dict(config),
            coef_older_models=_frozen(_older_models(d, calls, source)),
            **arrays,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable form `from_dict` reads back."""
        return {
            "format": TABLE_FORMAT,
            "scheduler": self.scheduler,
            "name": self.name,
            "prediction_type": self.prediction_type,
            "num_inference_steps": self.num_inference_steps,
            "init_noise_sigma": self.init_noise_sigma,
            **{key: getattr(self, key).tolist() for key in PER_STEP_KEYS},
            # Only where they exist, so every other sampler's table reads as before.
            **({"model_calls": self.num_calls} if self.num_calls != self.num_inference_steps else {}),
            **({"coef_older_models": self.coef_older_models.tolist()} if self.history_depth else {}),
            "config": dict(self.config),
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SchedulerTable):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable-looking contents (arrays, config dict): not hashable

    @property
    def num_steps(self) -> int:
        """Number of inference steps (what a request asks for; see `num_calls`)."""
        return self.num_inference_steps

    @property
    def num_calls(self) -> int:
        """Model calls per generation: one per table row (PLMS: `num_steps` + 1, else `num_steps`)."""
        return len(self.timesteps)

    @property
    def history_depth(self) -> int:
        """How many model outputs older than m_{i-1} the update reads (3 for PLMS, else 0)."""
        return self.coef_older_models.shape[1]

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_calls:
            raise RuntimeInputError(
                f"step index must be an integer in [0, {self.num_calls}) for this "
                f"{self.num_inference_steps}-step {self.name} table, got {i!r}"
            )
        return int(i)

    def initial_latents(self, noise: np.ndarray) -> np.ndarray:
        """``init_noise_sigma * noise``, in the noise's float dtype."""
        noise = np.asarray(noise)
        dtype = np.result_type(noise.dtype, np.float32)
        return noise.astype(dtype, copy=False) * dtype.type(self.init_noise_sigma)

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        """The UNet input at step `i`: ``input_scale[i] * x`` (float32 stays float32)."""
        i = self._check_index(i)
        x = np.asarray(x)
        dtype = np.result_type(x.dtype, np.float32)
        return x.astype(dtype, copy=False) * dtype.type(self.input_scale[i])

    def coefficients(self, i: int) -> tuple[float, float, float, float]:
        """``(coef_sample, coef_model, coef_prev_sample, coef_prev_model)`` of step `i`."""
        i = self._check_index(i)
        return tuple(float(getattr(self, key)[i]) for key in COEFFICIENT_KEYS)

    def older_coefficients(self, i: int) -> tuple[float, ...]:
        """Weights of ``m_{i-2}, m_{i-3}, ...`` at step `i` (empty but for PLMS)."""
        i = self._check_index(i)
        if not self.history_depth:
            return ()
        return tuple(float(c) for c in self.coef_older_models[i])

    def step(
        self,
        model_output: np.ndarray,
        i: int,
        sample: np.ndarray,
        prev_sample: np.ndarray | None = None,
        prev_model: np.ndarray | None = None,
        older_models: Sequence[np.ndarray | None] = (),
    ) -> np.ndarray:
        """The sample after step `i`, from the guided model output and its history.

        `prev_sample` / `prev_model` are ``x_{i-1}`` / ``m_{i-1}``; ``None`` means zero (step 0).
        `older_models` are ``m_{i-2}, m_{i-3}, ...`` (newest first; missing or ``None`` is zero),
        read only where the table has older terms (PLMS).
        The result has the float dtype of `sample` and `model_output` (float32 in, float32 out).

        Raises:
            RuntimeInputError: `i` out of range, or the arrays' shapes differ.
        """
        c_sample, c_model, c_prev_sample, c_prev_model = self.coefficients(i)
        x = np.asarray(sample)
        m = np.asarray(model_output)
        dtype = np.result_type(x.dtype, m.dtype, np.float32)
        terms = [(x, c_sample, "sample"), (m, c_model, "model_output")]
        if prev_sample is not None:
            terms.append((np.asarray(prev_sample), c_prev_sample, "prev_sample"))
        if prev_model is not None:
            terms.append((np.asarray(prev_model), c_prev_model, "prev_model"))
        for k, (value, coef) in enumerate(zip(older_models, self.older_coefficients(i))):
            if value is not None:
                terms.append((np.asarray(value), coef, f"older_models[{k}]"))
        for value, _, label in terms:
            if value.shape != x.shape:
                raise RuntimeInputError(
                    f"{label} has shape {value.shape}, sample has shape {x.shape}; they must match"
                )
        out = np.zeros(x.shape, dtype=dtype)
        for value, coef, _ in terms:
            if coef != 0.0:
                # dtype.type(coef): a float64 scalar would silently promote float32 arrays.
                out += value.astype(dtype, copy=False) * dtype.type(coef)
        return out
