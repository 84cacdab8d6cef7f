"""UNet sessions specialised to the shapes they are called with (opt-in, CPU).

A UNet exported with dynamic ``batch``/``height``/``width``/``steps``/``sequence`` carries
shape arithmetic (Shape, Gather, Unsqueeze, Concat nodes) that every call runs. onnxruntime's
free dimension overrides fix those dimensions when a session is created, with no graph rewrite
and nothing on disk. `ShapeSessionEngine` keeps the dynamic session and, for a shape called
`min_calls` times, creates a session with every symbolic dimension fixed to that call's sizes;
at most `max_sessions` of them (least recently used dropped first). Results are those of the
dynamic session (rows are independent; the tests check 1e-5).

Why opt-in, and why the weights are not shared (narrow SD 2.1 export at 128 px, onnxruntime
1.32, 2 cores, nothing else running; ``aptp-bench latency --fixed-shapes``, BENCHMARKS.md
"Per-call cost", measured 2026-12-06 at 52e7b21):

* Speed: on one thread, what each UNet session gets under the pipeline's default 2 workers, a
  specialised session ran 0.97-1.02x the dynamic one; on two threads 1.02-1.11x, the dense UNet
  as much as the experts.
* Memory: each specialised session holds its own copy of the weights (+278 MiB for expert 0
  with 243 MiB of weights; the dynamic session plus one specialised hold 2.0-2.2x the dynamic
  session alone), whether or not the weights are handed over as shared initializers
  (``SessionOptions.add_initializer``): at ``ORT_ENABLE_ALL`` onnxruntime re-lays convolution
  weights out (NCHWc) and pre-packs MatMul weights per session, and the Python API has no
  pre-packed weights container. Sharing does work at ``ORT_ENABLE_EXTENDED`` with pre-packing off
  (+26-33 MiB a session), but those sessions ran 0.85x the dynamic one.
  onnxruntime also reads the initializers' external data while it optimises the graph even when
  they are overridden, and refuses in-memory address markers in a model, so a shared copy would
  not spare the per-creation read and hash of the weight file either.

So each specialised session is created through `OnnxRuntimeEngine`'s verified path (the weight
files hashed as they are pinned, as for the dynamic session), and it is charged to the memory
budget: the engine measures the RSS each one adds at creation and first run (`extra_bytes`),
and `aptp.runtime.residency` charges that on top of the session's own cost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from aptp.errors import ArtifactError, RuntimeInputError

from .engine import OnnxRuntimeEngine
from .residency import MemoryProbe

__all__ = ["DEFAULT_MAX_SESSIONS", "DEFAULT_MIN_CALLS", "ShapeSessionEngine", "check_shape_sessions"]

logger = logging.getLogger(__name__)

#: Specialised sessions an engine keeps (each costs about a copy of the weights, see above).
DEFAULT_MAX_SESSIONS = 1
#: Calls of one shape before it gets its own session: a creation costs 1-3 s on 2 cores, as
#: much as ~10 calls of a small expert, so a shape seen once (a stray batch) keeps the dynamic one.
DEFAULT_MIN_CALLS = 3
_MAX = 64

ShapeKey = tuple[tuple[str, int], ...]


def check_shape_sessions(value: object, name: str = "shape_sessions") -> int:
    """`value` as a count of specialised sessions per UNet in ``[0, 64]`` (0: off).

    Raises:
        RuntimeInputError: not an integer in range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= _MAX:
        raise RuntimeInputError(f"{name} must be an integer in [0, {_MAX}] (0 turns shape-specialised sessions "
                                f"off), got {value!r}")
    return int(value)


class ShapeSessionEngine(OnnxRuntimeEngine):
    """An `OnnxRuntimeEngine` that adds sessions specialised to the shapes it is called with.

    Args (besides `OnnxRuntimeEngine`'s):
        max_sessions: specialised sessions kept at once (LRU); 0 runs the dynamic session only.
        min_calls: calls of a shape before it is specialised (1: at once).

    On CUDA, or with buffers bound, it behaves as `OnnxRuntimeEngine` (specialisation is a CPU
    measure here). ``extra_bytes`` is the RSS the specialised sessions now held added when they
    were created and first run; ``created`` counts the sessions created, ``create_seconds`` the
    time spent creating them.
    """

    def __init__(self, *args: Any, max_sessions: int = DEFAULT_MAX_SESSIONS, min_calls: int = DEFAULT_MIN_CALLS,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_sessions = check_shape_sessions(max_sessions, "max_sessions")
        if isinstance(min_calls, bool) or not isinstance(min_calls, int) or min_calls < 1:
            raise RuntimeInputError(f"min_calls must be an integer >= 1, got {min_calls!r}")
        self.min_calls = min_calls
        self._specialised: OrderedDict[ShapeKey, tuple[Any, int]] = OrderedDict()  # key -> (session, bytes)
        self._calls: Counter = Counter()
        self._symbolic: dict[str, list[tuple[int, str]]] = {}  # input -> [(axis, dim name)]
        self._shape_lock = threading.Lock()
        self._probe = MemoryProbe()
        self.created = 0
        self.create_seconds = 0.0

    @property
    def extra_bytes(self) -> int:
        return sum(size for _, size in list(self._specialised.values()))

    @property
    def shapes(self) -> list[dict[str, int]]:
        """The shapes that have a specialised session, least recently used first."""
        return [dict(key) for key in list(self._specialised)]

    def _adopt(self, session: Any, providers: list[Any]) -> None:
        super()._adopt(session, providers)
        self._symbolic = {i.name: [(axis, d) for axis, d in enumerate(i.shape) if isinstance(d, str)]
                          for i in session.get_inputs()}

    def dims_of(self, feed: Mapping[str, Any]) -> ShapeKey | None:
        """The symbolic dimensions `feed` fixes, by name; ``None`` when its inputs disagree on
        one (the dynamic session then reports the error)."""
        dims: dict[str, int] = {}
        for name, axes in self._symbolic.items():
            shape = np.shape(feed[name]) if name in feed else None
            for axis, dim in axes:
                if shape is None or axis >= len(shape) or dims.setdefault(dim, int(shape[axis])) != int(shape[axis]):
                    return None
        return tuple(sorted(dims.items()))

    def warm(self, feeds: Iterable[Mapping[str, Any]]) -> None:
        """Create the specialised sessions for the shapes of `feeds` now (e.g. a server's batch
        sizes at start-up), at most `max_sessions` of them."""
        self.load()
        for feed in feeds:
            key = self.dims_of(feed)
            if key is not None and self.max_sessions:
                self._specialise(key, feed)

    def _run_host(self, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.max_sessions == 0 or self.device != "cpu":
            return super()._run_host(arrays)
        key = self.dims_of(arrays)
        session = None
        if key is not None:
            with self._shape_lock:
                self._calls[key] += 1
                entry = self._specialised.get(key)
                if entry is not None:
                    self._specialised.move_to_end(key)
                    session = entry[0]
                due = entry is None and self._calls[key] >= self.min_calls
            if due:
                session = self._specialise(key, arrays)
        if session is None:
            return super()._run_host(arrays)
        try:
            return session.run(None, arrays)
        except Exception as err:
            raise ArtifactError(f"onnxruntime failed running {self.path} specialised to {dict(key)}: {err}") from err

    def _specialise(self, key: ShapeKey, feed: Mapping[str, Any]) -> Any:
        """Create (once) the session for `key`, evicting the least recently used beyond the cap."""
        with self._shape_lock:
            if key in self._specialised:
                return self._specialised[key][0]
            while len(self._specialised) >= self.max_sessions:
                old, _ = self._specialised.popitem(last=False)
                logger.info("%s: dropped the session specialised to %s", self.path, dict(old))

            def create() -> tuple[Any, float]:
                clock = time.perf_counter()
                session, _ = self._build_session(dict(key))
                arrays = {name: np.ascontiguousarray(value, dtype=self._inputs[name]) for name, value in feed.items()}
                session.run(None, arrays)  # the first run sizes the arena: its memory is the session's too
                return session, time.perf_counter() - clock

            (session, seconds), size = self._probe.rss_added(create)
            self._specialised[key] = (session, size)
            self.created += 1
            self.create_seconds += seconds
        logger.info("%s: specialised to %s in %.2f s (RSS +%d MiB)", self.path, dict(key), seconds, size >> 20)
        return session

    def unload(self) -> None:
        with self._shape_lock:
            self._specialised.clear()
            self._calls.clear()
        super().unload()

