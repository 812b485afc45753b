"""The cpu device's 3x3 convolutions, direct against Winograd F(m x m, 3x3) (the tile ``winograd.output_tile``
picks), per layer: forward, data gradient, filter gradient and their sum, the two algorithms alternating within each
round, medians over the rounds (a loaded machine's noise hits both alike), and the passes ``--cpu-conv auto`` (the
default) gives to Winograd. The layers: the default fmnist net's conv2 and conv3 at its batch, AlexNet's conv3-5
(one tower) at batch 32.

    python benchmarks/winograd_bench.py --threads 1 --rounds 7
    CONVNET_CPU_GEMM=avx2 python benchmarks/winograd_bench.py --threads 2

Prints a markdown table (the machine's CPU and the GEMM's SIMD width in its header); docs/results.md keeps the
measured one. ``speed-up`` is direct / Winograd (> 1: Winograd faster).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import numpy as np  # noqa: E402

from convnet.cpu import conv, gemm, loop_threads, winograd  # noqa: E402
from convnet.geometry import ConvGeometry  # noqa: E402

# name: (C, H, W, F, padding, batch)
LAYERS = {
    "fmnist conv2": (32, 13, 13, 64, 1, 64),
    "fmnist conv3": (64, 6, 6, 128, 1, 64),
    "alexnet conv3": (256, 13, 13, 384, 1, 32),
    "alexnet conv4": (384, 13, 13, 384, 1, 32),
    "alexnet conv5": (384, 13, 13, 256, 1, 32),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def one_pass(x, w, dy, pad):
    t = []
    for fn in (lambda: conv.conv_forward(x, w, None, 1, pad, 1),
               lambda: conv.conv_backward_data(dy, w, x.shape[1:3], 1, pad, 1),
               lambda: conv.conv_backward_filter(x, dy, (3, 3), 1, pad, 1)):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="calls per algorithm per round (the round's best)")
    ap.add_argument("--layers", default=",".join(LAYERS))
    args = ap.parse_args(argv)
    unknown = [name for name in args.layers.split(",") if name not in LAYERS]
    if unknown:
        ap.error(f"unknown layer(s) {', '.join(unknown)}: choose from {', '.join(LAYERS)}")
    rng = np.random.default_rng(0)
    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs, GEMM {gemm.isa()}, {args.threads} thread(s), "
          f"medians of {args.rounds} rounds (best of {args.repeats} calls each), ms")
    print("| layer | C->F, HxW, batch | tile | direct fwd / data / filter | Winograd fwd / data / filter | speed-up "
          "(sum) | auto's Winograd passes |")
    print("|---|---|---|---|---|---|---|")
    with loop_threads(args.threads):
        _measure(args, rng)


def _measure(args, rng):
    """One table row per layer of ``--layers``."""
    for name in args.layers.split(","):
        c, h, wd, f, pad, n = LAYERS[name]
        x = rng.standard_normal((c, h, wd, n)).astype(np.float32)
        w = rng.standard_normal((c, 3, 3, f)).astype(np.float32)
        dy = rng.standard_normal((f, h + 2 * pad - 2, wd + 2 * pad - 2, n)).astype(np.float32)
        times = {"direct": [], "winograd": []}
        for _ in range(args.rounds):
            for algo in times:
                best = None
                with winograd.algorithm(algo):
                    for _ in range(args.repeats):
                        t = one_pass(x, w, dy, pad)
                        best = t if best is None or sum(t) < sum(best) else best
                times[algo].append(best)
        med = {a: [statistics.median(r[i] for r in v) * 1e3 for i in range(3)] for a, v in times.items()}
        d, wg = med["direct"], med["winograd"]
        g = ConvGeometry.of(x.shape, w.shape, padding=pad)
        m = winograd.output_tile(g.OH, g.OW)
        auto = ", ".join(p for p in winograd.PASSES if winograd.prefers_winograd(g, p)) or "none"
        print(f"| {name} | {c}->{f}, {h}x{wd}, {n} | {m}x{m} | {d[0]:.2f} / {d[1]:.2f} / {d[2]:.2f} | "
              f"{wg[0]:.2f} / {wg[1]:.2f} / {wg[2]:.2f} | {sum(d) / sum(wg):.2f}x | {auto} |", flush=True)


if __name__ == "__main__":
    main()
