"""Timing and result-writing helpers shared by every benchmark in benchmarks/.

Importing this module makes ``import convnet`` work: the installed package (``pip install .``, which carries
``convnet._cuda``) when there is one, else this checkout's ``src/`` (a development build, ``tools/dev_build.sh``).

* ``time_ms(fn, device)``: CUDA events around each call after warm-up on cuda (median of repeats); only for calls
  long enough that the host's dispatch does not matter (an 8192^3 GEMM); wall clock on emu/numpy, where the figure is
  only a smoke test.
* ``bench_ms(fn, device)`` and ``torch_bench_ms(torch, fn)``: THE timing of every benchmark row, ours and the
  baselines alike: ``reps`` back-to-back calls captured in one CUDA graph (CuPy's stream capture for our ops and
  ctypes cuDNN; ``torch.cuda.CUDAGraph`` for PyTorch), the graph replayed 7 times between two CUDA events, the
  median / ``reps``. Host dispatch (Python, ctypes, PyTorch's dispatcher: 10-30 us a call, comparable to a 13x13
  layer's kernel) is not counted for anyone. When capture fails -- or for an op that waits for the host -- the
  fallback is the same for both: ``reps`` back-to-back calls between two events (the host runs ahead, so its
  dispatch hides behind the GPU's work once kernels take longer than it). ``TIMING`` records which method each
  label got; a row whose two sides were timed differently is reported.
* ``measure_copy_bandwidth(device)``: the device-to-device copy GB/s that memory-bound ops are compared with
  (timed by ``bench_ms`` too).
* ``cudnn(device)``: PyTorch with cuDNN configured for an FP32 baseline on the same GPU (TF32 off, benchmark mode),
  or None with the reason in ``TORCH_UNAVAILABLE``.
* ``write_results(name, device, rows, columns)``: JSON + markdown in benchmarks/results/, with the device name,
  date and library versions, so every committed number says where it was measured.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import glob
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

try:  # the installed package; else the source tree of this checkout (src layout), said out loud
    import convnet  # noqa: F401
except ImportError as exc:
    print(f"(convnet is not installed ({exc}); using this checkout's source tree {REPO / 'src'})", file=sys.stderr)
    sys.path.insert(0, str(REPO / "src"))


def time_ms(fn, device, *, warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of ``fn()`` on ``device``."""
    for _ in range(warmup):
        fn()
    times = []
    if device.kind == "cuda":
        import cupy as cp

        with device.activate():
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            for _ in range(repeats):
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, stop))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


TORCH_UNAVAILABLE = {"reason": None}


def cudnn(device=None, allow_tf32: bool = False):
    """torch with cuDNN configured for an FP32 (or TF32) baseline on ``device``'s GPU (made torch's current device),
    or None when unavailable (the reason in ``TORCH_UNAVAILABLE["reason"]``)."""
    if device is not None and device.kind != "cuda":
        TORCH_UNAVAILABLE["reason"] = f"ours runs on {device}: the PyTorch/cuDNN baseline needs a GPU"
        return None
    try:
        import torch
    except ImportError as exc:
        TORCH_UNAVAILABLE["reason"] = f"PyTorch is not installed ({exc})"
        return None
    if not torch.cuda.is_available():
        TORCH_UNAVAILABLE["reason"] = "PyTorch sees no GPU"
        return None
    if device is not None:
        if device.index >= torch.cuda.device_count():
            TORCH_UNAVAILABLE["reason"] = f"PyTorch sees {torch.cuda.device_count()} GPU(s), not {device}"
            return None
        torch.cuda.set_device(device.index)  # same GPU as ours: every torch tensor below goes to cuda:<index>
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return torch


def torch_cpu(threads: int):
    """torch for a CPU baseline with ``threads`` intra-op threads (the same count as our BLAS threads), or None when
    PyTorch is not installed (the reason in ``TORCH_UNAVAILABLE["reason"]``)."""
    try:
        import torch
    except ImportError as exc:
        TORCH_UNAVAILABLE["reason"] = f"PyTorch is not installed ({exc}; pip install torch for the CPU baseline)"
        return None
    torch.set_num_threads(max(1, int(threads)))
    return torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``) and the cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def torch_view(a):
    """Zero-copy torch tensor of a CuPy array (DLPack)."""
    import torch

    return torch.from_dlpack(a)


def device_info(device) -> dict:
    info = {"device": str(device), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__}
    if device.kind == "cuda":
        import cupy as cp

        with device.activate():
            props = cp.cuda.runtime.getDeviceProperties(device.index)
        info.update(name=props["name"].decode(), sms=props["multiProcessorCount"],
                    cc=f"{props['major']}.{props['minor']}", cupy=cp.__version__,
                    cuda_runtime=cp.cuda.runtime.runtimeGetVersion(), driver=cp.cuda.runtime.driverGetVersion())
        torch = cudnn()
        if torch is not None:
            info.update(torch=torch.__version__, cudnn=torch.backends.cudnn.version())
    elif device.kind == "emu":
        info.update(name=cpu_name(), note="the CUDA emulator: times are a correctness smoke, not speed figures")
    else:  # numpy / cpu: the CPU training path, a real speed figure for this CPU
        info.update(name=cpu_name())
    return info


# Dense peak TFLOP/s per card and precision (NVIDIA's datasheets, boost clock; what "% of peak" divides by). A card
# is matched by the first key its name contains; H200 has H100's compute. Unknown cards: the FP32 peak computed from
# the SM count and clock (conv_bench.fp32_peak_tflops), none for the tensor-core precisions.
PEAK_TFLOPS = {
    "H100 PCIe": None,  # other clocks and SMs than the SXM part: not in the table
    "H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0},  # H100 SXM5
    "H200": {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


def card_name(device) -> str:
    """The GPU's name ("NVIDIA H100 80GB HBM3"), "" off the GPU."""
    if device.kind != "cuda":
        return ""
    import cupy as cp

    with device.activate():
        return cp.cuda.runtime.getDeviceProperties(device.index)["name"].decode()


def peak_tflops(name: str, precision: str) -> float | None:
    """The card's dense peak for ``precision`` ("fp32", "tf32", "bf16") from PEAK_TFLOPS, None when not listed."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision] if peaks else None
    return None


COPY_BYTES = 1 << 30  # the copy-bandwidth measurement's buffer (tests shrink it)


def measure_copy_bandwidth(device, nbytes: int | None = None) -> float | None:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the ceiling for memory-bound kernels."""
    if device.kind != "cuda":
        return None
    import cupy as cp

    nbytes = nbytes or COPY_BYTES
    with device.activate():
        src = cp.ones(nbytes // 4, dtype=cp.float32)
        dst = cp.empty_like(src)
        cp.cuda.Device().synchronize()  # src is written on the default stream; the copy runs on another
        with cp.cuda.Stream(non_blocking=True):  # graph capture needs a non-default stream
            ms = bench_ms(lambda: dst.__setitem__(Ellipsis, src), device, reps=5, label="copy bandwidth")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def rel_error(got, want) -> float:
    """Normwise error ``max|got - want| / max|want|`` in float64 (0 when both are all zeros)."""
    got, want = to_host(got).astype(np.float64), to_host(want).astype(np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shape {got.shape} != reference {want.shape}")
    err = np.max(np.abs(got - want), initial=0.0)
    return float(err / max(np.max(np.abs(want), initial=0.0), 1e-30))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, device, rows: list[dict], columns: list[str], extra: dict | None = None) -> Path:
    """Write benchmarks/results/<name>-<card>-<date>.{json,md} (smoke runs: results/smoke/); returns the .md path."""
    info = device_info(device)
    # GPU and CPU-path (numpy, cpu) measurements are results; emulator smoke runs go to an ignored folder.
    out_dir = RESULTS_DIR / "smoke" if device.kind == "emu" else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in info.get("name", str(device))).strip("-").lower()
    stem = out_dir / f"{name}-{slug}-{_dt.date.today().isoformat()}"
    payload = {"benchmark": name, "info": info, "rows": rows, **(extra or {})}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    header = f"# {name} on {info.get('name')} ({info['date']})\n\n"
    if "note" in info:
        header += f"**{info['note']}**\n\n"
    md = header + markdown_table(rows, columns) + "\n"
    stem.with_suffix(".md").write_text(md)
    return stem.with_suffix(".md")


# ---------------------------------------------------------------------------------------------------- CUDA timing
GRAPH, BACK_TO_BACK = "cuda graph", "back-to-back calls"
TIMING = {"method": None, "by_label": {}}  # the last method; label -> method (rows compare their sides' methods)
REPLAYS = 7


def _note(label, method):
    TIMING["method"] = method
    if label:
        TIMING["by_label"][label] = method


def bench_ms(fn, dev, reps: int = 20, *, graph: bool = True, label: str = "") -> float:
    """Milliseconds per call of ``fn`` (our ops, ctypes cuDNN, CuPy): see the module docstring.

    On cuda: one warm-up call, then ``reps`` calls captured into a CUDA graph on CuPy's current stream (must be a
    non-default stream), replayed ``REPLAYS`` times between two events; median / ``reps``. If capture fails, or
    with ``graph=False`` (an op that waits for the device, e.g. to return counts to the host, cannot be captured),
    ``reps`` back-to-back calls between two events instead. ``TIMING`` says which. Elsewhere: wall clock (a smoke
    figure only).
    """
    if dev.kind != "cuda":
        return time_ms(fn, dev, warmup=1, repeats=5)
    import cupy as cp

    s = cp.cuda.get_current_stream()
    fn()
    s.synchronize()
    run = None
    if graph:
        try:
            s.begin_capture()
            try:
                for _ in range(reps):
                    fn()
            finally:
                captured = s.end_capture()
            captured.launch(s)
            s.synchronize()
            run = lambda: captured.launch(s)  # noqa: E731
            _note(label, GRAPH)
        except Exception as exc:  # noqa: BLE001
            print(f"({label or 'call'}: graph capture failed: {exc}; timing {reps} back-to-back calls)")
            s.synchronize()
    if run is None:
        run = lambda: [fn() for _ in range(reps)]  # noqa: E731
        _note(label, BACK_TO_BACK)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(REPLAYS):
        start.record(s)
        run()
        stop.record(s)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / reps)
    return statistics.median(times)


def torch_bench_ms(torch, fn, reps: int = 20, *, warmup: int = 3, label: str = "") -> float:
    """``bench_ms`` for PyTorch calls, on torch's current GPU: ``warmup`` calls on a side stream (cuDNN's benchmark
    mode picks its algorithm there, before capture), ``reps`` calls captured in a ``torch.cuda.CUDAGraph``,
    replayed ``REPLAYS`` times between two events, median / ``reps``; back-to-back calls between two events if the
    capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run = None
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        g.replay()
        torch.cuda.synchronize()
        run = g.replay
        _note(label, GRAPH)
    except Exception as exc:  # noqa: BLE001
        print(f"({label or 'torch call'}: graph capture failed: {exc}; timing {reps} back-to-back calls)")
        torch.cuda.synchronize()
    if run is None:
        run = lambda: [fn() for _ in range(reps)]  # noqa: E731
        _note(label, BACK_TO_BACK)
    times = []
    for _ in range(REPLAYS):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / reps)
    return statistics.median(times)


def timing_summary() -> dict:
    """{method: [labels]} of this run, for the results' JSON (one key when everything was timed the same way)."""
    out = {}
    for label, method in TIMING["by_label"].items():
        out.setdefault(method, []).append(label)
    return out


# ---------------------------------------------------------------------------------------------------- cuDNN
def ptr(a):
    return ctypes.c_void_p(int(a.data.ptr))



class CuDNN:
    """cuDNN (8 or 9) through ctypes: library loading, handle, status checks and tensor descriptors.

    CuPy 14 dropped its cuDNN bindings, and torch does not expose cuDNN's pooling/LRN or a CHWN convolution, so
    the benchmarks call cuDNN directly; subclasses add the ops they compare against.
    """

    FLOAT, POOL_MAX, POOL_AVG_EXCLUDE_PAD, NOT_PROPAGATE_NAN, LRN_CROSS_CHANNEL = 0, 0, 2, 0, 0

    def __init__(self, stream_ptr: int):
        self.lib = self._load()
        self.handle = ctypes.c_void_p()
        self._ok(self.lib.cudnnCreate(ctypes.byref(self.handle)), "cudnnCreate")
        self._ok(self.lib.cudnnSetStream(self.handle, ctypes.c_void_p(stream_ptr)), "cudnnSetStream")
        self.version = int(self.lib.cudnnGetVersion())
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _load():
        names = ["libcudnn.so.9", "libcudnn.so.8", "libcudnn.so", ctypes.util.find_library("cudnn")]
        for base in sys.path:
            names += sorted(glob.glob(os.path.join(base, "nvidia", "cudnn", "lib", "libcudnn.so*")))
            names += sorted(glob.glob(os.path.join(base, "torch", "lib", "libcudnn.so*")))
        errors = []
        for name in names:
            if not name:
                continue
            try:
                return ctypes.CDLL(name)
            except OSError as exc:
                errors.append(f"{name}: {exc}")
        raise OSError("cuDNN not found (" + "; ".join(errors[-3:]) + ")")

    @staticmethod
    def _ok(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cudnnStatus {status}")

    def tensor(self, C, H, W, N, layout):
        d = ctypes.c_void_p()
        self._ok(self.lib.cudnnCreateTensorDescriptor(ctypes.byref(d)), "cudnnCreateTensorDescriptor")
        if layout == "NCHW":
            strides = (C * H * W, H * W, W, 1)
        else:  # our CHWN memory: images fastest
            strides = (1, H * W * N, W * N, N)
        self._ok(self.lib.cudnnSetTensor4dDescriptorEx(d, self.FLOAT, N, C, H, W, *strides),
                 "cudnnSetTensor4dDescriptorEx")
        return d

