"""Which GPU architectures the CUDA kernels are compiled for (used by build.py).

Kept apart from build.py, which needs pybind11 at import, so that the choice can be tested
from an environment without the build requirements.

The default covers the data-centre and desktop GPUs from Turing (7.5) on and the two Jetson
generations before Thor: Xavier (7.2, Volta) and Orin (8.7, Ampere). nvcc drops old architectures over
time (CUDA 13 no longer compiles for anything below 7.5, so Xavier's 7.2 is left out there with
a message), and only what the nvcc at hand lists with ``--list-gpu-arch`` is requested.
"""

from __future__ import annotations

import re

# sm_72: Jetson AGX Xavier / Xavier NX; sm_87: Jetson AGX Orin / Orin NX / Orin Nano.
# sm_110: Jetson Thor (CUDA 13 numbering; CUDA 12.9 called it sm_101).
DEFAULT_ARCHS = ("72", "75", "80", "86", "87", "89", "90", "100", "110", "120")
# Used when nvcc cannot say what it supports (every CUDA from 11.8 to 13 compiles these).
FALLBACK_ARCHS = ("75", "80", "86", "87", "90")


def parse_archs(text: str) -> list[str]:
    """``"87;72"``, ``"8.7, 7.2"``, ``"sm_87 compute_72"`` -> ``["72", "87"]`` (sorted, unique)."""
    archs = set()
    for item in text.replace(",", " ").replace(";", " ").split():
        match = re.fullmatch(r"(?:sm_|compute_)?(\d{1,2})\.?(\d)", item.lower())
        if match is None:
            raise ValueError(f"APTP_CUDA_ARCHS entry {item!r} is not a compute capability "
                             "(write 87, 8.7 or sm_87; separate entries with ';')")
        archs.add(match[1] + match[2])
    if not archs:
        raise ValueError(f"APTP_CUDA_ARCHS={text!r} names no architecture")
    return sorted(archs, key=int)


def supported_archs(list_gpu_arch_output: str) -> set[str]:
    """The numbers in ``nvcc --list-gpu-arch`` output (``compute_75`` ... lines)."""
    return {word.removeprefix("compute_") for word in list_gpu_arch_output.split()
            if word.startswith("compute_") and word.removeprefix("compute_").isdigit()}


def choose_archs(wanted: str | None, supported: set[str] | None) -> tuple[list[str], list[str]]:
    """The architectures to compile and those left out (not supported by this nvcc).

    `wanted` is APTP_CUDA_ARCHS (None or empty: the default list); `supported` is what nvcc
    lists (None: unknown). Explicitly wanted architectures are kept even when nvcc does not
    list them, so that its own error names the problem; defaults are filtered.
    """
    if wanted and wanted.strip():
        archs = parse_archs(wanted)
        left_out = [a for a in archs if supported is not None and a not in supported]
        return archs, left_out
    if supported is None:
        return list(FALLBACK_ARCHS), []
    archs = [a for a in DEFAULT_ARCHS if a in supported]
    left_out = [a for a in DEFAULT_ARCHS if a not in supported]
    return (archs or list(FALLBACK_ARCHS)), left_out


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc flags: a cubin per architecture, plus PTX of the newest one so that the driver can
    compile for GPUs newer than the list."""
    newest = max(archs, key=int)
    return [*(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs),
            f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def describe(archs: list[str], left_out: list[str], explicit: bool) -> str:
    """One line for the build log naming what is compiled and what is not."""
    newest = max(archs, key=int)
    line = f"CUDA architectures: {' '.join('sm_' + a for a in archs)} + PTX compute_{newest}"
    if left_out:
        names = ", ".join("sm_" + a for a in left_out)
        line += (f"; nvcc does not list {names}, expect it to fail" if explicit
                 else f"; left out, this nvcc does not support {names}")
        if any(int(a) < 75 for a in left_out):
            line += " (CUDA 13 dropped compute capabilities below 7.5, Xavier's 7.2 among them: use CUDA 12)"
    return line
