"""Memory-bound ops (pooling, LRN, neurons, eltsum/eltmax) at AlexNet's batch-128 shapes, pooling and LRN side by side
with cuDNN; same-map response and contrast normalisation (rnorm, cnorm) at cuda-convnet's CIFAR-10 shapes (no cuDNN
counterpart).

    python benchmarks/memory_bound_bench.py                 # best device (cuda when usable)
    python benchmarks/memory_bound_bench.py --device emu    # smoke run on the emulator: NOT a speed figure

For each op the row reports our time, the compulsory bytes (every input read once, every output written once),
the achieved GB/s, that as a percentage of the card's device-to-device copy bandwidth measured in the same run,
and cuDNN's time for the same op on the same card (legacy cudnnPoolingForward/Backward and
cudnnLRNCrossChannelForward/Backward through ctypes: CuPy 14 dropped its cuDNN bindings and torch does not use
cuDNN for pooling or LRN).  cuDNN runs twice: on its preferred NCHW layout, and on our CHWN memory described by
strides.  Targets: >= 70% of copy bandwidth and faster than cuDNN.

Timing -- the same for ours, both cuDNN layouts and the copy ceiling (common.bench_ms): one warm-up call, then 20
back-to-back calls captured in one CUDA graph on the same non-default stream (cuDNN's handle is bound to it), the
graph replayed 7 times between two CUDA events, median / 20: GPU time per call, no side charged its host dispatch
(ctypes into cuDNN, or the validation of our op call). If a capture fails that measurement falls back to 20
back-to-back calls between two events, and the JSON's ``timing`` says which measurement was timed how. With
``--device cuda:N`` ours, cuDNN (its handle is created with GPU N current) and the copy ceiling all run on GPU N.

Byte counts (float32, compulsory):
  pool forward  x + y              pool backward (max)  x + y + dy + dx     (avg: dy + dx)
  lrn forward   x + y (+ denom)    lrn backward recompute: x + dy + dx;  reuse: x + y + denom + dy + dx
  neuron        forward x + y;  backward y (or x) + dy + dx (no cuDNN rows: cuDNN's activations lack cuda-convnet's
                parameters)
  eltsum, eltmax (k inputs)  forward k inputs + y (eltmax: + which, 1 byte); backward of one input dy + dx (+ which)
  cuDNN's LRN backward reads x, y, dy and writes dx; its rows use cuDNN's own byte count.
  rnorm forward x + y + denom      rnorm backward: x + denom + dy + dx
  cnorm forward x + y + mean_diff + denom          cnorm backward: x + mean_diff + denom + dy + dx
Results go to benchmarks/results/memory_bound-<card>-<date>.{json,md} (benchmarks/common.py's format).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (makes `import convnet` work from a source checkout)
from common import CuDNN, bench_ms, measure_copy_bandwidth, ptr, write_results  # noqa: E402

from convnet import ops  # noqa: E402
from convnet.devices import get_device  # noqa: E402
from convnet.reference import lrn as lrn_ref  # noqa: E402

# name, op, (C, H, W), params — AlexNet (2012, two towers joined in memory): conv1 96 maps at 55x55, conv2 256 at 27x27,
# conv5 256 at 13x13.
CASES = [
    ("lrn1", "lrn", (96, 55, 55), dict(size=5)),
    ("pool1", "pool", (96, 55, 55), dict(mode="max", window=3, stride=2)),
    ("lrn2", "lrn", (256, 27, 27), dict(size=5)),
    ("pool2", "pool", (256, 27, 27), dict(mode="max", window=3, stride=2)),
    ("pool5", "pool", (256, 13, 13), dict(mode="max", window=3, stride=2)),
    ("pool1-avg", "pool", (96, 55, 55), dict(mode="avg", window=3, stride=2)),
    ("pool-2x2", "pool", (96, 56, 56), dict(mode="max", window=2, stride=2)),
    # cuda-convnet's CIFAR-10 nets: layers-18pct's rnorm1 (32 maps at 16x16, size 3), a 64-map 8x8 layer with
    # the 9x9 window of the 11pct nets' normalisation
    ("rnorm1", "rnorm", (32, 16, 16), dict(size=3)),
    ("rnorm-9", "rnorm", (64, 8, 8), dict(size=9)),
    ("cnorm1", "cnorm", (32, 16, 16), dict(size=3)),
    ("cnorm-9", "cnorm", (64, 8, 8), dict(size=9)),
    ("tanh1", "neuron", (96, 55, 55), dict(neuron="tanh[1.7159,0.6667]")),
    ("softrelu1", "neuron", (96, 55, 55), dict(neuron="softrelu")),
    ("eltsum2", "eltsum", (256, 27, 27), dict(inputs=2)),
    ("eltmax2", "eltmax", (256, 27, 27), dict(inputs=2)),
]
LRN = dict(alpha=1e-4, beta=0.75, k=2.0, convention="sum")
RNORM = dict(alpha=1e-3, beta=0.75, k=1.0)  # cuda-convnet's scale, pow, minDiv


# ---------------------------------------------------------------------------------------------------- cuDNN
class PoolLRNCuDNN(CuDNN):
    """cuDNN's legacy pooling and cross-channel LRN."""

    def pooling(self, mode, window, stride, padding):
        d = ctypes.c_void_p()
        self._ok(self.lib.cudnnCreatePoolingDescriptor(ctypes.byref(d)), "cudnnCreatePoolingDescriptor")
        m = self.POOL_MAX if mode == "max" else self.POOL_AVG_EXCLUDE_PAD
        self._ok(self.lib.cudnnSetPooling2dDescriptor(d, m, self.NOT_PROPAGATE_NAN, window, window, padding, padding,
                                                      stride, stride), "cudnnSetPooling2dDescriptor")
        return d

    def lrn(self, size, a, beta, k):
        d = ctypes.c_void_p()
        self._ok(self.lib.cudnnCreateLRNDescriptor(ctypes.byref(d)), "cudnnCreateLRNDescriptor")
        # cuDNN divides its alpha by n (the "mean" convention): pass a * size to get coefficient a
        self._ok(self.lib.cudnnSetLRNDescriptor(d, ctypes.c_uint(size), ctypes.c_double(a * size),
                                                ctypes.c_double(beta), ctypes.c_double(k)), "cudnnSetLRNDescriptor")
        return d

    def pool_forward(self, pd, xd, x, yd, y):
        self._ok(self.lib.cudnnPoolingForward(self.handle, pd, ctypes.byref(self.one), xd, ptr(x),
                                              ctypes.byref(self.zero), yd, ptr(y)), "cudnnPoolingForward")

    def pool_backward(self, pd, yd, y, dy, xd, x, dx):
        self._ok(self.lib.cudnnPoolingBackward(self.handle, pd, ctypes.byref(self.one), yd, ptr(y), yd, ptr(dy), xd,
                                               ptr(x), ctypes.byref(self.zero), xd, ptr(dx)), "cudnnPoolingBackward")

    def lrn_forward(self, ld, xd, x, y):
        self._ok(self.lib.cudnnLRNCrossChannelForward(self.handle, ld, self.LRN_CROSS_CHANNEL, ctypes.byref(self.one),
                                                      xd, ptr(x), ctypes.byref(self.zero), xd, ptr(y)),
                 "cudnnLRNCrossChannelForward")

    def lrn_backward(self, ld, xd, y, dy, x, dx):
        self._ok(self.lib.cudnnLRNCrossChannelBackward(self.handle, ld, self.LRN_CROSS_CHANNEL, ctypes.byref(self.one),
                                                       xd, ptr(y), xd, ptr(dy), xd, ptr(x), ctypes.byref(self.zero),
                                                       xd, ptr(dx)), "cudnnLRNCrossChannelBackward")


def to_nchw(xp, a):
    """(C, H, W, N) -> contiguous (N, C, H, W)."""
    return xp.ascontiguousarray(a.transpose(3, 0, 1, 2))


# ---------------------------------------------------------------------------------------------------- runs
def bench_case(dev, name, op, chw, p, N, cud, copy_gbps, rows, check):
    xp = dev.xp
    C, H, W = chw
    rng = np.random.default_rng(0)
    with dev.activate():
        x = dev.asarray(rng.uniform(0, 1, (C, H, W, N)).astype(np.float32))
    fsz = 4
    n_in = C * H * W * N

    def row(direction, variant, ms, nbytes, cudnn_nchw=None, cudnn_chwn=None, cudnn_bytes=None, err=None):
        r = dict(case=name, op=f"{op} {direction}", variant=variant, shape=f"{C}x{H}x{W}x{N}", ms=ms,
                 MB=nbytes / 1e6, GBps=nbytes / (ms * 1e-3) / 1e9)
        if copy_gbps:
            r["pct_copy"] = 100.0 * r["GBps"] / copy_gbps
        best = min((t for t in (cudnn_nchw, cudnn_chwn) if t is not None), default=None)
        if best is not None:
            r["cudnn_nchw_ms"] = cudnn_nchw
            r["cudnn_chwn_ms"] = cudnn_chwn
            r["cudnn_GBps"] = (cudnn_bytes or nbytes) / (best * 1e-3) / 1e9
            r["speedup_vs_cudnn"] = best / ms
        if err is not None:
            r["max_rel_diff_vs_cudnn"] = err
        rows.append(r)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)

    def rel(a, b):
        a, b = dev.to_numpy(a).astype(np.float64), dev.to_numpy(b).astype(np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    if op == "pool":
        kw = dict(mode=p["mode"], window=p["window"], stride=p["stride"], padding=0)
        y = ops.pool_forward(dev, x, **kw)
        n_out = y.size
        dy = dev.asarray(rng.uniform(-1, 1, y.shape).astype(np.float32))
        dx = dev.empty(x.shape, np.float32)
        t_f = bench_ms(lambda: ops.pool_forward(dev, x, out=y, **kw), dev, label=f"{name} forward ours")
        t_b = bench_ms(lambda: ops.pool_backward(dev, x, y, dy, out=dx, **kw), dev, label=f"{name} backward ours")
        bwd_bytes = (2 * n_in + 2 * n_out) * fsz if p["mode"] == "max" else (n_in + n_out) * fsz
        cf = cb = {}
        ef = eb = None
        if cud is not None:
            OH, OW = y.shape[1:3]
            pd = cud.pooling(p["mode"], p["window"], p["stride"], 0)
            cf, cb = {}, {}
            for layout in ("NCHW", "CHWN"):
                xd, yd = cud.tensor(C, H, W, N, layout), cud.tensor(C, OH, OW, N, layout)
                if layout == "NCHW":
                    xa, ya, dya, dxa = to_nchw(xp, x), xp.empty((N, C, OH, OW), np.float32), to_nchw(xp, dy), \
                        xp.empty((N, C, H, W), np.float32)
                else:
                    xa, ya, dya, dxa = x, dev.empty(y.shape, np.float32), dy, dev.empty(x.shape, np.float32)
                try:
                    cf[layout] = bench_ms(lambda: cud.pool_forward(pd, xd, xa, yd, ya), dev,
                                          label=f"{name} forward cuDNN {layout}")
                    cb[layout] = bench_ms(lambda: cud.pool_backward(pd, yd, ya, dya, xd, xa, dxa), dev,
                                          label=f"{name} backward cuDNN {layout}")
                except RuntimeError as exc:  # e.g. a layout this cuDNN does not support
                    print(f"cuDNN {layout} {name}: {exc}")
                    continue
                if layout == "CHWN":
                    ef = rel(y, ya)
                    ops.pool_backward(dev, x, y, dy, out=dx, **kw)
                    eb = rel(dx, dxa)  # random inputs: no ties, so the tie rules do not matter
        row("forward", "", t_f, (n_in + n_out) * fsz, cf.get("NCHW"), cf.get("CHWN"), err=ef)
        row("backward", "", t_b, bwd_bytes, cb.get("NCHW"), cb.get("CHWN"), err=eb)
        if check:
            dev.synchronize()
    elif op in ("rnorm", "cnorm"):
        kw = dict(size=p["size"], **RNORM)
        fwd, bwd = (ops.rnorm_forward, ops.rnorm_backward) if op == "rnorm" else (ops.cnorm_forward,
                                                                                  ops.cnorm_backward)
        saved = fwd(dev, x, **kw)  # (y, denom) or (y, mean_diff, denom)
        dy = dev.asarray(rng.uniform(-1, 1, x.shape).astype(np.float32))
        dx = dev.empty(x.shape, np.float32)
        t_f = bench_ms(lambda: fwd(dev, x, out=saved, **kw), dev, label=f"{name} forward ours")
        t_b = bench_ms(lambda: bwd(dev, x, *saved[1:], dy, out=dx, **kw), dev, label=f"{name} backward ours")
        row("forward", "", t_f, (1 + len(saved)) * n_in * fsz)
        row("backward", "", t_b, (2 + len(saved)) * n_in * fsz)
    elif op == "neuron":  # no cuDNN row: its activations lack cuda-convnet's parameters (tanh's a, b)
        text = p["neuron"]
        y = ops.neuron_forward(dev, x, text)
        dy = dev.asarray(rng.uniform(-1, 1, x.shape).astype(np.float32))
        dx = dev.empty(x.shape, np.float32)
        t_f = bench_ms(lambda: ops.neuron_forward(dev, x, text, out=y), dev, label=f"{name} forward ours")
        t_b = bench_ms(lambda: ops.neuron_backward(dev, x, y, dy, text, out=dx), dev, label=f"{name} backward ours")
        row("forward", text, t_f, 2 * n_in * fsz)
        row("backward", text, t_b, 3 * n_in * fsz)  # y (or x), dy in; dx out
    elif op in ("eltsum", "eltmax"):
        xs = [x] + [dev.asarray(rng.uniform(0, 1, x.shape).astype(np.float32)) for _ in range(p["inputs"] - 1)]
        dy = dev.asarray(rng.uniform(-1, 1, x.shape).astype(np.float32))
        y, dx = dev.empty(x.shape, np.float32), dev.empty(x.shape, np.float32)
        k = len(xs)
        if op == "eltsum":
            coeffs = [1.0] * k
            t_f = bench_ms(lambda: ops.eltsum_forward(dev, xs, coeffs, out=y), dev, label=f"{name} forward ours")
            t_b = bench_ms(lambda: ops.eltsum_backward(dev, dy, 0.5, out=dx), dev, label=f"{name} backward ours")
            fwd, bwd = (k + 1) * n_in * fsz, 2 * n_in * fsz
        else:
            which = dev.empty(x.shape, np.uint8)
            t_f = bench_ms(lambda: ops.eltmax_forward(dev, xs, out=(y, which)), dev, label=f"{name} forward ours")
            t_b = bench_ms(lambda: ops.eltmax_backward(dev, which, dy, 0, out=dx), dev, label=f"{name} backward ours")
            fwd, bwd = (k + 1) * n_in * fsz + n_in, 2 * n_in * fsz + n_in  # which: one byte per element
        row("forward", f"{k} inputs", t_f, fwd)
        row("backward", "one input", t_b, bwd)
    else:
        kw = dict(size=p["size"], **LRN)
        y, d = ops.lrn_forward(dev, x, **kw)
        dy = dev.asarray(rng.uniform(-1, 1, x.shape).astype(np.float32))
        dx = dev.empty(x.shape, np.float32)
        t_fd = bench_ms(lambda: ops.lrn_forward(dev, x, out=(y, d), **kw), dev, label=f"{name} forward+denom ours")
        t_f = bench_ms(lambda: ops.lrn_forward(dev, x, out=y, with_denom=False, **kw), dev,
                       label=f"{name} forward ours")
        t_br = bench_ms(lambda: ops.lrn_backward(dev, x, None, None, dy, out=dx, method="recompute", **kw), dev,
                        label=f"{name} backward recompute ours")
        t_bu = bench_ms(lambda: ops.lrn_backward(dev, x, y, d, dy, out=dx, method="reuse", **kw), dev,
                        label=f"{name} backward reuse ours")
        cf, cb, ef, eb = {}, {}, None, None
        if cud is not None:
            a = lrn_ref.lrn_scale(LRN["alpha"], p["size"], LRN["convention"])
            ld = cud.lrn(p["size"], a, LRN["beta"], LRN["k"])
            for layout in ("NCHW", "CHWN"):
                xd = cud.tensor(C, H, W, N, layout)
                if layout == "NCHW":
                    xa, ya, dya, dxa = to_nchw(xp, x), xp.empty((N, C, H, W), np.float32), to_nchw(xp, dy), \
                        xp.empty((N, C, H, W), np.float32)
                else:
                    xa, ya, dya, dxa = x, dev.empty(x.shape, np.float32), dy, dev.empty(x.shape, np.float32)
                try:
                    cf[layout] = bench_ms(lambda: cud.lrn_forward(ld, xd, xa, ya), dev,
                                          label=f"{name} forward cuDNN {layout}")
                    cb[layout] = bench_ms(lambda: cud.lrn_backward(ld, xd, ya, dya, xa, dxa), dev,
                                          label=f"{name} backward cuDNN {layout}")
                except RuntimeError as exc:
                    print(f"cuDNN {layout} {name}: {exc}")
                    continue
                if layout == "CHWN":
                    ef = rel(y, ya)
                    ops.lrn_backward(dev, x, None, None, dy, out=dx, **kw)
                    eb = rel(dx, dxa)
        row("forward", "y only", t_f, 2 * n_in * fsz, cf.get("NCHW"), cf.get("CHWN"), err=ef)
        row("forward", "y + denom", t_fd, 3 * n_in * fsz, cf.get("NCHW"), cf.get("CHWN"), cudnn_bytes=2 * n_in * fsz)
        row("backward", "recompute", t_br, 3 * n_in * fsz, cb.get("NCHW"), cb.get("CHWN"), cudnn_bytes=4 * n_in * fsz,
            err=eb)
        row("backward", "reuse", t_bu, 5 * n_in * fsz, cb.get("NCHW"), cb.get("CHWN"), cudnn_bytes=4 * n_in * fsz)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:N, emu or numpy (default: best available)")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 128 on cuda, 4 elsewhere)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--no-cudnn", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    dev = get_device(args.device)
    cases = CASES if not args.cases else [c for c in CASES if c[0] in args.cases.split(",")]
    rows: list[dict] = []
    extra = {}
    if dev.kind == "cuda":
        import cupy as cp

        N = args.batch or 128
        copy = measure_copy_bandwidth(dev)
        extra["copy_GBps"] = copy
        print(f"device-to-device copy bandwidth: {copy:.0f} GB/s (read + write)")
        with dev.activate():
            stream = cp.cuda.Stream(non_blocking=True)  # graph capture needs a non-default stream
        cud = None
        if not args.no_cudnn:
            try:
                with dev.activate():
                    cud = PoolLRNCuDNN(int(stream.ptr))
                extra["cudnn_version"] = cud.version
            except Exception as exc:  # noqa: BLE001 - report and go on without the baseline
                print(f"cuDNN baseline unavailable: {exc}")
                extra["cudnn_unavailable"] = str(exc)
        with dev.activate(), stream:
            for name, op, chw, p in cases:
                bench_case(dev, name, op, chw, p, N, cud, copy, rows, check=True)
        methods = common.timing_summary()
        extra["timing"] = {"method": "20 calls per CUDA graph, 7 replays timed with CUDA events, median / 20; the "
                                     "same for ours, cuDNN and the copy", "by_method": methods}
        if len(methods) > 1:
            print(f"WARNING: not every measurement was timed the same way: {methods}")
    else:
        N = args.batch or 4
        print(f"*** {dev}: SMOKE RUN ONLY. The emulator/NumPy times below are NOT speed figures; channels are "
              f"divided by 16 and the batch is {N} to keep it short; run it on a GPU for speed. ***")
        for name, op, (C, H, W), p in cases:
            bench_case(dev, name, op, (max(1, C // 16), H, W), p, N, None, None, rows, check=False)
    columns = ["case", "op", "variant", "shape", "ms", "MB", "GBps", "pct_copy", "cudnn_nchw_ms", "cudnn_chwn_ms",
               "cudnn_GBps", "speedup_vs_cudnn", "max_rel_diff_vs_cudnn"]
    if not args.no_write:
        path = write_results("memory_bound", dev, rows, columns, extra)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
