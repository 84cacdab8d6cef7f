"""Progress and interrupt of the HTTP jobs, for ``/sdapi/v1/progress`` and ``/sdapi/v1/interrupt``.

A job is one txt2img request: ``n`` images, each a request to the generation server. Each
image reports its sampling steps through the runtime's progress callback
(`aptp.runtime.pipeline.ProgressCallback`); the job's progress is the mean of its images'
step fractions, and its ETA is extrapolated from the time spent so far. A1111 runs one job at
a time; aptp batches several, so "the current job" is the oldest one still running.

An interrupt marks every running job: the next sampling step of each of its images raises
`GenerationInterrupted`, which fails that image only (the server's isolation re-runs the other
requests of its batch without it). Images already finished are kept. Where no step callback
reaches the sampling loop (Ray mode), progress counts finished images and an interrupt only
drops the images that have not been sent yet.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from aptp.errors import AptpError

from .pipeline import ProgressCallback

__all__ = ["GenerationInterrupted", "Job", "ProgressBoard"]


class GenerationInterrupted(AptpError):
    """The job of this image was interrupted (``POST /sdapi/v1/interrupt``)."""


class Job:
    """One running txt2img job: per image, the fraction of its steps done."""

    def __init__(self, number: int, images: int, steps: int):
        self.number = number
        self.images = images
        self.steps = steps
        self.started = time.monotonic()
        self.interrupted = False
        self.expert: Any = None
        self.step = 0
        self._fractions = [0.0] * images
        self._lock = threading.Lock()

    def callback(self, image: int) -> ProgressCallback:
        """The step callback of image `image` (called from the server's worker thread)."""
        def report(step: int, total: int, expert: Any) -> None:
            if self.interrupted:
                raise GenerationInterrupted("interrupted by POST /sdapi/v1/interrupt")
            with self._lock:
                self._fractions[image] = step / max(total, 1)
                self.expert, self.step, self.steps = expert, step, total
        return report

    def image_done(self, image: int) -> None:
        with self._lock:
            self._fractions[image] = 1.0

    def progress(self) -> float:
        with self._lock:
            return sum(self._fractions) / max(self.images, 1)


class ProgressBoard:
    """The jobs running now (thread-safe)."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, images: int, steps: int) -> Job:
        with self._lock:
            job = Job(next(self._numbers), images, steps)
            self._jobs[job.number] = job
            return job

    def finish(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.number, None)

    def interrupt(self) -> int:
        """Mark every running job interrupted; returns how many there were."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.interrupted = True
        return len(jobs)

    def snapshot(self) -> dict[str, Any]:
        """A1111's progress response for the oldest running job (zeros when idle), with
        aptp's fields (expert, jobs running) under ``"aptp"``."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.number)
        if not jobs:
            return {"progress": 0.0, "eta_relative": 0.0, "state": _state(None, 0), "current_image": None,
                    "textinfo": None, "aptp": {"jobs": 0, "expert": None}}
        job = jobs[0]
        progress = job.progress()
        elapsed = time.monotonic() - job.started
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        return {"progress": round(progress, 4), "eta_relative": round(max(eta, 0.0), 3), "state": _state(job, len(jobs)),
                "current_image": None, "textinfo": None, "aptp": {"jobs": len(jobs), "expert": job.expert}}


def _state(job: Job | None, count: int) -> dict[str, Any]:
    return {"skipped": False, "interrupted": bool(job and job.interrupted), "job": f"job-{job.number}" if job else "",
            "job_count": count, "job_timestamp": "0", "job_no": 0,
            "sampling_step": job.step if job else 0, "sampling_steps": job.steps if job else 0}
