"""The ``cuda:i`` devices: the kernels compiled by nvcc (``convnet._cuda``) on GPU i; arrays are CuPy arrays."""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings

import numpy as np

from convnet.devices.device import Device, DeviceUnavailable
from convnet.extensions import load_extension
from convnet.reference.storage import BFLOAT16

# CONVNET_CUPY_POOL=0: CuPy allocates every array with its own cudaMalloc (no device or pinned memory pool). Under
# compute-sanitizer memcheck an out-of-bounds access into a pooled sub-allocation lands in memory the pool owns and
# goes unseen; with the pool off it is reported (tools/gpu_check.sh sets it for the sanitizer runs).
POOL_ENV = "CONVNET_CUPY_POOL"
_allocator_configured = False
_COMPUTE_TYPE_LOCK = threading.Lock()  # CuPy's GEMM compute type is one per process (CudaDevice.matmul)

# cuBLAS is bit-reproducible only while one stream is active on a handle: with several (CuPy shares one handle per
# device and thread across our streams: the towers', the one-placement net's) it may pick workspaces differently
# from run to run, unless this is set before the handle is made. ":4096:8" costs about 24 MiB of GPU memory.
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"


def configure_cublas(environ=os.environ) -> str:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS with several streams, unless the user set it;
    returns the value in effect."""
    return environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_WORKSPACE)


def cupy_pool_enabled(environ=os.environ) -> bool:
    """Whether CuPy's memory pools stay on: ``CONVNET_CUPY_POOL`` unset/empty/1 (default) or 0 (off)."""
    value = environ.get(POOL_ENV, "").strip().lower()
    if value in ("", "1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{POOL_ENV} must be 0 (no memory pool) or 1 (CuPy's pools, the default), got {value!r}")


def configure_allocator(cp, environ=os.environ) -> bool:
    """Apply ``CONVNET_CUPY_POOL`` to the CuPy module ``cp``; returns whether the pools stay on."""
    enabled = cupy_pool_enabled(environ)
    if not enabled:
        cp.cuda.set_allocator(None)
        cp.cuda.set_pinned_memory_allocator(None)
    return enabled


def _import_cupy():
    """``import cupy``, applying ``CONVNET_CUPY_POOL`` once per process, before this package allocates anything."""
    global _allocator_configured
    configure_cublas()  # before CuPy makes a cuBLAS handle
    import cupy

    if not _allocator_configured:
        configure_allocator(cupy)
        _allocator_configured = True
    return cupy


def cupy():
    try:
        return _import_cupy()
    except ImportError as exc:
        raise DeviceUnavailable(f"CuPy is not installed ({exc}); `pip install .[cuda]`") from None


def record_event(cp, index, stream):
    """An event recorded on ``stream`` of GPU ``index`` (None: that GPU's current stream); ``cp`` is the cupy
    module (a fake in tests). An event is recorded with its stream's GPU current."""
    with cp.cuda.Device(index):
        event = cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream if stream is not None else cp.cuda.get_current_stream())
    return event


def wait_event(cp, index, stream, event):
    """Work issued from now on on ``stream`` of GPU ``index`` (None: its current stream) waits for ``event``."""
    with cp.cuda.Device(index):  # stream handle 0 is the current device's null stream
        (stream if stream is not None else cp.cuda.get_current_stream()).wait_event(event)


PEER_ACCESS_ALREADY_ENABLED = 704  # cudaErrorPeerAccessAlreadyEnabled (CuPy may have enabled the pair itself)


class GpuCopier:
    """The cuda side of :func:`convnet.ops.copy`: copies between GPUs and within one, never through pageable host
    memory and never waiting on the host.

    * two GPUs that can access each other: peer access is enabled once per pair (``cudaDeviceCanAccessPeer``, then
      ``cudaDeviceEnablePeerAccess`` both ways), then ``cudaMemcpyPeerAsync`` on the consumer's stream;
    * two GPUs that cannot: said once per pair (a RuntimeWarning), then staged through pinned host memory: a
      device-to-host copy on the producer's stream, a host-to-device copy on the consumer's stream;
    * one GPU (two towers on it): ``cudaMemcpyAsync`` device to device on the consumer's stream.

    Ordering is done on the GPUs with events: the consumer's stream waits for an event recorded on the producer's
    stream (the kernels that wrote ``a`` come first), and when the copy read ``a`` on another stream the producer's
    stream then waits for the copy (CuPy's pool may give ``a``'s memory to the producer's next allocation). A pinned
    buffer is kept until an event recorded after its copy has completed (polled with ``Event.done``, never waited on).
    ``cp`` (a function returning the cupy module) and ``warn`` are injectable: tests run this logic on a fake runtime.
    """

    def __init__(self, cp=None, warn=None):
        self._cp = cp or cupy
        self._warn = warn or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=2))
        self.peer = {}  # (i, j) with i < j -> True: peer-to-peer; False: staged through pinned host memory
        self._pending = []  # (event, pinned buffer): the buffer lives until the event has completed

    def peer_access(self, i: int, j: int) -> bool:
        """Whether GPUs i and j copy peer-to-peer (asked, and enabled, once per pair)."""
        key = lo, hi = (min(i, j), max(i, j))
        if key not in self.peer:
            cp = self._cp()
            rt = cp.cuda.runtime
            ok = bool(rt.deviceCanAccessPeer(lo, hi)) and bool(rt.deviceCanAccessPeer(hi, lo))
            if ok:
                for dev, peer in ((lo, hi), (hi, lo)):
                    with cp.cuda.Device(dev):
                        try:
                            rt.deviceEnablePeerAccess(peer)
                        except rt.CUDARuntimeError as e:
                            if getattr(e, "status", None) != PEER_ACCESS_ALREADY_ENABLED:
                                raise
            else:
                self._warn(f"GPUs {lo} and {hi} cannot access each other's memory (no peer-to-peer): copies "
                           f"between them are staged through pinned host memory")
            self.peer[key] = ok
        return self.peer[key]

    @staticmethod
    def _stream(cp, index, stream):
        if stream is not None:
            return stream
        with cp.cuda.Device(index):
            return cp.cuda.get_current_stream()

    @staticmethod
    def _wait(cp, first, first_index, then, then_index):
        """Stream ``then`` (of GPU then_index) waits, on the GPU, for the work issued so far on ``first``."""
        wait_event(cp, then_index, then, record_event(cp, first_index, first))

    def copy(self, a, src: int, dst: int, out, stream=None, src_stream=None):
        cp = self._cp()
        rt = cp.cuda.runtime
        n = int(a.nbytes)
        self._pending = [(e, buf) for e, buf in self._pending if not e.done]
        if n == 0:
            return out
        s_src, s_dst = self._stream(cp, src, src_stream), self._stream(cp, dst, stream)
        if src != dst and not self.peer_access(src, dst):
            host = cp.cuda.alloc_pinned_memory(n)
            with cp.cuda.Device(src):
                rt.memcpyAsync(host.ptr, a.data.ptr, n, rt.memcpyDeviceToHost, s_src.ptr)
            self._wait(cp, s_src, src, s_dst, dst)
            with cp.cuda.Device(dst):
                rt.memcpyAsync(out.data.ptr, host.ptr, n, rt.memcpyHostToDevice, s_dst.ptr)
            self._pending.append((record_event(cp, dst, s_dst), host))
            return out
        one_stream = src == dst and s_src.ptr == s_dst.ptr
        if not one_stream:
            self._wait(cp, s_src, src, s_dst, dst)
        with cp.cuda.Device(dst):
            if src == dst:
                rt.memcpyAsync(out.data.ptr, a.data.ptr, n, rt.memcpyDeviceToDevice, s_dst.ptr)
            else:
                rt.memcpyPeerAsync(out.data.ptr, dst, a.data.ptr, src, n, s_dst.ptr)
        if not one_stream:
            self._wait(cp, s_dst, dst, s_src, src)
        return out


def _cublas_operand(cublas, a):
    """(transpose flag, leading dimension) giving cuBLAS the row-major matrix ``a`` transposed, ``a.T``, without a
    copy: a C-contiguous ``a`` (r, c) is, read column-major, the (c, r) matrix ``a.T`` with leading dimension c (no
    transpose); an F-contiguous one (a transposed view such as ``w.T``) is, read column-major, ``a`` itself with
    leading dimension r, so cuBLAS transposes it. None if ``a`` is neither (``cublas``: ``cupy.cuda.cublas``)."""
    r, c = a.shape
    if a.flags.c_contiguous:
        return cublas.CUBLAS_OP_N, max(1, c)
    if a.flags.f_contiguous:
        return cublas.CUBLAS_OP_T, max(1, r)
    return None


def gemm_bf16(cp, a, b, out=None):
    """``a @ b`` of two bfloat16 matrices of the current GPU ((M, K) and (K, N), each C- or F-contiguous) as a float32
    (M, N) array (``out``: a C-contiguous float32 array, else a new one), on the current stream: one cuBLAS GEMM
    (``cublasGemmEx``) with bfloat16 inputs, CUBLAS_COMPUTE_32F (the BF16 tensor cores: products of two bfloat16
    values are exact in FP32, sums in FP32) and a float32 output.

    cuBLAS is column-major: a row-major (r, c) array is, read column-major, its transpose. So the row-major
    C = A @ B is computed as the column-major C.T (N x M, leading dimension N) = B.T (N x K) @ A.T (K x M): cuBLAS's
    m = N, n = M, k = K, its first operand b and its second a (:func:`_cublas_operand` gives each one's flag and
    leading dimension)."""
    rt, cublas = cp.cuda.runtime, cp.cuda.cublas
    for name, v in (("a", a), ("b", b)):
        if v.dtype != BFLOAT16 or v.ndim != 2:
            raise TypeError(f"gemm_bf16: {name} must be a 2-D bfloat16 array, got {v.ndim}-D {v.dtype}")
    (M, K), (K2, N) = a.shape, b.shape
    if K != K2:
        raise ValueError(f"gemm_bf16: a {tuple(a.shape)} and b {tuple(b.shape)} do not multiply")
    if out is not None and (out.shape != (M, N) or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"gemm_bf16: out must be a C-contiguous float32 array of shape {(M, N)}, got "
                         f"{out.dtype} {tuple(out.shape)} with strides {out.strides}")
    c = out if out is not None else cp.empty((M, N), np.float32)
    if M == 0 or N == 0:
        return c
    if K == 0:
        c[...] = 0
        return c
    b, a = (v if _cublas_operand(cublas, v) else cp.ascontiguousarray(v) for v in (b, a))
    (transa, lda), (transb, ldb) = _cublas_operand(cublas, b), _cublas_operand(cublas, a)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)  # host scalars (CuPy's handles: host pointer mode)
    cublas.gemmEx(cp.cuda.get_cublas_handle(), transa, transb, N, M, K,
                  one.ctypes.data, b.data.ptr, rt.CUDA_R_16BF, lda, a.data.ptr, rt.CUDA_R_16BF, ldb,
                  zero.ctypes.data, c.data.ptr, rt.CUDA_R_32F, N,
                  cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)
    return c


@functools.lru_cache(maxsize=None)
def gpu_count() -> tuple[int, str]:
    """(the number of GPUs CUDA sees, why none can be used when 0); probed once per process."""
    module, reason = load_extension(CudaDevice.extension)
    if module is None:
        return 0, reason
    n, message = module.device_count()
    if n == 0:
        return 0, f"no usable GPU: the CUDA runtime says {message or 'there are 0 devices'}"
    try:
        _import_cupy()
    except ImportError as exc:
        return 0, f"{n} GPU(s) present but CuPy is not installed ({exc}); `pip install .[cuda]`"
    return n, ""


@functools.lru_cache(maxsize=None)
def copier() -> GpuCopier:
    """The copier of every copy between GPUs (it remembers which pairs have peer access)."""
    return GpuCopier()


class CudaDevice(Device):
    kind = "cuda"
    synchronous = False
    always_indexed = True
    extension = "_cuda"

    # -- availability (probed once per process) -----------------------------------------------------------------
    @functools.lru_cache(maxsize=None)
    def available(self):
        n, reason = gpu_count()
        if n == 0:
            return False, reason
        if self.index >= n:
            return False, f"only {n} GPU(s) present"
        module, _ = load_extension(self.extension)
        try:
            name, major, minor, sms = module.device_name(self.index)
        except RuntimeError as exc:
            return False, str(exc)
        if major < 8:
            return False, f"{name} is sm_{major}{minor}; convnet._cuda is built for sm_80 and newer"
        return True, f"{name} (sm_{major}{minor}, {sms} SMs)"

    # -- precision: TF32 and BF16 tensor cores from compute capability 8.0 (sm_80) on ---------------------
    @property
    def tensor_cores(self):
        return int(cupy().cuda.Device(self.index).compute_capability) >= 80

    @property
    def precisions(self):
        return ("fp32", "tf32", "bf16") if self.tensor_cores else ("fp32",)

    @classmethod
    def report(cls):
        n, reason = gpu_count()
        if n == 0:
            return [{"device": "cuda", "usable": False, "detail": reason}]
        entries = []
        for i in range(n):
            ok, detail = cls(cls.kind, i).available()
            entries.append({"device": f"cuda:{i}", "usable": ok, "detail": detail})
        return entries

    # -- arrays -------------------------------------------------------------------------------------------------
    @property
    def xp(self):
        return cupy()

    def is_array(self, a):
        cp = cupy()
        return isinstance(a, cp.ndarray) and a.device.id == self.index

    @property
    def array_name(self):
        return f"cupy.ndarray on GPU {self.index}"

    def describe_array(self, a):
        name = super().describe_array(a)
        return f"{name} on GPU {a.device.id}" if name == "cupy.ndarray" else name

    def asarray(self, a, dtype=None):
        cp = cupy()
        with cp.cuda.Device(self.index):
            return cp.ascontiguousarray(cp.asarray(a, dtype=dtype))

    def to_numpy(self, a):
        cp = cupy()
        if not isinstance(a, cp.ndarray):  # already on the host
            return np.asarray(a)
        # ndarray.get() copies on the current stream of the *current* device: make the array's GPU current, so that
        # the copy is ordered after the work queued on that GPU's current stream (another GPU's stream is not)
        with cp.cuda.Device(a.device.id):
            return a.get()

    def pointer(self, a):
        return int(a.data.ptr)

    def matmul(self, a, b, out=None, precision="fp32"):
        """cuBLAS through CuPy; ``tf32``: with CuPy's TF32 compute type (cuBLAS's CUBLAS_COMPUTE_32F_FAST_TF32, tensor
        cores) for this call only. CuPy keeps the compute type per process, so every call sets it and issues its GEMM
        under one lock: another thread's fp32 GEMM never runs in TF32. ``bf16``: ``a`` and ``b`` are bfloat16 arrays
        and the result float32 (:func:`gemm_bf16`: the BF16 tensor cores, FP32 accumulation)."""
        cp = cupy()
        if precision == "bf16":
            return gemm_bf16(cp, a, b, out)
        linalg = importlib.import_module("cupy._core._routines_linalg")
        with _COMPUTE_TYPE_LOCK:
            before = linalg.get_compute_type(np.float32)
            if precision == "tf32":
                linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
            try:
                return cp.matmul(a, b, out=out)
            finally:
                linalg.set_compute_type(np.float32, before)

    # -- execution ----------------------------------------------------------------------------------------------
    def activate(self):
        return cupy().cuda.Device(self.index)

    @contextlib.contextmanager
    def on_stream(self, stream=None):
        with cupy().cuda.Device(self.index):
            if stream is None:
                yield
            else:
                with stream:
                    yield

    def stream_handle(self, stream=None):
        if stream is None:
            with cupy().cuda.Device(self.index):
                stream = cupy().cuda.get_current_stream()
        return int(stream.ptr)

    def synchronize(self):
        cupy().cuda.Device(self.index).synchronize()

    def free_memory(self):
        cp = cupy()
        with cp.cuda.Device(self.index):
            free, _ = cp.cuda.runtime.memGetInfo()
        return f"GPU {self.index}", int(free)

    def new_stream(self):
        # Non-blocking: ordered by events only (the graph's fork and join, the copies', the loader's and the
        # reducer's), never by the legacy default stream's implicit barriers, which would serialise the towers, the
        # loader and the gradient all-reduce with whatever the loop queues on the null stream.
        cp = cupy()
        with cp.cuda.Device(self.index):
            return cp.cuda.Stream(non_blocking=True)

    def record_event(self, stream=None):
        return record_event(cupy(), self.index, stream)

    def wait_event(self, event, stream=None):
        if event is not None:
            wait_event(cupy(), self.index, stream, event)

    def copy(self, a, src, out, stream=None, src_stream=None):
        return copier().copy(a, src.index, self.index, out, stream, src_stream)


DEVICE = CudaDevice
