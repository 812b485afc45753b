"""A fake CuPy (and cupyx, and CuPy's NCCL) that runs the cuda device's Python path on the CPU with the emulator's
kernels as ``convnet._cuda``: ``fake = FakeCupy(devices=2).install(monkeypatch)``. It keeps CuPy's rules where the
cuda path depends on them: one current GPU per thread, each GPU with its own stack of current streams (the null
stream, handle 0, is every GPU's default); every array belongs to the GPU current at its allocation (views to their
base's), and a launch, copy or array-module call with an operand on another GPU raises :class:`CrossDeviceError`
(``runtime.memcpyPeerAsync`` is the way between GPUs; ``get()`` reads any GPU's array); a device array never becomes a
NumPy array implicitly. While ``recording``, ``calls`` logs ``(what, current GPU, current stream handle, launch/copy
stream or event)``, which :meth:`FakeCupy.waits_for` orders as a GPU would. Work runs when it is issued. Every public
name mirrors CuPy's (tests/test_cupy_api.py), except each fake's ``MACHINERY``.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import types

import numpy as np


class CrossDeviceError(RuntimeError):
    """An operand of a kernel launch, a copy or an array-module call is not on the current GPU."""


# ---------------------------------------------------------------------------------------------------- cupy.cuda
class Stream:
    """A new stream of the current GPU, or (``null=True``) the legacy default stream, handle 0 on every GPU."""
    _fake = None  # each FakeCupy binds its own subclass (Cuda.__init__)

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        fake = self._fake
        if null:
            self.ptr, self.device_id = 0, -1
        else:
            fake.next_ptr += 1
            self.ptr, self.device_id = fake.next_ptr, fake.current
        self._blocking = not non_blocking  # synchronises with the legacy default stream (waits_for)
        fake.streams[self.ptr] = self

    def __enter__(self):
        if self.device_id not in (-1, self._fake.current):
            raise RuntimeError(f"The device that the stream is created on ({self.device_id}) is different from the "
                               f"current device ({self._fake.current})")
        self._fake.stacks[self._fake.current].append(self)
        return self

    def __exit__(self, *exc):
        self._fake.stacks[self._fake.current].pop()

    def wait_event(self, event):
        self._fake.record("wait", event.index, stream=self)

    def record(self, event=None):
        event = event if event is not None else self._fake.cuda.Event()
        event.record(self)
        return event

    def synchronize(self):
        self._fake.record("stream synchronize", stream=self)

    def begin_capture(self, mode=None):  # the calls run as they are made; the graph replays nothing
        self._fake.record("begin capture", stream=self)

    def end_capture(self):
        self._fake.record("end capture", stream=self)
        return types.SimpleNamespace(launch=lambda stream=None: self._fake.record("graph launch", stream=stream))


class Event:
    _fake = None

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.index, self.done, self.time = len(self._fake.events), True, None
        self._fake.events.append(self)

    def record(self, stream=None):
        self.time = time.perf_counter()  # the work is done when issued: events time the host
        self._fake.record("record", self.index, stream=stream if stream is not None else
                          self._fake.cuda.get_current_stream())

    def synchronize(self):
        self._fake.record("event synchronize", self.index)


class Device:
    _fake = None

    def __init__(self, device=None):
        self.id = self._fake.current if device is None else int(device)
        if not 0 <= self.id < self._fake.devices:
            raise RuntimeError(f"cudaErrorInvalidDevice: {self.id}")
        self._prev = []

    compute_capability = property(lambda self: self._fake.compute_capability)

    def __enter__(self):
        self._prev.append(self._fake.current)
        self._fake.current = self.id
        return self

    def __exit__(self, *exc):
        self._fake.current = self._prev.pop()

    def synchronize(self):
        self._fake.record("device synchronize")


class CUDARuntimeError(RuntimeError):
    def __init__(self, status):
        super().__init__(f"status {status}")
        self.status = status


class Runtime:
    """``cupy.cuda.runtime``: copies really copy (device memory is host memory), logged on their stream handle."""
    memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice = 1, 2, 3
    cudaDevAttrClockRate = 13
    CUDA_R_32F, CUDA_R_16BF = 0, 14  # cudaDataType_t: float, bfloat16
    CUDARuntimeError = CUDARuntimeError

    def __init__(self, fake):
        self._fake = fake

    def getDeviceCount(self): return self._fake.devices
    def runtimeGetVersion(self): return 13000
    def driverGetVersion(self): return 13000
    def memGetInfo(self): return 1 << 30, 1 << 30  # (free, total) bytes of the current GPU

    def deviceCanAccessPeer(self, device, peerDevice):
        self._fake.record("can access peer", (device, peerDevice))
        return int(self._fake.peer_access)

    def deviceEnablePeerAccess(self, peerDevice):
        self._fake.record("enable peer", peerDevice)
        if self._fake.peer_error is not None:
            raise CUDARuntimeError(self._fake.peer_error)

    def getDeviceProperties(self, device):  # a made-up sm_90 with 2 SMs
        return {"name": b"FakeCupy GPU", "major": 9, "minor": 0, "multiProcessorCount": 2, "clockRate": 1_000_000,
                "totalGlobalMem": 1 << 30}

    def deviceGetAttribute(self, attrib, device):
        if attrib != self.cudaDevAttrClockRate:
            raise CUDARuntimeError(1)  # cudaErrorInvalidValue
        return 1_000_000

    def memcpyAsync(self, dst, src, size, kind, stream):
        self._fake.record("memcpy", stream)
        if kind in (self.memcpyHostToDevice, self.memcpyDeviceToDevice):
            self._fake.check_pointer("memcpyAsync", dst)
        if kind in (self.memcpyDeviceToHost, self.memcpyDeviceToDevice):
            self._fake.check_pointer("memcpyAsync", src)
        ctypes.memmove(dst, src, size)

    def memcpyPeerAsync(self, dst, dstDevice, src, srcDevice, size, stream):
        self._fake.record("memcpy peer", stream)
        self._fake.check_pointer("memcpyPeerAsync's destination", dst, dstDevice)
        self._fake.check_pointer("memcpyPeerAsync's source", src, srcDevice)
        ctypes.memmove(dst, src, size)


class CublasError(RuntimeError):
    """What cuBLAS answers with CUBLAS_STATUS_INVALID_VALUE / NOT_SUPPORTED (CuPy's CUBLASError)."""


class Cublas:
    """``cupy.cuda.cublas``: ``gemmEx`` as cuBLAS computes it, from the column-major arguments it is given: each
    matrix is read from its address with its leading dimension (an access past the array whose ``data`` gave the
    address raises), op(A) (m x k) times op(B) (k x n) into C (m x n). The inputs and types it models: bfloat16 or
    float32 A and B, a float32 C, CUBLAS_COMPUTE_32F (the products of the inputs in FP32: exact for bfloat16 and TF32
    values; FP32 sums), host-pointer alpha and beta (float32); anything else raises."""
    CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
    CUBLAS_COMPUTE_32F = 68
    CUBLAS_GEMM_DEFAULT, CUBLAS_GEMM_DEFAULT_TENSOR_OP = -1, 99
    _HANDLE = 0xC0B1A5  # + the GPU: cupy.cuda.get_cublas_handle() of each

    def __init__(self, fake):
        self._fake = fake

    def _matrix(self, what, ptr, dtype_code, rows, cols, ld, device):
        """The column-major (rows, cols) matrix at ``ptr`` with leading dimension ``ld``, as a NumPy view."""
        fake = self._fake
        dtype = {Runtime.CUDA_R_32F: np.dtype(np.float32), Runtime.CUDA_R_16BF: np.dtype(np.uint16)}.get(dtype_code)
        if dtype is None:
            raise CublasError(f"fake cublas: gemmEx {what} type {dtype_code} (only CUDA_R_32F and CUDA_R_16BF)")
        if ld < max(1, rows):
            raise CublasError(f"fake cublas: gemmEx ld{what.lower()}={ld} < {rows} rows "
                              f"(CUBLAS_STATUS_INVALID_VALUE)")
        fake.check_pointer(f"gemmEx {what}", ptr, device)
        end = fake._extents.get(ptr)
        span = (ld * (cols - 1) + rows) * dtype.itemsize
        if end is None or ptr + span > end:
            raise CublasError(f"fake cublas: gemmEx {what} reads {span} bytes from an address "
                              + ("no array gave" if end is None else f"with {end - ptr} bytes of its array"))
        memory = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(ptr))
        return np.ndarray((rows, cols), dtype, memory, strides=(dtype.itemsize, ld * dtype.itemsize))

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
               computeType, algo):
        fake = self._fake
        fake.record("gemmEx")
        device = handle - self._HANDLE
        if not 0 <= device < fake.devices:
            raise CublasError(f"fake cublas: {handle} is not a handle of get_cublas_handle()")
        if computeType != self.CUBLAS_COMPUTE_32F or Ctype != Runtime.CUDA_R_32F:
            raise CublasError(f"fake cublas: gemmEx computeType {computeType}, Ctype {Ctype} (only "
                              f"CUBLAS_COMPUTE_32F into CUDA_R_32F)")
        if algo not in (self.CUBLAS_GEMM_DEFAULT, self.CUBLAS_GEMM_DEFAULT_TENSOR_OP):
            raise CublasError(f"fake cublas: gemmEx algo {algo}")
        ops = {}
        for what, trans, rows, cols in (("A", transa, m, k), ("B", transb, k, n)):
            if trans not in (self.CUBLAS_OP_N, self.CUBLAS_OP_T):
                raise CublasError(f"fake cublas: trans{what.lower()}={trans} (CUBLAS_OP_N or CUBLAS_OP_T)")
            ops[what] = (rows, cols) if trans == self.CUBLAS_OP_N else (cols, rows)
        a = self._matrix("A", A, Atype, *ops["A"], lda, device)
        b = self._matrix("B", B, Btype, *ops["B"], ldb, device)
        c = self._matrix("C", C, Ctype, m, n, ldc, device)
        a, b = (x if x.dtype == np.float32 else _bfloat16_values(x) for x in (a, b))
        a, b = (x if t == self.CUBLAS_OP_N else x.T for x, t in ((a, transa), (b, transb)))
        scalar = lambda ptr: float(np.ctypeslib.as_array((ctypes.c_float * 1).from_address(ptr))[0])
        al, be = np.float32(scalar(alpha)), np.float32(scalar(beta))
        # float32: FP32 sums. Evaluated as the row-major product the caller means, C.T = op(B).T @ op(A).T, on
        # contiguous operands: the host BLAS call a host device makes for it, so that a run on the fake GPU gives
        # emu's bits (tests/test_train.py)
        product = np.matmul(np.ascontiguousarray(b.T), np.ascontiguousarray(a.T)).T
        c[...] = al * product if be == 0 else al * product + be * c  # beta = 0 never reads C, as cuBLAS


def _bfloat16_values(bits):
    import ml_dtypes
    return np.ascontiguousarray(bits).view(ml_dtypes.bfloat16).astype(np.float32)


class Cuda:
    """``cupy.cuda`` of one FakeCupy."""

    def __init__(self, fake):
        self._fake, self._pinned = fake, []  # pinned buffers live as long as the fake
        for cls in (Stream, Event, Device):
            setattr(self, cls.__name__, type(cls.__name__, (cls,), {"_fake": fake}))
        rt = Runtime(fake)  # a namespace of its own, so that a test may patch or delete a function
        self.runtime = types.SimpleNamespace(**{n: getattr(rt, n) for n in dir(rt) if not n.startswith("_")})
        self.profiler = types.SimpleNamespace(start=lambda: fake.record("profiler start"),
                                              stop=lambda: fake.record("profiler stop"))
        self.cublas = Cublas(fake)

    def get_cublas_handle(self):  # the current GPU's (CuPy: one per GPU and thread)
        return Cublas._HANDLE + self._fake.current

    def get_current_stream(self, device_id=-1):
        return self._fake.stacks[self._fake.current if device_id == -1 else device_id][-1]

    def get_elapsed_time(self, start_event, end_event):  # milliseconds, on the host's clock
        return (end_event.time - start_event.time) * 1e3

    def alloc_pinned_memory(self, size):
        self._pinned.append(np.empty(size, np.uint8))
        return types.SimpleNamespace(ptr=self._pinned[-1].ctypes.data)


class RoutinesLinalg:
    """``cupy._core._routines_linalg``: the per-process GEMM compute type of each float dtype. The fake's ``matmul``
    in float32 with ``COMPUTE_TYPE_TF32`` multiplies the inputs with their low 13 mantissa bits dropped, as a tensor
    core given raw FP32 bits does (truncation, the worst a GPU may do: code that rounds its inputs to TF32 first gets
    the same products on the fake as on any GPU; code that does not is caught)."""
    COMPUTE_TYPE_TBD, COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC, COMPUTE_TYPE_FP16 = 0, 1, 2, 3
    COMPUTE_TYPE_FP32, COMPUTE_TYPE_FP64, COMPUTE_TYPE_BF16, COMPUTE_TYPE_TF32 = 4, 5, 6, 7

    def __init__(self):
        self._types = {}  # dtype char -> compute type

    def get_compute_type(self, dtype):
        return self._types.setdefault(np.dtype(dtype).char, self.COMPUTE_TYPE_DEFAULT)

    def set_compute_type(self, dtype, compute_type):
        self._types[np.dtype(dtype).char] = compute_type


def _tf32_truncated(a):
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


# ---------------------------------------------------------------------------------------------------- arrays
def _unwrap(v, what):
    if isinstance(v, ndarray):
        return v._a
    if isinstance(v, np.ndarray) and v.ndim:
        raise TypeError(f"fake cupy: a host numpy array in {what} with device arrays")
    if isinstance(v, (list, tuple)):
        return type(v)(_unwrap(e, what) for e in v)
    return v


class ndarray:
    """A device array: NumPy memory and the GPU it is on. Not a numpy.ndarray (as CuPy's is not)."""
    _fake = None
    __array_ufunc__ = None  # NumPy scalars defer to our operators (np.float32(2) * a), as with CuPy's arrays
    __hash__ = None

    def __init__(self, a, dev):
        self._a, self._dev = a, dev

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: type(self)(self._a.T, self._dev))
    device = property(lambda self: types.SimpleNamespace(id=self._dev))

    @property
    def data(self):  # the address, remembered as this GPU's: launches and copies are given addresses, not arrays
        ptr = self._a.ctypes.data
        self._fake._pointers[ptr] = self._dev
        # where this array's memory ends (the fake cuBLAS reads no further)
        self._fake._extents[ptr] = getattr(np.lib, "array_utils", np).byte_bounds(self._a)[1]
        return types.SimpleNamespace(ptr=ptr)

    def __array__(self, *args, **kwargs):
        raise TypeError("fake cupy: implicit conversion to a NumPy array is not allowed; use .get()")

    # 0-d arrays convert to Python numbers (CuPy copies the value to the host); larger ones raise, as NumPy's
    __float__, __int__, __bool__ = (lambda self: float(self._a)), (lambda self: int(self._a)), (lambda self: bool(self._a))

    def __getitem__(self, key):
        if any(isinstance(k, ndarray) for k in (key if isinstance(key, tuple) else (key,))):
            self._fake.check_current("advanced indexing", self, key)  # a gather kernel; a basic slice is a view
        return type(self)(self._a[_unwrap(key, "an index")], self._dev)

    def __setitem__(self, key, value):
        self._fake.record("setitem")
        self._fake.check_current("setitem", self, key, value)
        self._a[key] = _unwrap(value, "setitem")

    def __getattr__(self, name):  # the methods CuPy shares with NumPy (FakeCupy.SHARED_METHODS)
        if name not in FakeCupy.SHARED_METHODS:
            raise AttributeError(f"fake cupy: ndarray has no attribute {name!r} (FakeCupy.SHARED_METHODS)")
        method = getattr(self._a, name)
        if name in FakeCupy.VIEWS:  # the same memory, on its GPU whichever is current
            return lambda *args, **kwargs: type(self)(method(*args, **kwargs), self._dev)
        return self._fake.delegate(name, method, self)

    def __neg__(self):
        self._fake.check_current("__neg__", self)
        return self._fake.wrap(-self._a)

    def reshape(self, *shape):
        return type(self)(self._a.reshape(*shape), self._dev)

    def get(self, stream=None):
        self._fake.record("get")
        return np.array(self._a)

    def set(self, arr, stream=None):  # host -> device on ``stream`` (None: the current one)
        self._fake.record("set", stream=stream)
        self._a[...] = arr


def _operator(name, inplace):
    def op(self, other):
        self._fake.record(name)
        self._fake.check_current(name, self, other)
        result = getattr(self._a, name)(_unwrap(other, name))
        return self if inplace else self._fake.wrap(result)
    return op


for _op in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow", "lt", "le", "gt", "ge", "eq",
            "ne", "and", "or", "rshift"):
    setattr(ndarray, f"__{_op}__", _operator(f"__{_op}__", inplace=False))
for _op in ("iadd", "isub", "imul", "itruediv"):
    setattr(ndarray, f"__{_op}__", _operator(f"__{_op}__", inplace=True))


class Kernels:
    """A kernel module (convnet._emu) whose launches are recorded on their stream handle (the last argument) and
    whose addresses must be the current GPU's."""

    def __init__(self, fake, module):
        self._fake, self._module = fake, module

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not callable(attr) or name.endswith(FakeCupy.HOST_ONLY) or isinstance(attr, type):
            return attr

        def launch(*args):
            self._fake.record(f"launch {name}", args[-1])
            for a in args[:-1]:
                if isinstance(a, int):
                    self._fake.check_pointer(f"launch {name}", a)
            return attr(*args)
        return launch


class ElementwiseKernel:
    """``cupy.ElementwiseKernel``: the operation's source itself, compiled by the host's C++ compiler (``$CXX``, else
    ``c++``) into a loop over the elements, one process-wide build per source. Each parameter is a CuPy type name
    (_ELEMENT_TYPES) and a name bound, in the loop, to the element i (inputs const); the inputs have one shape (no
    broadcasting) and the outputs are new C-contiguous arrays of that shape, as CuPy allocates them."""
    _fake = None
    _ELEMENT_TYPES = {"uint32": ("unsigned int", np.uint32), "uint16": ("unsigned short", np.uint16),
                     "int32": ("int", np.int32), "float32": ("float", np.float32)}
    _built = {}  # source -> the compiled loop (ctypes function)

    def __init__(self, in_params, out_params, operation, name='kernel', reduce_dims=True, preamble='',
                 no_return=False, return_tuple=False, **kwargs):
        parse = lambda params: [tuple(p.split()) for p in params.split(",")]
        self._in, self._out, self._name = parse(in_params), parse(out_params), name
        for param in self._in + self._out:
            if len(param) != 2 or param[0] not in self._ELEMENT_TYPES:
                raise NotImplementedError(f"fake cupy: ElementwiseKernel parameter {' '.join(param)!r} (types: "
                                          f"{', '.join(self._ELEMENT_TYPES)})")
        binds = [f"{'const ' if j < len(self._in) else ''}{self._ELEMENT_TYPES[t][0]} &{n} = "
                 f"(({'const ' if j < len(self._in) else ''}{self._ELEMENT_TYPES[t][0]} *)args[{j}])[i];"
                 for j, (t, n) in enumerate(self._in + self._out)]
        self._source = (f"{preamble}\nextern \"C\" void run(void **args, long long n) {{\n"
                        f"  for (long long i = 0; i < n; ++i) {{\n    {' '.join(binds)}\n{operation}\n  }}\n}}\n")

    def _loop(self):
        if self._source not in self._built:
            import subprocess
            import tempfile
            folder = tempfile.mkdtemp(prefix="fake_cupy_")
            path = os.path.join(folder, "kernel.so")
            done = subprocess.run([os.environ.get("CXX", "c++"), "-O1", "-shared", "-fPIC", "-x", "c++", "-",
                                   "-o", path], input=self._source, text=True, capture_output=True)
            if done.returncode:
                raise RuntimeError(f"fake cupy: ElementwiseKernel {self._name} does not compile:\n{done.stderr}")
            loop = ctypes.CDLL(path).run
            loop.argtypes, loop.restype = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_longlong], None
            self._built[self._source] = loop
        return self._built[self._source]

    def __call__(self, *args, **kwargs):
        fake = self._fake
        fake.record(f"elementwise {self._name}")
        fake.check_current(f"ElementwiseKernel {self._name}", args)
        if len(args) != len(self._in) or kwargs:
            raise TypeError(f"fake cupy: ElementwiseKernel {self._name} takes its {len(self._in)} inputs only")
        shape = args[0].shape
        inputs = []
        for a, (t, name) in zip(args, self._in):
            if not isinstance(a, ndarray) or a.shape != shape or a.dtype != self._ELEMENT_TYPES[t][1]:
                raise TypeError(f"fake cupy: ElementwiseKernel {self._name}: {name} must be a {t} device array of "
                                f"shape {shape}")
            inputs.append(np.ascontiguousarray(a._a))
        outputs = [np.empty(shape, self._ELEMENT_TYPES[t][1]) for t, _ in self._out]
        pointers = (ctypes.c_void_p * len(inputs + outputs))(*(x.ctypes.data for x in inputs + outputs))
        self._loop()(pointers, int(np.prod(shape)))
        results = [fake.wrap(x) for x in outputs]
        return results[0] if len(results) == 1 else tuple(results)


# ---------------------------------------------------------------------------------------------------- cupy
class FakeCupy:
    """The ``cupy`` module (see the module's docstring)."""
    MACHINERY = frozenset({"calls", "recording", "devices", "compute_capability", "peer_access", "peer_error",
                           "current", "null", "next_ptr", "events", "streams", "stacks", "record", "wrap", "delegate",
                           "check_current", "check_pointer", "waits_for", "array_on", "kernels", "install",
                           "MACHINERY", "SHARED_FUNCTIONS", "SHARED_METHODS", "VIEWS", "HOST_ONLY", "HOST_SYNCS"})
    # What CuPy shares with NumPy and the cuda path uses: NumPy's, on the unwrapped arrays (a name missing here is an
    # AttributeError in the tests; tests/test_cupy_api.py checks that CuPy has each)
    SHARED_FUNCTIONS = frozenset({"add", "arange", "argmax", "concatenate", "empty_like", "exp", "isfinite", "log",
                                  "logaddexp", "matmul", "maximum", "multiply", "not_equal", "ones", "sum", "where"})
    SHARED_METHODS = frozenset({"all", "astype", "copy", "max", "sum", "transpose", "view"})
    VIEWS = frozenset({"transpose", "view"})  # methods that launch nothing: any GPU's array
    HOST_ONLY = ("_workspace", "_plan", "_tile_count", "_tile_override")  # kernel-module functions that launch nothing
    HOST_SYNCS = ("get", "stream synchronize", "device synchronize", "event synchronize")

    def __init__(self, devices: int = 2, compute_capability: str = "90"):
        self.devices, self.compute_capability, self.__version__ = devices, compute_capability, "fake"
        self.peer_access, self.peer_error = True, None  # whether GPUs reach each other; enabling it raises that status
        self.calls, self.recording = [], False
        self.events, self.streams, self.next_ptr = [], {}, 0x100
        self._pointers = {}  # address -> GPU of every array whose ``data`` was taken
        self._extents = {}  # address -> the end of the memory of the array whose ``data`` gave it last
        self._local = threading.local()  # the current GPU and streams are per thread, as in CUDA
        self.ndarray = type("ndarray", (ndarray,), {"_fake": self})
        self.ElementwiseKernel = type("ElementwiseKernel", (ElementwiseKernel,), {"_fake": self})
        self.cuda = Cuda(self)
        self._core = types.SimpleNamespace(_routines_linalg=RoutinesLinalg())
        self.random = types.SimpleNamespace(rand=self._rand)
        self.null = self.cuda.Stream(null=True)

    @property
    def current(self) -> int:
        return getattr(self._local, "current", 0)

    @current.setter
    def current(self, index: int):
        self._local.current = index

    @property
    def stacks(self) -> dict:
        """Each GPU's stack of current streams, in this thread."""
        if not hasattr(self._local, "stacks"):
            self._local.stacks = {i: [self.null] for i in range(self.devices)}
        return self._local.stacks

    def record(self, what, handle=None, stream=None):
        """Log ``what`` with the current GPU and stream (``stream``: the one it is about, for events)."""
        if self.recording:
            current = self.stacks[self.current][-1] if stream is None else stream
            self.calls.append((what, self.current, current.ptr, handle))

    def wrap(self, result):
        """A NumPy result as CuPy returns it: arrays and NumPy scalars as arrays of the current GPU."""
        if isinstance(result, (np.ndarray, np.generic)):
            return self.ndarray(np.asarray(result), self.current)
        return result

    def delegate(self, name, fn, owner=None):
        """``fn`` (NumPy's function, or a bound method of ``owner``'s memory) on the current GPU's arrays."""
        def call(*args, **kwargs):
            self.record(name)
            self.check_current(name, owner, *args, *kwargs.values())
            result = fn(*(_unwrap(a, name) for a in args), **{k: _unwrap(v, name) for k, v in kwargs.items()})
            return kwargs["out"] if kwargs.get("out") is not None else self.wrap(result)
        return call

    def check_current(self, what, *operands):
        """CrossDeviceError unless every device array among ``operands`` (lists, tuples, dicts searched) is on the
        current GPU."""
        for a in operands:
            if isinstance(a, (list, tuple, dict)):
                self.check_current(what, *(a.values() if isinstance(a, dict) else a))
            elif isinstance(a, ndarray) and a._dev != self.current:
                raise CrossDeviceError(f"fake cupy: {what} on an array of GPU {a._dev} while GPU {self.current} is "
                                       f"current")

    def check_pointer(self, what, ptr, device=None):
        """CrossDeviceError if ``ptr`` is an array's address on another GPU than ``device`` (None: the current)."""
        on, want = self._pointers.get(ptr), self.current if device is None else device
        if on is not None and on != want:
            raise CrossDeviceError(f"fake cupy: {what} given an address on GPU {on}, "
                                   + (f"GPU {want} is current" if device is None else f"declared on GPU {want}"))

    def waits_for(self, later: int, earlier: int, implicit: bool = True) -> bool:
        """Whether ``calls[later]`` would run on a GPU only after ``calls[earlier]``, through: each stream's order;
        an event waited for (``wait`` after the event's latest ``record``); the host waiting (``get``, a synchronize)
        before it issued ``later``; and (``implicit``) the legacy default stream's barriers, which CUDA adds and CuPy
        does not show: on a GPU, work on the null stream waits for all work issued before it on the GPU's blocking
        streams (``Stream(non_blocking=False)``, CuPy's default), and work on a blocking stream for all work issued
        before it on the null stream. Non-blocking streams are ordered by events only."""
        def stream_of(e):  # (GPU for the null stream else None, handle); None: not GPU work
            if e[0] in ("profiler start", "profiler stop", "begin capture", "end capture", *self.HOST_SYNCS[1:]):
                return None
            ptr = e[3] if e[0].startswith(("launch", "memcpy", "nccl")) else e[2]
            return (e[1], 0) if ptr == 0 else (None, ptr)

        def gpu_of(key):
            return key[0] if key[0] is not None else getattr(self.streams.get(key[1]), "device_id", None)

        def blocking(key):
            return key[1] != 0 and getattr(self.streams.get(key[1]), "_blocking", True)

        preds = [[] for _ in self.calls]
        last, recorded, host = {}, {}, None  # stream -> its last call; event -> its last record; the last host wait
        for i, e in enumerate(self.calls[:later + 1]):
            preds[i] += [] if host is None else [host]
            if e[0] in self.HOST_SYNCS:
                if e[0] == "event synchronize":
                    preds[i] += [recorded[e[3]]] if e[3] in recorded else []
                elif e[0] == "device synchronize":
                    preds[i] += [j for k, j in last.items() if gpu_of(k) == e[1]]
                else:  # a stream synchronize or a get: the stream current then
                    k = (e[1], 0) if e[2] == 0 else (None, e[2])
                    preds[i] += [last[k]] if k in last else []
                host = i
            key = stream_of(e)
            if key is None:
                continue
            preds[i] += [last[key]] if key in last else []
            if e[0] == "wait" and e[3] in recorded:
                preds[i].append(recorded[e[3]])
            if implicit and key[1] == 0:  # the legacy null stream waits for the GPU's blocking streams ...
                preds[i] += [j for k, j in last.items() if blocking(k) and gpu_of(k) == key[0]]
            elif implicit and blocking(key) and (gpu_of(key), 0) in last:  # ... and they for it
                preds[i].append(last[(gpu_of(key), 0)])
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

    # -- the array module -----------------------------------------------------------------------------------------
    def empty(self, shape, dtype=float):
        self.record("empty")
        return self.ndarray(np.empty(shape, dtype), self.current)

    def zeros(self, shape, dtype=float):
        self.record("zeros")
        return self.ndarray(np.zeros(shape, dtype), self.current)

    def asarray(self, a, dtype=None):
        self.record("asarray")
        if isinstance(a, ndarray):  # another GPU's: a copy between GPUs outside the peer copy
            self.check_current("asarray", a)
            return a if dtype is None or a.dtype == dtype else a.astype(dtype)
        return self.ndarray(np.array(a, dtype=dtype, copy=True), self.current)

    def ascontiguousarray(self, a, dtype=None):
        self.record("ascontiguousarray")
        self.check_current("ascontiguousarray", a)
        if a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a
        return self.ndarray(np.ascontiguousarray(a._a, dtype=dtype), self.current)

    def __getattr__(self, name):  # NumPy's dtypes, and the functions CuPy shares with NumPy (SHARED_FUNCTIONS)
        value = getattr(np, name, None)
        if isinstance(value, type) and issubclass(value, np.generic):
            return value  # cupy.float32 is numpy.float32
        if name not in self.SHARED_FUNCTIONS:
            raise AttributeError(f"fake cupy has no attribute {name!r} (FakeCupy.SHARED_FUNCTIONS)")
        if name == "matmul" and self._core._routines_linalg.get_compute_type(np.float32) == \
                RoutinesLinalg.COMPUTE_TYPE_TF32:
            def tf32_matmul(a, b, out=None):  # float32 operands through TF32 tensor cores (RoutinesLinalg)
                if a.dtype == np.float32 and b.dtype == np.float32:
                    a, b = (self.ndarray(_tf32_truncated(m._a), m._dev) for m in (a, b))
                return self.delegate("matmul tf32", value)(a, b, out=out)
            return tf32_matmul
        return self.delegate(name, value)

    def _rand(self, *size, dtype=float):  # cupy.random.rand
        self.record("random")
        return self.wrap(np.random.default_rng(0).random(size).astype(dtype))

    def array_on(self, device, host):
        """A device array of GPU ``device`` holding ``host`` (test setup; not recorded)."""
        return self.ndarray(np.array(host), device)

    def kernels(self, module):
        return Kernels(self, module)

    def install(self, monkeypatch, usable=False):
        """Make this the cuda backend's ``cupy`` (and CUPYX its ``cupyx``), with the emulator's kernels as
        ``convnet._cuda``; ``usable``: also make ``get_device("cuda:i")`` accept the fake's GPUs (whole runs)."""
        from convnet.devices import Device, backend_cuda

        if usable:
            monkeypatch.setattr(backend_cuda, "gpu_count", lambda: (self.devices, ""))
            monkeypatch.setattr(backend_cuda.CudaDevice, "available",
                                lambda dev: (dev.index < self.devices, "a fake GPU (tests/fake_cupy.py)"))
        monkeypatch.setitem(sys.modules, "cupy", self)
        monkeypatch.setitem(sys.modules, "cupyx", CUPYX)
        monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", self._core._routines_linalg)
        monkeypatch.setattr(backend_cuda, "_allocator_configured", True)
        kernels = self.kernels(Device("emu").kernels)
        monkeypatch.setattr(backend_cuda.CudaDevice, "kernels", property(lambda dev: kernels))
        return self


def empty_pinned(shape, dtype=float, order="C"):  # host memory, as CuPy's (a numpy array over pinned memory)
    return np.empty(shape, dtype, order=order)


CUPYX = types.SimpleNamespace(empty_pinned=empty_pinned)  # ``cupyx``


# ---------------------------------------------------------------------------------------------------- NCCL
class NcclCommunicator:
    """A communicator on the GPU current at its making. With ``ndev`` > 1 the ranks are MPI processes (the test runs
    under mpirun) and the sum goes through mpi4py; with one rank a reduction is a copy, as NCCL's."""
    _nccl = None

    def __init__(self, ndev, commId, rank):
        if not isinstance(commId, bytes):  # CuPy 14's type (13 and older: a tuple of ints)
            raise TypeError(f"fake nccl: commId must be get_unique_id()'s bytes, got {type(commId).__name__}")
        if len(commId) != 128:
            raise ValueError(f"commId length {len(commId)} != 128.")
        if not 0 <= rank < ndev:
            raise ValueError(f"fake nccl: rank {rank} of {ndev}")
        self._ndev, self._device = ndev, self._nccl._fake.current

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        fake = self._nccl._fake
        if op != FakeNccl.NCCL_SUM:
            raise ValueError(f"fake nccl: op {op} (only NCCL_SUM)")
        ctype = {FakeNccl.NCCL_FLOAT32: ctypes.c_float, FakeNccl.NCCL_FLOAT64: ctypes.c_double}[datatype]
        send, recv = (np.ctypeslib.as_array((ctype * count).from_address(p)) for p in (sendbuf, recvbuf))
        fake.record("nccl allReduce", stream)
        for ptr in (sendbuf, recvbuf):  # a communicator works on the GPU it was made on
            fake.check_pointer("nccl allReduce", ptr, self._device)
        if self._ndev > 1:
            from mpi4py import MPI
            MPI.COMM_WORLD.Allreduce(send.copy(), recv, op=MPI.SUM)
        elif recvbuf != sendbuf:
            recv[...] = send


class FakeNccl:
    """``cupy.cuda.nccl`` for a FakeCupy: ``FakeNccl().install(fake)``; each allReduce is logged in the fake's
    ``calls`` as ``("nccl allReduce", GPU, current stream, the stream handle given)``."""
    NCCL_SUM, NCCL_FLOAT32, NCCL_FLOAT64 = 0, 7, 8
    available = True
    MACHINERY = frozenset({"install", "MACHINERY"})

    def __init__(self):
        self._fake = None
        self.NcclCommunicator = type("NcclCommunicator", (NcclCommunicator,), {"_nccl": self})

    @staticmethod
    def get_unique_id():
        return os.urandom(128)  # CuPy 14: 128 bytes

    def install(self, fake):
        """Make this ``fake.cuda.nccl``."""
        self._fake = fake
        fake.cuda.nccl = self
        return self
