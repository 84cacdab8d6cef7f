"""Which UNet sessions are resident, under a memory budget.

An edge device cannot hold K experts at once. `ResidencyManager` is the one owner of the
loaded UNet sessions of a pipeline: a caller asks for a session with ``use(key)`` (a context
manager that pins it while the caller runs on it), the manager loads it on demand and evicts
the least recently used unpinned sessions so that the charged total stays within the budget.

What a session costs is measured when it is loaded: the process RSS before and after (from
``/proc/self/statm``, else psutil) and, on CUDA, the device memory in use before and after
(``cudaMemGetInfo`` through the CUDA runtime library). Until a session has been loaded once,
its cost is estimated from its files' size (a lower bound: the session holds at least its
weights) scaled by the largest measured-to-file ratio seen so far; after its first load the
measured cost is charged, but never less than the files' size: an RSS delta undercounts when
the allocator reuses heap that an earlier session freed. A first load whose measured cost exceeds its estimate is recharged at
once and other unpinned sessions are evicted to make room; ``overshoots`` in the report counts
the rare case where pinned sessions leave no room, instead of hiding it.

Running a session costs memory too: onnxruntime's allocator arena grows on a session's first
runs to hold its activations, and keeps that memory for as long as the session lives (the
arena's high-water mark). So a session's charge also includes its working memory: the RSS (and
device memory) it gained while it ran, measured across each use during which it was the only
session in use and nothing was loaded or evicted, over the first `MEASURED_USES` such uses of
each residence (the arena grows on its first runs; later growth, such as a larger batch, is left
to the reconciliation below rather than creeping into one session). The largest growth seen over
one residence is kept, so a reload is charged its working memory before it runs, and sessions never run yet are
estimated at the largest measured-cost-to-file ratio, working memory included.

Loading costs more than holding: while a session is created, onnxruntime holds parsing copies
(measured for a 119 MiB expert: a 175 MiB peak with external weights read from a pinned file,
387 MiB with inline weights handed over from memory, against 142 MiB kept). Each load's peak above
the RSS before it is measured from the kernel's peak-RSS mark (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the load; Linux only, else not measured), and a load
reserves room for its peak (measured, or estimated at the largest measured peak-to-file ratio),
not just for what the session keeps.

Charges are deltas, and a delta misses memory the allocator keeps: heap that an evicted session
freed but that stays mapped (fragmentation), or growth of the parts outside the budget. So the
manager also reconciles with the process itself: the RSS above its floor (the RSS just before
its first load) that no charge explains is counted against the budget too (``unattributed``
in the report), and evictions go on until charges plus that excess fit.

Loads are serialised (one ``_load_lock``), so an RSS delta is not mixed with another load's.
A pinned session (a group running on it) is never evicted; a caller that needs room held by
pinned sessions waits until they are released. Thread-safe.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import numbers
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from aptp.errors import RuntimeInputError, shown

__all__ = [
    "MemoryProbe",
    "release_free_heap",
    "ResidencyManager",
    "SessionRecord",
    "format_bytes",
    "parse_memory_budget",
]

logger = logging.getLogger(__name__)

#: Clean uses of each residence whose RSS growth counts as that session's working memory.
MEASURED_USES = 4

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNLIMITED = ("unlimited", "none")
#: Largest budget accepted (1 EiB): beyond any machine, and still an exact int64 byte count.
MAX_MEMORY_BUDGET = 1 << 60


def parse_memory_budget(value: Any, name: str = "memory_budget") -> int | None:
    """A memory budget in bytes: an int byte count, or text like ``"3GiB"``, ``"512MiB"``,
    ``"2GB"`` (decimal), ``"1.5G"`` (binary); ``None`` or ``"unlimited"`` means no budget.

    Raises:
        RuntimeInputError: anything else, or a budget that is not positive.
    """
    if value is None or isinstance(value, str) and value.strip().lower() in _UNLIMITED:
        return None
    bad = RuntimeInputError(f"{name} must be a positive size such as '3GiB', '512MiB', '2GB' or a byte count "
                            f"(or 'unlimited') of at most 1 EiB, got {shown(value)}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, numbers.Integral):
        size = int(value)
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise bad
        scaled = float(match.group(1)) * _UNITS[match.group(2).lower()]
        if not math.isfinite(scaled):  # 400 digits: a float of inf bytes
            raise bad
        size = int(scaled)
    else:
        raise bad
    if not 0 < size <= MAX_MEMORY_BUDGET:
        raise bad
    return size


def signed_bytes(size: float | None) -> str:
    """A change in bytes with its sign: ``+1.50 MiB``, ``-37.36 MiB`` (a load can free heap)."""
    if size is None:
        return "unknown"
    return ("-" if size < 0 else "+") + format_bytes(abs(size))


def format_bytes(size: float | None) -> str:
    """``3.00 GiB``-style text (binary units)."""
    if size is None:
        return "unknown"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"  # unreachable


T = TypeVar("T")


class MemoryProbe:
    """Process RSS and, on CUDA, device memory in use (both in bytes, ``None`` when unknown)."""

    def __init__(self, device: str = "cpu", device_id: int = 0):
        self.device = device
        self.device_id = device_id
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._cudart: Any = None
        self._cudart_tried = False

    def rss(self) -> int | None:
        """Resident set size of this process now."""
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            pass
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.Process().memory_info().rss)

    def rss_added(self, action: Callable[[], T]) -> tuple[T, int]:
        """`action`'s result and the RSS it added (0 when unknown). Freed heap is handed back
        before and after (`release_free_heap`), so what counts is what `action` keeps."""
        release_free_heap()
        before = self.rss()
        result = action()
        release_free_heap()
        after = self.rss()
        return result, (max(0, after - before) if before is not None and after is not None else 0)

    def reset_peak(self) -> bool:
        """Reset this process's peak-RSS mark to its RSS now (Linux ``/proc/self/clear_refs``);
        False where that cannot be done. It is one mark per process: whoever reads ``VmHWM``
        afterwards sees the peak since this reset."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak_rss(self) -> int | None:
        """The largest RSS of this process since the last `reset_peak` (``VmHWM``)."""
        try:
            with open("/proc/self/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def device_used(self) -> int | None:
        """Device memory in use on the GPU (all processes: what ``cudaMemGetInfo`` sees), CUDA only."""
        if self.device != "cuda":
            return None
        lib = self._cuda_runtime()
        if lib is None:
            return None
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if lib.cudaSetDevice(int(self.device_id)) != 0 or lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)):
            return None
        return int(total.value - free.value)

    def _cuda_runtime(self) -> Any:
        if not self._cudart_tried:
            self._cudart_tried = True
            for name in (ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12"):
                if not name:
                    continue
                try:
                    self._cudart = ctypes.CDLL(name)
                    break
                except OSError:
                    continue
            if self._cudart is None:
                logger.warning("device memory cannot be measured: the CUDA runtime library (libcudart) is not found")
        return self._cudart


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``): after an eviction the
    session's weights are free, but without this RSS can keep them and mislead the budget."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class SessionRecord:
    """What the manager knows of one UNet session (bytes; ``None`` = not measured yet)."""

    key: Any
    file_bytes: int
    rss_bytes: int | None = None
    device_bytes: int | None = None
    run_bytes: int | None = None  # working memory: the most RSS + device memory one residence gained running
    load_peak_bytes: int | None = None  # the RSS peak of the last load above the RSS before it
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    extra_bytes: int = 0  # what the engine's shape-specialised sessions add now (`shape_sessions`)

    @property
    def load_bytes(self) -> int | None:
        """RSS plus device memory the last load added (negative deltas count as 0)."""
        if self.rss_bytes is None and self.device_bytes is None:
            return None
        return max(0, self.rss_bytes or 0) + max(0, self.device_bytes or 0)

    @property
    def measured_bytes(self) -> int | None:
        """What the last load added plus the working memory measured while running."""
        load = self.load_bytes
        return None if load is None else load + (self.run_bytes or 0) + self.extra_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"file_bytes": self.file_bytes, "rss_bytes": self.rss_bytes, "device_bytes": self.device_bytes,
                "run_bytes": self.run_bytes, "extra_bytes": self.extra_bytes, "measured_bytes": self.measured_bytes,
                "load_peak_bytes": self.load_peak_bytes,
                "loads": self.loads, "evictions": self.evictions,
                "load_seconds": round(self.load_seconds, 4)}


class ResidencyManager:
    """Loads UNet sessions on demand and keeps their charged total within `budget` (LRU).

    Args:
        budget: bytes, or ``None`` for no limit (sessions are then kept once loaded).
        factory: ``key -> Engine`` (not yet loaded); the manager calls ``load``/``unload``.
        file_bytes: ``key -> int``, the size of the session's files (the first estimate).
        describe: ``key -> str`` for messages (``"expert 3"``).
        probe: what measures memory (default: a `MemoryProbe` on the CPU).
    """

    def __init__(self, budget: int | None, factory: Callable[[Any], Any], file_bytes: Callable[[Any], int], *,
                 describe: Callable[[Any], str] = str, probe: MemoryProbe | None = None):
        self.budget = budget
        self.probe = probe or MemoryProbe()
        self.factory = factory  # replaceable: wrap engines, e.g. to record their inputs
        self._file_bytes = file_bytes
        self._describe = describe
        self._records: dict[Any, SessionRecord] = {}
        self._resident: OrderedDict[Any, Any] = OrderedDict()  # least recently used first
        self._charged: dict[Any, int] = {}  # bytes charged per resident or loading session
        self._pins: Counter = Counter()
        self._loading: set = set()
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.peak_bytes = 0
        self.overshoots = 0
        self.max_overshoot_bytes = 0
        self.events: list[tuple[float, str, Any, int]] = []  # (monotonic time, "load"/"evict", key, bytes)
        # Working-memory measurement: every acquire, load and eviction bumps _activity; a use
        # measures cleanly when _activity did not move between its acquire and its release.
        self._activity = 0
        # key -> (activity, rss, device, the engine's extra_bytes) when a clean use started
        self._use_start: dict[Any, tuple[int, int | None, int | None, int]] = {}
        self._growth: dict[Any, int] = {}  # working memory gained by each resident session this residence
        self._measured_uses: dict[Any, int] = {}  # clean uses measured this residence
        self._floor: int | None = None  # process RSS just before the first load (no UNet resident)
        self.unattributed_bytes = 0  # the last excess of RSS over floor + charges

    # ---- what things cost ------------------------------------------------------------------

    def record(self, key: Any) -> SessionRecord:
        with self._cond:
            return self._record(key)

    def _record(self, key: Any) -> SessionRecord:
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = SessionRecord(key, int(self._file_bytes(key)))
        return record

    def _estimate(self, key: Any) -> tuple[int, str]:
        # What a load keeps scales with the weights; working memory (activations, which int8
        # weights do not shrink) does not: a session not yet run gets the largest measured.
        record = self._record(key)
        work = record.run_bytes
        if work is None:
            work = max([r.run_bytes for r in self._records.values() if r.run_bytes is not None], default=0)
        if record.load_bytes is not None:
            return max(1, record.file_bytes, record.load_bytes + work + record.extra_bytes), \
                "measured when it was last loaded"
        ratios = [r.load_bytes / r.file_bytes for r in self._records.values()
                  if r.load_bytes is not None and r.file_bytes > 0]
        ratio = max([1.0, *ratios])
        how = "its files' size, a lower bound on its session" if ratio == 1.0 else \
            f"its files' size x {ratio:.2f} (the largest load/file ratio measured so far) plus the largest " \
            "working memory measured"
        return max(1, int(record.file_bytes * ratio) + work), how

    def _estimate_load_peak(self, key: Any) -> int:
        """Bytes a load of `key` is expected to need at its peak (0 when no load was measured)."""
        record = self._record(key)
        if record.load_peak_bytes is not None:
            return record.load_peak_bytes
        ratios = [r.load_peak_bytes / r.file_bytes for r in self._records.values()
                  if r.load_peak_bytes is not None and r.file_bytes > 0]
        return int(record.file_bytes * max(ratios)) if ratios else 0

    def estimate(self, key: Any) -> int:
        """Bytes the session of `key` is expected to take (measured if it was ever loaded)."""
        with self._cond:
            return self._estimate(key)[0]

    def check_fits(self, key: Any) -> None:
        """Raise when the session of `key` cannot fit the budget even alone: when its files
        alone (the weights a session must hold) exceed it. A measured cost above the budget is
        not refused (an RSS delta is noisy for small graphs); that session then runs alone and
        the report counts the overshoot.

        Raises:
            RuntimeInputError: naming the session's size, how it was obtained, and the budget.
        """
        if self.budget is None:
            return
        with self._cond:
            size = self._record(key).file_bytes
            measured = self._record(key).measured_bytes
        if size > self.budget:
            seen = "" if measured is None else f"; its session measured {format_bytes(measured)} when loaded"
            raise RuntimeInputError(
                f"{self._describe(key)} needs at least {format_bytes(size)} (its files' size, a lower bound on its "
                f"session{seen}) but the memory budget is {format_bytes(self.budget)}: it cannot fit even alone; "
                f"raise the memory budget above {format_bytes(size)}, or use a smaller precision (int8)")

    # ---- residency -------------------------------------------------------------------------

    def is_resident(self, key: Any) -> bool:
        with self._cond:
            return key in self._resident

    @property
    def resident_keys(self) -> list[Any]:
        """Resident sessions, least recently used first."""
        with self._cond:
            return list(self._resident)

    @property
    def resident_bytes(self) -> int:
        with self._cond:
            return sum(self._charged.values())

    @contextmanager
    def use(self, key: Any) -> Iterator[Any]:
        """The loaded engine of `key`, pinned (never evicted) until the block exits."""
        engine = self.acquire(key)
        try:
            yield engine
        finally:
            self.release(key)

    def acquire(self, key: Any) -> Any:
        """Load (or reuse) the session of `key` and pin it; pair with `release`."""
        self.check_fits(key)
        with self._cond:
            while True:
                if key in self._resident:
                    self._pins[key] += 1
                    self._resident.move_to_end(key)
                    self._start_use(key)
                    return self._resident[key]
                if key in self._loading:
                    self._cond.wait()
                    continue
                # Room for the load's peak, which is more than the session keeps once loaded.
                need = max(self._estimate(key)[0], self._estimate_load_peak(key))
                if self.budget is not None:
                    # A cost measured above the budget (check_fits let it through) runs alone:
                    # it reserves the whole budget, and its overshoot is counted once loaded.
                    need = min(need, self.budget)
                if self._make_room(need, keep=key):
                    break
                self._cond.wait()  # the room is held by pinned sessions: wait for a release
            if self._floor is None and not self._resident and not self._loading:
                self._floor = self.probe.rss()
            self._loading.add(key)
            self._activity += 1
            self._charged[key] = need
            self._pins[key] += 1
            self._note_peak()
        try:
            engine = self._load(key)
        except BaseException:
            with self._cond:
                self._loading.discard(key)
                self._charged.pop(key, None)
                self._unpin(key)
                self._cond.notify_all()
            raise
        with self._cond:
            self._charged[key] = self._estimate(key)[0]
            self._loading.discard(key)
            self._resident[key] = engine
            self.loads += 1
            self._growth[key] = 0
            self._measured_uses[key] = 0
            self.events.append((time.monotonic(), "load", key, self._charged[key]))
            self._fit_recharged(key, f"measured {format_bytes(self._charged[key])}, more than estimated")
            self._note_peak()
            self._start_use(key)
            self._cond.notify_all()
        return engine

    def release(self, key: Any) -> None:
        """Unpin `key` (it stays resident until evicted); a clean use's working memory is charged."""
        with self._cond:
            self._unpin(key)
            self._end_use(key)
            self._charge_extra(key)
            self._cond.notify_all()

    def preload(self, keys: list[Any]) -> list[Any]:
        """Load `keys` in order while each fits without evicting another; returns those loaded."""
        loaded = []
        for key in keys:
            with self._cond:
                fits = self.budget is None or self._total() + self._estimate(key)[0] <= self.budget
            if not fits:
                break
            with self.use(key):
                loaded.append(key)
        return loaded

    def evict(self, key: Any) -> bool:
        """Unload `key` now unless it is pinned; returns whether it was evicted."""
        with self._cond:
            if key not in self._resident or self._pins[key]:
                return False
            self._evict(key)
            return True

    def clear(self) -> None:
        """Unload every session that is not pinned."""
        with self._cond:
            for key in [k for k in self._resident if not self._pins[k]]:
                self._evict(key)

    def report(self) -> dict[str, Any]:
        """Budget, charged totals, loads/evictions and each session's measured cost."""
        with self._cond:
            return {
                "budget_bytes": self.budget,
                "resident": [str(k) for k in self._resident],
                "resident_bytes": self._total(),
                "peak_resident_bytes": self.peak_bytes,
                "loads": self.loads,
                "evictions": self.evictions,
                "overshoots": self.overshoots,
                "max_overshoot_bytes": self.max_overshoot_bytes,
                "floor_rss_bytes": self._floor,
                "unattributed_bytes": self.unattributed_bytes,
                "sessions": {str(k): r.as_dict() for k, r in self._records.items()},
            }

    # ---- internals (called with self._cond held) -----------------------------------------

    def _total(self) -> int:
        return sum(self._charged.values())

    def _start_use(self, key: Any) -> None:
        """Bump the activity count; when `key` is now the only pinned session, note the
        memory in use so that `_end_use` can measure what running on it added."""
        self._activity += 1
        if (len(self._pins) == 1 and self._pins[key] == 1 and not self._loading
                and self._measured_uses.get(key, MEASURED_USES) < MEASURED_USES):
            self._use_start[key] = (self._activity, self.probe.rss(), self.probe.device_used(),
                                    self._engine_extra(key))
        else:
            self._use_start.clear()  # overlapping uses: none of them measures cleanly

    def _engine_extra(self, key: Any) -> int:
        return int(getattr(self._resident.get(key), "extra_bytes", 0) or 0)

    def _charge_extra(self, key: Any) -> None:
        """Charge what the engine's extra sessions (`aptp.runtime.shape_sessions`) hold now,
        measured by the engine around each creation; recharged whenever it changes."""
        if key not in self._resident:
            return
        extra, record = self._engine_extra(key), self._records[key]
        if extra == record.extra_bytes:
            return
        record.extra_bytes = extra
        self._charged[key] = self._estimate(key)[0]
        self._fit_recharged(key, f"holds {format_bytes(extra)} of shape-specialised sessions")
        self._note_peak()

    def _end_use(self, key: Any) -> None:
        start = self._use_start.pop(key, None)
        if start is None or start[0] != self._activity or key not in self._resident or self._pins[key]:
            return
        self._measured_uses[key] += 1
        rss, device = self.probe.rss(), self.probe.device_used()
        gained = sum(max(0, now - then) for now, then in ((rss, start[1]), (device, start[2]))
                     if now is not None and then is not None)
        gained -= max(0, self._engine_extra(key) - start[3])  # charged as extra_bytes, not working memory
        if gained <= 0:
            return
        self._growth[key] = self._growth.get(key, 0) + gained
        record = self._records[key]
        if self._growth[key] <= (record.run_bytes or 0):
            return  # this residence has not yet outgrown what an earlier one measured
        record.run_bytes = self._growth[key]
        self._charged[key] = self._estimate(key)[0]
        self._fit_recharged(key, f"grew its working memory to {format_bytes(record.run_bytes)} while running")
        self._note_peak()

    def _fit_recharged(self, key: Any, why: str) -> None:
        """After `key`'s charge grew: evict others to fit it, or count (and log) the overshoot
        that pinned sessions leave."""
        if self.budget is None or self._make_room(0, keep=key, best_effort=True):
            return
        # What _make_room measured: the charges plus the RSS no charge explains (the charges
        # alone can sit below the budget while the process is above it).
        over = self._total() + self._excess() - self.budget
        if over <= 0:
            return
        self.overshoots += 1
        self.max_overshoot_bytes = max(self.max_overshoot_bytes, over)
        logger.warning("%s %s; pinned sessions leave the budget %s exceeded by %s until they are released",
                       self._describe(key), why, format_bytes(self.budget), format_bytes(over))

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._total())

    def _unpin(self, key: Any) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def _make_room(self, need: int, keep: Any, best_effort: bool = False) -> bool:
        """Evict unpinned sessions, least recently used first, until `need` more bytes fit
        (nothing is evicted when they cannot make enough room, unless `best_effort`)."""
        if self.budget is None:
            return True
        excess = self._excess()
        evictable = sum(self._charged[k] for k in self._resident if k != keep and not self._pins[k])
        others_busy = any(k != keep for k in self._pins) or any(k != keep for k in self._loading)
        if self._total() - evictable + need + excess > self.budget and not best_effort and others_busy:
            return False  # pinned sessions hold the room: evict nothing, wait for a release
        while self._total() + need + excess > self.budget:
            victim = next((k for k in self._resident if k != keep and not self._pins[k]), None)
            if victim is None:
                break
            self._evict(victim)  # trims the heap: the excess may shrink with it
            excess = self._excess()
        # With nothing left to evict and nobody to wait for, a load goes ahead alone (the
        # report counts the overshoot once it is loaded).
        return self._total() + need + excess <= self.budget or not best_effort

    def _excess(self) -> int:
        """Process RSS above the floor that no charge explains (0 before the first load)."""
        rss = self.probe.rss()
        if self._floor is None or rss is None:
            return 0
        self._floor = min(self._floor, rss)
        self.unattributed_bytes = max(0, rss - self._floor - self._total())
        return self.unattributed_bytes

    def _evict(self, key: Any) -> None:
        engine = self._resident.pop(key)
        engine.unload()
        retire = getattr(engine, "retire", None)
        if retire is not None:  # a caller still holding it must not reload it outside the budget
            retire(f"{self._describe(key)} was evicted under the memory budget")
        self._activity += 1
        self._growth.pop(key, None)
        self._measured_uses.pop(key, None)
        self._records[key].extra_bytes = 0  # the unloaded engine dropped its specialised sessions
        charged = self._charged.pop(key, 0)
        self._records[key].evictions += 1
        self.evictions += 1
        self.events.append((time.monotonic(), "evict", key, charged))
        logger.info("evicted %s (%s)", self._describe(key), format_bytes(charged))
        release_free_heap()

    # ---- loading (outside self._cond, one at a time) --------------------------------------

    def _load(self, key: Any) -> Any:
        with self._load_lock:
            engine = self.factory(key)
            rss0, dev0 = self.probe.rss(), self.probe.device_used()
            peak_known = self.probe.reset_peak()
            clock = time.perf_counter()
            engine.load()
            seconds = time.perf_counter() - clock
            release_free_heap()  # what the load freed (verified bytes, parsing copies) is not the session's
            rss1, dev1 = self.probe.rss(), self.probe.device_used()
            peak = self.probe.peak_rss() if peak_known else None
        with self._cond:
            record = self._record(key)
            if peak is not None and rss0 is not None:
                record.load_peak_bytes = max(0, peak - rss0)
            record.rss_bytes = None if rss0 is None or rss1 is None else rss1 - rss0
            record.device_bytes = None if dev0 is None or dev1 is None else dev1 - dev0
            record.loads += 1
            record.load_seconds = seconds
        logger.info("loaded %s in %.2f s: RSS %s%s", self._describe(key), seconds, signed_bytes(record.rss_bytes),
                    "" if record.device_bytes is None else f", device {signed_bytes(record.device_bytes)}")
        return engine
