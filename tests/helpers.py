"""Test helpers shared by every op's tests: devices, schedules, random data, comparisons, finite differences,
bad-input tables and benchmark loading. A test file keeps only what is specific to its op.

Every kernel test runs on ``emu`` (always; CI has no GPU), on ``cuda`` when a GPU is usable, and on ``cpu`` (the fast
CPU path, ``convnet.cpu``), against the NumPy reference on the host. ``conftest.py`` turns the device lists into the ``kernel_device``, ``any_device`` and
``cuda_device`` fixtures, and marks every test that gets a cuda device ``cuda`` (tools/gpu_check.sh counts them).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import convnet
from convnet import emu
from convnet.devices import Device, device_report, get_device

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- devices
def _cuda_param():
    for entry in device_report():
        if entry["device"] == "cuda:0" and entry["usable"]:
            return pytest.param(Device("cuda", 0), id="cuda")
    reason = next((e["detail"] for e in device_report() if e["device"].startswith("cuda")), "no GPU")
    return pytest.param(Device("cuda", 0), id="cuda", marks=pytest.mark.skip(reason=reason))


def _emu_param():
    get_device("emu")  # the emulator must be built: a missing _emu is a failure, not a skip
    return pytest.param(Device("emu"), id="emu")


def _cpu_param():
    get_device("cpu")  # convnet._cpu must be built: a missing module is a failure, not a skip
    return pytest.param(Device("cpu"), id="cpu")


NUMPY = Device("numpy")
EMU = Device("emu")
CPU = Device("cpu")
CUDA_DEVICES = [_cuda_param()]                                     # GPU-only tests (skipped here, with the reason)
COMPILED_DEVICES = [_emu_param(), *CUDA_DEVICES]                    # the compiled kernels (tests of their internals)
KERNEL_DEVICES = [*COMPILED_DEVICES, _cpu_param()]                  # every implementation checked against numpy
ALL_DEVICES = [pytest.param(NUMPY, id="numpy")] + KERNEL_DEVICES    # and the NumPy reference device


# ---------------------------------------------------------------------------------------------------- schedules
SCHEDULES = emu.SCHEDULES


@contextlib.contextmanager
def schedule(device: Device, order: str, seed: int = 0):
    """Emulator schedule order on emu; a no-op on the GPU (whose schedule is the hardware's)."""
    if device.kind == "emu":
        with emu.schedule(order, seed):
            yield
    else:
        yield


def assert_schedules_identical(run, names, *, seed: int):
    """``run()`` returns a tuple of results (arrays or numbers); under every emulator schedule order each must be
    bit-identical to its value under the first order (a missing barrier or a racy reduction shows up here)."""
    results = {}
    for order in SCHEDULES:
        with emu.schedule(order, seed):
            results[order] = tuple(run())
    first = SCHEDULES[0]
    for order in SCHEDULES[1:]:
        assert len(results[order]) == len(names)
        for name, got, want in zip(names, results[order], results[first]):
            assert_identical(f"{name} ({order} vs {first})", got, want)


# ---------------------------------------------------------------------------------------------------- data
def rand(rng: np.random.Generator, shape, dtype=np.float32, low=-1.0, high=1.0) -> np.ndarray:
    """Random data in [low, high): never zeros, never a constant."""
    return rng.uniform(low, high, size=shape).astype(dtype)


def misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous host copy of ``a`` whose data pointer is 4 bytes past a 16-byte boundary (forces the kernels'
    scalar path)."""
    buf = np.empty(a.size + 8, a.dtype)
    off = (-(buf.ctypes.data // 4) % 4 + 1) % 4 or 1
    out = buf[off:off + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 16 != 0 and out.flags.c_contiguous
    return out


def offset_view(device: Device, a: np.ndarray, rng: np.random.Generator):
    """``a`` on ``device`` as a view starting one element into a (random-filled) buffer: contiguous but not
    16-byte aligned, on any device (the scalar path)."""
    buf = device.asarray(rand(rng, a.size + 1))
    view = buf[1:].reshape(a.shape)
    view[...] = device.asarray(a)
    return view


# ---------------------------------------------------------------------------------------------------- comparisons
def to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def assert_close(name: str, got, want, *, rtol: float, atol: float = 0.0):
    """Compare against the reference; on failure report the worst element and the error statistics."""
    got, want = to_host(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values in the result"
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = atol + rtol * np.abs(want.astype(np.float64))
    if not (err <= bound).all():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{name}: {int((err > bound).sum())}/{err.size} elements off; worst at {i}: "
                             f"got {got[i]!r}, want {want[i]!r} (|err| {err[i]:.3g} > {bound[i]:.3g}); "
                             f"max |err| {err.max():.3g}")


def assert_identical(name: str, got, want):
    """Same shape, dtype and bits (NaN where the other has NaN)."""
    got, want = to_host(got), to_host(want)
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{name}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    if not np.array_equal(got, want, equal_nan=True):
        same = (got == want) | (np.isnan(got) & np.isnan(want)) if got.dtype.kind in "fc" else got == want
        diff = np.argwhere(~same)
        raise AssertionError(f"{name}: not bit-identical; {len(diff)} elements differ, first at {tuple(int(i) for i in diff[0])}")


# ---------------------------------------------------------------------------------------------------- gradients
def sample_indices(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """``min(n, size)`` distinct flat indices of an array of ``size`` elements."""
    return rng.choice(size, size=min(n, size), replace=False)


def numeric_grad(f, x, eps=1e-6, idx=None) -> np.ndarray:
    """Central differences (float64) of the scalar ``f`` at ``x`` for the flat indices ``idx`` (all when None), in
    the order of ``idx``. ``f`` receives a float64 copy of ``x`` with one element moved by +-eps."""
    x = np.array(x, dtype=np.float64)
    flat = x.reshape(-1)
    idx = range(flat.size) if idx is None else idx
    g = []
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        g.append((fp - fm) / (2 * eps))
    return np.array(g)


def check_grad(f, x, analytic, *, eps=1e-6, n=60, rtol=1e-5, atol=1e-7, seed=0):
    """The analytic gradient of the scalar ``f`` at ``x`` agrees with central differences at ``n`` sampled
    elements: ``|analytic - numeric| <= atol + rtol * |numeric|`` for each."""
    rng = np.random.default_rng(seed)
    idx = sample_indices(rng, np.asarray(x).size, n)
    num = numeric_grad(f, x, eps, idx)
    a = np.asarray(analytic).reshape(-1)
    for i, v in zip(idx, num):
        assert abs(a[i] - v) <= atol + rtol * abs(v), f"flat index {i}: analytic {a[i]!r} vs numeric {v!r}"


# ---------------------------------------------------------------------------------------------------- bad inputs
def assert_raises_each(*cases):
    """Each case ``(exception, match, call)``: ``call()`` raises ``exception`` with a message matching the regular
    expression ``match``. A failure names the case."""
    for exception, match, call in cases:
        try:
            with pytest.raises(exception, match=match):
                call()
        except (Exception, pytest.fail.Exception) as exc:
            raise AssertionError(f"bad-input case ({exception.__name__}, {match!r}): {exc!r}") from exc


# ---------------------------------------------------------------------------------------------------- benchmarks
def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it, as an import would (dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------- a fake GPU
class FakeCupy:
    """A stand-in ``cupy`` module (install it as ``sys.modules["cupy"]``) that runs the cuda device's Python path on
    the CPU and records, for every array-module call and kernel launch, which device and which stream were current:
    the checks a GPU session would otherwise be the first to make. It follows CuPy's rules where ops depend on them:

    * one current device per thread (``cuda.Device(i)`` is a context manager); each device has its own current
      stream per thread (``cuda.get_current_stream()`` is the current device's; the null stream, ptr 0, is every
      device's default): the data loader's thread switching devices does not move the training thread's;
    * entering a ``cuda.Stream`` of another device than the current one is a RuntimeError (CuPy's
      ``check_stream_device_match``);
    * ``ndarray.get()`` copies on the current device's current stream (whatever GPU the array is on);
    * a device array is not a numpy.ndarray and never becomes one implicitly; mixing a host array into device
      arithmetic is a TypeError;
    * every array belongs to the GPU current when it was allocated (views to their base's), and a kernel launch, a
      copy or an array-module call whose operands are not all on the current GPU raises :class:`CrossDeviceError`
      (where CuPy would warn, enable peer access or raise, the fake always raises); the explicit peer copy
      (``runtime.memcpyPeerAsync``) is the way between GPUs, and ``get()`` reads any GPU's array (CuPy switches to it).

    Arrays are numpy memory (``ndarray`` wraps a numpy array and its device), so the emulator's kernels
    (``convnet._emu``) can stand in for ``convnet._cuda``: :meth:`kernels` wraps them to record each launch's stream
    handle. ``calls`` holds ``(what, current device, current stream ptr, launch stream handle or None)`` while
    ``recording`` is true.

    What CuPy shares with NumPy and the fake does not define by name (``log``, ``argmax``, ``x.transpose()``, ...) is
    NumPy's on the wrapped arrays, so whole training runs and benchmarks take their cuda branches here
    (``install(monkeypatch, usable=True)`` makes ``get_device("cuda:i")`` accept the fake's GPUs). Work runs when it is
    issued: stream order and timing are not modelled (emu's emulated streams are where a missing event wait shows)."""

    # the fake's own machinery; every other public name mirrors CuPy's (tests/test_cupy_api.py checks it against a
    # real CuPy: names, parameters, defaults, constants)
    MACHINERY = frozenset({"calls", "recording", "devices", "current", "null", "next_ptr", "events", "stacks",
                           "streams", "HOST_SYNCS", "waits_for", "HOST_ONLY", "record", "array_on", "kernels",
                           "install", "MACHINERY", "VIEWS", "check_current", "check_pointer"})

    def __init__(self, devices: int = 2):
        fake = self
        self.calls, self.recording, self.devices = [], False, devices  # calls: not log (cupy.log)
        self._pointers = {}  # address -> GPU of the arrays whose ``data`` was taken (check_pointer)
        self._local = threading.local()  # the current device and streams are per thread, as CUDA's and CuPy's
        self.null = None
        self.streams = {}  # ptr -> every stream made (waits_for asks whether it is blocking)

        class Stream:
            def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
                # CuPy's constructor: a new stream of the current device, or (null=True) the legacy default stream,
                # handle 0 on every device
                if null:
                    self.ptr, self.device_id = 0, -1
                else:
                    fake.next_ptr += 1
                    self.ptr, self.device_id = fake.next_ptr, fake.current
                self._blocking = not non_blocking  # synchronises with the legacy default stream (see waits_for)
                fake.streams[self.ptr] = self

            def wait_event(self, event):
                fake.record("wait", event.index, stream=self)

            def __enter__(self):
                if self.device_id not in (-1, fake.current):
                    raise RuntimeError(f"The device that the stream is created on ({self.device_id}) is different "
                                       f"from the current device ({fake.current})")
                fake.stacks[fake.current].append(self)
                return self

            def __exit__(self, *exc):
                fake.stacks[fake.current].pop()

            def synchronize(self):
                fake.record("stream synchronize", stream=self)

            def record(self, event=None):
                event = event if event is not None else Event()
                event.record(self)
                return event

            def begin_capture(self, mode=None):  # the calls run as they are made; the graph replays nothing
                fake.record("begin capture", stream=self)

            def end_capture(self):
                fake.record("end capture", stream=self)
                return Graph()

        class Graph:
            def launch(self, stream=None):
                fake.record("graph launch", stream=stream)

        class ExternalStream(Stream):
            def __init__(self, ptr, device_id=-1):  # CuPy's: a stream made elsewhere, by its handle and GPU
                self.ptr, self.device_id = ptr, device_id
                self._blocking = True  # cudaStreamCreate's default
                fake.streams.setdefault(ptr, self)

        class Event:
            def __init__(self, block=False, disable_timing=False, interprocess=False):
                self.index, self.done, self.time = len(fake.events), True, None
                fake.events.append(self)

            def record(self, stream=None):
                self.time = time.perf_counter()  # the fake's work is done when issued: events time the host
                fake.record("record", self.index, stream=stream if stream is not None else get_current_stream())

            def synchronize(self):  # the host waits for the event (the fake's work is done when issued)
                fake.record("event synchronize", self.index)

        class CUDARuntimeError(RuntimeError):
            def __init__(self, status):
                super().__init__(f"status {status}")
                self.status = status

        class Runtime:
            """Copies really copy (fake device memory is host memory) and are logged on their stream handle."""
            memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice = 1, 2, 3

            @staticmethod
            def deviceCanAccessPeer(device, peerDevice):
                return 1

            @staticmethod
            def getDeviceCount():
                return fake.devices

            @staticmethod
            def runtimeGetVersion():
                return 13000

            @staticmethod
            def driverGetVersion():
                return 13000

            @staticmethod
            def getDeviceProperties(device):  # CuPy's dict: a made-up sm_90 with 2 SMs
                return {"name": b"FakeCupy GPU", "major": 9, "minor": 0, "multiProcessorCount": 2,
                        "clockRate": 1_000_000, "totalGlobalMem": 1 << 30}

            cudaDevAttrClockRate = 13

            @staticmethod
            def deviceGetAttribute(attrib, device):  # the attributes the sources ask for
                if attrib != Runtime.cudaDevAttrClockRate:
                    raise CUDARuntimeError(1)  # cudaErrorInvalidValue
                return 1_000_000

            @staticmethod
            def deviceEnablePeerAccess(peerDevice):
                pass

            @staticmethod
            def memGetInfo():  # (free, total) bytes of the current GPU: all of it is free
                return 1 << 30, 1 << 30

            @staticmethod
            def memcpyAsync(dst, src, size, kind, stream):
                fake.record("memcpy", stream)
                for ptr, device_side in ((dst, (Runtime.memcpyHostToDevice, Runtime.memcpyDeviceToDevice)),
                                         (src, (Runtime.memcpyDeviceToHost, Runtime.memcpyDeviceToDevice))):
                    if kind in device_side:
                        fake.check_pointer("memcpyAsync", ptr)
                ctypes.memmove(dst, src, size)

            @staticmethod
            def memcpyPeerAsync(dst, dstDevice, src, srcDevice, size, stream):
                fake.record("memcpy peer", stream)
                fake.check_pointer("memcpyPeerAsync's destination", dst, dstDevice)
                fake.check_pointer("memcpyPeerAsync's source", src, srcDevice)
                ctypes.memmove(dst, src, size)

        Runtime.CUDARuntimeError = CUDARuntimeError

        class Device:
            def __init__(self, device=None):
                self.id = fake.current if device is None else int(device)
                if not 0 <= self.id < fake.devices:
                    raise RuntimeError(f"cudaErrorInvalidDevice: {self.id}")
                self._prev = []

            def __enter__(self):
                self._prev.append(fake.current)
                fake.current = self.id
                return self

            def __exit__(self, *exc):
                fake.current = self._prev.pop()

            def synchronize(self):
                fake.record("device synchronize")

        def get_current_stream(device_id=-1):
            return fake.stacks[fake.current if device_id == -1 else device_id][-1]

        def get_elapsed_time(start_event, end_event):  # milliseconds between the records, on the host's clock
            return (end_event.time - start_event.time) * 1e3

        class Profiler:  # cupy.cuda.profiler: the range a profiler started with --profile-from-start off records
            @staticmethod
            def start():
                fake.record("profiler start")

            @staticmethod
            def stop():
                fake.record("profiler stop")

        self.next_ptr, self.events = 0x100, []
        self.null = Stream(null=True)
        pinned = []  # pinned buffers stay alive with the fake
        self.cuda = type("cuda", (), dict(Stream=Stream, ExternalStream=ExternalStream, Device=Device, Event=Event,
                                          runtime=Runtime,
                                          get_current_stream=staticmethod(get_current_stream),
                                          get_elapsed_time=staticmethod(get_elapsed_time), profiler=Profiler,
                                          alloc_pinned_memory=staticmethod(
                                              lambda size: pinned.append(np.empty(size, np.uint8))
                                              or type("Pinned", (), {"ptr": pinned[-1].ctypes.data})()),
                                          set_allocator=staticmethod(lambda allocator=None: None),
                                          set_pinned_memory_allocator=staticmethod(lambda allocator=None: None)))
        self.__version__ = "fake"

        def unwrap(v, what):
            if isinstance(v, ndarray):
                return v._a
            if isinstance(v, np.ndarray) and v.ndim:
                raise TypeError(f"fake cupy: a host numpy array in {what} with device arrays")
            if isinstance(v, (list, tuple)):
                return type(v)(unwrap(e, what) for e in v)
            return v

        def wrap(result):
            """A NumPy result as CuPy returns it: arrays and NumPy scalars (reductions) as device arrays."""
            if isinstance(result, (np.ndarray, np.generic)):
                return fake._wrap(np.asarray(result))
            if isinstance(result, tuple):
                return tuple(wrap(r) for r in result)
            return result

        def delegate(name, fn, owner=None):
            """``fn`` (a NumPy function or bound method of ``owner``) on unwrapped device arrays, its result wrapped:
            the array functions and methods CuPy shares with NumPy that the fake does not define one by one. (Which
            names the sources use, CuPy must have: tests/test_cupy_api.py.)"""
            def call(*args, **kwargs):
                fake.record(name)
                fake.check_current(name, owner, *args, *kwargs.values())
                out = kwargs.get("out")
                result = fn(*(unwrap(a, name) for a in args), **{k: unwrap(v, name) for k, v in kwargs.items()})
                return out if out is not None else wrap(result)
            return call
        self._delegate = delegate

        class ndarray:
            """A device array: numpy memory and the GPU it is on. Not a numpy.ndarray (as CuPy's is not), and never
            converted to one implicitly (``__array__`` raises, as CuPy's does)."""

            __array_ufunc__ = None  # numpy scalars defer to our operators (np.float32(2) * a), as with CuPy's

            def __init__(self, a, dev):
                self._a, self._dev = a, dev

            shape = property(lambda self: self._a.shape)
            dtype = property(lambda self: self._a.dtype)
            ndim = property(lambda self: self._a.ndim)
            size = property(lambda self: self._a.size)
            nbytes = property(lambda self: self._a.nbytes)
            strides = property(lambda self: self._a.strides)
            flags = property(lambda self: self._a.flags)
            T = property(lambda self: ndarray(self._a.T, self._dev))
            device = property(lambda self: type("Device", (), {"id": self._dev})())
            @property
            def data(self):  # the address, remembered as this GPU's: kernels and copies get addresses, not arrays
                ptr = self._a.ctypes.data
                fake._pointers[ptr] = self._dev
                return type("MemoryPointer", (), {"ptr": ptr})()

            def __array__(self, *args, **kwargs):
                raise TypeError("fake cupy: implicit conversion to a NumPy array is not allowed; use .get()")

            def __len__(self):
                return len(self._a)

            def __getitem__(self, key):
                if any(isinstance(k, ndarray) for k in (key if isinstance(key, tuple) else (key,))):
                    fake.check_current("advanced indexing", self, key)  # a gather kernel (a basic slice is a view)
                return ndarray(self._a[unwrap(key, "an index")], self._dev)

            def __iter__(self):
                return (ndarray(a, self._dev) for a in self._a)

            def __getattr__(self, name):  # the other NumPy-shared methods (transpose, all, max, ...)
                if name.startswith("_") or not hasattr(np.ndarray, name):
                    raise AttributeError(f"fake cupy: ndarray has no attribute {name!r}")
                attr = getattr(self._a, name)
                if not callable(attr):
                    return wrap(attr)
                if name in fake.VIEWS:  # the same memory, on its GPU whichever is current
                    return lambda *args, **kwargs: ndarray(attr(*args, **kwargs), self._dev)
                return delegate(name, attr, self)

            # 0-d arrays convert to Python numbers (CuPy syncs and copies the value); larger ones raise, as NumPy's
            __float__ = lambda self: float(self._a)  # noqa: E731
            __int__ = lambda self: int(self._a)  # noqa: E731
            __bool__ = lambda self: bool(self._a)  # noqa: E731

            def __setitem__(self, key, value):
                fake.record("setitem")
                fake.check_current("setitem", self, key, value)
                self._a[key] = unwrap(value, "setitem")

            def reshape(self, *shape):
                return ndarray(self._a.reshape(*shape), self._dev)

            def get(self, stream=None):
                fake.record("get")
                return np.array(self._a)

            def set(self, arr, stream=None):  # host -> device, on ``stream`` (None: the current one)
                fake.record("set", stream=stream)
                self._a[...] = arr

            def _op(name, inplace=False):
                def op(self, other):
                    fake.record(name)
                    fake.check_current(name, self, other)
                    result = getattr(self._a, name)(unwrap(other, name))
                    return self if inplace else fake._wrap(np.asarray(result))
                return op

            __mul__, __rmul__, __add__, __radd__ = _op("__mul__"), _op("__rmul__"), _op("__add__"), _op("__radd__")
            __sub__, __imul__, __iadd__ = _op("__sub__"), _op("__imul__", True), _op("__iadd__", True)
            __isub__ = _op("__isub__", True)
            __truediv__, __itruediv__ = _op("__truediv__"), _op("__itruediv__", True)
            __rsub__, __rtruediv__, __pow__, __neg__ = _op("__rsub__"), _op("__rtruediv__"), _op("__pow__"), \
                lambda self: fake.check_current("__neg__", self) or fake._wrap(-self._a)
            __lt__, __le__, __gt__, __ge__ = _op("__lt__"), _op("__le__"), _op("__gt__"), _op("__ge__")
            __eq__, __ne__ = _op("__eq__"), _op("__ne__")
            __hash__ = None

        class Random:  # cupy.random's part the benchmarks use
            @staticmethod
            def rand(*size, dtype=float):
                fake.record("random")
                return fake._wrap(np.random.default_rng(0).random(size, dtype=np.float64).astype(dtype))

        self.random = Random()
        self.ndarray = ndarray

    # -- per thread, as in CUDA: the current device, and each device's stack of current streams ---------------------
    @property
    def current(self) -> int:
        return getattr(self._local, "current", 0)

    @current.setter
    def current(self, index: int):
        self._local.current = index

    @property
    def stacks(self) -> dict:
        stacks = getattr(self._local, "stacks", None)
        if stacks is None:
            stacks = self._local.stacks = {i: [self.null] for i in range(self.devices)}
        return stacks

    # -- recording --------------------------------------------------------------------------------------------------
    def record(self, what, handle=None, stream=None):
        """Log ``what`` with the current device and stream (``stream``: the one it is about, for events)."""
        if self.recording:
            current = self.stacks[self.current][-1] if stream is None else stream
            self.calls.append((what, self.current, current.ptr, handle))

    def _wrap(self, a):
        return self.ndarray(a, self.current)

    # -- where arrays live: every operand on the current GPU ---------------------------------------------------------
    VIEWS = frozenset({"view", "transpose", "swapaxes", "squeeze"})  # methods that launch nothing: any GPU's array

    def check_current(self, what, *operands):
        """CrossDeviceError unless every device array among ``operands`` (lists, tuples and dicts searched) is on
        the current GPU."""
        for a in operands:
            if isinstance(a, (list, tuple)):
                self.check_current(what, *a)
            elif isinstance(a, dict):
                self.check_current(what, *a.values())
            elif isinstance(a, self.ndarray) and a._dev != self.current:
                raise CrossDeviceError(f"fake cupy: {what} on an array of GPU {a._dev} while GPU {self.current} is "
                                       f"current")

    def check_pointer(self, what, ptr, device=None):
        """CrossDeviceError if ``ptr`` is the address of an array of another GPU than ``device`` (None: the
        current one). Addresses are known from ``ndarray.data`` (how every launch and copy gets them)."""
        on = self._pointers.get(ptr)
        want = self.current if device is None else device
        if on is not None and on != want:
            raise CrossDeviceError(f"fake cupy: {what} given an address on GPU {on}, "
                                   + (f"GPU {want} is current" if device is None else f"declared on GPU {want}"))

    # -- what the GPU would order: the recorded calls as a dependency graph ------------------------------------------
    HOST_SYNCS = ("get", "stream synchronize", "device synchronize", "event synchronize")

    def waits_for(self, later: int, earlier: int, implicit: bool = True) -> bool:
        """Whether recorded call ``calls[later]`` would run on a GPU only after ``calls[earlier]``, through: the
        order of each stream; an event waited for (``wait`` after the event's latest ``record``); the host waiting
        (``get``, a synchronize) before it issued ``later``; and the legacy default stream's implicit barriers, which
        CUDA adds and CuPy does not show: on a device, work on the null stream waits for all work issued before it on
        the device's *blocking* streams (``Stream(non_blocking=False)``, CuPy's default), and work on a blocking stream
        waits for all work issued before it on the null stream. Non-blocking streams are ordered by events only.
        ``implicit=False``: without those barriers (what the program's own events and syncs order)."""
        def stream_of(e):  # (device or None, ptr) of the stream a call runs on; None: not device work
            what = e[0]
            if what in ("profiler start", "profiler stop", "begin capture", "end capture", "event synchronize",
                        "stream synchronize", "device synchronize"):
                return None
            ptr = e[3] if what.startswith(("launch", "memcpy", "nccl")) else e[2]
            return (e[1], 0) if ptr == 0 else (None, ptr)

        def blocking(key):
            return key[1] != 0 and getattr(self.streams.get(key[1]), "_blocking", True)

        def device_of(key):
            return key[0] if key[0] is not None else getattr(self.streams.get(key[1]), "device_id", None)

        preds = [[] for _ in self.calls]
        last, recorded, host = {}, {}, None  # stream -> its last call; event -> its last record; the last host sync
        for i, e in enumerate(self.calls[:later + 1]):
            key = stream_of(e)
            if host is not None:
                preds[i].append(host)
            if e[0] in self.HOST_SYNCS:
                if e[0] == "event synchronize" and e[3] in recorded:
                    preds[i].append(recorded[e[3]])
                elif e[0] == "device synchronize":
                    preds[i] += [j for k, j in last.items() if device_of(k) == e[1]]
                elif e[0] == "stream synchronize" or e[0] == "get":
                    k = (e[1], 0) if e[2] == 0 else (None, e[2])
                    preds[i] += [last[k]] if k in last else []
                host = i
            if key is None:
                continue
            if key in last:
                preds[i].append(last[key])
            if e[0] == "wait" and e[3] in recorded:
                preds[i].append(recorded[e[3]])
            if not implicit:
                pass
            elif key[1] == 0:  # the legacy null stream waits for the device's blocking streams ...
                preds[i] += [j for k, j in last.items() if blocking(k) and device_of(k) == key[0]]
            elif blocking(key) and (device_of(key), 0) in last:  # ... and they for it
                preds[i].append(last[(device_of(key), 0)])
            if e[0] == "record":
                recorded[e[3]] = i
            last[key] = i
        seen, todo = set(), [later]
        while todo:
            for j in preds[todo.pop()]:
                if j == earlier:
                    return True
                if j > earlier and j not in seen:
                    seen.add(j)
                    todo.append(j)
        return False

    # -- the array module -------------------------------------------------------------------------------------------
    def empty(self, shape, dtype=float):
        self.record("empty")
        return self._wrap(np.empty(shape, dtype))

    def zeros(self, shape, dtype=float):
        self.record("zeros")
        return self._wrap(np.zeros(shape, dtype))

    def asarray(self, a, dtype=None):
        self.record("asarray")
        if isinstance(a, self.ndarray):  # another GPU's: a copy between GPUs outside the explicit peer copy
            self.check_current("asarray", a)
            return a if dtype is None or a.dtype == dtype else a.astype(dtype)
        return self._wrap(np.array(a, dtype=dtype, copy=True))

    def ascontiguousarray(self, a, dtype=None):
        self.record("ascontiguousarray")
        self.check_current("ascontiguousarray", a)
        if a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a
        return self._wrap(np.ascontiguousarray(a._a, dtype=dtype))

    def __getattr__(self, name):  # the other NumPy-shared functions (log, maximum, arange, argmax, ...) and dtypes
        fn = getattr(np, name, None) if not name.startswith("_") else None
        if isinstance(fn, type) and issubclass(fn, np.generic):
            return fn  # cupy.float32 is numpy.float32
        if fn is None or not callable(fn) or isinstance(fn, type):
            raise AttributeError(f"fake cupy has no attribute {name!r}")
        return self._delegate(name, fn)

    def array_on(self, device, host):
        """A device array of GPU ``device`` holding ``host`` (test setup; not recorded)."""
        return self.ndarray(np.array(host), device)

    # -- kernels ----------------------------------------------------------------------------------------------------
    HOST_ONLY = ("_workspace", "_plan", "_tile_count", "_tile_override")

    def kernels(self, module):
        """``module`` (convnet._emu) with each launch recorded: the stream handle is its last argument."""
        fake = self

        class Kernels:
            def __getattr__(self, name):
                attr = getattr(module, name)
                if not callable(attr) or name.endswith(fake.HOST_ONLY) or isinstance(attr, type):
                    return attr

                def launch(*args):
                    fake.record(f"launch {name}", args[-1])
                    for a in args[:-1]:
                        if isinstance(a, int):
                            fake.check_pointer(f"launch {name}", a)
                    return attr(*args)
                return launch

        return Kernels()

    def install(self, monkeypatch, usable=False):
        """Make this the ``cupy`` of the cuda backend, with the emulator's kernels as ``convnet._cuda``; ``usable``:
        also make ``get_device("cuda:i")`` accept the fake's GPUs (whole training runs)."""
        from convnet.devices import backend_cuda

        if usable:
            monkeypatch.setattr(backend_cuda, "gpu_count", lambda: (self.devices, ""))
            monkeypatch.setattr(backend_cuda.CudaDevice, "available",
                                lambda dev: (dev.index < self.devices, "a fake GPU (tests/helpers.FakeCupy)"))
        monkeypatch.setitem(sys.modules, "cupy", self)
        monkeypatch.setitem(sys.modules, "cupyx", FakeCupyx(self))
        monkeypatch.setattr(backend_cuda, "_allocator_configured", True)
        kernels = self.kernels(EMU.kernels)
        monkeypatch.setattr(backend_cuda.CudaDevice, "kernels", property(lambda dev: kernels))
        return self


class CrossDeviceError(RuntimeError):
    """:class:`FakeCupy`: an operand of a kernel launch, a copy or an array-module call is not on the current GPU."""


class FakeCupyx:
    """The part of ``cupyx`` the cuda path uses, for :class:`FakeCupy` (installed with it): pinned host arrays."""

    MACHINERY = frozenset({"fake", "MACHINERY"})

    def __init__(self, fake):
        self.fake = fake

    def empty_pinned(self, shape, dtype=float, order="C"):
        return np.empty(shape, dtype, order=order)  # host memory, as CuPy's (a numpy array over pinned memory)


def subprocess_env(*first_on_path, **extra) -> dict:
    """The environment for a subprocess that must import the convnet under test (installed in CI, ``src/`` in a
    development build) and never a checkout's unbuilt sources: that package's parent folder goes first on the path."""
    under_test = str(Path(convnet.__file__).resolve().parents[1])
    path = os.pathsep.join([*map(str, first_on_path), under_test, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, **extra)


class FakeNccl:
    """A stand-in ``cupy.cuda.nccl`` for :class:`FakeCupy` (``FakeNccl().install(fake)``): ``get_unique_id``,
    ``NcclCommunicator(ndev, uid, rank)`` and its ``allReduce(send, recv, count, datatype, op, stream)`` on the fake's
    device memory (host memory, by address). With ``ndev`` > 1 the ranks are MPI processes (the test runs under
    mpirun) and the sum goes through mpi4py's ``COMM_WORLD``; with one rank it is a copy, as NCCL's. Each call is logged
    in the fake's ``calls`` as ``("nccl allReduce", device, current stream, launch stream handle)``."""

    NCCL_SUM, NCCL_FLOAT32, NCCL_FLOAT64 = 0, 7, 8
    available = True
    MACHINERY = frozenset({"fake", "install", "MACHINERY"})  # the rest mirrors cupy.cuda.nccl (tests/test_cupy_api.py)

    def __init__(self):
        self.fake = None
        nccl = self

        class NcclCommunicator:
            def __init__(self, ndev, commId, rank):
                if not isinstance(commId, bytes):  # CuPy 14's type (13 and older: a tuple of ints)
                    raise TypeError(f"fake nccl: commId must be get_unique_id()'s bytes, got {type(commId).__name__}")
                if len(commId) != 128:
                    raise ValueError(f"commId length {len(commId)} != 128.")
                if not 0 <= rank < ndev:
                    raise ValueError(f"fake nccl: rank {rank} of {ndev}")
                self.ndev, self.rank_ = ndev, rank
                self.device = nccl.fake.current

            def rank_id(self):
                return self.rank_

            def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
                import ctypes
                if op != FakeNccl.NCCL_SUM:
                    raise ValueError(f"fake nccl: op {op} (only NCCL_SUM)")
                ctype = {FakeNccl.NCCL_FLOAT32: ctypes.c_float, FakeNccl.NCCL_FLOAT64: ctypes.c_double}[datatype]
                send = np.ctypeslib.as_array((ctype * count).from_address(sendbuf))
                recv = np.ctypeslib.as_array((ctype * count).from_address(recvbuf))
                nccl.fake.record("nccl allReduce", stream)
                for ptr in (sendbuf, recvbuf):  # a communicator works on the GPU it was made on
                    nccl.fake.check_pointer("nccl allReduce", ptr, self.device)
                if self.ndev > 1:
                    from mpi4py import MPI
                    MPI.COMM_WORLD.Allreduce(send.copy(), recv, op=MPI.SUM)
                elif recvbuf != sendbuf:
                    recv[...] = send

        self.NcclCommunicator = NcclCommunicator

    @staticmethod
    def get_unique_id():
        return os.urandom(128)  # CuPy 14 returns the id as 128 bytes

    def install(self, fake):
        """Make this ``fake.cuda.nccl``."""
        self.fake = fake
        fake.cuda.nccl = self
        return self
