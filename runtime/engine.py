"""Inference engines: one exported graph each, behind the TensorRT demo's verbs.

The constructor only stores the path and the placement; ``load`` creates the session (or
deserialises the plan), ``allocate_buffers`` preallocates device I/O by tensor name,
``infer(feed, stream)`` runs, ``unload`` drops everything. I/O is keyed by the graph's tensor
names; what those names mean (the model contract) lives in the export configs, not here.

Backends:
    `OnnxRuntimeEngine`  CPU, or CUDA through onnxruntime's CUDA (and TensorRT) execution
                         providers. On CPU ``infer`` takes and returns numpy arrays; on CUDA with
                         allocated buffers it binds device memory (IO binding) so that latents
                         never leave the GPU.
    `TensorRTEngine`     a serialized TensorRT plan, run with ``execute_async_v3``.

Device memory is `DeviceTensor` (an onnxruntime ``OrtValue`` on the GPU): it exposes
``__cuda_array_interface__``, so `aptp.runtime.kernels`' CUDA functions take it directly.
Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aptp.errors import ArtifactError, DependencyError, RuntimeInputError
from aptp.export.manifest import read_verified

from .kernels import DeviceArray
from .pinned_files import pinned_weights

__all__ = [
    "BACKENDS",
    "DEVICES",
    "DeviceTensor",
    "Engine",
    "OnnxRuntimeEngine",
    "TensorRTEngine",
    "check_active_providers",
    "check_threads",
    "default_threads",
    "import_onnxruntime",
    "onnxruntime_providers",
    "tensorrt_available",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")

# onnxruntime's session option naming where a graph loaded from bytes finds its external weights.
_WEIGHTS_FOLDER = "session.model_external_initializers_file_folder_path"
#: onnxruntime session option: the intra-op threads stop spinning when a run ends (see `_session_options`).
STOP_SPINNING_AFTER_RUN = "session.force_spinning_stop"

# onnxruntime's tensor type strings -> numpy dtypes (inputs the runtime feeds).
_ORT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
}


#: Most intra-op threads a session may be given: onnxruntime creates them all up front, and a
#: huge count makes session creation hang rather than fail.
MAX_THREADS = 256


def check_threads(value: object) -> int | None:
    """`value` as a thread count in ``[1, MAX_THREADS]``, or ``None`` (the default).

    Raises:
        RuntimeInputError: not an integer, or outside the range.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_THREADS:
        raise RuntimeInputError(f"threads must be an integer in [1, {MAX_THREADS}] (or None for the default), "
                                f"got {value!r}")
    return int(value)


ONNXRUNTIME_EXTRAS = ("pip install 'aptp[cpu]' (onnxruntime) or 'aptp[gpu]' (onnxruntime-gpu with its "
                      "CUDA and cuDNN wheels)")
CPU_PROVIDER, CUDA_PROVIDER, TENSORRT_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_warned: set[str] = set()  # fallback reasons already logged (one warning each per process)


def import_onnxruntime() -> Any:
    """``import onnxruntime``, or a `DependencyError` naming the extras that install it.

    The base install carries no onnxruntime flavour on purpose: the CPU and GPU builds write the
    same package folder, so whichever is installed last would silently win."""
    try:
        import onnxruntime
    except ImportError as err:
        raise DependencyError(f"the aptp runtime needs onnxruntime, which is not installed ({err}): "
                              f"{ONNXRUNTIME_EXTRAS}") from err
    return onnxruntime


def _provider_name(entry: Any) -> str:
    return entry[0] if isinstance(entry, tuple) else str(entry)


def check_active_providers(requested: list[Any], active: list[str], *, device: str, backend: str,
                           source: str = "the session") -> str:
    """The provider that runs the graph, after checking onnxruntime activated what was asked.

    onnxruntime-gpu lists the CUDA and TensorRT providers even where their libraries cannot
    load, and a session asked for them then runs on the CPU provider without an error. So the
    providers a session actually activated decide: device ``"cuda"`` with CUDA inactive is an
    error (never report CPU execution as CUDA); ``backend="tensorrt"`` with TensorRT inactive is
    an error; ``backend="auto"`` whose TensorRT provider did not activate falls back to CUDA
    with one warning naming the reason.

    Raises:
        RuntimeInputError: the device or backend asked for explicitly is not what runs.
    """
    names = [_provider_name(p) for p in requested]
    active = list(active)
    if device == "cpu" or not active:
        return active[0] if active else CPU_PROVIDER
    wanted_trt = TENSORRT_PROVIDER in names
    if wanted_trt and TENSORRT_PROVIDER not in active:
        reason = (f"onnxruntime's {TENSORRT_PROVIDER} is listed but did not activate for {source} "
                  f"(active: {active}; its TensorRT libraries are missing or do not load)")
        if backend == "tensorrt":
            raise RuntimeInputError(f"backend 'tensorrt': {reason}. Install TensorRT (see the README) or use "
                                    "backend 'onnxruntime'")
        if TENSORRT_PROVIDER not in _warned:
            _warned.add(TENSORRT_PROVIDER)
            logger.warning("%s: falling back to %s", reason, CUDA_PROVIDER)
    if CUDA_PROVIDER not in active and TENSORRT_PROVIDER not in active:
        raise RuntimeInputError(
            f"device 'cuda': onnxruntime did not activate {CUDA_PROVIDER} for {source}; it would run on {active} "
            "(the CUDA or cuDNN libraries onnxruntime-gpu needs are missing, or no GPU is visible). Install "
            "'aptp[gpu]' on a machine with a GPU, or pass device 'cpu'")
    return active[0]


def default_threads() -> int:
    """Intra-op threads per session: ``$OMP_NUM_THREADS`` when set, else 0 (onnxruntime's
    default, every core). onnxruntime itself ignores that variable."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return min(int(value), MAX_THREADS) if value.isdigit() and int(value) > 0 else 0


def tensorrt_available() -> tuple[bool, str]:
    """``(True, version)`` when ``import tensorrt`` works, else ``(False, reason)``."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "the 'tensorrt' Python package is not installed"
    except Exception as err:  # a broken install (missing libnvinfer) raises OSError and friends
        return False, f"'import tensorrt' failed: {err}"
    return True, str(getattr(trt, "__version__", "unknown"))


def onnxruntime_providers(device: str, backend: str = "auto", device_id: int = 0) -> list[Any]:
    """The execution providers for `device`, best first.

    CPU: the CPU provider. CUDA: onnxruntime's TensorRT provider first when present and
    `backend` allows it (``"tensorrt"`` requires it), then its CUDA provider, then CPU for the
    few ops neither takes. Listed is not active: `check_active_providers` checks the session.

    Raises:
        RuntimeInputError: an unknown device, or CUDA without a CUDA-enabled onnxruntime.
    """
    if device not in DEVICES:
        raise RuntimeInputError(f"device must be one of {DEVICES}, got {device!r}")
    ort = import_onnxruntime()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise RuntimeInputError(
            f"device 'cuda' needs onnxruntime with the CUDA execution provider; this onnxruntime "
            f"{ort.__version__} offers {available}: install onnxruntime-gpu, or pass device='cpu'"
        )
    if backend == "tensorrt" and TENSORRT_PROVIDER not in available:
        raise RuntimeInputError(f"backend 'tensorrt' needs onnxruntime's {TENSORRT_PROVIDER}; this onnxruntime "
                                f"{ort.__version__} offers {available}: install TensorRT (see the README) or use "
                                "backend 'onnxruntime'")
    providers: list[Any] = []
    if backend in ("auto", "tensorrt") and "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", {"device_id": device_id, "trt_fp16_enable": True}))
    providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
    providers.append("CPUExecutionProvider")
    return providers


class DeviceTensor:
    """A C-contiguous GPU buffer owned by onnxruntime (an ``OrtValue`` on ``cuda``).

    Exposes ``__cuda_array_interface__`` so `aptp.runtime.kernels`' CUDA functions take it;
    `rows` gives a pointer view of a row range without copying. ``upload``/``download`` copy
    from/to host numpy arrays and synchronise (a blocking ``cudaMemcpy``).
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, device_id: int = 0):
        ort = import_onnxruntime()

        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.device_id = device_id
        try:
            self.ortvalue = ort.OrtValue.ortvalue_from_shape_and_type(list(self.shape), self.dtype.type, "cuda",
                                                                      device_id)
        except Exception as err:  # a CPU-only onnxruntime cannot allocate on "cuda"
            raise RuntimeInputError(
                f"cannot allocate a {self.shape} {self.dtype} buffer on cuda:{device_id} through onnxruntime "
                f"{ort.__version__} ({err}); GPU buffers need onnxruntime-gpu") from err

    @property
    def ptr(self) -> int:
        return int(self.ortvalue.data_ptr())

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "strides": None,
                "version": 3}

    def rows(self, start: int, stop: int) -> DeviceArray:
        """Rows ``start:stop`` as a `DeviceArray` sharing this buffer."""
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        return DeviceArray(self.ptr + start * row_bytes, (stop - start, *self.shape[1:]), self.dtype)

    def upload(self, array: np.ndarray) -> None:
        """Copy a host array of this shape into the buffer (cast to its dtype)."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape != self.shape:
            raise ValueError(f"cannot upload shape {array.shape} into a device buffer of shape {self.shape}")
        self.ortvalue.update_inplace(array)

    def download(self) -> np.ndarray:
        """A host copy of the buffer. Blocks until work queued on the default stream is done."""
        return self.ortvalue.numpy()


class Engine(ABC):
    """One exported graph on one device (the demo's ``Engine``: the constructor only stores).

    Args:
        path: the graph (``.onnx``) or plan (``.plan``) file.
        device: ``"cpu"`` or ``"cuda"``.
        device_id: the GPU ordinal for ``"cuda"``.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", device_id: int = 0):
        if device not in DEVICES:
            raise RuntimeInputError(f"device must be one of {DEVICES}, got {device!r}")
        self.path = Path(path)
        self.device = device
        self.device_id = device_id
        self.buffers: dict[str, DeviceTensor] = {}
        self.retired: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, device={self.device!r})"

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """Whether `load` has run (and `unload` not since)."""

    @abstractmethod
    def load(self) -> None:
        """Create the session or deserialise the plan. Idempotent."""

    @property
    @abstractmethod
    def input_names(self) -> list[str]:
        """The graph's inputs, in graph order."""

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """The graph's outputs, in graph order."""

    @abstractmethod
    def input_dtype(self, name: str) -> np.dtype:
        """The numpy dtype the graph expects for input `name`."""

    def allocate_buffers(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Preallocate device buffers for the named inputs and outputs (CUDA only).

        After this, `infer` writes outputs into these buffers and returns them; inputs fed as
        `DeviceTensor`/`DeviceArray` are bound in place, numpy inputs are uploaded into the
        input's buffer. Buffers of the same shape and dtype are kept across calls.
        """
        if self.device != "cuda":
            raise RuntimeInputError(f"{self}: allocate_buffers is for device 'cuda'; CPU engines take numpy feeds")
        self.load()
        for name, shape in shapes.items():
            dtype = self.input_dtype(name) if name in self.input_names else self.output_dtype(name)
            current = self.buffers.get(name)
            if current is None or current.shape != tuple(shape) or current.dtype != dtype:
                self.buffers[name] = DeviceTensor(tuple(shape), dtype, self.device_id)

    def output_dtype(self, name: str) -> np.dtype:
        """The numpy dtype of output `name` (float32 unless a subclass knows better)."""
        return np.dtype(np.float32)

    @abstractmethod
    def infer(self, feed: Mapping[str, Any], stream: Any = None) -> dict[str, Any]:
        """Run the graph on `feed` (inputs by name); returns the outputs by name."""

    @abstractmethod
    def unload(self) -> None:
        """Drop buffers, session or context. The engine can be loaded again (unless retired)."""

    def retire(self, reason: str) -> None:
        """Refuse to load again. A memory manager that evicted this engine retires it: a caller
        still holding it would otherwise reload it behind the manager's back, outside the budget."""
        self.retired = reason

    def _refuse_if_retired(self) -> None:
        if self.retired:
            raise RuntimeInputError(f"{self.retired}: this engine object cannot be loaded again; run on the UNet "
                                    f"inside `pipe.residency.use(key)`, which reloads it within the budget")

    def _missing_inputs(self, feed: Mapping[str, Any]) -> None:
        missing = [name for name in self.input_names if name not in feed]
        extra = [name for name in feed if name not in self.input_names]
        if missing or extra:
            raise RuntimeInputError(
                f"{self.path}: feed names {sorted(feed)} do not match the graph's inputs {self.input_names}"
                + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else "")
            )


class OnnxRuntimeEngine(Engine):
    """An onnxruntime ``InferenceSession``, created once in `load` and reused by every call.

    Args:
        path: the ``.onnx`` file.
        device: ``"cpu"`` or ``"cuda"``.
        threads: intra-op threads; ``None`` means `default_threads`.
        backend: ``"auto"`` lets onnxruntime's TensorRT provider take the graph on CUDA when it
            activates (else CUDA, with one warning); ``"tensorrt"`` requires it; ``"onnxruntime"``
            keeps the CUDA provider only. After `load`, ``provider`` is the provider that runs
            the graph and ``providers`` all the session activated.
        device_id: the GPU ordinal.
        sha256: the graph file's expected sha256 (from the manifest); ``None`` skips the check.
        external_data: ``(path, sha256)`` of each external weight file the graph references
            (by file name).

    `load` reads every file once, checks its hash and gives onnxruntime those bytes, never the
    path: a file replaced after the export was verified is refused when it is loaded (sessions
    are created lazily, possibly long after). onnxruntime is barred from reading external
    weights from disk itself, so only verified bytes reach the session.

    ``session.run`` is thread-safe; the bound-buffer path (after `allocate_buffers`) is not:
    the engine serialises those calls with a lock.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 backend: str = "auto", device_id: int = 0, sha256: str | None = None,
                 external_data: Sequence[tuple[str | os.PathLike, str | None]] = ()):
        super().__init__(path, device, device_id)
        self.threads = default_threads() if threads is None else check_threads(threads)
        self.sha256 = sha256
        self.external_data = [(Path(p), digest) for p, digest in external_data]
        self.backend = backend
        self.session = None
        self.providers: list[str] = []  # the session's active providers, best first (after load)
        self.provider: str | None = None  # the one that runs the graph
        self._inputs: dict[str, np.dtype] = {}
        self._outputs: dict[str, np.dtype] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.session is not None

    def load(self) -> None:
        if self.session is not None:
            return
        self._refuse_if_retired()
        with self._load_lock:  # concurrent first calls create one session, not several
            if self.session is None:
                self._create_session()

    def _create_session(self) -> None:
        self._adopt(*self._build_session())

    def _build_session(self, dims: Mapping[str, int] | None = None) -> tuple[Any, list[Any]]:
        """A new session on the verified files, and the providers it was asked for. `dims` fixes
        symbolic dimensions by name (onnxruntime's free dimension overrides)."""
        ort = import_onnxruntime()

        if not self.path.is_file():
            raise ArtifactError(f"ONNX graph {self.path} does not exist; re-export")
        options = self._session_options(ort)
        for name, value in (dims or {}).items():
            options.add_free_dimension_override_by_name(name, int(value))
        providers = onnxruntime_providers(self.device, self.backend, self.device_id)
        model = read_verified(self.path, self.sha256, "ONNX graph")
        session = None
        if self.external_data:
            # Verified weights that onnxruntime reads itself from pinned files: no in-memory copy
            # (`aptp.runtime.pinned_files`; about 1.3x instead of 3x the weights at the peak).
            with pinned_weights(self.external_data) as folder:
                if folder is not None:
                    options.add_session_config_entry(_WEIGHTS_FOLDER, str(folder))
                    session = self._new_session(ort, model, options, providers)
        if session is None:
            # From bytes, onnxruntime would look for external weights relative to the working
            # directory: point it at a folder that cannot exist and hand it the verified files.
            options.add_session_config_entry(_WEIGHTS_FOLDER, os.path.join(os.devnull, "aptp-no-external-data"))
            if self.external_data:
                weights = [read_verified(p, digest, "ONNX external data") for p, digest in self.external_data]
                options.add_external_initializers_from_files_in_memory(
                    [p.name for p, _ in self.external_data], weights, [len(w) for w in weights])
            session = self._new_session(ort, model, options, providers)
        return session, providers

    def _session_options(self, ort: Any) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # A pipeline holds many sessions, each with its own thread pool. By default a pool's
        # threads keep spinning after a run ends and take the cores from the first call of the
        # session that runs next: +25-32 ms per switch (narrow SD 2.1 UNets at 128 px, 2 cores,
        # docs/performance-log.md); stopping them once the run ends costs nothing measurable.
        options.add_session_config_entry(STOP_SPINNING_AFTER_RUN, "1")
        return options

    def _adopt(self, session: Any, providers: list[Any]) -> None:
        """Check the providers `session` activated and make it the engine's session."""
        # What runs is what the session activated, not what was listed (see check_active_providers).
        self.providers = list(session.get_providers())
        self.provider = check_active_providers(providers, self.providers, device=self.device, backend=self.backend,
                                               source=str(self.path))
        self._inputs = {i.name: _ORT_DTYPES.get(i.type, np.dtype(np.float32)) for i in session.get_inputs()}
        self._outputs = {o.name: _ORT_DTYPES.get(o.type, np.dtype(np.float32)) for o in session.get_outputs()}
        self.session = session  # last: a thread that sees the session also sees its I/O tables
        logger.debug("loaded %s with %s", self.path, session.get_providers())

    def _new_session(self, ort: Any, model: bytes, options: Any, providers: list) -> Any:
        try:
            return ort.InferenceSession(model, options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph...)
            raise ArtifactError(f"onnxruntime cannot load {self.path}: {err}") from err

    @property
    def input_names(self) -> list[str]:
        self.load()
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        self.load()
        return list(self._outputs)

    def input_dtype(self, name: str) -> np.dtype:
        self.load()
        return self._inputs[name]

    def output_dtype(self, name: str) -> np.dtype:
        self.load()
        return self._outputs[name]

    def infer(self, feed: Mapping[str, Any], stream: Any = None) -> dict[str, Any]:
        """CPU (or CUDA without buffers): numpy in, numpy out, each input cast to the graph's
        dtype. CUDA with buffers: device in, the engine's device buffers out (see
        `allocate_buffers`). `stream` is unused: onnxruntime runs on its own stream and
        synchronises it before returning."""
        self.load()
        self._missing_inputs(feed)
        if not self.buffers:
            arrays = {name: np.ascontiguousarray(value, dtype=self._inputs[name]) for name, value in feed.items()}
            return dict(zip(self._outputs, self._run_host(arrays)))
        with self._lock:
            return self._infer_bound(feed)

    def _run_host(self, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, arrays)
        except Exception as err:
            raise ArtifactError(f"onnxruntime failed running {self.path}: {err}") from err

    def _infer_bound(self, feed: Mapping[str, Any]) -> dict[str, DeviceTensor]:
        binding = self.session.io_binding()
        for name, value in feed.items():
            if isinstance(value, np.ndarray):
                buffer = self.buffers.get(name)
                if buffer is None:
                    raise RuntimeInputError(f"{self.path}: no device buffer for input {name!r}; allocate_buffers first")
                buffer.upload(value)
                value = buffer
            if isinstance(value, DeviceTensor):
                binding.bind_ortvalue_input(name, value.ortvalue)
            else:  # DeviceArray or anything with __cuda_array_interface__: bind the raw pointer
                view = value if isinstance(value, DeviceArray) else DeviceArray(
                    value.__cuda_array_interface__["data"][0], value.__cuda_array_interface__["shape"],
                    value.__cuda_array_interface__["typestr"])
                binding.bind_input(name, "cuda", self.device_id, view.dtype.type, list(view.shape), view.ptr)
        for name in self._outputs:
            if name not in self.buffers:
                raise RuntimeInputError(f"{self.path}: no device buffer for output {name!r}; allocate_buffers first")
            binding.bind_ortvalue_output(name, self.buffers[name].ortvalue)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as err:
            raise ArtifactError(f"onnxruntime failed running {self.path}: {err}") from err
        return {name: self.buffers[name] for name in self._outputs}

    def unload(self) -> None:
        self.buffers.clear()
        self.session = None
        self.providers, self.provider = [], None
        self._inputs, self._outputs = {}, {}


class TensorRTEngine(Engine):
    """A serialized TensorRT plan (built by ``aptp-export`` where TensorRT was present).

    Device buffers come from onnxruntime (`DeviceTensor`), so torch is never needed; ``infer``
    runs ``execute_async_v3`` on `stream` (an int handle; 0 is the default stream, on which
    `aptp.runtime.kernels`' CUDA functions then run in order) and returns the output buffers
    without synchronising.
    """

    #: What `GenerationResult.provider` and the benchmarks record for a native TensorRT plan.
    provider = "TensorRT"

    def __init__(self, path: str | os.PathLike, device_id: int = 0, sha256: str | None = None):
        super().__init__(path, "cuda", device_id)
        self.sha256 = sha256  # checked on the bytes deserialised, as OnnxRuntimeEngine does
        self.engine = None
        self.context = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def load(self) -> None:
        if self.engine is not None:
            return
        self._refuse_if_retired()
        ok, reason = tensorrt_available()
        if not ok:
            raise RuntimeInputError(f"backend 'tensorrt' cannot run {self.path}: {reason}; use backend 'onnxruntime'")
        import tensorrt as trt

        if not self.path.is_file():
            raise ArtifactError(f"TensorRT plan {self.path} does not exist; re-export on a machine with TensorRT")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(read_verified(self.path, self.sha256, "TensorRT plan"))
        if self.engine is None:
            raise ArtifactError(f"TensorRT cannot load {self.path} (built by another TensorRT version or GPU?): "
                                "re-export on this machine")
        self.context = self.engine.create_execution_context()

    def _names(self, want_input: bool) -> list[str]:
        import tensorrt as trt

        self.load()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        return [n for n in names if (self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT) == want_input]

    @property
    def input_names(self) -> list[str]:
        return self._names(True)

    @property
    def output_names(self) -> list[str]:
        return self._names(False)

    def _dtype(self, name: str) -> np.dtype:
        import tensorrt as trt

        self.load()
        return np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))

    def input_dtype(self, name: str) -> np.dtype:
        return self._dtype(name)

    def output_dtype(self, name: str) -> np.dtype:
        return self._dtype(name)

    def allocate_buffers(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Set the input shapes, then allocate inputs and outputs (output shapes are inferred
        by TensorRT; any given are checked against them)."""
        self.load()
        inputs = self.input_names
        missing = [n for n in inputs if n not in shapes]
        if missing:
            raise RuntimeInputError(f"{self.path}: no shape given for inputs {missing}")
        for name in inputs:
            if not self.context.set_input_shape(name, tuple(shapes[name])):
                raise RuntimeInputError(f"{self.path}: input {name!r} shape {tuple(shapes[name])} is outside the "
                                        "engine's optimisation profile; re-export with a wider profile")
        all_shapes = dict(shapes)
        for name in self.output_names:
            inferred = tuple(self.context.get_tensor_shape(name))
            if name in shapes and tuple(shapes[name]) != inferred:
                raise RuntimeInputError(f"{self.path}: output {name!r} has shape {inferred}, not {tuple(shapes[name])}")
            all_shapes[name] = inferred
        super().allocate_buffers(all_shapes)
        for name, buffer in self.buffers.items():
            self.context.set_tensor_address(name, buffer.ptr)

    def infer(self, feed: Mapping[str, Any], stream: Any = None) -> dict[str, DeviceTensor]:
        self.load()
        self._missing_inputs(feed)
        if not self.buffers:
            raise RuntimeInputError(f"{self.path}: call allocate_buffers before infer")
        with self._lock:
            for name, value in feed.items():
                if isinstance(value, np.ndarray):
                    self.buffers[name].upload(value)
                    self.context.set_tensor_address(name, self.buffers[name].ptr)
                else:
                    ptr = value.ptr if isinstance(value, (DeviceTensor, DeviceArray)) else \
                        int(value.__cuda_array_interface__["data"][0])
                    self.context.set_tensor_address(name, ptr)
            handle = int(getattr(stream, "ptr", getattr(stream, "cuda_stream", stream or 0)))
            if not self.context.execute_async_v3(handle):
                raise ArtifactError(f"TensorRT inference failed for engine {self.path}")
            return {name: self.buffers[name] for name in self.output_names}

    def unload(self) -> None:
        self.buffers.clear()
        self.context = None
        self.engine = None
