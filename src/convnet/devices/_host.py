"""What the CPU backends (numpy, cpu, emu) share: host arrays tagged with their virtual device, and the BLAS pool.

Every index of a host kind is a *virtual device* of the one host (``emu:0``/``emu:1`` stand for two GPUs in the
two-tower tests). So that a missing copy between them fails instead of passing silently, memory belongs to one
virtual device: an array made for ``kind:i`` with i >= 1 (``Device.empty/zeros/asarray``, an op's result,
``ops.copy``, :meth:`Device.adopt`) is tagged with that device, and only ``kind:i`` accepts it. Index 0 is the host's
own memory: it accepts every untagged array -- any NumPy array a user makes -- so single-device code is unchanged.

The tag belongs to the array owning the memory (the root of the ``.base`` chain), so every view of a tagged array
(slice, reshape, ``np.asarray``) is of the same device; new memory computed from device arrays (``a + b``,
``np.concatenate``) is untagged until its device adopts it. Tags live in a registry keyed by the root's ``id``
and are dropped when the root is freed (a weak reference's callback runs before its id can be reused). While no
array of an index >= 1 is alive the registry is empty and the check is one ``isinstance`` and one dict test.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref

import numpy as np

from convnet.devices.backend import Backend

# id(root array) -> (device name, weak reference whose callback drops the entry); only indices >= 1 are here
_TAGS: dict = {}


def _root(a: np.ndarray) -> np.ndarray:
    """The array owning ``a``'s memory (``a`` itself, or the end of its chain of ndarray bases)."""
    base = a.base
    while isinstance(base, np.ndarray):
        a, base = base, base.base
    return a


def tag_of(a: np.ndarray) -> str | None:
    """The virtual device (``"emu:1"``) whose memory ``a`` is, or None for the host's own memory (index 0)."""
    if not _TAGS:
        return None
    entry = _TAGS.get(id(_root(a)))
    return None if entry is None else entry[0]


def _tag(a: np.ndarray, name: str) -> None:
    root = _root(a)
    key = id(root)
    _TAGS[key] = (name, weakref.ref(root, lambda _, key=key: _TAGS.pop(key, None)))


class HostBackend(Backend):
    """Arrays are C-contiguous numpy.ndarray in host memory; index i >= 1 is a virtual device whose arrays are
    tagged (module docstring).

    A kind with ``emulates_streams`` (emu) has streams (:mod:`convnet.devices.host_streams`): work on one runs on its
    worker, asynchronously; the current stream is per thread (``on_stream``); with none current, work runs on the
    host when it is issued. Reading an array on the host (``to_numpy``) first waits for this kind's streams, as
    ``cupy.ndarray.get()`` waits for the GPU. Such a kind also fills new arrays with NaN (``empty``), so a kernel
    or a copy that reads memory before it is written gives NaN instead of plausible stale numbers. The other host
    kinds (numpy, cpu) run everything on the host in issue order: a stream there is None."""

    emulates_streams = False

    def __init__(self):
        self._local = threading.local()       # .current: {index: the calling thread's current stream}
        self._live = weakref.WeakSet()         # every stream of this kind not yet collected

    # -- streams ------------------------------------------------------------------------------------------------
    def new_stream(self, index):
        if not self.emulates_streams:
            return None
        from convnet.devices.host_streams import HostStream

        stream = HostStream(f"{self.kind}:{index}")
        self._live.add(stream)
        return stream

    def _current(self) -> dict:
        current = getattr(self._local, "current", None)
        if current is None:
            current = self._local.current = {}
        return current

    def _resolve(self, index, stream):
        return stream if stream is not None else self._current().get(index)

    @contextlib.contextmanager
    def on_stream(self, index, stream):
        if stream is None or not self.emulates_streams:
            yield
            return
        current = self._current()
        before = current.get(index)
        current[index] = stream
        try:
            yield
        finally:
            current[index] = before

    def runs_at_issue(self, index, stream):
        return self._resolve(index, stream) is None

    def submit(self, index, stream, fn):
        s = self._resolve(index, stream)
        if s is None:
            fn()
        else:
            s.submit(fn)

    def record_event(self, index, stream):
        s = self._resolve(index, stream)
        return None if s is None else s.record()

    def wait_event(self, index, stream, event):
        if event is None:
            return
        s = self._resolve(index, stream)
        if s is None:
            event.wait()  # the host is the current stream: it waits
        else:
            s.wait(event)

    def synchronize(self, index):
        for s in list(self._live):
            if s.name == f"{self.kind}:{index}":
                s.synchronize()

    def _synchronize_all(self):
        for s in list(self._live):
            s.synchronize()

    def empty(self, shape, dtype, index):
        dtype = np.dtype(dtype)
        if self.emulates_streams and dtype.kind in "fc":
            return np.full(shape, np.nan, dtype)
        return np.empty(shape, dtype)

    def xp(self):
        return np

    def array_name(self, index: int) -> str:
        return "numpy.ndarray"

    def _name(self, index: int) -> str | None:
        """The tag of this kind's device ``index``: None for index 0 (untagged host memory)."""
        return f"{self.kind}:{index}" if index else None

    def is_array(self, a, index: int) -> bool:
        if not isinstance(a, np.ndarray):
            return False
        if not _TAGS:  # no virtual device's array is alive: every array is the host's own
            return not index
        return tag_of(a) == self._name(index)

    def describe_array(self, a) -> str:
        if not isinstance(a, np.ndarray):
            return super().describe_array(a)
        return f"numpy.ndarray of {tag_of(a) or f'{self.kind}:0 (untagged host memory)'}"

    def adopt(self, a, index: int):
        """Claim ``a``'s memory (new, untagged, or already this device's) for device ``index``; an array of another
        device is a TypeError: it needs a copy (``ops.copy``)."""
        if not index and not _TAGS:
            return a
        owner, mine = tag_of(a), self._name(index)
        if owner != mine:
            if owner is not None:
                raise TypeError(f"a numpy.ndarray of {owner} cannot become an array of {self.kind}:{index} "
                                f"without a copy (convnet.ops.copy)")
            _tag(a, mine)
        return a

    def asarray(self, a, dtype, index: int):
        if not isinstance(a, np.ndarray) and hasattr(a, "get"):  # a cupy array coming back to the host
            a = a.get()
        b = np.ascontiguousarray(a, dtype=dtype)
        if self.is_array(b, index):
            return b
        if tag_of(b) is not None or (isinstance(a, np.ndarray) and _root(b) is _root(a)):
            b = b.copy()  # another device's memory, or a caller's host array (never claimed): copied
        return self.adopt(b, index)

    def to_numpy(self, a) -> np.ndarray:
        if self._live:
            self._synchronize_all()
        return np.asarray(a)

    def pointer(self, a) -> int:
        return int(a.ctypes.data)

    def free_memory(self, index):
        return "host memory", available_ram()

    def copy(self, a, src_index, dst_index, out, stream=None, src_stream=None):
        """A real copy from ``a`` (device ``src_index``'s memory, written on ``src_stream``) into ``out``
        (``dst_index``'s), on ``stream``, the consumer's: that stream first waits for an event recorded on the
        producer's, as on a GPU (without streams: done when it returns)."""
        s_dst, s_src = self._resolve(dst_index, stream), self._resolve(src_index, src_stream)
        if s_src is not s_dst:
            self.wait_event(dst_index, s_dst, self.record_event(src_index, s_src))
        self.submit(dst_index, s_dst, lambda: np.copyto(out, a))
        return out


def available_ram() -> int | None:
    """Bytes of RAM that can be allocated without swapping (Linux: MemAvailable, within a cgroup v2 limit), or
    None when the system does not say."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            pass
    try:  # a container's limit
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                left = max(0, int(limit) - int(g.read()))
                free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def busy_cores(window: float = 0.25) -> float:
    """How many cores other work keeps busy now: the machine's non-idle CPU time over ``window`` seconds
    (``/proc/stat``; 0 where there is none). A short sample, not the load average, which lags by minutes: a run
    started right after another one would see that one's load."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = total1 - total0
    return 0.0 if total <= 0 else (1.0 - (idle1 - idle0) / total) * (os.cpu_count() or 1)


def default_threads(limit: int = 8) -> int:
    """The CPU devices' default thread count: the cores this process may use (its affinity mask) that other work is
    not using now (:func:`busy_cores`), at least 1 and at most ``limit`` (the fmnist net's GEMMs stop scaling well
    before that). Why not simply every core: OpenBLAS's threads wait by spinning, so on a machine whose cores are
    taken by other work a 2-thread step was measured 5-25x slower than a 1-thread one (2-core box, two other jobs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, cores - round(busy_cores()), limit))


class blas_threads:
    """Limit the BLAS thread pool (threadpoolctl) while training on a CPU device; 0 leaves the library default."""

    def __init__(self, n, log=print):
        self.n, self.log, self.ctl = int(n or 0), log, None

    def __enter__(self):
        if self.n > 0:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:
                self.log("note: threadpoolctl is not installed; BLAS threads left at the library default "
                         "(pip install threadpoolctl, or set OPENBLAS_NUM_THREADS)")
                return self
            self.ctl = threadpool_limits(limits=self.n, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self.ctl is not None:
            self.ctl.restore_original_limits()
        return False
