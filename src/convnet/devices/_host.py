"""What the host devices (numpy, cpu, emu) share: host arrays tagged with their virtual device, and the BLAS pool.

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

from convnet.devices.device import Device

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


class HostDevice(Device):
    """Arrays are C-contiguous numpy.ndarray in host memory; index i >= 1 is a virtual device whose arrays are
    tagged (module docstring).

    A kind with ``streams`` (emu) has emulated streams (:mod:`convnet.devices.host_streams`): work on one runs on its
    worker, asynchronously; the current stream is per device and thread (``on_stream``); with none current, work runs
    on the host when it is issued. Reading an array on the host (``to_numpy``) first waits for this kind's streams,
    as ``cupy.ndarray.get()`` waits for the GPU. Such a kind also fills new arrays with NaN (``empty``), so a kernel
    or a copy that reads memory before it is written gives NaN instead of plausible stale numbers. The other host
    kinds (numpy, cpu) run everything on the host in issue order: a stream there is None."""

    streams = None  # a kind with emulated streams: a WeakSet of every one of its streams not yet collected

    def _setup(self):
        object.__setattr__(self, "_local", threading.local())  # .stream: the calling thread's current stream

    # -- streams ------------------------------------------------------------------------------------------------
    def new_stream(self):
        if self.streams is None:
            return None
        from convnet.devices.host_streams import HostStream

        stream = HostStream(f"{self.kind}:{self.index}")
        self.streams.add(stream)
        return stream

    def _resolve(self, stream):
        return stream if stream is not None else getattr(self._local, "stream", None)

    @contextlib.contextmanager
    def on_stream(self, stream=None):
        if stream is None or self.streams is None:
            yield
            return
        before = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = before

    def runs_at_issue(self, stream=None):
        return self._resolve(stream) is None

    def submit(self, fn, stream=None):
        s = self._resolve(stream)
        if s is None:
            fn()
        else:
            s.submit(fn)

    def record_event(self, stream=None):
        s = self._resolve(stream)
        return None if s is None else s.record()

    def wait_event(self, event, stream=None):
        if event is None:
            return
        s = self._resolve(stream)
        if s is None:
            event.wait()  # the host is the current stream: it waits
        else:
            s.wait(event)

    def synchronize(self):
        for s in list(self.streams or ()):
            if s.name == f"{self.kind}:{self.index}":
                s.synchronize()

    # -- arrays -------------------------------------------------------------------------------------------------
    def _allocate(self, shape, dtype):
        dtype = np.dtype(dtype)
        if self.streams is not None and dtype.kind in "fc":
            return np.full(shape, np.nan, dtype)
        return np.empty(shape, dtype)

    @property
    def xp(self):
        return np

    @property
    def array_name(self) -> str:
        return "numpy.ndarray"

    def _tag(self) -> str | None:
        """The tag of this device's memory: None for index 0 (untagged host memory)."""
        return f"{self.kind}:{self.index}" if self.index else None

    def is_array(self, a) -> bool:
        if not isinstance(a, np.ndarray):
            return False
        if not _TAGS:  # no virtual device's array is alive: every array is the host's own
            return not self.index
        return tag_of(a) == self._tag()

    def describe_array(self, a) -> str:
        if not isinstance(a, np.ndarray):
            return super().describe_array(a)
        return f"numpy.ndarray of {tag_of(a) or f'{self.kind}:0 (untagged host memory)'}"

    def adopt(self, a):
        """Claim ``a``'s memory (new, untagged, or already this device's) for this device; an array of another device
        is a TypeError: it needs a copy (``ops.copy``)."""
        if not self.index and not _TAGS:
            return a
        owner, mine = tag_of(a), self._tag()
        if owner != mine:
            if owner is not None:
                raise TypeError(f"a numpy.ndarray of {owner} cannot become an array of {self.kind}:{self.index} "
                                f"without a copy (convnet.ops.copy)")
            _tag(a, mine)
        return a

    def asarray(self, a, dtype=None):
        if not isinstance(a, np.ndarray) and hasattr(a, "get"):  # a cupy array coming back to the host
            a = a.get()
        b = np.ascontiguousarray(a, dtype=dtype)
        if self.is_array(b):
            return b
        if tag_of(b) is not None or (isinstance(a, np.ndarray) and _root(b) is _root(a)):
            b = b.copy()  # another device's memory, or a caller's host array (never claimed): copied
        return self.adopt(b)

    def to_numpy(self, a) -> np.ndarray:
        for s in list(self.streams or ()):
            s.synchronize()
        return np.asarray(a)

    def pointer(self, a) -> int:
        return int(a.ctypes.data)

    def free_memory(self):
        return "host memory", available_ram()

    def copy(self, a, src, out, stream=None, src_stream=None):
        """A real copy from ``a`` (``src``'s memory, written on ``src_stream``) into ``out`` (this device's), on
        ``stream``, the consumer's: that stream first waits for an event recorded on the producer's, as on a GPU
        (without streams: done when it returns)."""
        s_dst, s_src = self._resolve(stream), src._resolve(src_stream)
        if s_src is not s_dst:
            self.wait_event(src.record_event(s_src), s_dst)
        self.submit(lambda: np.copyto(out, a), s_dst)
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
