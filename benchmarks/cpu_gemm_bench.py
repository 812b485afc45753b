"""The cpu device's GEMM (convnet.cpu.gemm, csrc/cpu/gemm*.cpp) against NumPy's BLAS, on the GEMMs of one training
step of a model (default: the default job's ``fmnist`` net at batch 64), same process, same thread count.

    python benchmarks/cpu_gemm_bench.py                          # 1 thread, the widest SIMD width here
    python benchmarks/cpu_gemm_bench.py --threads 2 --model fmnist --batch 64
    CONVNET_CPU_GEMM=avx2 python benchmarks/cpu_gemm_bench.py     # the AVX2 kernels on an AVX-512 CPU

For each convolution: the forward GEMM (w @ im2col(x)), the filter gradient (im2col(x) @ dy.T) and the data
gradient's GEMM (w.T-side @ dy, into a column matrix); for each fully-connected layer: forward, data and weight
gradients. Ours packs the im2col operand straight from the image; NumPy multiplies an im2col matrix built beforehand
(its build is timed separately, in the row's "im2col ms": what the cpu device paid before it had its own GEMM). Each
time is the median of --repeats calls after one warm-up; every case of ours first, then NumPy's (OpenBLAS's threads
spin after a call and would slow ours down if the sides alternated); GFLOP/s = 2*M*N*K / time. Every result is
checked against NumPy's (normwise relative difference, printed). Results go to
benchmarks/results/cpu_gemm-<cpu>-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (makes `import convnet` work from a source checkout)

from convnet import _cpu  # noqa: E402
from convnet.cpu import gemm as cpu_gemm  # noqa: E402
from convnet.cpu import loop_threads  # noqa: E402
from convnet.devices import blas_threads, get_device  # noqa: E402
from convnet.layers import FC, Conv  # noqa: E402
from convnet.model_file import load_model  # noqa: E402


def cases(model: str, batch: int, rng) -> list[dict]:
    """The step's GEMMs: name, flops, our call, NumPy's call (operands prepared), and the im2col build for NumPy."""
    net, _ = load_model(model, device=get_device("numpy"))
    out = []
    for layer in net.layers.values():
        if isinstance(layer, Conv):
            g = dataclasses.replace(layer.geometry(layer.in_shape), N=batch)
            fg, k, p = g.F // g.groups, g.Cg * g.KH * g.KW, g.OH * g.OW * g.N
            x = rng.standard_normal((g.C, g.H, g.W, g.N), dtype=np.float32)
            w = rng.standard_normal((fg, k), dtype=np.float32)
            dy = rng.standard_normal((fg, p), dtype=np.float32)
            args = (g.C, g.H, g.W, g.N, 0, g.Cg, 0, g.N, g.KH, g.KW, *g.stride, *g.padding, g.OH, g.OW)
            cols = np.empty((k, p), np.float32)
            _cpu.im2col(x, cols, *args)
            y, dw, dcols = np.empty((fg, p), np.float32), np.empty((k, fg), np.float32), np.empty((k, p), np.float32)
            build = (lambda cols=cols, x=x, args=args: _cpu.im2col(x, cols, *args))
            out += [
                dict(name=f"{layer.name} forward", m=fg, n=p, k=k, build=build,
                     ours=lambda w=w, x=x, y=y, a=args: (
                         _cpu.conv_gemm_forward(w, x, y, *a, isa=cpu_gemm.isa()) or y),
                     numpy=lambda w=w, c=cols, y=y: np.matmul(w, c, out=y)),
                dict(name=f"{layer.name} filter grad", m=k, n=fg, k=p, build=build,
                     ours=lambda x=x, d=dy, dw=dw, a=args: (
                         _cpu.conv_gemm_filter(x, d, dw, *a, isa=cpu_gemm.isa()) or dw),
                     numpy=lambda c=cols, d=dy, dw=dw: np.matmul(c, d.T, out=dw)),
            ]
            if layer.inputs[0] != net.data_layer.name:  # the data layer's input needs no gradient
                wt = np.ascontiguousarray(w.T)
                out.append(dict(name=f"{layer.name} data grad", m=k, n=p, k=fg, build=None,
                                ours=lambda a=wt, d=dy, c=dcols: cpu_gemm.matmul(a, d, out=c),
                                numpy=lambda a=wt, d=dy, c=dcols: np.matmul(a, d, out=c)))
        elif isinstance(layer, FC):
            o, i = layer.params["w"].shape
            x = rng.standard_normal((i, batch), dtype=np.float32)
            w = rng.standard_normal((o, i), dtype=np.float32)
            dy = rng.standard_normal((o, batch), dtype=np.float32)
            for name, a, b, shape in ((f"{layer.name} forward", w, x, (o, batch)),
                                      (f"{layer.name} data grad", w.T, dy, (i, batch)),
                                      (f"{layer.name} weight grad", dy, x.T, (o, i))):
                c = np.empty(shape, np.float32)
                out.append(dict(name=name, m=a.shape[0], n=b.shape[1], k=a.shape[1], build=None,
                                ours=lambda a=a, b=b, c=c: cpu_gemm.matmul(a, b, out=c),
                                numpy=lambda a=a, b=b, c=c: np.matmul(a, b, out=c)))
    return out


def median_ms(fns: dict, repeats: int) -> dict:
    """Median milliseconds of each callable, one warm-up call each, the callables alternating."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fmnist")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads for ours, BLAS threads for NumPy")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    if not cpu_gemm.available():
        print("the cpu device uses NumPy's BLAS here (no AVX2+FMA, or CONVNET_CPU_GEMM=numpy): nothing to compare")
        return 0
    rng = np.random.default_rng(0)
    rows = []
    with blas_threads(a.threads), loop_threads(a.threads):
        todo = cases(a.model, a.batch, rng)
        # Ours (and the im2col builds) for every case first, then NumPy's: OpenBLAS's threads spin for a while after
        # each call, and would take the cores from our (sleeping-when-idle) OpenMP threads if the sides alternated.
        ours_ms = [median_ms({"ours": c["ours"], **({"im2col": c["build"]} if c["build"] else {})}, a.repeats)
                   for c in todo]
        numpy_ms = [median_ms({"numpy": c["numpy"]}, a.repeats)["numpy"] for c in todo]
        for case, mine, theirs in zip(todo, ours_ms, numpy_ms):
            flop = 2.0 * case["m"] * case["n"] * case["k"]
            ours = np.array(case["ours"](), np.float64)
            want = np.array(case["numpy"](), np.float64)
            diff = float(np.linalg.norm(ours - want) / max(np.linalg.norm(want), 1e-30))
            rows.append({"gemm": case["name"], "M x N x K": f"{case['m']} x {case['n']} x {case['k']}",
                         "ours ms": mine["ours"], "ours GFLOP/s": flop / mine["ours"] / 1e6, "numpy ms": theirs,
                         "numpy GFLOP/s": flop / theirs / 1e6, "im2col ms": mine.get("im2col"),
                         "numpy / ours time": theirs / mine["ours"], "rel diff": diff})
            if diff > 1e-5:
                print(f"FAILED: {case['name']}: ours differs from NumPy's by {diff:.2e}", file=sys.stderr)
                return 1
    total_ours = sum(r["ours ms"] for r in rows)
    total_np = sum(r["numpy ms"] + (r["im2col ms"] or 0) for r in rows)
    columns = ["gemm", "M x N x K", "ours ms", "ours GFLOP/s", "numpy ms", "numpy GFLOP/s", "im2col ms",
               "numpy / ours time", "rel diff"]
    print(common.markdown_table(rows, columns))
    print(f"\nsum: ours {total_ours:.2f} ms, NumPy {total_np:.2f} ms with the im2col builds "
          f"({a.threads} thread(s), ours {cpu_gemm.isa()}; OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', 'unset')})")
    if not a.no_write:
        extra = {"threads": a.threads, "isa": cpu_gemm.isa(), "model": a.model, "batch": a.batch,
                 "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "sum_ours_ms": total_ours,
                 "sum_numpy_with_im2col_ms": total_np}
        path = common.write_results(f"cpu_gemm-{a.model}-b{a.batch}-t{a.threads}", get_device("cpu"), rows, columns,
                                    extra)
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
