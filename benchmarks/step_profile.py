"""Where a cpu-device training step goes: the time of each phase of one step (forward, backward, SGD) of a model,
medians over steps after warm-up.

    python benchmarks/step_profile.py --threads 1                         # fmnist, batch 64, the widest GEMM
    CONVNET_CPU_GEMM=avx2 python benchmarks/step_profile.py --threads 2   # the AVX2 kernels

Rows:

* each GEMM (layer and pass: forward, data grad, weight grad), with its GFLOP/s and its share of the peak of the
  threads' cores: threads x clock x FMA lanes x 2 flops. The clock is /proc/cpuinfo's ``cpu MHz`` (``--ghz`` to
  state another); FMA lanes are the float32 fused multiply-adds a core starts per cycle (``--fma-lanes``, default
  16: two 256-bit FMA units, or one 512-bit unit issued as two halves -- AMD Zen 2-4, most Intel client cores; 32
  for Intel Xeons with two 512-bit FMA units). The convolutions' im2col packing is inside their GEMM (packed
  straight from the image), so it is counted there. A Winograd pass is a row ``(Winograd)``: the fused forward or
  data gradient (``winograd_conv``: transforms and products together) or the filter gradient's fused products
  (``winograd_filter_products``); its GFLOP/s are the direct form's flops over its time (effective).
* the compiled loops by kind, all layers together: col2im, max pooling, ReLU, dropout, bias (add and sum), the SGD
  update, Winograd's filter transforms (G g G^T, and G^T D G after the filter gradient's products), im2col (only where NumPy's BLAS multiplies);
* the ops that run NumPy on this device (the softmax and its loss, the fc bias gradient, ...), each by name;
* ``ops' Python + NumPy around the compiled calls``: the rest of the time inside the ops that call compiled code
  (argument checks, output allocation);
* ``layers, graph and optimizer Python``: the step less every op: the layer graph's dispatch, the optimizer's loop.

How: every function of ``convnet.ops`` and of the compiled module ``convnet._cpu`` is wrapped by a timer (a few
hundred ns per call; the uninstrumented step's median is printed beside the instrumented one). Each row is the
median over the timed steps of that row's per-step time, so the rows need not add up to the median step exactly.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (makes `import convnet` work from a source checkout)

import convnet.cpu  # noqa: E402
from convnet import ops  # noqa: E402
from convnet.cpu import gemm as cpu_gemm  # noqa: E402
from convnet.cpu import loop_threads, winograd  # noqa: E402
from convnet.data import Loader, synthetic  # noqa: E402
from convnet.devices import blas_threads, get_device  # noqa: E402
from convnet.model_file import load_model  # noqa: E402
from convnet.optim import SGD  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 1e-4, 0.9, 5e-4  # train_bench's

# compiled function of convnet._cpu -> its row (GEMMs get a row per layer and pass instead)
LOOPS = {"im2col": "im2col (NumPy GEMM path)", "col2im": "col2im", "maxpool_forward": "max pooling",
         "maxpool_backward": "max pooling", "relu_forward": "ReLU", "relu_backward": "ReLU",
         "dropout_apply": "dropout", "dropout_apply_mask": "dropout", "bias_add": "bias (add, sum)",
         "bias_sum": "bias (add, sum)", "sgd_update": "SGD update", "sgd_update_many": "SGD update",
         "winograd_filter": "Winograd transforms", "winograd_filter_grad": "Winograd transforms"}
GEMMS = ("gemm", "conv_gemm_forward", "conv_gemm_filter", "winograd_conv", "winograd_filter_products")
# op -> the pass its GEMMs compute
PASS = {"conv_forward": "forward", "fc_forward": "forward", "conv_backward_data": "data grad",
        "fc_backward_data": "data grad", "conv_backward_filter": "weight grad", "fc_backward_weights": "weight grad"}
NUMPY_OPS = {"softmax_cross_entropy": "softmax + cross-entropy (NumPy)", "softmax_forward": "softmax (NumPy)",
             "fc_backward_bias": "fc bias gradient (NumPy)"}
OPS_OVERHEAD = "ops' Python + NumPy around the compiled calls"
REMAINDER = "layers, graph and optimizer Python"


def gemm_flops(name, args) -> float:
    """Floating-point operations (2 per multiply-add) of a compiled GEMM call from its array arguments."""
    if name == "gemm":  # (a (M, K), b (K, N), out)
        a, b = args[0], args[1]
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    if name.startswith("winograd"):  # (x, u or dy, y or D, C, H, W, N, c0, Cg, ph, pw, F, f0, Fg, OH, OW): direct's flops
        return 2.0 * 9 * args[8] * args[13] * args[14] * args[15] * args[6]
    if name == "conv_gemm_forward":  # (w^T (M, K), x, y (M, cols), ...)
        return 2.0 * args[0].shape[0] * args[0].shape[1] * args[2].shape[1]
    return 2.0 * args[2].shape[0] * args[2].shape[1] * args[1].shape[1]  # filter: (x, dy (F, K), dw (rows, F), ...)


class Profiler:
    """Wraps convnet.ops' functions, convnet._cpu's functions and the layers' forward/backward; ``times`` holds the
    current step's seconds per row, ``flops`` the GEMM rows' flops."""

    def __init__(self, net):
        self.times, self.flops = defaultdict(float), {}
        self.stack = []  # frames of the ops being run: [name, seconds of nested ops, seconds of compiled calls]
        self.layer = "?"
        self.saved = []
        for name in dir(ops):
            fn = getattr(ops, name)
            if callable(fn) and not isinstance(fn, type) and not name.startswith("_") and \
                    getattr(fn, "__module__", "").startswith("convnet.ops"):
                self._patch(ops, name, self._op(name, fn))
        lib = convnet.cpu.lib()
        for name in (*LOOPS, *GEMMS):
            if hasattr(lib, name):
                self._patch(lib, name, self._compiled(name, getattr(lib, name)))
        for layer in net.order:
            for method in ("forward", "backward"):
                self._patch(layer, method, self._in_layer(layer.name, getattr(layer, method)), instance=True)

    def _patch(self, owner, name, fn, instance=False):
        self.saved.append((owner, name, None if instance else getattr(owner, name)))
        setattr(owner, name, fn)

    def restore(self):
        for owner, name, fn in reversed(self.saved):
            if fn is None:
                delattr(owner, name)  # the instance attribute hid the class's method
            else:
                setattr(owner, name, fn)

    def _in_layer(self, name, fn):
        def run(*args, **kw):
            outer, self.layer = self.layer, name
            try:
                return fn(*args, **kw)
            finally:
                self.layer = outer
        return run

    def _op(self, name, fn):
        def run(*args, **kw):
            frame = {"op": name, "nested": 0.0, "compiled": 0.0, "winograd": False}
            self.stack.append(frame)
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                dt = time.perf_counter() - t
                self.stack.pop()
                if self.stack:
                    self.stack[-1]["nested"] += dt
                else:
                    self.times["_ops"] += dt
                own = dt - frame["nested"]  # less the nested ops, which count for themselves
                if frame["compiled"] > 0:
                    self.times[OPS_OVERHEAD] += own - frame["compiled"]
                else:
                    self.times[NUMPY_OPS.get(name, f"{name} (NumPy)")] += own
        return run

    def _compiled(self, name, fn):
        def run(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                dt = time.perf_counter() - t
                frame = self.stack[-1] if self.stack else {"op": "?", "compiled": 0.0, "winograd": False}
                frame["compiled"] += dt
                if name in GEMMS:
                    row = f"GEMM {self.layer} {PASS.get(frame['op'], frame['op'])}"
                    row += " (Winograd)" if frame["winograd"] or name.startswith("winograd") else ""
                    self.times[row] += dt
                    self.flops[row] = self.flops.get(row, 0.0) + gemm_flops(name, args)
                else:
                    frame["winograd"] |= name.startswith("winograd")
                    self.times[LOOPS[name]] += dt
        return run

    def begin_step(self):
        self.times, self.flops = defaultdict(float), {}


def clock_ghz() -> float | None:
    """The CPU's clock from /proc/cpuinfo (the first core's ``cpu MHz``), None where not readable."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(float(line.split(":", 1)[1]) / 1e3 for line in f if line.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return None


def profile(a) -> dict:
    """{"plain": seconds of each uninstrumented step, "steps": [{row: seconds} per instrumented step], "flops":
    {GEMM row: flops per step}} for the options ``a`` of ``main``."""
    dev = get_device("cpu")
    net, _ = load_model(a.model, device=dev)
    opt = SGD(net, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    shape = net.data_layer.out_shape
    ds = synthetic(shape, net.num_classes, n_train=a.batch_size * 2, n_test=8)
    x, y = Loader(ds.train_x, ds.train_y, a.batch_size, train=True, out_hw=shape[1:], mean=ds.mean_image(),
                  flip=True, device=dev, prefetch=0).make_batch(0, 0)

    def step(i):
        net.forward(x, y, train=True, step=i)
        net.backward()
        opt.step()

    plain, rows = [], []
    with blas_threads(a.threads), loop_threads(a.threads), winograd.algorithm(a.cpu_conv):
        for i in range(a.warmup):
            step(i)
        for i in range(a.steps):  # uninstrumented, for comparison
            t = time.perf_counter()
            step(i)
            plain.append(time.perf_counter() - t)
        prof = Profiler(net)
        try:
            for i in range(a.steps):
                prof.begin_step()
                t = time.perf_counter()
                step(i)
                total = time.perf_counter() - t
                times = dict(prof.times)
                times[REMAINDER] = total - times.pop("_ops", 0.0)
                times["total"] = total
                rows.append(times)
        finally:
            prof.restore()
    return {"plain": plain, "steps": rows, "flops": prof.flops}


def table(result, a) -> tuple[list[dict], dict]:
    ghz = a.ghz or clock_ghz()
    peak = a.threads * ghz * a.fma_lanes * 2 if ghz else None  # GFLOP/s
    steps = result["steps"]
    names = sorted({k for s in steps for k in s} - {"total"})
    med = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in names}
    total = statistics.median(s["total"] for s in steps)
    gemm_rows = [k for k in names if k.startswith("GEMM ")]
    order = {n: i for i, n in enumerate(net_order_hint(gemm_rows))}
    out = []

    def row(name, seconds, flops=None):
        r = {"phase": name, "ms": round(seconds * 1e3, 3), "% of step": round(100 * seconds / total, 1),
             "GFLOP/s": None, "% of peak": None}
        if flops and seconds > 0:
            r["GFLOP/s"] = round(flops / seconds / 1e9, 1)
            if peak:
                r["% of peak"] = round(100 * flops / seconds / 1e9 / peak, 1)
        out.append(r)

    for k in sorted(gemm_rows, key=order.get):
        row(k, med[k], result["flops"].get(k))
    gemm_total = statistics.median(sum(s.get(k, 0.0) for k in gemm_rows) for s in steps)
    row("all GEMMs", gemm_total, sum(result["flops"].get(k, 0.0) for k in gemm_rows))
    rest = [k for k in names if k not in gemm_rows and k not in (OPS_OVERHEAD, REMAINDER)]
    for k in sorted(rest, key=lambda k: -med[k]):
        row(k, med[k])
    row(OPS_OVERHEAD, med.get(OPS_OVERHEAD, 0.0))
    row(REMAINDER, med.get(REMAINDER, 0.0))
    row("step (instrumented)", total)
    row("step (not instrumented)", statistics.median(result["plain"]))
    info = {"threads": a.threads, "isa": cpu_gemm.isa() or "numpy", "cpu_conv": a.cpu_conv, "clock_ghz": ghz, "fma_lanes": a.fma_lanes,
            "peak_gflop_s": peak, "steps": a.steps, "batch": a.batch_size, "model": a.model}
    return out, info


def net_order_hint(gemm_rows):
    """GEMM rows in step order: forward by layer, then the backward passes (as the step runs them)."""
    fwd = [r for r in gemm_rows if r.endswith(" forward") or r.endswith("forward (Winograd)")]
    bwd = [r for r in gemm_rows if r not in fwd]
    return fwd + bwd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fmnist")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="the cpu device's threads (GEMMs and loops)")
    p.add_argument("--cpu-conv", default="auto", choices=winograd.ALGOS,
                   help="the convolution algorithm (python -m convnet.train --cpu-conv)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (medians over them)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ghz", type=float, default=None, help="the cores' clock (default: /proc/cpuinfo's cpu MHz)")
    p.add_argument("--fma-lanes", type=int, default=16,
                   help="float32 FMAs a core starts per cycle (16: 2x256-bit or a double-pumped 512-bit unit)")
    p.add_argument("--no-write", action="store_true", help="print only; no results file")
    a = p.parse_args(argv)
    if a.threads < 1 or a.steps < 1 or a.warmup < 0 or a.batch_size < 1:
        p.error("--threads, --steps and --batch-size must be >= 1, --warmup >= 0")
    rows, info = table(profile(a), a)
    columns = ["phase", "ms", "% of step", "GFLOP/s", "% of peak"]
    peak = (f"peak {info['peak_gflop_s']:.0f} GFLOP/s = {a.threads} core(s) x {info['clock_ghz']:.2f} GHz x "
            f"{a.fma_lanes} FMA lanes x 2" if info["peak_gflop_s"] else "peak unknown (no clock: pass --ghz)")
    print(f"{a.model}, batch {a.batch_size}, cpu device, {a.threads} thread(s), GEMM {info['isa']}, {a.cpu_conv} "
          f"convolutions, "
          f"medians of {a.steps} steps; {common.cpu_name()}; {peak}")
    print(common.markdown_table(rows, columns))
    if not a.no_write:
        path = common.write_results(f"step_profile-{a.model}-b{a.batch_size}-t{a.threads}-{info['isa']}",
                                    get_device("cpu"), rows, columns, extra={"settings": info})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
