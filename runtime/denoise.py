"""The denoising loop with classifier-free guidance, on the host or with latents on the GPU.

Per model call ``i`` of an exported scheduler table (`aptp.runtime.scheduler.SchedulerTable`)::

    model input  = input_scale[i] * [x; x]                     (kernels.cfg_input)
    [u; c]       = unet([x; x] scaled, t_i, [uncond; cond] text states)
    x            = guided_step(x, u, c, guidance_scale, history, coefficients(i))
    x           += sum_k older_coefficients(i)[k] * m_{i-2-k}  (PLMS only)

which is diffusers' ``StableDiffusionPipeline`` loop (concatenated batch, ``scale_model_input``,
``uncond + s * (cond - uncond)``, ``scheduler.step``) with the step read off as coefficients.
A guidance scale of 1 or less runs the conditional half only, as diffusers does.

`denoise` runs on numpy arrays and `aptp.runtime.kernels`' CPU functions (C++ or the numpy
twins). `denoise_on_device` keeps the latents, the history and the UNet I/O in GPU buffers
for the whole loop and runs the kernels' CUDA entry points on them; only the initial latents,
the text states and one timestep vector per step cross to the device, and the final latents
come back once.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from . import kernels
from .engine import DeviceTensor, Engine, TensorRTEngine
from .scheduler import SchedulerTable

__all__ = ["StepCallback", "denoise", "denoise_on_device", "uses_guidance"]

#: ``callback(step, total)`` after each sampling step (``step`` counts from 1). Raising from it
#: stops the loop with that exception (how an interrupt ends a request).
StepCallback = Callable[[int, int], None]

logger = logging.getLogger(__name__)


def uses_guidance(guidance_scale: float) -> bool:
    """Whether the loop runs the unconditional half (diffusers: ``guidance_scale > 1``)."""
    return guidance_scale > 1.0


def _timesteps(table: SchedulerTable, i: int, rows: int) -> np.ndarray:
    # One value per row: the exported UNet was validated with as many timesteps as samples.
    return np.full((rows,), table.timesteps[i], dtype=np.float32)


def denoise(unet: Engine, latents: np.ndarray, text_states: np.ndarray, table: SchedulerTable,
            guidance_scale: float, callback: StepCallback | None = None,
            blend: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Run the whole sampling loop on the host; returns the final latents (float32, new array).

    Args:
        unet: a loaded or loadable UNet engine (numpy in, numpy out).
        latents: initial latents ``(B, C, h, w)`` (already times ``init_noise_sigma``).
        text_states: ``(2B, L, D)`` as ``[uncond; cond]`` when `uses_guidance`, else ``(B, L, D)``.
        table: the sampler.
        guidance_scale: classifier-free guidance scale.
        callback: ``callback(step, total)`` after each step (None: nothing is called).
        blend: ``blend(i, x)`` after model call ``i``'s step, updating ``x`` in place
            (inpainting puts the known region back: `aptp.runtime.img2img`).
    """
    x = np.array(latents, dtype=np.float32, order="C", copy=True)
    batch = x.shape[0]
    guided = uses_guidance(guidance_scale)
    rows = 2 * batch if guided else batch
    if text_states.shape[0] != rows:
        raise ValueError(f"text_states has {text_states.shape[0]} rows, the loop needs {rows} for {batch} samples")
    prev_x, prev_m = np.zeros_like(x), np.zeros_like(x)
    older: list[np.ndarray] = []  # m_{i-2}, m_{i-3}, ... newest first (PLMS only)
    doubled = np.empty((2 * batch, *x.shape[1:]), dtype=np.float32)
    for i in range(table.num_calls):
        kernels.cfg_input(x, float(table.input_scale[i]), out=doubled)
        sample = doubled if guided else doubled[:batch]
        out = unet.infer({"sample": sample, "timestep": _timesteps(table, i, rows),
                          "encoder_hidden_states": text_states})["out_sample"]
        out = np.ascontiguousarray(out, dtype=np.float32)
        if out.shape != (rows, *x.shape[1:]):
            raise ValueError(f"UNet {unet.path} returned out_sample of shape {out.shape}, expected "
                             f"{(rows, *x.shape[1:])}")
        if guided:
            m_uncond, m_cond, scale = out[:batch], out[batch:], guidance_scale
        else:  # scale 0 with both halves the conditional output: m = cond exactly
            m_uncond = m_cond = out
            scale = 0.0
        prev_m_before = prev_m.copy() if table.history_depth else None
        kernels.guided_step(x, m_uncond, m_cond, scale, prev_x, prev_m, table.coefficients(i))
        if table.history_depth:
            _add_older(x, older, table.older_coefficients(i))
            older = [prev_m_before, *older][: table.history_depth]
        if blend is not None:
            blend(i, x)
        if callback is not None:
            callback(i + 1, table.num_calls)  # UNet calls: PLMS makes one more than its steps
    return x


def _add_older(x: np.ndarray, older: list[np.ndarray], coefs: tuple[float, ...]) -> None:
    """``x += sum_k coefs[k] * older[k]`` in float32 (terms that do not exist yet weigh 0)."""
    for value, coef in zip(older, coefs):
        if coef != 0.0:
            x += np.float32(coef) * value


# ---- GPU: latents stay on the device ------------------------------------------------------

_cudart: Any = None


def _synchronize() -> None:
    """Wait for all work queued on the GPU (kernels on the default stream included).

    onnxruntime runs on its own stream and does not see work queued on the default stream, so
    the loop waits for the kernels before handing their output to the next run. The CUDA
    runtime library onnxruntime's CUDA provider already loaded is reused through ctypes.
    """
    global _cudart
    if _cudart is None:
        for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"):
            try:
                _cudart = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            _cudart = False
            logger.warning("libcudart not found through ctypes; synchronising with a 4-byte device copy instead")
    if _cudart:
        status = _cudart.cudaDeviceSynchronize()
        if status != 0:
            raise RuntimeError(f"cudaDeviceSynchronize failed with CUDA error {status}")
    else:
        if "fence" not in _FENCE:
            _FENCE["fence"] = DeviceTensor((1,), np.float32)
        _FENCE["fence"].download()


_FENCE: dict[str, DeviceTensor] = {}


class _DeviceHistory:
    """PLMS's older model outputs in GPU buffers, moved with the fused step kernel alone.

    ``guided_step_cuda`` with coefficients (0, 1, 0, 0) copies a buffer and (1, c, 0, 0) adds
    ``c`` times one (guidance 0 makes its model output that buffer); two scratch buffers take
    the history it writes. ``0 * x`` is NaN for uninitialised memory, so everything starts at 0.
    """

    def __init__(self, depth: int, shape: tuple[int, ...], dtype: Any, device_id: int):
        zeros = np.zeros(shape, dtype=dtype)
        self.pending = DeviceTensor(shape, dtype, device_id)  # m_{i-1} of the step now running
        self.buffers = [DeviceTensor(shape, dtype, device_id) for _ in range(depth)]  # m_{i-2}, ...
        self.scratch = (DeviceTensor(shape, dtype, device_id), DeviceTensor(shape, dtype, device_id))
        for buffer in (self.pending, *self.buffers, *self.scratch):
            buffer.upload(zeros)

    def __bool__(self) -> bool:
        return bool(self.buffers)

    def keep(self, prev_m: DeviceTensor, stream: int) -> None:
        """Shift the history by one step and hold m_{i-1} (`prev_m`) until the step is done."""
        # The oldest buffer becomes the newest: rotate, then overwrite it with the pending m_{i-2}.
        self.buffers = [self.buffers[-1], *self.buffers[:-1]]
        self._copy(self.pending, self.buffers[0], stream)
        self._copy(prev_m, self.pending, stream)

    def add_to(self, x: DeviceTensor, coefs: tuple[float, ...], stream: int) -> None:
        for value, coef in zip(self.buffers, coefs):
            if coef != 0.0:
                kernels.guided_step_cuda(x, value, value, 0.0, *self.scratch, (1.0, coef, 0.0, 0.0), stream)

    def _copy(self, src: DeviceTensor, dst: DeviceTensor, stream: int) -> None:
        kernels.guided_step_cuda(dst, src, src, 0.0, *self.scratch, (0.0, 1.0, 0.0, 0.0), stream)


def _device_history(table: SchedulerTable, shape: tuple[int, ...], dtype: Any, device_id: int,
                    prev_m: DeviceTensor) -> _DeviceHistory | None:
    """Buffers for the table's older model terms (None unless PLMS); `prev_m` is zeroed too."""
    if not table.history_depth:
        return None
    prev_m.upload(np.zeros(shape, dtype=dtype))  # it is copied into the history before it is read
    return _DeviceHistory(table.history_depth, shape, dtype, device_id)


def denoise_on_device(unet: Engine, latents: np.ndarray, text_states: np.ndarray, table: SchedulerTable,
                      guidance_scale: float, stream: int = 0, callback: StepCallback | None = None) -> np.ndarray:
    """`denoise` with the latents, history and UNet I/O in GPU buffers from start to end.

    `unet` is a CUDA engine (`OnnxRuntimeEngine` on ``"cuda"`` or `TensorRTEngine`); its
    buffers are (re)allocated for this batch. The kernels run on `stream` (default 0, where a
    TensorRT engine runs too); the loop synchronises before each onnxruntime call. Returns the
    final latents on the host as float32. `callback` as in `denoise` (called once the step is
    queued, without waiting for the GPU: a progress report, not a timing).
    """
    if unet.device != "cuda":
        raise ValueError(f"denoise_on_device needs a CUDA engine, got {unet}")
    batch = latents.shape[0]
    guided = uses_guidance(guidance_scale)
    rows = 2 * batch if guided else batch
    dtype = unet.input_dtype("sample")
    shape = tuple(latents.shape[1:])
    unet.allocate_buffers({
        "sample": (rows, *shape),
        "timestep": (rows,),
        "encoder_hidden_states": tuple(text_states.shape),
        "out_sample": (rows, *shape),
    })
    text = unet.buffers["encoder_hidden_states"]
    text.upload(text_states)
    # cfg_input always writes [x; x]; the unguided loop feeds the first half only.
    doubled = DeviceTensor((2 * batch, *shape), dtype, unet.device_id)
    sample = doubled if guided else doubled.rows(0, batch)
    x = DeviceTensor((batch, *shape), dtype, unet.device_id)
    x.upload(latents)
    # History needs no initialisation: coefficient 0 at step 0 drops the term unread.
    prev_x = DeviceTensor((batch, *shape), dtype, unet.device_id)
    prev_m = DeviceTensor((batch, *shape), dtype, unet.device_id)
    older = _device_history(table, (batch, *shape), dtype, unet.device_id, prev_m)
    native_stream = isinstance(unet, TensorRTEngine)  # it runs on `stream` itself, after the kernels
    for i in range(table.num_calls):
        kernels.cfg_input_cuda(x, float(table.input_scale[i]), doubled, stream)
        if not native_stream:
            _synchronize()
        out = unet.infer({"sample": sample, "timestep": _timesteps(table, i, rows), "encoder_hidden_states": text},
                         stream)["out_sample"]
        if guided:
            m_uncond, m_cond, scale = out.rows(0, batch), out.rows(batch, rows), guidance_scale
        else:
            m_uncond = m_cond = out
            scale = 0.0
        if older:
            older.keep(prev_m, stream)  # m_{i-1}, before the step overwrites prev_m with m_i
        kernels.guided_step_cuda(x, m_uncond, m_cond, scale, prev_x, prev_m, table.coefficients(i), stream)
        if older:
            older.add_to(x, table.older_coefficients(i), stream)
        if callback is not None:
            callback(i + 1, table.num_calls)
    _synchronize()
    return np.asarray(x.download(), dtype=np.float32)
