"""Kernels of aptp._C / aptp._C_cuda against their numpy twins, the fallback path, and the
errors at the boundary.

The twins are the oracle of the C++ and CUDA kernels; the twins themselves are checked
against direct formulas (np.flatnonzero per code, float64 guidance arithmetic), so a
shared mistake cannot hide.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from aptp.runtime import kernels as K

RNG_SEED = 1234
LATENT_SHAPES = [(1, 4, 3, 3), (5, 4, 8, 8), (3, 7), (6, 2, 3, 5)]


def _cpp():
    if K._C is None:
        pytest.skip(f"aptp._C is not built here ({K._C_IMPORT_ERROR}): run `pip install -e .`")
    return K._C


@pytest.fixture(params=["cpp", "numpy"])
def impl(request, monkeypatch):
    """The public CPU functions on either backend (numpy: aptp._C switched off)."""
    if request.param == "cpp":
        _cpp()
    else:
        monkeypatch.setattr(K, "_C", None)
        monkeypatch.setattr(K, "_warned_fallback", True)  # the warning has its own test
    return request.param


def _rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ---- group_by_code -----------------------------------------------------------------------

GROUP_CASES = {
    "B=1": (np.array([3]), 8),
    "random-with-empty-codes": (np.random.default_rng(RNG_SEED).integers(0, 5, size=37) * 2, 11),
    "all-in-one-code": (np.full(9, 4), 8),
    "empty-batch": (np.zeros(0, dtype=np.int64), 4),
    "int32-codes": (np.array([1, 0, 1, 2, 0, 1], dtype=np.int32), 3),
    "list-codes": ([2, 2, 0, 1], 3),
}


@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_group_by_code_matches_twin_and_definition(case):
    codes, num_codes = GROUP_CASES[case]
    order, offsets = K.group_by_code(codes, num_codes)
    ref_order, ref_offsets = K.group_by_code_numpy(codes, num_codes)
    assert order.dtype == np.int64 and offsets.dtype == np.int64
    np.testing.assert_array_equal(order, ref_order)
    np.testing.assert_array_equal(offsets, ref_offsets)
    codes = np.asarray(codes)
    assert offsets.shape == (num_codes + 1,) and offsets[0] == 0 and offsets[-1] == codes.size
    for k in range(num_codes):  # the definition: positions of code k, in original order
        np.testing.assert_array_equal(order[offsets[k]:offsets[k + 1]], np.flatnonzero(codes == k))


@pytest.mark.parametrize("bad", [8, -1])
def test_group_by_code_names_out_of_range_code(impl, bad):
    with pytest.raises(ValueError, match=rf"codes\[2\] = {bad} is outside \[0, 8\)"):
        K.group_by_code(np.array([0, 7, bad, 1]), 8)


def test_group_by_code_rejects_non_integer_codes(impl):
    with pytest.raises(TypeError, match="integers"):
        K.group_by_code(np.array([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="1-d"):
        K.group_by_code(np.zeros((2, 2), dtype=np.int64), 2)


# ---- gather / scatter ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", LATENT_SHAPES)
def test_gather_rows_matches_twin(shape, dtype):
    _cpp()
    rng = np.random.default_rng(RNG_SEED)
    src = _rand(rng, shape, dtype)
    for index in (rng.integers(0, shape[0], size=4), np.array([shape[0] - 1]), np.array([], int)):
        got = K.gather_rows(src, index)
        np.testing.assert_array_equal(got, K.gather_rows_numpy(src, index))
        np.testing.assert_array_equal(got, src[index])
        out = np.full((len(index),) + shape[1:], np.nan, dtype=dtype)
        assert K.gather_rows(src, index, out) is out
        np.testing.assert_array_equal(out, src[index])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", LATENT_SHAPES)
def test_scatter_rows_matches_twin(shape, dtype):
    _cpp()
    rng = np.random.default_rng(RNG_SEED)
    batch = shape[0] + 3
    dst = _rand(rng, (batch,) + shape[1:], dtype)
    index = rng.permutation(batch)[: shape[0]]
    src = _rand(rng, shape, dtype)
    got, ref = dst.copy(), dst.copy()
    K.scatter_rows(src, index, got)
    K.scatter_rows_numpy(src, index, ref)
    np.testing.assert_array_equal(got, ref)
    untouched = np.setdiff1d(np.arange(batch), index)
    np.testing.assert_array_equal(got[index], src)
    np.testing.assert_array_equal(got[untouched], dst[untouched])


def test_group_gather_scatter_round_trip(impl):
    """What the runtime does: run each code's 'expert' on its rows, put results back."""
    rng = np.random.default_rng(RNG_SEED)
    codes = np.array([2, 0, 2, 2, 1, 0, 2])
    latents = _rand(rng, (codes.size, 4, 4, 4))
    out = np.zeros_like(latents)
    order, offsets = K.group_by_code(codes, 4)
    for k in range(4):
        rows = order[offsets[k]:offsets[k + 1]]
        group = K.gather_rows(latents, rows)
        K.scatter_rows((k + 1) * group, rows, out)  # expert k multiplies by k + 1
    np.testing.assert_array_equal(out, (codes + 1).astype(np.float32)[:, None, None, None] * latents)


def test_gather_scatter_errors(impl):
    rng = np.random.default_rng(RNG_SEED)
    src = _rand(rng, (3, 4))
    with pytest.raises(IndexError, match=r"index\[1\] = 3 is out of range for src with 3 rows"):
        K.gather_rows(src, [0, 3])
    with pytest.raises(IndexError, match=r"index\[0\] = -1"):
        K.gather_rows(src, [-1])
    with pytest.raises(TypeError, match="float64"):
        K.gather_rows(src.astype(np.float64), [0])
    with pytest.raises(ValueError, match="C-contiguous"):
        K.gather_rows(np.asfortranarray(_rand(rng, (3, 4))), [0])
    with pytest.raises(TypeError, match="numpy.ndarray"):
        K.gather_rows([[1.0, 2.0]], [0])
    with pytest.raises(ValueError, match="rows"):
        K.gather_rows(src, [0, 1], out=np.zeros((3, 4), np.float32))
    dst = np.zeros((4, 4), np.float32)
    with pytest.raises(IndexError, match="out of range for dst with 4 rows"):
        K.scatter_rows(src, [0, 1, 4], dst)
    with pytest.raises(ValueError, match="row 1"):
        K.scatter_rows(src, [1, 2, 1], dst)
    with pytest.raises(ValueError, match="rows"):
        K.scatter_rows(src, [0, 1], dst)
    with pytest.raises(ValueError, match="shape"):
        K.scatter_rows(src, [0, 1, 2], np.zeros((4, 5), np.float32))
    with pytest.raises(TypeError, match="float16"):
        K.scatter_rows(src, [0, 1, 2], np.zeros((4, 4), np.float16))
    readonly = np.zeros((4, 4), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        K.scatter_rows(src, [0, 1, 2], readonly)
    np.testing.assert_array_equal(dst, 0)  # failed calls wrote nothing


# ---- guided_step / cfg_input -----------------------------------------------------------------


def _step_inputs(rng, shape, dtype=np.float32):
    return {name: _rand(rng, shape, dtype) for name in ("x", "m_uncond", "m_cond", "prev_x", "prev_m")}


def _step_float64(a, scale, coefs):
    """The contract in float64, independent of both implementations."""
    x, mu, mc, px, pm = (a[k].astype(np.float64) for k in ("x", "m_uncond", "m_cond", "prev_x", "prev_m"))
    m = mu + scale * (mc - mu)
    return coefs[0] * x + coefs[1] * m + coefs[2] * px + coefs[3] * pm, m


@pytest.mark.parametrize("shape", LATENT_SHAPES + [(2, 4, 64, 64)])
@pytest.mark.parametrize("coefs", [(0.9, -0.3, 0.25, 0.1), (1.0, -0.05, 0.0, 0.0), (0.5, 0.5, 0.0, 0.7)])
def test_guided_step_matches_twin_and_contract(shape, coefs):
    _cpp()
    rng = np.random.default_rng(RNG_SEED)
    scale = 7.5
    got = _step_inputs(rng, shape)
    ref = {k: v.copy() for k, v in got.items()}
    x_next64, m64 = _step_float64(got, scale, coefs)
    x_before = got["x"].copy()
    K.guided_step(got["x"], got["m_uncond"], got["m_cond"], scale, got["prev_x"], got["prev_m"], coefs)
    K.guided_step_numpy(ref["x"], ref["m_uncond"], ref["m_cond"], scale, ref["prev_x"], ref["prev_m"], coefs)
    for name in ("x", "prev_x", "prev_m"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got["prev_x"], x_before)
    np.testing.assert_allclose(got["prev_m"], m64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["x"], x_next64, rtol=1e-5, atol=1e-4)


def test_guided_step_zero_coefficient_skips_uninitialised_history(impl):
    rng = np.random.default_rng(RNG_SEED)
    a = _step_inputs(rng, (2, 3, 4))
    a["prev_x"][:] = np.nan  # as np.empty could leave them before the first multistep update
    a["prev_m"][:] = np.inf
    expected, m = _step_float64({**a, "prev_x": 0 * a["x"], "prev_m": 0 * a["x"]}, 3.0, (1, 2, 0, 0))
    K.guided_step(a["x"], a["m_uncond"], a["m_cond"], 3.0, a["prev_x"], a["prev_m"], [1, 2, 0, 0])
    assert np.isfinite(a["x"]).all()
    np.testing.assert_allclose(a["x"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["prev_m"], m, rtol=1e-5, atol=1e-5)


def test_guided_step_errors(impl):
    rng = np.random.default_rng(RNG_SEED)
    a = _step_inputs(rng, (2, 3))
    args = lambda **kw: [kw.get(k, a[k]) for k in ("x", "m_uncond", "m_cond")] + [2.0] + [
        kw.get(k, a[k]) for k in ("prev_x", "prev_m")] + [kw.get("coefs", (1, 0, 0, 0))]
    with pytest.raises(ValueError, match="m_cond has shape"):
        K.guided_step(*args(m_cond=_rand(rng, (2, 4))))
    with pytest.raises(TypeError, match="prev_m has dtype float64"):
        K.guided_step(*args(prev_m=a["prev_m"].astype(np.float64)))
    with pytest.raises(ValueError, match="x is not C-contiguous"):
        K.guided_step(*args(x=_rand(rng, (3, 2)).T))
    with pytest.raises(ValueError, match="4 numbers"):
        K.guided_step(*args(coefs=(1.0, 0.5, 0.0)))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        K.guided_step(*args(m_uncond=a["m_uncond"].tolist()))


@pytest.mark.parametrize("shape", LATENT_SHAPES)
def test_cfg_input_matches_twin(shape):
    _cpp()
    rng = np.random.default_rng(RNG_SEED)
    x = _rand(rng, shape)
    got = K.cfg_input(x, 0.18)
    np.testing.assert_array_equal(got, K.cfg_input_numpy(x, 0.18))
    assert got.shape == (2 * shape[0],) + shape[1:]
    np.testing.assert_allclose(got, np.concatenate([x, x]) * 0.18, rtol=1e-6)
    out = np.empty_like(got)
    assert K.cfg_input(x, 2.0, out) is out
    np.testing.assert_array_equal(out, np.concatenate([2 * x, 2 * x]))


def test_cfg_input_errors(impl):
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="twice"):
        K.cfg_input(x, 1.0, np.empty((3, 3), np.float32))
    with pytest.raises(TypeError, match="float64"):
        K.cfg_input(x.astype(np.float64), 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.cfg_input(np.ones((3, 2), np.float32).T, 1.0)


# ---- fallback ------------------------------------------------------------------------------


def test_numpy_fallback_warns_once_and_matches(monkeypatch, caplog):
    rng = np.random.default_rng(RNG_SEED)
    codes = rng.integers(0, 3, size=10)
    a = _step_inputs(rng, (4, 2, 3, 3))
    expected_x, _ = _step_float64(a, 5.0, (0.9, 0.1, 0.2, 0.3))
    monkeypatch.setattr(K, "_C", None)
    monkeypatch.setattr(K, "_warned_fallback", False)
    with caplog.at_level(logging.WARNING, logger=K.__name__):
        assert K.backend() == "numpy"
        order, offsets = K.group_by_code(codes, 3)
        K.guided_step(a["x"], a["m_uncond"], a["m_cond"], 5.0, a["prev_x"], a["prev_m"],
                      (0.9, 0.1, 0.2, 0.3))
        rows = K.gather_rows(a["x"], [3, 1])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == K.__name__]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "numpy" in warnings[0].getMessage() and "pip install -e ." in warnings[0].getMessage()
    for k in range(3):
        np.testing.assert_array_equal(order[offsets[k]:offsets[k + 1]], np.flatnonzero(codes == k))
    np.testing.assert_allclose(a["x"], expected_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rows, a["x"][[3, 1]])


def test_cpp_backend_logs_no_warning(caplog):
    _cpp()
    with caplog.at_level(logging.WARNING, logger=K.__name__):
        K.group_by_code([0, 1], 2)
    assert K.backend() == "cpp"
    assert not [r for r in caplog.records if r.name == K.__name__]


# ---- CUDA: argument checks (no device needed) --------------------------------------------


class _FakeCudaArray:
    """Only an interface: the checks must reject it before any pointer is touched."""

    def __init__(self, shape, typestr="<f4", strides=None, readonly=False):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "strides": strides,
                                         "data": (0x10000, readonly), "version": 3}


def test_cuda_wrappers_check_arrays_before_launching():
    x = _FakeCudaArray((2, 4))
    with pytest.raises(TypeError, match="__cuda_array_interface__"):
        K.cfg_input_cuda(np.ones((2, 4), np.float32), 1.0, _FakeCudaArray((4, 4)))
    with pytest.raises(TypeError, match="float64"):
        K.cfg_input_cuda(_FakeCudaArray((2, 4), "<f8"), 1.0, _FakeCudaArray((4, 4), "<f8"))
    with pytest.raises(ValueError, match="C-contiguous"):
        K.gather_rows_cuda(_FakeCudaArray((2, 4), strides=(4, 8)), [0], _FakeCudaArray((1, 4)))
    with pytest.raises(ValueError, match="read-only"):
        K.scatter_rows_cuda(x, [0, 1], _FakeCudaArray((3, 4), readonly=True))
    with pytest.raises(ValueError, match="twice"):
        K.cfg_input_cuda(x, 1.0, _FakeCudaArray((3, 4)))
    with pytest.raises(ValueError, match="prev_m has shape"):
        K.guided_step_cuda(x, x, x, 1.0, x, _FakeCudaArray((2, 5)), (1, 0, 0, 0))
    with pytest.raises(TypeError, match="stream"):
        K.gather_rows_cuda(x, [0, 1], _FakeCudaArray((2, 4)), stream="default")


def test_c_contiguity_ignores_strides_of_length_one_axes():
    assert K._c_contiguous((2, 1, 3), (12, 999, 4), 4)
    assert K._c_contiguous((2, 3), None, 4)
    assert not K._c_contiguous((2, 3), (4, 8), 4)
    view = K.DeviceArray(0x1000, (2, 3), "float16")
    assert view.__cuda_array_interface__["typestr"] == np.dtype(np.float16).str


def test_cuda_module_without_device_raises_clearly():
    if K._C_cuda is None:
        pytest.skip(f"aptp._C_cuda is not built here: {K.cuda_status()}")
    if K.cuda_available():
        pytest.skip("a CUDA device is present: this test covers machines without one")
    assert "device" in K.cuda_status() or "driver" in K.cuda_status().lower()
    x = K.DeviceArray(0x10000, (2, 4))
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        K.guided_step_cuda(x, x, x, 1.0, x, x, (1, 0, 0, 0))


# ---- CUDA kernels on a device (CuPy or torch buffers) --------------------------------------


class _CupyLib:
    def __init__(self, cupy):
        self.cp = cupy

    def to_device(self, a):
        return self.cp.asarray(a)

    def to_host(self, d):
        return self.cp.asnumpy(d)

    def stream(self):
        return self.cp.cuda.Stream(non_blocking=True)

    def sync(self, stream=None):
        (stream or self.cp.cuda.Device()).synchronize()


class _TorchLib:
    def __init__(self, torch):
        self.torch = torch

    def to_device(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a)).cuda()

    def to_host(self, d):
        return d.cpu().numpy()

    def stream(self):
        return self.torch.cuda.Stream()

    def sync(self, stream=None):
        (stream or self.torch.cuda).synchronize()


@pytest.fixture(scope="module")
def gpu():
    if not K.cuda_available():
        pytest.skip(f"no CUDA device: {K.cuda_status()}")
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return _CupyLib(cupy)
    except Exception:  # noqa: BLE001 - absent or without a driver: try torch
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchLib(torch)
    except ImportError:
        pass
    pytest.skip("no CUDA device: neither CuPy nor torch.cuda can allocate device buffers")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(8, 4, 64, 64), (5, 3), (300, 5)])
def test_cuda_gather_scatter_match_twins(gpu, shape, dtype):
    rng = np.random.default_rng(RNG_SEED)
    src = _rand(rng, shape, dtype)
    index = rng.permutation(shape[0])  # 300 rows: more than one launch of 256
    d_src, d_out = gpu.to_device(src), gpu.to_device(np.zeros_like(src))
    K.gather_rows_cuda(d_src, index, d_out)
    gpu.sync()
    np.testing.assert_array_equal(gpu.to_host(d_out), K.gather_rows_numpy(src, index))
    dst = _rand(rng, shape, dtype)
    d_dst = gpu.to_device(dst)
    part = index[: max(1, shape[0] // 2)]
    K.scatter_rows_cuda(gpu.to_device(src[: part.size]), part, d_dst)
    gpu.sync()
    K.scatter_rows_numpy(src[: part.size], part, dst)
    np.testing.assert_array_equal(gpu.to_host(d_dst), dst)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(8, 4, 64, 64), (3, 5, 7)])
@pytest.mark.parametrize("coefs", [(0.9, -0.3, 0.25, 0.1), (1.0, -0.05, 0.0, 0.0)])
def test_cuda_guided_step_matches_twin(gpu, shape, dtype, tol, coefs):
    rng = np.random.default_rng(RNG_SEED)
    host = _step_inputs(rng, shape, dtype)
    dev = {k: gpu.to_device(v) for k, v in host.items()}
    K.guided_step_cuda(dev["x"], dev["m_uncond"], dev["m_cond"], 7.5, dev["prev_x"], dev["prev_m"], coefs)
    gpu.sync()
    K.guided_step_numpy(host["x"], host["m_uncond"], host["m_cond"], 7.5, host["prev_x"], host["prev_m"], coefs)
    for name in ("x", "prev_x", "prev_m"):
        np.testing.assert_allclose(gpu.to_host(dev[name]).astype(np.float32),
                                   host[name].astype(np.float32), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_cfg_input_unaligned_raw_pointers_and_stream(gpu, dtype):
    """Views one element in (scalar path), DeviceArray over raw pointers, a side stream."""
    rng = np.random.default_rng(RNG_SEED)
    x = _rand(rng, (3 * 5 + 1,), dtype)
    d_x = gpu.to_device(x)
    d_out = gpu.to_device(np.zeros(2 * 15 + 1, dtype))
    itemsize = np.dtype(dtype).itemsize
    x_ptr = K._device_view(d_x, "x").ptr + itemsize
    out_ptr = K._device_view(d_out, "out").ptr + itemsize
    stream = gpu.stream()
    K.cfg_input_cuda(K.DeviceArray(x_ptr, (3, 5), dtype), 0.5,
                     K.DeviceArray(out_ptr, (6, 5), dtype), stream=stream)
    gpu.sync(stream)
    expected = K.cfg_input_numpy(np.ascontiguousarray(x[1:].reshape(3, 5)), 0.5)
    np.testing.assert_allclose(gpu.to_host(d_out)[1:].reshape(6, 5), expected, rtol=1e-3)
    assert gpu.to_host(d_out)[0] == 0  # nothing written before the view


def test_cuda_rejects_host_pointers_and_bad_indices(gpu):
    host = np.ones((2, 4), np.float32)
    fake = K.DeviceArray(host.ctypes.data, host.shape)
    with pytest.raises(ValueError, match="host memory|not a CUDA pointer"):
        K.cfg_input_cuda(fake, 1.0, gpu.to_device(np.zeros((4, 4), np.float32)))
    d = gpu.to_device(host)
    with pytest.raises(IndexError, match="out of range"):
        K.gather_rows_cuda(d, [0, 2], gpu.to_device(host))
    with pytest.raises(ValueError, match="row 0"):
        K.scatter_rows_cuda(d, [0, 0], gpu.to_device(host))
