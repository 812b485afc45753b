"""Every op family at AlexNet's batch-128 shapes, one row per op and layer: the benchmark of the families that have
no benchmark of their own (elementwise, softmax, fc) and a one-stop view of the others.

    python benchmarks/ops_bench.py                          # cuda:0 if usable, else emu
    python benchmarks/ops_bench.py --families softmax,fc --repeats 50
    python benchmarks/ops_bench.py --device emu             # correctness smoke of every op (see below)

Shapes (the 2012 two-tower model; activations (C, H, W, N) or (features, N)):
  elementwise  ReLU on conv1..conv5's outputs (conv_bench.MODELS through ConvGeometry) and on fc6/fc7's outputs;
               dropout (keep 0.5) on fc6/fc7's outputs
  neuron       every neuron of convnet.neurons on conv1's output (forward and backward); eltsum (coefficients
               1, -0.5) and eltmax of two conv2-shaped inputs (forward, one input's gradient)
  conv         conv_bench.MODELS["2012"]: forward, input gradient, filter gradient, bias gradient
  pool, lrn    memory_bound_bench.CASES (LRN per tower: groups=2, as models/alexnet.cfg)
  rnorm        memory_bound_bench.CASES' rnorm and cnorm rows (cuda-convnet's CIFAR-10 shapes)
  local        cuda-convnet's CIFAR-10 11% net's locally connected layers local3 (64 -> 64 maps) and local4
               (64 -> 32), 3x3 pad 1 on 8x8: forward, input, filter and per-position bias gradients
  softmax      1000 classes: softmax_forward, softmax_cross_entropy, topk_errors (k = 1, 5)
  fc           fc6 9216 -> 4096, fc7 4096 -> 4096, fc8 4096 -> 1000: forward, data, weight and bias gradients

On a GPU each op is timed as the other benchmarks do (common.bench_ms: warm-up, then ``repeats`` calls captured in
a CUDA graph and timed with CUDA events, median of 7 replays; an op that returns values to the host, topk_errors,
cannot be captured and is timed over back-to-back calls). Compute-bound ops (conv, the fc GEMMs) report GFLOP/s
(ConvGeometry.flops(), 2*O*I*N) and % of the FP32 peak; the others their compulsory bytes (every input read once,
every output written once), GB/s and % of the device-to-device copy bandwidth measured in the same run. The cuDNN
comparisons are conv_bench.py's and memory_bound_bench.py's.

On the emulator (``--device emu``) the shapes are tiny (batch 4, channel and feature counts divided by 16; the 1000
classes stay), each op's result is compared with the NumPy reference (the ``numpy`` device: bit-identical for
ReLU, dropout, pooling and top-k; within 1e-5 of the float64 reference, normwise, for the others), and a mismatch
fails the run, naming the op. The times are not speed figures.
Results: benchmarks/results/ops-<card>-<date>.{json,md} (smoke runs: benchmarks/results/smoke/).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (also makes `import convnet` work from a source checkout)
import conv_bench  # noqa: E402
import memory_bound_bench  # noqa: E402
from common import TIMING, bench_ms  # noqa: E402

from convnet import ops  # noqa: E402
from convnet.devices import device_report, get_device  # noqa: E402
from convnet.geometry import LocalGeometry, LrnGeometry, PoolGeometry  # noqa: E402

FAMILIES = ("elementwise", "neuron", "conv", "pool", "lrn", "rnorm", "local", "softmax", "fc")
MODEL = conv_bench.MODELS["2012"]
FC = {"fc6": (256 * 6 * 6, 4096), "fc7": (4096, 4096), "fc8": (4096, 1000)}  # (in, out) features
CLASSES = 1000
KEEP = 0.5
LRN_GROUPS = 2
F32 = 4  # bytes
# Functions of convnet.ops that are not in the table: shape helpers, the dropout mask (a debugging view; the
# dropout ops regenerate it), the copy between devices (timed with the two-tower net: train_bench --towers), the layer
# graph's array-module ops (joins, gradient sums, the cost's scaling) and the optimizer's update (memory-bound
# passes, timed within a training step: train_bench). Every other op has rows (tests/test_benchmarks.py checks it).
NOT_TIMED = frozenset({"conv_output_shape", "pool_output_shape", "dropout_mask", "copy", "concat", "add", "scale",
                       "window", "multiply", "sgd_update", "sgd_update_many"})


@dataclass
class Case:
    """One op on one layer's shape."""

    family: str
    op: str                      # the convnet.ops function
    layer: str
    shape: str
    run: Callable[[], object]    # one call on the device, into preallocated outputs where the op takes ``out``
    want: Callable[[], tuple]    # the NumPy reference's outputs, in the order of ``outputs``
    outputs: tuple[str, ...]     # names of what ``run`` returns (a tuple when several)
    tol: float                   # smoke check: 0 = identical, else max normwise error vs the reference
    nbytes: int = 0              # compulsory bytes (memory-bound ops) ...
    flops: int = 0               # ... or floating-point operations (compute-bound ops)
    graph: bool = True           # False: the op waits for the device (no CUDA-graph capture)
    variant: str = ""
    extra: dict = field(default_factory=dict)  # JSON only (e.g. the conv plan)


class Scale:
    """The sizes of a run: batch ``n``; channel/feature counts divided by ``div`` (1 on a GPU)."""

    def __init__(self, n: int, div: int):
        self.n, self.div = n, div

    def count(self, c: int) -> int:
        return max(1, c // self.div)


def _host(rng, shape, low=-1.0, high=1.0):
    return rng.uniform(low, high, shape).astype(np.float32)


def _f64(*arrays):
    return tuple(a.astype(np.float64) for a in arrays)


def _shape_str(shape) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------------------------------- families
def elementwise_cases(dev, sc: Scale, rng):
    shapes = [(f"relu{i}", conv_bench.layer_geometry(MODEL[f"conv{i}"], sc.n, sc.div).y_shape) for i in range(1, 6)]
    shapes += [(f"relu{i}", (sc.count(FC[f"fc{i}"][1]), sc.n)) for i in (6, 7)]
    for layer, shape in shapes:
        yield from _relu(dev, layer, shape, rng)
    for i in (6, 7):
        yield from _dropout(dev, f"dropout{i}", (sc.count(FC[f"fc{i}"][1]), sc.n), seed=i, rng=rng)


def _relu(dev, layer, shape, rng):
    x, dy = _host(rng, shape), _host(rng, shape)
    y = ops.relu_forward("numpy", x)
    X, Y_in, DY = dev.asarray(x), dev.asarray(y), dev.asarray(dy)
    Y, DX = dev.empty(shape, np.float32), dev.empty(shape, np.float32)
    n = x.size
    yield Case("elementwise", "relu_forward", layer, _shape_str(shape), lambda: ops.relu_forward(dev, X, out=Y),
               lambda: (y,), ("y",), 0.0, nbytes=2 * n * F32)
    yield Case("elementwise", "relu_backward", layer, _shape_str(shape),
               lambda: ops.relu_backward(dev, Y_in, DY, out=DX), lambda: (ops.relu_backward("numpy", y, dy),),
               ("dx",), 0.0, nbytes=3 * n * F32)


def _dropout(dev, layer, shape, seed, rng):
    x, dy = _host(rng, shape), _host(rng, shape)
    X, DY = dev.asarray(x), dev.asarray(dy)
    Y, DX = dev.empty(shape, np.float32), dev.empty(shape, np.float32)
    n = x.size
    yield Case("elementwise", "dropout_forward", layer, _shape_str(shape),
               lambda: ops.dropout_forward(dev, X, KEEP, seed, out=Y),
               lambda: (ops.dropout_forward("numpy", x, KEEP, seed),), ("y",), 0.0, nbytes=2 * n * F32)
    yield Case("elementwise", "dropout_backward", layer, _shape_str(shape),
               lambda: ops.dropout_backward(dev, DY, KEEP, seed, out=DX),
               lambda: (ops.dropout_backward("numpy", dy, KEEP, seed),), ("dx",), 0.0, nbytes=2 * n * F32)


NEURONS = ("relu", "tanh[1.7159,0.6667]", "logistic", "abs", "square", "sqrt", "softrelu", "brelu[6]",
           "linear[2,1]")


def neuron_cases(dev, sc: Scale, rng):
    shape = conv_bench.layer_geometry(MODEL["conv1"], sc.n, sc.div).y_shape
    for text in NEURONS:
        yield from _neuron(dev, "conv1", text, shape, rng)
    shape = conv_bench.layer_geometry(MODEL["conv2"], sc.n, sc.div).y_shape
    yield from _joins(dev, "conv2", shape, rng)


def _neuron(dev, layer, text, shape, rng):
    low = 0.05 if text == "sqrt" else -1.0  # sqrt's domain
    x, dy = _host(rng, shape, low), _host(rng, shape)
    x64, dy64 = _f64(x, dy)
    y64 = ops.neuron_forward("numpy", x64, text)
    X, Y_in, DY = dev.asarray(x), dev.asarray(y64.astype(np.float32)), dev.asarray(dy)
    Y, DX = dev.empty(shape, np.float32), dev.empty(shape, np.float32)
    n = x.size
    reads = 2 if text.startswith("linear") else 3  # dy and the one of x, y the neuron reads; dx
    yield Case("neuron", "neuron_forward", layer, _shape_str(shape), lambda: ops.neuron_forward(dev, X, text, out=Y),
               lambda: (y64,), ("y",), 1e-6, nbytes=2 * n * F32, variant=text)
    yield Case("neuron", "neuron_backward", layer, _shape_str(shape),
               lambda: ops.neuron_backward(dev, X, Y_in, DY, text, out=DX),
               lambda: (ops.neuron_backward("numpy", x64, y64, dy64, text),), ("dx",), 1e-6, nbytes=reads * n * F32,
               variant=text)


def _joins(dev, layer, shape, rng):
    a, b, dy = _host(rng, shape), _host(rng, shape), _host(rng, shape)
    A, B, DY = dev.asarray(a), dev.asarray(b), dev.asarray(dy)
    Y, W, DX = dev.empty(shape, np.float32), dev.empty(shape, np.uint8), dev.empty(shape, np.float32)
    y, which = ops.eltmax_forward("numpy", [a, b])
    WHICH = dev.asarray(which)
    n = a.size
    yield Case("neuron", "eltsum_forward", layer, _shape_str(shape),
               lambda: ops.eltsum_forward(dev, [A, B], [1.0, -0.5], out=Y),
               lambda: (ops.eltsum_forward("numpy", list(_f64(a, b)), [1.0, -0.5]),), ("y",), 1e-6,
               nbytes=3 * n * F32, variant="2 inputs")
    yield Case("neuron", "eltsum_backward", layer, _shape_str(shape),
               lambda: ops.eltsum_backward(dev, DY, -0.5, out=DX), lambda: (ops.eltsum_backward("numpy", dy, -0.5),),
               ("dx",), 0.0, nbytes=2 * n * F32)
    yield Case("neuron", "eltmax_forward", layer, _shape_str(shape),
               lambda: ops.eltmax_forward(dev, [A, B], out=(Y, W)), lambda: (y, which), ("y", "which"), 0.0,
               nbytes=(3 * F32 + 1) * n, variant="2 inputs")
    yield Case("neuron", "eltmax_backward", layer, _shape_str(shape),
               lambda: ops.eltmax_backward(dev, WHICH, DY, 1, out=DX),
               lambda: (ops.eltmax_backward("numpy", which, dy, 1),), ("dx",), 0.0, nbytes=(2 * F32 + 1) * n)


def conv_cases(dev, sc: Scale, rng):
    for layer, spec in MODEL.items():
        yield from _conv(dev, layer, conv_bench.layer_geometry(spec, sc.n, sc.div))


def _conv(dev, layer, geo):
    host, arrs = conv_bench.make_inputs(dev, geo)
    fns, _ = conv_bench.our_fns(dev, geo, arrs)
    wants = functools.cache(lambda: conv_bench.reference_outputs(geo, host))
    ops_by_pass = {"forward": "conv_forward", "input-grad": "conv_backward_data",
                   "filter-grad": "conv_backward_filter"}
    for i, (ps, op) in enumerate(ops_by_pass.items()):
        yield Case("conv", op, layer, conv_bench.describe(geo), fns[ps], lambda i=i: (wants()[i],),
                   (("y", "dx", "dw")[i],), 1e-5, flops=geo.flops(), extra={"plan": conv_bench.plan(dev, ps, geo)})
    DB = dev.empty((geo.F,), np.float32)
    yield Case("conv", "conv_backward_bias", layer, conv_bench.describe(geo),
               lambda: ops.conv_backward_bias(dev, arrs["dy"], out=DB),
               lambda: (ops.conv_backward_bias("numpy", *_f64(host["dy"])),), ("db",), 1e-5,
               nbytes=(host["dy"].size + geo.F) * F32)


def pool_cases(dev, sc: Scale, rng):
    for layer, family, (c, h, w), params in memory_bound_bench.CASES:
        if family == "pool":
            yield from _pool(dev, layer, PoolGeometry.of((sc.count(c), h, w, sc.n), window=params["window"],
                                                         stride=params["stride"]), params["mode"], rng)


def _pool(dev, layer, geo, mode, rng):
    kw = dict(mode=mode, window=geo.window, stride=geo.stride, padding=geo.padding)
    x, dy = _host(rng, geo.x_shape), _host(rng, geo.y_shape)
    y = ops.pool_forward("numpy", x, **kw)
    X, Y_in, DY = dev.asarray(x), dev.asarray(y), dev.asarray(dy)
    Y, DX = dev.empty(geo.y_shape, np.float32), dev.empty(geo.x_shape, np.float32)
    n_in, n_out = x.size, y.size
    shape = f"{_shape_str(geo.x_shape)} {mode} {geo.window_h}x{geo.window_w}/{geo.stride_h}"
    yield Case("pool", "pool_forward", layer, shape, lambda: ops.pool_forward(dev, X, out=Y, **kw), lambda: (y,),
               ("y",), 0.0, nbytes=(n_in + n_out) * F32, variant=mode)
    yield Case("pool", "pool_backward", layer, shape, lambda: ops.pool_backward(dev, X, Y_in, DY, out=DX, **kw),
               lambda: (ops.pool_backward("numpy", x, y, dy, **kw),), ("dx",), 0.0,
               nbytes=((2 * n_in + 2 * n_out) if mode == "max" else (n_in + n_out)) * F32, variant=mode)


def lrn_cases(dev, sc: Scale, rng):
    for layer, family, (c, h, w), params in memory_bound_bench.CASES:
        if family == "lrn":
            yield from _lrn(dev, layer, LrnGeometry.of((sc.count(c), h, w, sc.n), size=params["size"],
                                                       groups=LRN_GROUPS, **memory_bound_bench.LRN), rng)


def _lrn(dev, layer, geo, rng):
    kw = dict(size=geo.size, alpha=geo.alpha, beta=geo.beta, k=geo.k, convention=geo.convention, groups=geo.groups)
    x, dy = _host(rng, geo.x_shape, 0.0, 1.0), _host(rng, geo.x_shape)
    y, d = ops.lrn_forward("numpy", x, **kw)
    X, Y_in, D_in, DY = (dev.asarray(a) for a in (x, y, d, dy))
    Y, D, DX = (dev.empty(geo.x_shape, np.float32) for _ in range(3))
    want_fwd = functools.cache(lambda: ops.lrn_forward("numpy", *_f64(x), **kw))
    want_bwd = functools.cache(lambda: (ops.lrn_backward("numpy", *_f64(x), *want_fwd(), *_f64(dy), **kw),))
    n = x.size
    shape = f"{_shape_str(geo.x_shape)} n{geo.size} g{geo.groups}"
    yield Case("lrn", "lrn_forward", layer, shape, lambda: ops.lrn_forward(dev, X, out=(Y, D), **kw), want_fwd,
               ("y", "denom"), 1e-5, nbytes=3 * n * F32, variant="y + denom")
    yield Case("lrn", "lrn_backward", layer, shape,
               lambda: ops.lrn_backward(dev, X, None, None, DY, out=DX, method="recompute", **kw), want_bwd,
               ("dx",), 1e-5, nbytes=3 * n * F32, variant="recompute")
    yield Case("lrn", "lrn_backward", layer, shape,
               lambda: ops.lrn_backward(dev, X, Y_in, D_in, DY, out=DX, method="reuse", **kw), want_bwd,
               ("dx",), 1e-5, nbytes=5 * n * F32, variant="reuse")


def rnorm_cases(dev, sc: Scale, rng):
    for layer, family, (c, h, w), params in memory_bound_bench.CASES:
        if family in ("rnorm", "cnorm"):
            yield from _rnorm(dev, layer, family, (sc.count(c), h, w, sc.n),
                              dict(size=params["size"], **memory_bound_bench.RNORM), rng)


def _rnorm(dev, layer, kind, x_shape, kw, rng):
    fwd, bwd = getattr(ops, f"{kind}_forward"), getattr(ops, f"{kind}_backward")
    x, dy = _host(rng, x_shape, -1.0, 1.0), _host(rng, x_shape)
    saved = fwd("numpy", x, **kw)[1:]  # denom, or mean_diff and denom
    X, DY, SAVED = dev.asarray(x), dev.asarray(dy), tuple(dev.asarray(a) for a in saved)
    OUT, DX = tuple(dev.empty(x_shape, np.float32) for _ in range(1 + len(saved))), dev.empty(x_shape, np.float32)
    want_fwd = functools.cache(lambda: fwd("numpy", *_f64(x), **kw))
    want_bwd = functools.cache(lambda: (bwd("numpy", *_f64(x), *want_fwd()[1:], *_f64(dy), **kw),))
    n = x.size
    shape = f"{_shape_str(x_shape)} {kw['size']}x{kw['size']}"
    names = ("y", "mean_diff", "denom") if kind == "cnorm" else ("y", "denom")
    yield Case("rnorm", f"{kind}_forward", layer, shape, lambda: fwd(dev, X, out=OUT, **kw), want_fwd, names, 1e-5,
               nbytes=(1 + len(names)) * n * F32)
    yield Case("rnorm", f"{kind}_backward", layer, shape, lambda: bwd(dev, X, *SAVED, DY, out=DX, **kw), want_bwd,
               ("dx",), 1e-5, nbytes=(3 + len(saved)) * n * F32)


# cuda-convnet's layers-conv-local-11pct: (input maps, filters), each 3x3, stride 1, padding 1 on 8x8 maps
LOCAL = {"local3": (64, 64), "local4": (64, 32)}


def local_cases(dev, sc: Scale, rng):
    for layer, (c, f) in LOCAL.items():
        geo = LocalGeometry(sc.count(c), 8, 8, sc.n, sc.count(f), 3, 3, 1, 1, 1, 1)
        yield from _local(dev, layer, geo, rng)


def _local(dev, layer, geo, rng):
    kw = dict(stride=geo.stride, padding=geo.padding)
    bias_shape = (geo.F, geo.OH, geo.OW)
    x, w, b, dy = (_host(rng, s) for s in (geo.x_shape, geo.w_shape, bias_shape, geo.y_shape))
    X, Wt, B, DY = (dev.asarray(a) for a in (x, w, b, dy))
    Y, DX, DW, DB = (dev.empty(s, np.float32) for s in (geo.y_shape, geo.x_shape, geo.w_shape, bias_shape))
    x64, w64, b64, dy64 = _f64(x, w, b, dy)
    shape = f"{_shape_str(geo.x_shape)} -> {geo.F} 3x3"
    yield Case("local", "local_forward", layer, shape, lambda: ops.local_forward(dev, X, Wt, B, out=Y, **kw),
               lambda: (ops.local_forward("numpy", x64, w64, b64, **kw),), ("y",), 1e-5, flops=geo.flops())
    yield Case("local", "local_backward_data", layer, shape,
               lambda: ops.local_backward_data(dev, DY, Wt, (geo.H, geo.W), out=DX, **kw),
               lambda: (ops.local_backward_data("numpy", dy64, w64, (geo.H, geo.W), **kw),), ("dx",), 1e-5,
               flops=geo.flops())
    yield Case("local", "local_backward_filter", layer, shape,
               lambda: ops.local_backward_filter(dev, X, DY, (3, 3), out=DW, **kw),
               lambda: (ops.local_backward_filter("numpy", x64, dy64, (3, 3), **kw),), ("dw",), 1e-5,
               flops=geo.flops())
    yield Case("local", "local_backward_bias", layer, shape,
               lambda: ops.local_backward_bias(dev, DY, shared=False, out=DB),
               lambda: (ops.local_backward_bias("numpy", dy64, shared=False),), ("db",), 1e-5,
               nbytes=(dy.size + b.size) * F32, variant="per position")


def softmax_cases(dev, sc: Scale, rng):
    K, N = CLASSES, sc.n
    logits = (rng.standard_normal((K, N)) * 4).astype(np.float32)
    labels = rng.integers(0, K, N).astype(np.int32)
    L, LAB = dev.asarray(logits), dev.asarray(labels)
    P = dev.empty((K, N), np.float32)
    (l64,) = _f64(logits)
    shape = f"{K} classes x {N}"
    yield Case("softmax", "softmax_forward", "prob", shape, lambda: ops.softmax_forward(dev, L, out=P),
               lambda: (ops.softmax_forward("numpy", l64),), ("probs",), 1e-5, nbytes=2 * K * N * F32)
    yield Case("softmax", "softmax_cross_entropy", "logprob", shape,
               lambda: ops.softmax_cross_entropy(dev, L, LAB),
               lambda: ops.softmax_cross_entropy("numpy", l64, labels), ("loss", "probs", "dlogits"), 1e-5,
               nbytes=(3 * K * N + 2 * N + 1) * F32)
    yield Case("softmax", "topk_errors", "top-1/5", shape, lambda: ops.topk_errors(dev, L, LAB, ks=(1, 5)),
               lambda: ops.topk_errors("numpy", logits, labels, ks=(1, 5)), ("top-1", "top-5"), 0.0,
               nbytes=(K * N + N + 2) * F32, graph=False)


def fc_cases(dev, sc: Scale, rng):
    for layer, (i, o) in FC.items():
        yield from _fc(dev, layer, sc.count(i), sc.count(o), sc.n, rng)


def _fc(dev, layer, I, O, N, rng):
    x, w, b, dy = _host(rng, (I, N)), _host(rng, (O, I), -0.05, 0.05), _host(rng, (O,)), _host(rng, (O, N))
    X, Wt, B, DY = (dev.asarray(a) for a in (x, w, b, dy))
    Y, DX, DW, DB = (dev.empty(s, np.float32) for s in ((O, N), (I, N), (O, I), (O,)))
    x64, w64, b64, dy64 = _f64(x, w, b, dy)
    flops = 2 * O * I * N
    shape = f"{I} -> {O} x {N}"
    yield Case("fc", "fc_forward", layer, shape, lambda: ops.fc_forward(dev, X, Wt, B, out=Y),
               lambda: (ops.fc_forward("numpy", x64, w64, b64),), ("y",), 1e-5, flops=flops)
    yield Case("fc", "fc_backward_data", layer, shape, lambda: ops.fc_backward_data(dev, DY, Wt, out=DX),
               lambda: (ops.fc_backward_data("numpy", dy64, w64),), ("dx",), 1e-5, flops=flops)
    yield Case("fc", "fc_backward_weights", layer, shape, lambda: ops.fc_backward_weights(dev, X, DY, out=DW),
               lambda: (ops.fc_backward_weights("numpy", x64, dy64),), ("dw",), 1e-5, flops=flops)
    yield Case("fc", "fc_backward_bias", layer, shape, lambda: ops.fc_backward_bias(dev, DY, out=DB),
               lambda: (ops.fc_backward_bias("numpy", dy64),), ("db",), 1e-5, nbytes=(O * N + O) * F32)


BUILDERS = {"elementwise": elementwise_cases, "neuron": neuron_cases, "conv": conv_cases, "pool": pool_cases,
            "lrn": lrn_cases, "rnorm": rnorm_cases, "local": local_cases, "softmax": softmax_cases, "fc": fc_cases}


# ---------------------------------------------------------------------------------------------------- runs
def check(case: Case, got) -> tuple[float, list[str]]:
    """(max error, failures) of one result against the reference: normwise, or exact when ``case.tol == 0``."""
    got = got if isinstance(got, tuple) else (got,)
    want = case.want()
    if len(got) != len(case.outputs) or len(want) != len(case.outputs):
        return float("inf"), [f"{len(got)} outputs, reference {len(want)}, expected {len(case.outputs)}"]
    worst, failures = 0.0, []
    for name, g, w in zip(case.outputs, got, want):
        g, w = common.to_host(g), np.asarray(w)
        if case.tol == 0.0:
            if g.shape != w.shape or g.dtype != w.dtype or not np.array_equal(g, w):
                failures.append(f"{name} is not identical to the reference")
                worst = float("inf")
            continue
        err = common.rel_error(g, w)
        worst = max(worst, err)
        if not err <= case.tol:
            failures.append(f"{name}: normwise error {err:.3g} > {case.tol:g}")
    return worst, failures


def measure(case: Case, dev, on_gpu, warmup, repeats):
    """(ms, last result) of ``case.run``."""
    last = []

    def once():
        last[:] = [case.run()]

    try:
        if on_gpu:
            for _ in range(warmup):
                case.run()
            return bench_ms(case.run, dev, reps=repeats, graph=case.graph), None
        return common.time_ms(once, dev, warmup=warmup, repeats=repeats), last[0]
    except Exception as exc:
        raise RuntimeError(f"{case.op} ({case.layer}{', ' + case.variant if case.variant else ''}) failed: "
                           f"{exc}") from exc


def row_of(case: Case, ms, copy_gbps, peak_tflops):
    row = {"family": case.family, "op": case.op, "variant": case.variant, "layer": case.layer,
           "shape": case.shape, "ms": ms}
    if case.flops:
        row["GFLOP/s"] = case.flops / (ms * 1e-3) / 1e9
        if peak_tflops:
            row["% FP32 peak"] = 100.0 * row["GFLOP/s"] / (peak_tflops * 1e3)
    if case.nbytes:
        row["MB"] = case.nbytes / 1e6
        row["GB/s"] = case.nbytes / (ms * 1e-3) / 1e9
        if copy_gbps:
            row["% copy"] = 100.0 * row["GB/s"] / copy_gbps
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:1 or emu (default: cuda:0 if usable, else emu)")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 128 on cuda, 4 elsewhere)")
    ap.add_argument("--channel-divisor", type=int, default=None,
                    help="divide channel and feature counts (default 1 on cuda, 16 elsewhere)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20; 1 off the GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls (default 3; 0 off the GPU)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in families:
        if f not in BUILDERS:
            ap.error(f"unknown family {f!r}; choose from {', '.join(FAMILIES)}")

    if args.device is None:
        usable = {e["device"]: e["usable"] for e in device_report()}
        args.device = "cuda:0" if usable.get("cuda:0") else "emu"
    dev = get_device(args.device)
    on_gpu = dev.kind == "cuda"
    sc = Scale(args.batch or (128 if on_gpu else 4), args.channel_divisor or (1 if on_gpu else 16))
    repeats = args.repeats or (20 if on_gpu else 1)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 0)
    copy = None
    peak = conv_bench.fp32_peak_tflops(dev)
    with contextlib.ExitStack() as ctx:
        if on_gpu:
            import cupy as cp

            copy = common.measure_copy_bandwidth(dev)
            print(f"device-to-device copy bandwidth: {copy:.0f} GB/s (read + write); FP32 peak {peak:.1f} TFLOP/s")
            ctx.enter_context(dev.activate())
            ctx.enter_context(cp.cuda.Stream(non_blocking=True))  # CUDA-graph capture needs a non-default stream
        else:
            print(f"NOTE: no GPU ({dev}): a CORRECTNESS SMOKE of every op on tiny shapes (batch {sc.n}, channel "
                  f"and feature counts divided by {sc.div}) against the NumPy reference. The times are NOT speed "
                  f"figures.\n")
        rows, failures = [], []
        rng = np.random.default_rng(0)
        for family in families:
            for case in BUILDERS[family](dev, sc, rng):
                ms, got = measure(case, dev, on_gpu, warmup, repeats)
                row = row_of(case, ms, copy, peak)
                if not on_gpu:
                    err, bad = check(case, got)
                    row["rel err vs ref"] = err
                    row["check"] = "ok" if not bad else "FAILED"
                    failures += [f"{case.family} {case.op} ({case.layer}{', ' + case.variant if case.variant else ''})"
                                 f": {b}" for b in bad]
                else:
                    row["timing"] = TIMING["method"]
                row.update(case.extra)
                rows.append(row)
                print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                if k not in ("plan", "timing") and v != ""), flush=True)

    columns = ["family", "op", "variant", "layer", "shape", "ms", "GFLOP/s", "% FP32 peak", "MB", "GB/s", "% copy"]
    columns += ["rel err vs ref", "check"] if not on_gpu else []
    extra = {"families": families, "batch": sc.n, "channel_divisor": sc.div, "repeats": repeats, "warmup": warmup,
             "copy_GBps": copy, "fp32_peak_tflops": peak,
             "timing": (f"{repeats} calls captured in a CUDA graph, timed with CUDA events (median of 7) after "
                        f"{warmup} warm-up calls; back-to-back calls where a row's timing says so") if on_gpu
             else "wall clock (emulator smoke, not a speed figure)"}
    if not args.no_write:
        path = common.write_results("ops", dev, rows, columns, extra)
        print(f"\nwrote {path} and {path.with_suffix('.json')}")
    for f in failures:
        print(f"SMOKE FAILED: {f}", file=sys.stderr)
    if not on_gpu:
        print(f"\n{len(rows)} op calls ({len({r['op'] for r in rows})} ops) checked against the NumPy reference: "
              f"{'all match' if not failures else f'{len(failures)} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
