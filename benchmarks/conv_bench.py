"""Per-layer convolution benchmark: AlexNet conv1..conv5, forward / input gradient / filter gradient.

    python benchmarks/conv_bench.py                       # cuda:0 if usable, batch 128, the 2012 two-tower model
    python benchmarks/conv_bench.py --model one-tower --batch 64 --layers conv2,conv3 --repeats 50
    python benchmarks/conv_bench.py --device cuda:1       # ours and every cuDNN baseline on GPU 1
    python benchmarks/conv_bench.py --device emu          # correctness smoke on the CPU emulator (not a speed figure)
    ncu --profile-from-start off --section SpeedOfLight python benchmarks/conv_bench.py --profile  # one launch each

On a GPU each row gives our time, GFLOP/s (the direct-convolution count 2*N*F*OH*OW*Cg*KH*KW,
``ConvGeometry.flops()``), % of the card's FP32 peak (SMs x FP32 lanes x 2 x boost clock), and, in the same run on
the same GPU, three cuDNN baselines on its fastest algorithm for each:

* cuDNN NCHW FP32 (TF32 off): its native layout. Through PyTorch (``cudnn.benchmark = True``,
  ``allow_tf32 = False``) when torch is installed, else through ctypes (legacy API, cudnnFind* picks the algorithm,
  CUDNN_FMA_MATH). ``ours/cuDNN`` is our time over this one (< 1: faster than cuDNN). Its results are compared with
  ours (``NCHW rel diff``): at batch 128 on the real layer shapes, a check of our kernels that the small-shape cuda
  tests do not make.
* cuDNN CHWN FP32: cuDNN on OUR memory layout -- activations (x, y, dx, dy) described to cuDNN by CHWN strides
  (``CuDNN.tensor(..., "CHWN")``, ctypes), filters in cuDNN's KCRS (filter descriptors take no strides). Beside
  the NCHW column it separates layout from kernel quality: if cuDNN on CHWN is slower than on NCHW, that part of a
  gap is the layout's; if ours is slower than cuDNN on the same CHWN memory, it is the kernels'. Its result is
  compared with ours (``CHWN rel diff``), so a wrong stride description cannot pass as a fast baseline. Empty when
  cuDNN has no algorithm for those strides (the reason is printed). Either difference above 1e-4 is printed as a
  MISMATCH and fails the run (exit 1), after the results are written.
* cuDNN NCHW TF32: for reference (tensor cores; not the FP32 comparison).
* Through PyTorch only: cuDNN NHWC (``channels_last``) FP32 and TF32, and cuDNN NCHW / NHWC BF16 (bfloat16 tensors).

Precisions: ``ms`` / ``GFLOP/s`` are ours in FP32; ``TF32 ms`` / ``TF32 TFLOP/s`` ours with ``precision="tf32"``
(inputs rounded to TF32, FP32 accumulation); ``BF16 ms`` / ``BF16 TFLOP/s`` ours with ``precision="bf16"`` on the
arrays the bf16 training mode passes: x, dy, the output y and the input gradient dx stored as bfloat16, the weights as
the layer's per-step bfloat16 copy of its float32 master weights (made once per step, outside the timed passes), the
filter gradient float32 -- the bfloat16 16-byte (cp.async) load path wherever N and F/groups are multiples of 8.
(In training, conv1's forward reads the float32 images with float32 weights, rounded on load; here it is timed on
bfloat16 as the other layers.) ``BF16 ours/cuDNN`` is that time over the faster of cuDNN NCHW and NHWC BF16 (all its tensors
bfloat16, the filter gradient too). ``% FP32 peak``, ``% TF32 peak`` and ``% BF16 peak`` divide by the card's dense
peak in that precision (``common.PEAK_TFLOPS``, by card name: H100 SXM and H200 67 / 495 / 990 TFLOP/s FP32 / TF32 /
BF16, A100 19.5 / 156 / 312; a card not listed: the FP32 peak from its SMs and clock, no tensor-core peak); the
JSON's ``% of peak`` gives every timed column's share in its own precision.

Timing -- the same for ours and every cuDNN column (common.bench_ms / common.torch_bench_ms): warm-up calls (for
PyTorch on a side stream, where benchmark mode autotunes), then ``repeats`` back-to-back calls captured in ONE CUDA
graph (CuPy stream capture for ours and ctypes cuDNN, ``torch.cuda.CUDAGraph`` for PyTorch), the graph replayed 7
times between two CUDA events, median / ``repeats``. So no side pays host dispatch (Python, ctypes, PyTorch's
dispatcher: 10-30 us a call, comparable to a 13x13 layer's kernel at small batches): the numbers are GPU time per
call. Earlier versions put events around each PyTorch call, which charged cuDNN its dispatch but not ours. If a
capture fails, that side falls back to back-to-back calls between two events (dispatch hidden behind the GPU work
once kernels are long); the JSON's ``timing`` lists the method per measurement and a mixed row is flagged.
Results go to benchmarks/results/ (JSON + markdown, with the device name, date and versions).

Without a GPU (``--device emu``), the layers run on the emulator at a tiny size (batch 4, channels divided by
8) and are compared with the NumPy reference: a correctness smoke, the times are not speed figures; the cuDNN
columns are skipped with the reason printed. The TF32 and BF16 passes are checked against the reference on inputs
rounded to TF32 and bfloat16 (the BF16 outputs y and dx also carry their own rounding to bfloat16: SMOKE_TOL).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (also makes `import convnet` work from a source checkout)
# common.py has the ctypes cuDNN loader and the CUDA-graph timer shared by the benchmarks.
from common import TIMING, CuDNN, bench_ms, ptr  # noqa: E402

from convnet import ops  # noqa: E402
from convnet.devices import device_report, get_device  # noqa: E402
from convnet.geometry import ConvGeometry  # noqa: E402
from convnet.ops._checks import BFLOAT16  # noqa: E402
from convnet.reference.precision import to_bf16  # noqa: E402

# name: (C, H, W, F, KH, KW, stride, pad, groups) -- the batch size is a command-line choice
MODELS = {
    "2012": {
        "conv1": (3, 224, 224, 96, 11, 11, 4, 2, 1),
        "conv2": (96, 27, 27, 256, 5, 5, 1, 2, 2),
        "conv3": (256, 13, 13, 384, 3, 3, 1, 1, 1),
        "conv4": (384, 13, 13, 384, 3, 3, 1, 1, 2),
        "conv5": (384, 13, 13, 256, 3, 3, 1, 1, 2),
    },
    "one-tower": {
        "conv1": (3, 224, 224, 64, 11, 11, 4, 2, 1),
        "conv2": (64, 27, 27, 192, 5, 5, 1, 2, 1),
        "conv3": (192, 13, 13, 384, 3, 3, 1, 1, 1),
        "conv4": (384, 13, 13, 256, 3, 3, 1, 1, 1),
        "conv5": (256, 13, 13, 256, 3, 3, 1, 1, 1),
    },
}
PASSES = ("forward", "input-grad", "filter-grad")
CONV_PASS = {"forward": "forward", "input-grad": "backward_data", "filter-grad": "backward_filter"}  # kernels.ConvPass


def layer_geometry(spec, n, channel_divisor=1) -> ConvGeometry:
    """A MODELS entry at batch ``n``; channel and filter counts divided by ``channel_divisor`` (rounded down to a
    multiple of the groups; an RGB input keeps its 3 channels) for the emulator's small smoke runs."""
    c, h, w, f, kh, kw, s, p, g = spec
    c = c if c <= 3 else max(g, c // channel_divisor // g * g)
    f = max(g, f // channel_divisor // g * g)
    return ConvGeometry.of((c, h, w, n), (c // g, kh, kw, f), stride=s, padding=p, groups=g)


def describe(geo: ConvGeometry) -> str:
    return (f"C{geo.C} {geo.H}x{geo.W} F{geo.F} {geo.KH}x{geo.KW}/{geo.stride_h} p{geo.pad_h} g{geo.groups} "
            f"N{geo.N}")


def conv_params(geo: ConvGeometry) -> dict:
    return dict(stride=geo.stride, padding=geo.padding, groups=geo.groups)


def plan(device, ps, geo: ConvGeometry) -> str:
    """The kernels' plan for one pass (tile, path, grid, splits), as the dispatch table chooses it."""
    k = device.kernels
    return k.conv_plan(getattr(k.ConvPass, CONV_PASS[ps]), geo)


def fp32_peak_tflops(device) -> float | None:
    """SMs x FP32 lanes per SM x 2 (FMA) x clock. Lanes: 64 on sm_80 (A100), 128 on sm_86/89/90."""
    if device.kind != "cuda":
        return None
    import cupy as cp

    rt = cp.cuda.runtime
    with device.activate():
        props = rt.getDeviceProperties(device.index)
        try:  # kHz; CUDA 13 removed cudaDeviceProp.clockRate: the attribute is the one source every version has
            khz = rt.deviceGetAttribute(rt.cudaDevAttrClockRate, device.index)
        except (AttributeError, rt.CUDARuntimeError):
            khz = props.get("clockRate")
    if not khz:
        return None
    lanes = 64 if (props["major"], props["minor"]) == (8, 0) else 128
    return props["multiProcessorCount"] * lanes * 2 * khz * 1e3 / 1e12


SGEMM_N = 8192  # the ceiling's GEMM size (tests shrink it)


def measured_sgemm_tflops(device) -> float | None:
    """FP32 (no TF32) SGEMM_N^3 GEMM through CuPy/cuBLAS on the same card: a measured ceiling for FP32 FMA."""
    if device.kind != "cuda":
        return None
    import cupy as cp

    os.environ.setdefault("CUPY_TF32", "0")
    n = SGEMM_N
    with device.activate():
        a = cp.random.rand(n, n, dtype=cp.float32)
        b = cp.random.rand(n, n, dtype=cp.float32)
        ms = common.time_ms(lambda: cp.matmul(a, b), device, warmup=2, repeats=5)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def make_inputs(device, geo: ConvGeometry, seed=0):
    """Float32 host arrays x, w, dy and their device copies; ``<name> bf16``: the device copies stored as bfloat16
    (rounded to nearest even, as the bf16 training mode stores them)."""
    rng = np.random.default_rng(seed)
    host = dict(x=rng.uniform(-1, 1, geo.x_shape).astype(np.float32),
                w=rng.uniform(-1, 1, geo.w_shape).astype(np.float32) * 0.1,
                dy=rng.uniform(-1, 1, geo.y_shape).astype(np.float32))
    arrs = {k: device.asarray(v) for k, v in host.items()}
    arrs.update({f"{k} bf16": device.asarray(to_bf16(v)) for k, v in host.items()})
    return host, arrs


def our_fns(device, geo: ConvGeometry, arrs, precision="fp32"):
    """{pass: one call writing into a preallocated output}, and those outputs (forward, input-grad, filter-grad), in
    ``precision`` (the ops' ``precision=``). bf16: bfloat16 x, w, dy, y and dx, float32 dw (the module docstring)."""
    kw_ = dict(conv_params(geo), precision=precision)
    hw, khw = (geo.H, geo.W), (geo.KH, geo.KW)
    bf16 = precision == "bf16"
    x, wt, dy = (arrs[f"{k} bf16" if bf16 else k] for k in ("x", "w", "dy"))
    y = device.empty(geo.y_shape, BFLOAT16 if bf16 else np.float32)
    dx = device.empty(geo.x_shape, BFLOAT16 if bf16 else np.float32)
    dw = device.empty(geo.w_shape, np.float32)
    return {
        "forward": lambda: ops.conv_forward(device, x, wt, out=y, **kw_),
        "input-grad": lambda: ops.conv_backward_data(device, dy, wt, hw, out=dx, **kw_),
        "filter-grad": lambda: ops.conv_backward_filter(device, x, dy, khw, out=dw, **kw_),
    }, (y, dx, dw)


def reference_outputs(geo: ConvGeometry, host, precision="fp32"):
    """The three passes on the float64 NumPy reference (the ``numpy`` device), in PASSES order; tf32 and bf16: on the
    inputs rounded to TF32 or bfloat16 (what our TF32 and BF16 passes compute, up to FP32 summation)."""
    kw_ = dict(conv_params(geo), precision=precision)
    x, wt, dy = (host[k].astype(np.float64) for k in ("x", "w", "dy"))
    return (ops.conv_forward("numpy", x, wt, **kw_), ops.conv_backward_data("numpy", dy, wt, (geo.H, geo.W), **kw_),
            ops.conv_backward_filter("numpy", x, dy, (geo.KH, geo.KW), **kw_))


class _AlgoPerf(ctypes.Structure):  # cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t (same layout)
    _fields_ = [("algo", ctypes.c_int), ("status", ctypes.c_int), ("time", ctypes.c_float),
                ("memory", ctypes.c_size_t), ("determinism", ctypes.c_int), ("mathType", ctypes.c_int),
                ("reserved", ctypes.c_int * 3)]


class ConvCuDNN(CuDNN):
    """cuDNN's legacy convolution API through ctypes (cuDNN 8 or 9), best algorithm by cudnnFind*.

    ``layout="NCHW"``: packed NCHW activations; ``"CHWN"``: our (C, H, W, N) memory described by strides. Filters are
    KCRS either way (cuDNN's filter descriptors take a format, not strides). FP32 = CUDNN_FMA_MATH (no tensor cores);
    TF32 = CUDNN_DEFAULT_MATH (TF32 tensor cores allowed on sm_80+)."""

    DEFAULT_MATH, FMA_MATH, CROSS_CORRELATION, NCHW = 0, 3, 1, 0

    def conv_fns(self, xp, geo: ConvGeometry, host, tf32, layout="NCHW"):
        """{pass: one call}, plus ``"outputs"``: (y, dx, dw) as CuPy arrays in our layouts (views, for checks)."""
        wt = xp.asarray(np.ascontiguousarray(host["w"].transpose(3, 0, 1, 2)))  # (F, Cg, KH, KW)
        if layout == "NCHW":
            x = xp.asarray(np.ascontiguousarray(host["x"].transpose(3, 0, 1, 2)))
            dy = xp.asarray(np.ascontiguousarray(host["dy"].transpose(3, 0, 1, 2)))
            y, dx = xp.empty_like(dy), xp.empty_like(x)
            ours = lambda a: a.transpose(1, 2, 3, 0)  # noqa: E731  (N, C, H, W) -> (C, H, W, N)
        else:
            x, dy = xp.asarray(host["x"]), xp.asarray(host["dy"])
            y, dx = xp.empty(geo.y_shape, xp.float32), xp.empty(geo.x_shape, xp.float32)
            ours = lambda a: a  # noqa: E731
        dw = xp.empty_like(wt)
        xd = self.tensor(geo.C, geo.H, geo.W, geo.N, layout)
        yd = self.tensor(geo.F, geo.OH, geo.OW, geo.N, layout)
        fd = ctypes.c_void_p()
        self._ok(self.lib.cudnnCreateFilterDescriptor(ctypes.byref(fd)), "cudnnCreateFilterDescriptor")
        self._ok(self.lib.cudnnSetFilter4dDescriptor(fd, self.FLOAT, self.NCHW, geo.F, geo.Cg, geo.KH, geo.KW),
                 "cudnnSetFilter4dDescriptor")
        cd = ctypes.c_void_p()
        self._ok(self.lib.cudnnCreateConvolutionDescriptor(ctypes.byref(cd)), "cudnnCreateConvolutionDescriptor")
        self._ok(self.lib.cudnnSetConvolution2dDescriptor(cd, geo.pad_h, geo.pad_w, geo.stride_h, geo.stride_w, 1, 1,
                                                          self.CROSS_CORRELATION, self.FLOAT),
                 "cudnnSetConvolution2dDescriptor")
        self._ok(self.lib.cudnnSetConvolutionGroupCount(cd, geo.groups), "cudnnSetConvolutionGroupCount")
        math = self.DEFAULT_MATH if tf32 else self.FMA_MATH
        self._ok(self.lib.cudnnSetConvolutionMathType(cd, math), "cudnnSetConvolutionMathType")
        one, zero = ctypes.byref(self.one), ctypes.byref(self.zero)

        def best(find, *descs):
            perf = (_AlgoPerf * 16)()
            count = ctypes.c_int()
            self._ok(find(self.handle, *descs, 16, ctypes.byref(count), perf), find.__name__)
            ok = [r for r in perf[:count.value] if r.status == 0]
            if not ok:
                raise RuntimeError(f"{find.__name__}: no usable algorithm")
            r = min(ok, key=lambda r: r.time)
            # FP32 runs are always executed under CUDNN_FMA_MATH (no tensor cores, whatever Find reported).
            return (r.algo, r.mathType if tf32 else self.FMA_MATH,
                    xp.empty(max(1, (r.memory + 3) // 4), dtype=xp.float32), r.memory)

        fwd = best(self.lib.cudnnFindConvolutionForwardAlgorithm, xd, fd, cd, yd)
        bwd_data = best(self.lib.cudnnFindConvolutionBackwardDataAlgorithm, fd, yd, cd, xd)
        bwd_filter = best(self.lib.cudnnFindConvolutionBackwardFilterAlgorithm, xd, yd, cd, fd)

        def call(fn, algo, args_before, args_after, name):
            a, m, ws, size = algo

            def run():
                self.lib.cudnnSetConvolutionMathType(cd, m)
                self._ok(fn(self.handle, one, *args_before, cd, a, ptr(ws), ctypes.c_size_t(size), zero,
                            *args_after), name)
            return run

        return {
            "_keep": (x, wt, dy, y, dx, dw, fwd, bwd_data, bwd_filter),  # the buffers live as long as the calls
            "outputs": (ours(y), ours(dx), dw.transpose(1, 2, 3, 0)),  # dw: (F, Cg, KH, KW) -> (Cg, KH, KW, F)
            "forward": call(self.lib.cudnnConvolutionForward, fwd, (xd, ptr(x), fd, ptr(wt)), (yd, ptr(y)),
                            "cudnnConvolutionForward"),
            "input-grad": call(self.lib.cudnnConvolutionBackwardData, bwd_data, (fd, ptr(wt), yd, ptr(dy)),
                               (xd, ptr(dx)), "cudnnConvolutionBackwardData"),
            "filter-grad": call(self.lib.cudnnConvolutionBackwardFilter, bwd_filter, (xd, ptr(x), yd, ptr(dy)),
                                (fd, ptr(dw)), "cudnnConvolutionBackwardFilter"),
        }


def torch_fns(torch, geo: ConvGeometry, host, index: int, bf16=False, channels_last=False):
    """The same three passes through PyTorch's cuDNN on GPU ``index``, when torch is installed: NCHW, or NHWC memory
    (``channels_last``); float32 tensors, or (``bf16``) bfloat16 ones (cuDNN's BF16 tensor-core kernels)."""
    s, p, g = list(geo.stride), list(geo.padding), geo.groups
    dev = torch.device("cuda", index)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def tensor(a):  # (C, H, W, N) -> (N, C, H, W) on the GPU, in the dtype and memory format asked for
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(3, 0, 1, 2))).to(dev)
        return t.to(dtype=torch.bfloat16 if bf16 else torch.float32, memory_format=fmt)

    x, wt, dy = tensor(host["x"]), tensor(host["w"]), tensor(host["dy"])  # wt: (F, Cg, KH, KW)
    conv_bwd = torch.ops.aten.convolution_backward
    args = dict(bias_sizes=None, stride=s, padding=p, dilation=[1, 1], transposed=False,
                output_padding=[0, 0], groups=g)
    fns = {
        "forward": lambda: torch.nn.functional.conv2d(x, wt, None, s, p, 1, g),
        "input-grad": lambda: conv_bwd(dy, x, wt, output_mask=[True, False, False], **args),
        "filter-grad": lambda: conv_bwd(dy, x, wt, output_mask=[False, True, False], **args),
    }
    # one call of each, as NumPy arrays in our layouts: (N, F, OH, OW) -> CHWN; dw (F, Cg, KH, KW) -> (Cg, KH, KW, F)
    fns["outputs"] = lambda: tuple(t.float().cpu().numpy().transpose(1, 2, 3, 0) for t in
                                   (fns["forward"](), fns["input-grad"]()[0], fns["filter-grad"]()[1]))
    return fns


# baseline columns, in table order
NCHW_FP32, CHWN_FP32, NCHW_TF32 = "cuDNN NCHW FP32 ms", "cuDNN CHWN FP32 ms", "cuDNN NCHW TF32 ms"
NHWC_FP32, NHWC_TF32 = "cuDNN NHWC FP32 ms", "cuDNN NHWC TF32 ms"  # PyTorch's channels_last
NCHW_BF16, NHWC_BF16 = "cuDNN NCHW BF16 ms", "cuDNN NHWC BF16 ms"
# the cuDNN columns through PyTorch: (column, precision, channels_last)
TORCH_COLUMNS = ((NCHW_FP32, "fp32", False), (NHWC_FP32, "fp32", True), (NCHW_TF32, "tf32", False),
                 (NHWC_TF32, "tf32", True), (NCHW_BF16, "bf16", False), (NHWC_BF16, "bf16", True))
COLUMN_PRECISION = {**{c: p for c, p, _ in TORCH_COLUMNS}, CHWN_FP32: "fp32"}
# our columns: (time column, precision, its TFLOP/s and % of peak columns (FP32: GFLOP/s and % FP32 peak, set apart),
# the ratio column against the faster cuDNN layout in that precision, those cuDNN columns)
OURS = (("ms", "fp32"), ("TF32 ms", "tf32"), ("BF16 ms", "bf16"))
TENSOR_CORE_COLUMNS = (("TF32 ms", "tf32", "TF32 TFLOP/s", "% TF32 peak", "TF32 ours/cuDNN", (NCHW_TF32, NHWC_TF32)),
                       ("BF16 ms", "bf16", "BF16 TFLOP/s", "% BF16 peak", "BF16 ours/cuDNN", (NCHW_BF16, NHWC_BF16)))
ERROR_COLUMNS = {"ms": "rel err vs ref", "TF32 ms": "TF32 rel err vs ref", "BF16 ms": "BF16 rel err vs ref"}
# Emulator smoke tolerances (normwise, against the float64 reference on the rounded inputs): FP32 summation only, for
# FP32 and TF32 (sums of at most a few thousand terms on the smoke sizes: far below 1e-5); BF16 adds the rounding of
# y and dx to bfloat16, at most 2**-8 of each element (8 significant bits, nearest even), so of the max norm.
SMOKE_TOL = {"fp32": 1e-5, "tf32": 1e-5, "bf16": 2.0 ** -8 + 1e-5}
# cuDNN FP32's results against ours: max|cuDNN - ours| / max|ours| per pass. Both are FP32 sums of up to
# C*KH*KW (forward), F*KH*KW (input-grad) or N*OH*OW (filter-grad: 387k at conv1, batch 128) products in different
# orders; on random data even a sequential sum of 387k terms stays near sqrt(387k) x 6e-8 = 4e-5 of the result, and
# blocked sums (both sides') far below: 1e-4 flags a wrong result, not rounding.
DIFFS, MAX_DIFF_FROM_CUDNN = ("NCHW rel diff", "CHWN rel diff"), 1e-4


def baselines(device, name, geo: ConvGeometry, host, warmup, repeats, torch, cud, ours_out):
    """{column: {pass: ms}} from cuDNN on the same GPU (NCHW FP32 and TF32 through torch, else ctypes; CHWN FP32
    through ctypes), plus ``"NCHW rel diff"`` and ``"CHWN rel diff"`` {pass: normwise difference of cuDNN FP32's
    result from ours}. A baseline that cannot run is left out with a printed reason."""
    out = {}

    def timed(column, fns, time_one):
        try:
            out[column] = {ps: time_one(fns[ps], f"{name} {ps} {column}") for ps in PASSES}
        except Exception as exc:  # noqa: BLE001 - report and go on without this baseline
            print(f"{column} failed for {name} ({describe(geo)}): {exc}")

    if torch is not None:
        for column, precision, channels_last in TORCH_COLUMNS:
            try:
                fns = torch_fns(torch, geo, host, device.index, bf16=precision == "bf16", channels_last=channels_last)
            except Exception as exc:  # noqa: BLE001
                print(f"PyTorch baseline {column} failed for {name}: {exc}")
                continue
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
            timed(column, fns, lambda fn, label: common.torch_bench_ms(torch, fn, repeats, warmup=warmup,
                                                                       label=label))
            torch.backends.cudnn.allow_tf32 = False
            if column == NCHW_FP32 and column in out:
                out["NCHW rel diff"] = {ps: common.rel_error(got, want) for ps, got, want in
                                        zip(PASSES, fns["outputs"](), ours_out)}
    if cud is not None:
        variants = [(CHWN_FP32, False, "CHWN")]
        if torch is None:
            variants += [(NCHW_FP32, False, "NCHW"), (NCHW_TF32, True, "NCHW")]
        for column, tf32, layout in variants:
            try:
                fns = cud.conv_fns(device.xp, geo, host, tf32, layout)
            except Exception as exc:  # noqa: BLE001 - e.g. no cuDNN algorithm for these strides
                print(f"{column} unavailable for {name} ({describe(geo)}): {exc}")
                continue
            timed(column, fns, lambda fn, label: bench_ms(fn, device, reps=repeats, label=label))
            if layout == "CHWN" and column in out:
                for ps in PASSES:
                    fns[ps]()
                out["CHWN rel diff"] = {ps: common.rel_error(got, want) for ps, got, want in
                                        zip(PASSES, fns["outputs"], ours_out)}
    return out


def smoke_check(geo: ConvGeometry, host, outs, precision="fp32"):
    """Max normwise error of each pass against the float64 reference in ``precision`` (emu smoke)."""
    return [common.rel_error(o, want) for o, want in zip(outs, reference_outputs(geo, host, precision))]


def peaks(device) -> dict:
    """{precision: the card's dense peak TFLOP/s or None}: common.PEAK_TFLOPS by the card's name; FP32 of a card
    not listed: computed from its SMs and clock."""
    name = common.card_name(device)
    out = {p: common.peak_tflops(name, p) for p in ("fp32", "tf32", "bf16")}
    if out["fp32"] is None:
        out["fp32"] = fp32_peak_tflops(device)
    return out


def profile(device, model, layers, batch, div) -> int:
    """One call of each layer's passes inside the profiler range (cudaProfilerStart/Stop), after one warm-up call
    outside it: what ``ncu --profile-from-start off`` then profiles is exactly one launch per kernel, layer and pass
    (tools/gpu_check.sh's ncu step). Elsewhere the same calls without a profiler range (a smoke of this path)."""
    start = stop = lambda: None
    if device.kind == "cuda":
        import cupy as cp

        start, stop = cp.cuda.profiler.start, cp.cuda.profiler.stop
    with device.activate():
        for name in layers:
            geo = layer_geometry(model[name], batch, div)
            fns, _ = our_fns(device, geo, make_inputs(device, geo)[1])
            for ps in PASSES:
                fns[ps]()
                device.synchronize()
                start()
                fns[ps]()
                device.synchronize()
                stop()
                print(f"profiled {name} {ps} ({describe(geo)}): {plan(device, ps, geo)}", flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:1 or emu (default: cuda:0 if usable, else emu)")
    ap.add_argument("--model", choices=sorted(MODELS), default="2012", help="AlexNet variant (default 2012)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128 on cuda, 4 on emu)")
    ap.add_argument("--layers", default="conv1,conv2,conv3,conv4,conv5", help="comma-separated layer names")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 20; 1 on emu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls (default 3; 0 on emu)")
    ap.add_argument("--channel-divisor", type=int, default=None,
                    help="divide channel and filter counts (default 1 on cuda, 8 on emu)")
    ap.add_argument("--no-cudnn", action="store_true", help="skip the cuDNN columns")
    ap.add_argument("--profile", action="store_true",
                    help="for a profiler (ncu --profile-from-start off): each layer and pass once after a warm-up, "
                         "inside cudaProfilerStart/Stop; no timing, no baselines, no results written")
    ap.add_argument("--tile", type=int, default=-1,
                    help="force row TILE of the kernels' dispatch table (calibration; default -1: automatic)")
    args = ap.parse_args(argv)

    if args.device is None:
        usable = {e["device"]: e["usable"] for e in device_report()}
        args.device = "cuda:0" if usable.get("cuda:0") else "emu"
    device = get_device(args.device)
    on_gpu = device.kind == "cuda"
    batch = args.batch or (128 if on_gpu else 4)
    repeats = args.repeats or (20 if on_gpu else 1)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 0)
    div = args.channel_divisor or (1 if on_gpu else 8)
    model = MODELS[args.model]
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    for name in layers:
        if name not in model:
            ap.error(f"unknown layer {name!r}; choose from {', '.join(model)}")

    if args.profile:
        return profile(device, model, layers, batch, div)
    if not on_gpu:
        print(f"NOTE: no GPU ({device}): running a CORRECTNESS SMOKE on the emulator at batch {batch} with channel "
              f"counts divided by {div}. The times below are NOT speed figures.\n")
    peak_of = peaks(device)
    peak = peak_of["fp32"]
    sgemm = measured_sgemm_tflops(device)
    torch = cud = None
    backends = []
    stream = None
    if on_gpu:
        import contextlib

        import cupy as cp

        with device.activate():
            stream = cp.cuda.Stream(non_blocking=True)  # CUDA-graph capture needs a non-default stream
        if not args.no_cudnn:
            torch = common.cudnn(device, allow_tf32=False)  # torch's current GPU = ours
            if torch is None:
                print(f"PyTorch baseline unavailable: {common.TORCH_UNAVAILABLE['reason']}; NCHW from ctypes cuDNN, "
                      f"no NHWC or BF16 cuDNN columns (they go through PyTorch)")
            else:
                backends.append("torch (NCHW)")
            try:
                with device.activate():
                    cud = ConvCuDNN(int(stream.ptr))
                backends.append(f"ctypes cuDNN {cud.version} (CHWN{'' if torch else ', NCHW'})")
            except Exception as exc:  # noqa: BLE001
                print(f"ctypes cuDNN unavailable ({exc}): no CHWN column")
        ctx = contextlib.ExitStack()
        ctx.enter_context(device.activate())
        ctx.enter_context(stream)
    elif not args.no_cudnn:
        print(f"cuDNN columns skipped: ours runs on {device}, cuDNN needs a GPU")
    device.kernels.conv_set_tile_override(args.tile)

    rows = []
    base_columns = set()
    for name in layers:
        geo = layer_geometry(model[name], batch, div)
        host, arrs = make_inputs(device, geo)
        times, errors, outs = {}, {}, None
        for column, precision in OURS:  # ours in each precision the kernels do
            fns, prec_outs = our_fns(device, geo, arrs, precision)
            times[column] = {}
            for ps in PASSES:
                if on_gpu:
                    for _ in range(warmup):
                        fns[ps]()
                    times[column][ps] = bench_ms(fns[ps], device, reps=repeats, label=f"{name} {ps} ours {precision}")
                else:
                    times[column][ps] = common.time_ms(fns[ps], device, warmup=warmup, repeats=repeats)
            errors[column] = smoke_check(geo, host, prec_outs, precision) if not on_gpu else [None] * 3
            outs = outs or prec_outs  # FP32's: what cuDNN FP32 is compared with
        base = (baselines(device, name, geo, host, warmup, repeats, torch, cud, outs) if (torch or cud) else {})
        base_columns |= set(base)
        for i, ps in enumerate(PASSES):
            ms = times["ms"][ps]
            row = {"layer": name, "pass": ps, "shape": describe(geo), "ms": ms,
                   "GFLOP/s": geo.flops() / (ms * 1e-3) / 1e9}
            if peak:
                row["% FP32 peak"] = 100.0 * row["GFLOP/s"] / (peak * 1e3)
            for column, precision, tflops, share, _, _ in TENSOR_CORE_COLUMNS:
                row[column] = times[column][ps]
                row[tflops] = geo.flops() / (times[column][ps] * 1e-3) / 1e12
                if peak_of[precision]:
                    row[share] = 100.0 * row[tflops] / peak_of[precision]
            for column, ratio in ((NCHW_FP32, "ours/cuDNN"), (CHWN_FP32, "ours/cuDNN CHWN"), (NHWC_FP32, None),
                                  (NCHW_TF32, None), (NHWC_TF32, None), (NCHW_BF16, None), (NHWC_BF16, None)):
                if column in base:
                    row[column] = base[column][ps]
                    if ratio:
                        row[ratio] = ms / base[column][ps]
            for column, _, _, _, ratio, cudnn_columns in TENSOR_CORE_COLUMNS:
                best = min((base[c][ps] for c in cudnn_columns if c in base), default=None)
                if best:
                    row[ratio] = times[column][ps] / best
            # every timed column's share of the card's peak in its precision (JSON)
            row["% of peak"] = {c: 100.0 * geo.flops() / (t * 1e-3) / 1e12 / peak_of[p] for c, p, t in
                                [(f"ours {p.upper()}", p, times[column][ps]) for column, p in OURS] +
                                [(c, COLUMN_PRECISION[c], base[c][ps]) for c in COLUMN_PRECISION if c in base]
                                if peak_of[p]}
            for diff in DIFFS:
                if diff in base:
                    row[diff] = base[diff][ps]
            methods = {m for label, m in TIMING["by_label"].items() if label.startswith(f"{name} {ps} ")}
            if len(methods) > 1:
                row["timing"] = "MIXED: " + ", ".join(f"{label[len(name) + len(ps) + 2:]}={m}" for label, m in
                                                     TIMING["by_label"].items() if label.startswith(f"{name} {ps} "))
                print(f"WARNING: {name} {ps}: not every side was timed the same way ({row['timing']})")
            if not on_gpu:
                row.update({ERROR_COLUMNS[column]: errors[column][i] for column, _ in OURS})
            row["plan"] = plan(device, ps, geo)  # JSON only: tile, path, grid, splits
            row["BF16 plan"] = device.kernels.conv_bf16_plan(geo, True, getattr(device.kernels.ConvPass,
                                                                                CONV_PASS[ps]))
            rows.append(row)
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                            if k not in ("plan", "BF16 plan", "% of peak")), flush=True)
    if on_gpu:
        ctx.close()

    columns = ["layer", "pass", "shape", "ms", "GFLOP/s"]
    if peak:
        columns += ["% FP32 peak"]
    for column, precision, tflops, share, _, _ in TENSOR_CORE_COLUMNS:
        columns += [column, tflops] + ([share] if peak_of[precision] else [])
    for column, extra_cols in ((NCHW_FP32, ["ours/cuDNN", "NCHW rel diff"]),
                               (CHWN_FP32, ["ours/cuDNN CHWN", "CHWN rel diff"]), (NHWC_FP32, []),
                               (NCHW_TF32, []), (NHWC_TF32, []), (NCHW_BF16, []), (NHWC_BF16, [])):
        if column in base_columns:
            columns += [c for c in (column, *extra_cols) if c in base_columns or not c.endswith("rel diff")]
    columns += [ratio for *_, ratio, _ in TENSOR_CORE_COLUMNS if any(ratio in r for r in rows)]
    if any("timing" in r for r in rows):
        columns += ["timing"]
    # ours and cuDNN FP32 computed the same convolution: a larger difference is a wrong kernel (or a wrong baseline)
    bad = [r for r in rows for diff in DIFFS if r.get(diff, 0.0) > MAX_DIFF_FROM_CUDNN]
    for r in bad:
        print(f"MISMATCH: {r['layer']} {r['pass']}: ours and cuDNN FP32 differ by "
              f"{max(r.get(d, 0.0) for d in DIFFS):.3g} (normwise) > {MAX_DIFF_FROM_CUDNN:g}", file=sys.stderr)
    if not on_gpu:  # each precision against the float64 reference of what it computes (TF32, BF16: rounded inputs)
        columns += [ERROR_COLUMNS[column] for column, _ in OURS]
        for r in rows:
            failed = [f"{r[ERROR_COLUMNS[column]]:.3g} ({p.upper()}) > {SMOKE_TOL[p]:.3g}" for column, p in OURS
                      if r[ERROR_COLUMNS[column]] > SMOKE_TOL[p]]
            if failed:
                bad.append(r)
                print(f"SMOKE FAILED: {r['layer']} {r['pass']}: relative error {', '.join(failed)}", file=sys.stderr)
    device.kernels.conv_set_tile_override(-1)
    extra = {"model": args.model, "tile_override": args.tile, "batch": batch, "repeats": repeats, "warmup": warmup,
             "channel_divisor": div, "fp32_peak_tflops": peak, "peak_tflops": peak_of, "measured_sgemm_tflops": sgemm,
             "cudnn_backends": backends,
             "timing": ({"method": f"{repeats} back-to-back calls per CUDA graph, {common.REPLAYS} replays timed "
                                   f"with CUDA events, median / {repeats}; the same for ours and every cuDNN column",
                         "by_method": common.timing_summary()} if on_gpu
                        else "wall clock (emulator smoke, not a speed figure)"),
             "ratio": "ours/cuDNN is a time ratio: < 1 means faster than cuDNN FP32 (TF32 off); ours/cuDNN CHWN: "
                      "against cuDNN on our own memory layout; TF32 (BF16) ours/cuDNN: ours in TF32 (BF16) against "
                      "cuDNN's faster TF32 (BF16) layout (NCHW or NHWC)",
             "precisions": "ms/GFLOP/s: ours in FP32; TF32: ours with TF32-rounded inputs and FP32 accumulation; BF16: "
                           "ours on bfloat16 x, w, dy, y and dx (float32 dw), FP32 accumulation; cuDNN BF16: bfloat16 "
                           "tensors through PyTorch"}
    path = common.write_results(f"conv-{args.model}", device, rows, columns, extra)
    print(f"\nwrote {path} and {path.with_suffix('.json')}")
    if peak:
        print(f"peaks (TFLOP/s): " + ", ".join(f"{p} {v:g}" for p, v in peak_of.items() if v)
              + f"; measured SGEMM {sgemm:.1f} TFLOP/s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
