"""Micro-benchmark of the runtime kernels: numpy twins against aptp._C, side by side.

Both run in one process on the same arrays, at Stable-Diffusion-like latent sizes
(default B=8 latents of 4x64x64 float32), so the ratio is what the runtime gains per call.
No assertions: it prints a table.

    python -m aptp.benchmarks.latency.kernels [--batch 8] [--shape 4 64 64] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from aptp.runtime import kernels as K

# A contraction (|coefficients on x| sum below 1), so repeated in-place steps stay finite.
MULTISTEP_COEFS = (0.9, 0.08, 0.05, -0.03)
FIRST_STEP_COEFS = (0.95, 0.1, 0.0, 0.0)


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    """Median wall time of one call, in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def cases(batch: int, shape: tuple[int, ...], seed: int = 0) -> dict[str, tuple[Callable, Callable]]:
    """Per kernel: (numpy call, C++ call), each a closure over its own copy of the inputs."""
    rng = np.random.default_rng(seed)
    full = (batch,) + shape

    def arrays() -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        return {k: r.standard_normal(full).astype(np.float32)
                for k in ("x", "m_uncond", "m_cond", "prev_x", "prev_m")}

    def step(fn, coefs):
        a = arrays()
        return lambda: fn(a["x"], a["m_uncond"], a["m_cond"], 7.5, a["prev_x"], a["prev_m"], coefs)

    latents = rng.standard_normal(full).astype(np.float32)
    index = rng.permutation(batch)
    gathered = np.empty_like(latents)
    scattered = np.empty_like(latents)
    guided_in = np.empty((2 * batch,) + shape, np.float32)
    codes = rng.integers(0, 8, size=batch)
    cpp = K._C
    return {
        "guided_step (multistep)": (step(K.guided_step_numpy, MULTISTEP_COEFS),
                                    step(cpp.guided_step, MULTISTEP_COEFS) if cpp else None),
        "guided_step (first step)": (step(K.guided_step_numpy, FIRST_STEP_COEFS),
                                     step(cpp.guided_step, FIRST_STEP_COEFS) if cpp else None),
        "gather_rows": (lambda: K.gather_rows_numpy(latents, index, gathered),
                        (lambda: cpp.gather_rows(latents, index, gathered)) if cpp else None),
        "scatter_rows": (lambda: K.scatter_rows_numpy(latents, index, scattered),
                         (lambda: cpp.scatter_rows(latents, index, scattered)) if cpp else None),
        "cfg_input": (lambda: K.cfg_input_numpy(latents, 0.5, guided_in),
                      (lambda: cpp.cfg_input(latents, 0.5, guided_in)) if cpp else None),
        "group_by_code": (lambda: K.group_by_code_numpy(codes, 8),
                          (lambda: cpp.group_by_code(codes, 8)) if cpp else None),
    }


def run(batch: int, shape: tuple[int, ...], repeats: int) -> list[tuple[str, float, float | None]]:
    """(kernel, numpy seconds, C++ seconds or None) per kernel, measured alternately."""
    rows = []
    for name, (numpy_fn, cpp_fn) in cases(batch, shape).items():
        numpy_s = time_call(numpy_fn, repeats)
        cpp_s = time_call(cpp_fn, repeats) if cpp_fn else None
        rows.append((name, numpy_s, cpp_s))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 64, 64])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    print(f"latents: {args.batch} x {'x'.join(map(str, shape))} float32; backend: {K.backend()}; "
          f"median of {args.repeats} calls")
    if K._C is None:
        print(f"aptp._C is not built ({K._C_IMPORT_ERROR}): numpy times only")
    print(f"{'kernel':<26}{'numpy (us)':>12}{'C++ (us)':>12}{'numpy / C++':>13}")
    for name, numpy_s, cpp_s in run(args.batch, shape, args.repeats):
        cpp_col = f"{cpp_s * 1e6:12.1f}{numpy_s / cpp_s:12.2f}x" if cpp_s else f"{'-':>12}{'-':>13}"
        print(f"{name:<26}{numpy_s * 1e6:12.1f}{cpp_col}")


if __name__ == "__main__":
    main()
