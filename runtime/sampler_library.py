"""Per-request samplers: which samplers and step counts an export can run (`SamplerLibrary`), the
tables built for them on demand and cached, and the names users type for them (`canonical_sampler`).

Apart from `aptp.runtime.scheduler` (one table and its update) and `aptp.runtime.samplers` (how a
table is built), so that neither of those needs the other's caller.

numpy only: the runtime never imports torch or diffusers.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from aptp.errors import ArtifactError, RuntimeInputError, shown

from .samplers import build_table
from .scheduler import SchedulerTable

__all__ = ["CACHE_SIZE", "SAMPLERS_FORMAT", "SamplerLibrary", "canonical_sampler"]

SAMPLERS_FORMAT = 1
#: Tables kept per library; a (sampler, steps) pair is built once and reused until evicted.
CACHE_SIZE = 64


class SamplerLibrary:
    """The samplers and step counts an export can run, and a cache of their tables.

    Built from the manifest's ``samplers`` section (`aptp.export.scheduler_tables.sampler_specs`)
    plus the export's stored table, which stays the default and is used as is for its own
    (sampler, steps). An export written before per-request samplers has no such section: it
    runs its stored table only, and other requests are refused with a message that says so.
    """

    def __init__(self, default: SchedulerTable, specs: Mapping[str, Mapping[str, Any]] | None = None, *,
                 min_steps: int = 1, max_steps: int = 150, unavailable: Mapping[str, str] | None = None):
        self.default = default
        self.specs = dict(specs or {})
        self.min_steps = int(min_steps)
        self.max_steps = int(max_steps)
        self.unavailable = dict(unavailable or {})
        self._cache: dict[tuple[str, int], SchedulerTable] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_manifest(cls, section: Any, default: SchedulerTable, *, source: str = "samplers") -> SamplerLibrary:
        """Validate the manifest's ``samplers`` section (``None`` for an older export).

        Raises:
            ArtifactError: another format, a malformed range, or a sampler entry whose config
                or schedule the table builder refuses.
        """
        if section is None:
            return cls(default)
        if not isinstance(section, Mapping) or section.get("format") != SAMPLERS_FORMAT:
            got = section.get("format") if isinstance(section, Mapping) else type(section).__name__
            raise ArtifactError(f"{source}: format {got!r}, this runtime reads format {SAMPLERS_FORMAT}; "
                                "re-export with a matching aptp version")
        low, high = section.get("min_steps"), section.get("max_steps")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or not 1 <= low <= high:
            raise ArtifactError(f"{source}: min_steps/max_steps must be integers with 1 <= min <= max, "
                                f"got {low!r}/{high!r}")
        available = section.get("available")
        if not isinstance(available, Mapping):
            raise ArtifactError(f"{source}: 'available' must be a JSON object")
        specs = {}
        for name, spec in available.items():
            if not isinstance(spec, Mapping) or "config" not in spec or "alphas_cumprod" not in spec:
                raise ArtifactError(f"{source}.available.{name}: needs 'config' and 'alphas_cumprod'")
            try:
                build_table(name, spec["config"], spec["alphas_cumprod"], 1)  # validates config and schedule
            except (ArtifactError, ValueError, TypeError) as err:
                raise ArtifactError(f"{source}.available.{name}: {err}") from err
            if spec["config"].get("prediction_type") != default.prediction_type:
                raise ArtifactError(f"{source}.available.{name}: prediction type "
                                    f"{spec['config'].get('prediction_type')!r} differs from the stored table's "
                                    f"{default.prediction_type!r}")
            specs[name] = spec
        unavailable = section.get("unavailable") or {}
        if not isinstance(unavailable, Mapping):
            raise ArtifactError(f"{source}: 'unavailable' must be a JSON object")
        return cls(default, specs, min_steps=low, max_steps=high,
                   unavailable={str(k): str(v) for k, v in unavailable.items()})

    @property
    def names(self) -> list[str]:
        """Samplers a request may name (the stored table's always among them)."""
        return sorted({*self.specs, self.default.name})

    def check(self, name: str, steps: int) -> tuple[str, int]:
        """Canonical ``(sampler, steps)`` of a request, checked against what this export can run.

        Raises:
            RuntimeInputError: an unknown or unavailable sampler, a step count that is not an
                integer, or outside the export's range (or, for an older export, not its table's).
        """
        if not isinstance(name, str):
            raise RuntimeInputError(f"scheduler must be a sampler name such as 'euler', got {shown(name)}")
        key = canonical_sampler(name)
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise RuntimeInputError(f"num_inference_steps must be a positive integer, got {shown(steps)}")
        steps = int(steps)
        if key == self.default.name and steps == self.default.num_steps:
            return key, steps
        if not self.specs:
            raise RuntimeInputError(
                f"this export stores only its {self.default.num_steps}-step {self.default.name} table (it was made "
                f"before per-request samplers); {steps}-step {key} needs a re-export with this aptp version, or "
                f"pass scheduler={self.default.name!r}, num_inference_steps={self.default.num_steps}")
        if key not in self.specs:
            if key in self.unavailable:
                raise RuntimeInputError(f"sampler {key!r} is not available in this export: {self.unavailable[key]}")
            raise RuntimeInputError(f"unknown sampler {shown(name)}; this export runs: {', '.join(self.names)}")
        if not self.min_steps <= steps <= self.max_steps:
            raise RuntimeInputError(f"num_inference_steps must be between {self.min_steps} and {self.max_steps}, "
                                    f"got {steps}")
        return key, steps

    def table(self, name: str, steps: int) -> SchedulerTable:
        """The table of `name` at `steps` (checked, then built once and cached)."""
        key, steps = self.check(name, steps)
        if key == self.default.name and steps == self.default.num_steps:
            return self.default
        with self._lock:
            table = self._cache.get((key, steps))
            if table is None:
                spec = self.specs[key]
                table = build_table(key, spec["config"], spec["alphas_cumprod"], steps)
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.pop(next(iter(self._cache)))  # oldest first
                self._cache[(key, steps)] = table
            return table

    def with_default(self, table: SchedulerTable) -> SamplerLibrary:
        """The same library with another default table (shares nothing mutable)."""
        return SamplerLibrary(table, self.specs, min_steps=self.min_steps, max_steps=self.max_steps,
                              unavailable=self.unavailable)


# Spellings users type for the samplers (the CLI's and diffusers' names; PLMS is PNDM without PRK).
_SAMPLER_ALIASES = {
    "plms": "pndm", "pndm_scheduler": "pndm", "pndmscheduler": "pndm",
    "ddim_scheduler": "ddim", "ddimscheduler": "ddim",
    "euler_discrete": "euler", "eulerdiscretescheduler": "euler",
    "dpm++_2m": "dpmpp_2m", "dpmpp2m": "dpmpp_2m", "dpm_solver_pp_2m": "dpmpp_2m", "dpmsolver++": "dpmpp_2m",
    "dpm_solver++": "dpmpp_2m", "dpmsolvermultistepscheduler": "dpmpp_2m",
}


def canonical_sampler(name: str) -> str:
    """``"DPM++-2M"`` -> ``"dpmpp_2m"``: lower case, dashes as underscores, aliases resolved."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return _SAMPLER_ALIASES.get(key, key)
