"""The runtime's hot loops: group a batch by expert code, gather/scatter latent rows, and
the fused classifier-free guidance + scheduler update.

CPU functions take and return numpy arrays and run the C++ kernels of ``aptp._C``. Where
that module is missing they run the numpy twins (``*_numpy``) instead and log one warning;
the twins are plain numpy expressions, written apart from the C++ code, and serve as the
test oracle too.

CUDA functions (``*_cuda``) keep the latents on the GPU between steps. They take arrays
that expose ``__cuda_array_interface__`` (CuPy arrays, CUDA torch tensors) or raw device
pointers wrapped as ``DeviceArray(ptr, shape, dtype)`` (e.g. onnxruntime IO binding), plus a
stream (an int handle, a CuPy/torch stream object, or 0 for the default stream). They
enqueue work on that stream and return at once; ordering against the producer of the
inputs is the caller's job, as with any raw pointer. Grouping stays on the host: it works on
a handful of ints.

Contract of ``guided_step`` (the scheduler coefficient tables of the export are written for
it)::

    m      = m_uncond + guidance_scale * (m_cond - m_uncond)
    x_next = coefs[0]*x + coefs[1]*m + coefs[2]*prev_x + coefs[3]*prev_m
    prev_x <- x;  prev_m <- m;  x <- x_next          (in place)

A coefficient that is exactly 0 drops its term without reading its buffer, so the history
buffers may hold anything (even NaN) before the first multistep update.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "DeviceArray",
    "backend",
    "cfg_input",
    "cfg_input_cuda",
    "cfg_input_numpy",
    "cuda_available",
    "cuda_status",
    "gather_rows",
    "gather_rows_cuda",
    "gather_rows_numpy",
    "group_by_code",
    "group_by_code_numpy",
    "guided_step",
    "guided_step_cuda",
    "guided_step_numpy",
    "scatter_rows",
    "scatter_rows_cuda",
    "scatter_rows_numpy",
]

logger = logging.getLogger(__name__)

Coefs = Sequence[float] | np.ndarray


def _try_import(name: str) -> tuple[ModuleType | None, ImportError | None]:
    try:
        return importlib.import_module(name), None
    except ImportError as err:
        return None, err


# Module-level on purpose: tests (and a user who wants the numpy path) may set _C to None.
_C, _C_IMPORT_ERROR = _try_import("aptp._C")
_C_cuda, _C_CUDA_IMPORT_ERROR = _try_import("aptp._C_cuda")
_warned_fallback = False

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def _cpu_ext() -> ModuleType | None:
    """aptp._C, or None after warning once that the numpy twins run instead."""
    global _warned_fallback
    if _C is None and not _warned_fallback:
        _warned_fallback = True
        logger.warning(
            "aptp._C is not available (%s); running the numpy kernels, which are slower. "
            "Build it with `pip install -e .` (needs a C++17 compiler).",
            _C_IMPORT_ERROR or "disabled",
        )
    return _C


def backend() -> str:
    """``"cpp"`` when the CPU functions run aptp._C, ``"numpy"`` when they fall back."""
    return "cpp" if _C is not None else "numpy"


# ---- numpy twins: the fallback and the oracle ------------------------------------------
# Their checks raise what the C++ boundary raises (TypeError, ValueError, IndexError), so
# both backends fail alike. float16 is accepted everywhere here (the CUDA oracle needs it).


def _float_array(a: Any, name: str, write: bool = False, batched: bool = True) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {a.dtype}; this kernel takes float32 or float16: "
                        f"convert it with .astype(np.float32)")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} is not C-contiguous (shape {a.shape}): pass "
                         f"np.ascontiguousarray({name}) and use the result")
    if write and not a.flags.writeable:
        raise ValueError(f"{name} is read-only but this kernel writes it in place")
    if batched and a.ndim < 1:
        raise ValueError(f"{name} must have a leading batch axis, got a 0-d array")
    return a


def _int_vector(v: Any, name: str) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _check_rows(index: np.ndarray, rows: int, target: str) -> None:
    bad = np.flatnonzero((index < 0) | (index >= rows))
    if bad.size:
        i = int(bad[0])
        raise IndexError(f"index[{i}] = {index[i]} is out of range for {target} with {rows} rows "
                         "(negative indices are not wrapped)")


def _check_same(a: np.ndarray, a_name: str, ref: np.ndarray, ref_name: str, rows: bool) -> None:
    if a.dtype != ref.dtype:
        raise TypeError(f"{a_name} has dtype {a.dtype} but {ref_name} has dtype {ref.dtype}; "
                        "they must match")
    if (a.shape[1:] != ref.shape[1:]) if rows else (a.shape != ref.shape):
        what = "their rows (all axes after the first) must match" if rows else "they must match"
        raise ValueError(f"{a_name} has shape {a.shape} and {ref_name} has shape {ref.shape}; "
                         f"{what}")


def _coefs(coefs: Coefs) -> np.ndarray:
    c = np.asarray(coefs, dtype=np.float32)
    if c.shape != (4,):
        raise ValueError("coefs must be 4 numbers (sample, model, prev_sample, prev_model), "
                         f"got {coefs!r}")
    return c


def group_by_code_numpy(codes: Any, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of :func:`group_by_code`."""
    if num_codes < 0:
        raise ValueError(f"num_codes must be >= 0, got {num_codes}")
    c = _int_vector(codes, "codes")
    bad = np.flatnonzero((c < 0) | (c >= num_codes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"codes[{i}] = {c[i]} is outside [0, {num_codes}): every code must name "
                         "one of the num_codes experts")
    order = np.argsort(c, kind="stable").astype(np.int64)
    offsets = np.zeros(num_codes + 1, dtype=np.int64)
    np.cumsum(np.bincount(c, minlength=num_codes), out=offsets[1:])
    return order, offsets


def gather_rows_numpy(src: np.ndarray, index: Any, out: np.ndarray | None = None) -> np.ndarray:
    """numpy twin of :func:`gather_rows`."""
    _float_array(src, "src")
    idx = _int_vector(index, "index")
    _check_rows(idx, src.shape[0], "src")
    rows = src[idx]
    if out is None:
        return rows
    _float_array(out, "out", write=True)
    _check_same(out, "out", src, "src", rows=True)
    if out.shape[0] != idx.size:
        raise ValueError(f"out has {out.shape[0]} rows but index has {idx.size} entries; "
                         "they must match")
    out[...] = rows
    return out


def scatter_rows_numpy(src: np.ndarray, index: Any, dst: np.ndarray) -> None:
    """numpy twin of :func:`scatter_rows`."""
    _float_array(src, "src")
    _float_array(dst, "dst", write=True)
    _check_same(dst, "dst", src, "src", rows=True)
    idx = _int_vector(index, "index")
    if src.shape[0] != idx.size:
        raise ValueError(f"src has {src.shape[0]} rows but index has {idx.size} entries; "
                         "they must match")
    _check_rows(idx, dst.shape[0], "dst")
    values, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        row = int(values[counts > 1][0])
        raise ValueError(f"index holds row {row} more than once; each destination row can be "
                         "written once")
    dst[idx] = src


def guided_step_numpy(x: np.ndarray, m_uncond: np.ndarray, m_cond: np.ndarray,
                      guidance_scale: float, prev_x: np.ndarray, prev_m: np.ndarray,
                      coefs: Coefs) -> None:
    """numpy twin of :func:`guided_step` (float32 arithmetic, float16 storage allowed)."""
    arrays = {"x": x, "m_uncond": m_uncond, "m_cond": m_cond, "prev_x": prev_x, "prev_m": prev_m}
    for name, a in arrays.items():
        _float_array(a, name, write=name in ("x", "prev_x", "prev_m"), batched=False)
        _check_same(a, name, x, "x", rows=False)
    c = _coefs(coefs)
    f32 = np.float32
    mu = np.asarray(m_uncond, dtype=f32)  # float32 arithmetic; no copy for float32 input
    m = mu + f32(guidance_scale) * (np.asarray(m_cond, dtype=f32) - mu)
    x_next = c[0] * np.asarray(x, dtype=f32) + c[1] * m
    # Exactly-zero coefficients drop their term: history buffers may be uninitialised.
    if c[2] != 0:
        x_next += c[2] * np.asarray(prev_x, dtype=f32)
    if c[3] != 0:
        x_next += c[3] * np.asarray(prev_m, dtype=f32)
    prev_x[...] = x
    prev_m[...] = m
    x[...] = x_next


def cfg_input_numpy(x: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """numpy twin of :func:`cfg_input`."""
    _float_array(x, "x")
    if out is None:
        out = np.empty((2 * x.shape[0],) + x.shape[1:], dtype=x.dtype)
    else:
        _float_array(out, "out", write=True)
        _check_same(out, "out", x, "x", rows=True)
        if out.shape[0] != 2 * x.shape[0]:
            raise ValueError(f"out has shape {out.shape} but x has shape {x.shape}; out needs "
                             "twice x's rows ([x; x])")
    scaled = np.float32(scale) * np.asarray(x, dtype=np.float32)
    out[: x.shape[0]] = scaled
    out[x.shape[0]:] = scaled
    return out


# ---- CPU API: aptp._C, numpy twins as fallback -----------------------------------------


def group_by_code(codes: Any, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Group batch positions by code with a stable counting sort.

    Args:
        codes: 1-d integers in ``[0, num_codes)``, one per prompt.
        num_codes: number of codes (experts).

    Returns:
        ``(order, offsets)``, int64 of shapes ``(B,)`` and ``(num_codes + 1,)``:
        ``order[offsets[k]:offsets[k + 1]]`` are the positions routed to code ``k``, in their
        original order (empty for an unused code).

    Raises:
        ValueError: a code outside ``[0, num_codes)`` (named in the message).
    """
    ext = _cpu_ext()
    if ext is None:
        return group_by_code_numpy(codes, num_codes)
    return ext.group_by_code(codes, num_codes)


def gather_rows(src: np.ndarray, index: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``out[i] = src[index[i]]``: the latents of one group, as one contiguous batch.

    ``src`` is a C-contiguous float32 (or float16) ``(B, ...)`` array, ``index`` 1-d integers
    in ``[0, B)``; ``out`` (optional, ``(len(index), ...)``, not overlapping ``src``) is
    filled and returned. IndexError for an index out of range.
    """
    ext = _cpu_ext()
    if ext is None:
        return gather_rows_numpy(src, index, out)
    return ext.gather_rows(src, index, out)


def scatter_rows(src: np.ndarray, index: Any, dst: np.ndarray) -> None:
    """``dst[index[i]] = src[i]`` in place: a group's results back into the batch.

    ``index`` holds ``len(src)`` distinct integers in ``[0, len(dst))``; ``src`` and ``dst``
    are C-contiguous of one float dtype and one row shape.
    """
    ext = _cpu_ext()
    if ext is None:
        scatter_rows_numpy(src, index, dst)
    else:
        ext.scatter_rows(src, index, dst)


def guided_step(x: np.ndarray, m_uncond: np.ndarray, m_cond: np.ndarray, guidance_scale: float,
                prev_x: np.ndarray, prev_m: np.ndarray, coefs: Coefs) -> None:
    """Fused classifier-free guidance + scheduler update, in place (see the module docstring).

    All five arrays are C-contiguous float32 of one shape (the numpy fallback also takes
    float16); ``coefs`` is ``(sample, model, prev_sample, prev_model)``.
    """
    ext = _cpu_ext()
    if ext is None:
        guided_step_numpy(x, m_uncond, m_cond, guidance_scale, prev_x, prev_m, coefs)
    else:
        ext.guided_step(x, m_uncond, m_cond, guidance_scale, prev_x, prev_m, coefs)


def cfg_input(x: np.ndarray, scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """The model input of a guided batch: ``[scale * x; scale * x]`` with ``2B`` rows.

    The runtime feeds ``[uncond; cond]`` as one batch; ``scale`` is the scheduler's
    ``scale_model_input`` factor of the step. ``out`` (optional) is filled and returned.
    """
    ext = _cpu_ext()
    if ext is None:
        return cfg_input_numpy(x, scale, out)
    return ext.cfg_input(x, scale, out)


# ---- CUDA API: aptp._C_cuda on device pointers ------------------------------------------


class DeviceArray:
    """A raw device pointer with its shape and dtype (C-contiguous), for the ``*_cuda``
    functions: ``DeviceArray(ortvalue.data_ptr(), ortvalue.shape(), "float16")``."""

    __slots__ = ("ptr", "shape", "dtype", "readonly")

    def __init__(self, ptr: int, shape: Sequence[int], dtype: Any = np.float32,
                 readonly: bool = False) -> None:
        self.ptr = int(ptr)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.readonly = readonly

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, self.readonly),
                "strides": None, "version": 3}

    def __repr__(self) -> str:
        return f"DeviceArray(ptr={self.ptr:#x}, shape={self.shape}, dtype={self.dtype})"


def _c_contiguous(shape: tuple[int, ...], strides: Sequence[int] | None, itemsize: int) -> bool:
    if strides is None or 0 in shape:
        return True
    expected = itemsize
    for size, stride in zip(reversed(shape), reversed(tuple(strides))):
        if size != 1 and stride != expected:  # a length-1 axis may carry any stride
            return False
        expected *= size
    return True


def _device_view(obj: Any, name: str, write: bool = False) -> DeviceArray:
    """Pointer, shape and dtype of a CUDA array, checked like the CPU boundary checks."""
    try:
        cai = obj.__cuda_array_interface__
    except AttributeError:
        raise TypeError(f"{name} must expose __cuda_array_interface__ (a CuPy array, a CUDA "
                        f"torch tensor) or be a DeviceArray(ptr, shape, dtype); got "
                        f"{type(obj).__name__}") from None
    shape = tuple(int(s) for s in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    ptr, readonly = cai["data"]
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {dtype}; the CUDA kernels take float32 or float16")
    if not _c_contiguous(shape, cai.get("strides"), dtype.itemsize):
        raise ValueError(f"{name} is not C-contiguous (shape {shape}, strides "
                         f"{cai.get('strides')}): pass a contiguous copy")
    if cai.get("mask") is not None:
        raise ValueError(f"{name} has a mask; masked arrays are not supported")
    if write and readonly:
        raise ValueError(f"{name} is read-only but this kernel writes it in place")
    if not shape:
        raise ValueError(f"{name} must have a leading batch axis, got a 0-d array")
    return DeviceArray(ptr or 0, shape, dtype, bool(readonly))


def _same(a: DeviceArray, a_name: str, ref: DeviceArray, ref_name: str, rows: bool) -> None:
    if a.dtype != ref.dtype:
        raise TypeError(f"{a_name} has dtype {a.dtype} but {ref_name} has dtype {ref.dtype}; "
                        "they must match")
    if (a.shape[1:] != ref.shape[1:]) if rows else (a.shape != ref.shape):
        raise ValueError(f"{a_name} has shape {a.shape} and {ref_name} has shape {ref.shape}; "
                         "they must match" + (" after the first axis" if rows else ""))


def _stream_handle(stream: Any) -> int:
    """An int stream handle from an int, a CuPy stream (.ptr) or a torch stream (.cuda_stream)."""
    if stream is None:
        return 0
    for attr in ("ptr", "cuda_stream"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    if isinstance(stream, (int, np.integer)):
        return int(stream)
    raise TypeError(f"stream must be an int handle, a CuPy or torch stream, got "
                    f"{type(stream).__name__}")


def _row_bytes(a: DeviceArray) -> int:
    return int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize


def _size(a: DeviceArray) -> int:
    return int(np.prod(a.shape, dtype=np.int64))


def _cuda_ext() -> ModuleType:
    if _C_cuda is None:
        raise RuntimeError(
            f"aptp._C_cuda is not built ({_C_CUDA_IMPORT_ERROR or 'disabled'}): reinstall with a "
            "CUDA toolkit (nvcc on PATH or CUDA_HOME set, APTP_NO_CUDA unset) via "
            "`pip install -e .`, or use the CPU functions")
    return _C_cuda


def cuda_status() -> str:
    """Why the CUDA kernels can or cannot run here, in one line."""
    if _C_cuda is None:
        return f"aptp._C_cuda is not built ({_C_CUDA_IMPORT_ERROR or 'disabled'})"
    return f"aptp._C_cuda: {_C_cuda.driver_status()}"


def cuda_available() -> bool:
    """True when aptp._C_cuda is built and sees at least one CUDA device."""
    return _C_cuda is not None and _C_cuda.device_count() > 0


def gather_rows_cuda(src: Any, index: Any, dst: Any, stream: Any = 0) -> None:
    """``dst[i] = src[index[i]]`` on the GPU; ``index`` is host integers in ``[0, len(src))``."""
    s, d = _device_view(src, "src"), _device_view(dst, "dst", write=True)
    _same(d, "dst", s, "src", rows=True)
    handle = _stream_handle(stream)
    idx = np.asarray(index)
    if idx.ndim == 1 and idx.shape[0] != d.shape[0]:
        raise ValueError(f"dst has {d.shape[0]} rows but index has {idx.shape[0]} entries; "
                         "they must match")
    _cuda_ext().gather_rows(d.ptr, s.ptr, idx, s.shape[0], _row_bytes(s), handle)


def scatter_rows_cuda(src: Any, index: Any, dst: Any, stream: Any = 0) -> None:
    """``dst[index[i]] = src[i]`` on the GPU; ``index`` is distinct host integers."""
    s, d = _device_view(src, "src"), _device_view(dst, "dst", write=True)
    _same(d, "dst", s, "src", rows=True)
    handle = _stream_handle(stream)
    idx = np.asarray(index)
    if idx.ndim == 1 and idx.shape[0] != s.shape[0]:
        raise ValueError(f"src has {s.shape[0]} rows but index has {idx.shape[0]} entries; "
                         "they must match")
    _cuda_ext().scatter_rows(d.ptr, s.ptr, idx, d.shape[0], _row_bytes(s), handle)


def guided_step_cuda(x: Any, m_uncond: Any, m_cond: Any, guidance_scale: float, prev_x: Any,
                     prev_m: Any, coefs: Coefs, stream: Any = 0) -> None:
    """:func:`guided_step` on the GPU, float32 or float16 (float32 arithmetic), in place."""
    xv = _device_view(x, "x", write=True)
    views = {"m_uncond": _device_view(m_uncond, "m_uncond"),
             "m_cond": _device_view(m_cond, "m_cond"),
             "prev_x": _device_view(prev_x, "prev_x", write=True),
             "prev_m": _device_view(prev_m, "prev_m", write=True)}
    for name, v in views.items():
        _same(v, name, xv, "x", rows=False)
    handle = _stream_handle(stream)
    _cuda_ext().guided_step(xv.ptr, views["m_uncond"].ptr, views["m_cond"].ptr, guidance_scale,
                            views["prev_x"].ptr, views["prev_m"].ptr, _size(xv),
                            np.asarray(coefs, dtype=np.float64), xv.dtype.name, handle)


def cfg_input_cuda(x: Any, scale: float, out: Any, stream: Any = 0) -> None:
    """``out = [scale * x; scale * x]`` on the GPU; ``out`` has twice ``x``'s rows."""
    xv, ov = _device_view(x, "x"), _device_view(out, "out", write=True)
    _same(ov, "out", xv, "x", rows=True)
    if ov.shape[0] != 2 * xv.shape[0]:
        raise ValueError(f"out has shape {ov.shape} but x has shape {xv.shape}; out needs twice "
                         "x's rows ([x; x])")
    handle = _stream_handle(stream)
    _cuda_ext().cfg_input(ov.ptr, xv.ptr, _size(xv), scale, xv.dtype.name, handle)
