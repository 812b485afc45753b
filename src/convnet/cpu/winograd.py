"""Winograd F(m x m, 3x3) convolutions on the fast CPU path (m = 2 or 3, ``output_tile`` picks by the output's
size): 3x3 filters, stride 1, padding at most 2 (any groups, images, channels). An m x m output tile costs (m + 2)^2
multiplications per (input channel, filter) instead of 9 m^2: 2.25x fewer for F(2x2), 3.24x for F(3x3). The forward
and the data gradient (the forward of the transposed convolution: filters rotated 180 degrees, padding 2 - p) run
fused (``convnet._cpu.winograd_conv``, csrc/cpu/winograd_fused.inc): per tile and block of images the input
transform, the products and the output transform (with the bias and ReLU) stay in cache. The filter gradient,
G^T [sum over tiles (B^T d B) . (A dY A^T)] G, runs its products fused the same way
(``convnet._cpu.winograd_filter_products``) and its filter transforms G g G^T and G^T D G in csrc/cpu/winograd.cpp.
The matrices: ``MATRICES`` here, csrc/cpu/winograd_matrices.h there.

Deterministic like the direct path: a fixed transform order, every product element a fixed order of fused
multiply-adds, chunks of images fixed by the shapes, so the bits do not depend on the SIMD width or the thread
count. Not the direct path's bits: the transforms round differently, within the tolerance docs/training.md derives
("Winograd convolutions"); tests/test_winograd.py holds them to it against the float64 reference.

Which algorithm a pass gets: the process's choice, set with ``algorithm(name)`` (a context manager; ``python -m
convnet.train --cpu-conv`` and the model file's ``[train] cpu_conv`` enter it for the run): ``auto``, the default:
the measured cost model ``prefers_winograd`` per pass (forward, data gradient, filter gradient); ``direct``: never;
``winograd``: every pass of every eligible layer.
"""
from __future__ import annotations

import numpy as np

from convnet.config import CPU_CONV_ALGOS
from convnet.cpu import gemm, lib
from convnet.geometry import ConvGeometry

ALGOS = CPU_CONV_ALGOS  # direct, winograd, auto: the choices of --cpu-conv / [train] cpu_conv
_algo = "auto"  # the default: the cost model (config.py's cpu_conv)


def algo() -> str:
    """The algorithm the cpu device's eligible convolutions use now (``algorithm`` sets it)."""
    return _algo


class algorithm:
    """Context manager: the cpu device's convolutions use algorithm ``name`` (one of ``ALGOS``) inside, for the whole
    process (as ``convnet.cpu.loop_threads`` sets the threads); another name is a ValueError."""

    def __init__(self, name: str):
        if name not in ALGOS:
            raise ValueError(f"cpu convolution algorithm {name!r}: expected one of {', '.join(ALGOS)}")
        self.name, self.saved = name, None

    def __enter__(self):
        global _algo
        self.saved, _algo = _algo, self.name
        return self

    def __exit__(self, *exc):
        global _algo
        _algo = self.saved
        return False


def eligible(g: ConvGeometry) -> bool:
    """3x3 filters, stride 1, padding at most 2 on each axis (the data gradient's padding 2 - p must not be negative),
    and this path's GEMM (not NumPy's BLAS)."""
    return (g.KH, g.KW) == (3, 3) and tuple(g.stride) == (1, 1) and max(g.padding) <= 2 and min(g.padding) >= 0 \
        and gemm.available()


PASSES = ("forward", "data", "filter")  # the three products of a convolution: y, dx, dw

# F(m x m, 3x3)'s matrices per output tile m (Toom-Cook points 0, 1, -1 (, 2), infinity): (B^T, G, A^T), the same
# as csrc/cpu/winograd_matrices.h's (B^T and A^T dyadic: exact in float32).
MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    3: (np.array([[1, -.5, -1, .5, 0], [0, 1, .5, -.5, 0], [0, -1, 1.5, -.5, 0], [0, -.5, 0, .5, 0],
                  [0, 2, -1, -2, 1]], np.float64),
        np.array([[1, 0, 0], [1, 1, 1], [1 / 3, -1 / 3, 1 / 3], [1 / 3, 2 / 3, 4 / 3], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 1]], np.float64)),
}
TILES = tuple(MATRICES)

# The cost model of ``auto``, measured with benchmarks/winograd_bench.py on a 2-vCPU AMD EPYC with AVX-512 at 1 and
# 2 threads, Winograd (F(3x3) for all of these) against direct (docs/results.md, "Winograd on the cpu device"): the
# forward and data gradient 1.4-2.2x faster (fmnist's conv2 1.4-1.7x, conv3 1.8-2.1x, AlexNet's conv3-5 at batch 32
# 1.7-2.2x) and the filter gradient 1.1-2.4x (fmnist's conv2, 32 -> 64: 1.1-1.3x; AlexNet's: 1.5-2.0x). They lose
# with 1-3 channels on either side (forward and data gradient 0.3-0.6x: a micro-tile of filters or a product of
# depth 3 mostly idle), the forward and data gradient with fewer than 32 images (0.8x: the blocks of images are 32
# wide with AVX-512, half empty at 16), the filter gradient below 32 channels on either side (16 -> 32: 0.6-1.0x;
# 8 -> 16: 0.3x: the transforms' and panels' work per product grows as the channels shrink).
# The rule reads the geometry only, never the CPU or the threads: the same bits on every machine.
MIN_CHANNELS = 4             # forward / data gradient: input channels and filters per group, at least
MIN_IMAGES = 32              # forward / data gradient: images, at least
MIN_FILTER_CHANNELS = 32     # filter gradient: input channels and filters per group, at least


def prefers_winograd(g: ConvGeometry, pass_: str = "forward") -> bool:
    """The cost model of ``auto`` for one pass (``PASSES``) of an eligible convolution."""
    if pass_ not in PASSES:
        raise ValueError(f"convolution pass {pass_!r}: expected one of {', '.join(PASSES)}")
    if not eligible(g):
        return False
    fg = g.F // g.groups
    if pass_ == "filter":
        return min(g.Cg, fg) >= MIN_FILTER_CHANNELS
    return min(g.Cg, fg) >= MIN_CHANNELS and g.N >= MIN_IMAGES


def chosen(g: ConvGeometry, pass_: str = "forward") -> bool:
    """Whether the cpu device runs this pass of the convolution by Winograd (the chosen ``algo()`` and the cost
    model)."""
    choice = algo()
    if choice == "direct":
        return False
    if choice == "winograd":
        return eligible(g)
    return prefers_winograd(g, pass_)


def _check(g: ConvGeometry):
    if not eligible(g):
        raise ValueError(f"Winograd F(2x2, 3x3) needs 3x3 filters, stride 1 and padding 0..2 and this path's GEMM, got "
                         f"{g.KH}x{g.KW} filters, stride {tuple(g.stride)}, padding {tuple(g.padding)}")


def last_tile(out: int, m: int) -> int:
    """The last tile along an axis of ``out`` outputs: F(1, 3) (1: the direct products along it, alpha 3) where m
    leaves one output, else m (csrc/cpu/winograd_matrices.h's winograd_last_tile)."""
    return 1 if m > 1 and out % m == 1 else m


def tile_kinds(m: int, oh: int, ow: int) -> list[tuple[int, int]]:
    """The kinds of tile (rows, columns) of F(m x m, 3x3) on an oh x ow output, in the transformed filters' order
    (winograd_tile_kinds): m x m; m x 1; 1 x m; 1 x 1, those present (no m along an axis of one output)."""
    def sizes(out):
        last = last_tile(out, m)
        return ([m] if out >= m or last == m else []) + ([1] if last == 1 else [])
    return [(y, x) for y in sizes(oh) for x in sizes(ow)]


def _elements(m: int, oh: int, ow: int) -> int:
    """The transformed elements of every kind of tile together (the blocks of U and of D)."""
    return sum((y + 2) * (x + 2) for y, x in tile_kinds(m, oh, ow))


def output_tile(oh: int, ow: int) -> int:
    """The output tile m of F(m x m, 3x3) for an output of oh x ow: the one with the fewest products, the
    transformed rows (alpha per tile: m + 2, 3 for an F(1) last tile) along one axis times those along the other
    (ties: 2). fmnist's 13x13: 23 x 23 against 27 x 27... 3; its 6x6: 3; a 4x4 output: 2. The geometry alone
    decides: the same bits on every machine."""
    def rows(out, m):
        whole, rest = divmod(out, m)
        return whole * (m + 2) + (0 if rest == 0 else last_tile(out, m) + 2)
    return min(TILES, key=lambda m: (rows(oh, m) * rows(ow, m), m))


def _filters(w, g: ConvGeometry, group: int, m: int, rotate: bool, oh: int, ow: int):
    """The transformed filters of one group for an oh x ow output: per kind of tile a block (E, Cg, Fg)."""
    fg = g.F // g.groups
    u = np.empty(_elements(m, oh, ow) * g.Cg * fg, dtype=np.float32)
    lib().winograd_filter(w, u, g.Cg, g.F, group * fg, fg, rotate, m=m, oh=oh, ow=ow)
    return u


def conv_forward(x, w, g: ConvGeometry, bias=None, relu: bool = False, m: int | None = None):
    """y (F, OH, OW, N) = the convolution of x (C, H, W, N) with w (C/groups, 3, 3, F) [+ bias (F,)] [then the ReLU:
    v > 0 ? v : +0], by the fused kernel (csrc/cpu/winograd_fused.inc): per tile and block of images the input
    transform, the products and the output transform stay in cache. m: the output tile (default ``output_tile``)."""
    _check(g)
    m = m or output_tile(g.OH, g.OW)
    fg = g.F // g.groups
    y = np.empty(g.y_shape, dtype=np.float32)
    for group in range(g.groups):
        u = _filters(w, g, group, m, False, g.OH, g.OW)
        lib().winograd_conv(x, u, y, g.C, g.H, g.W, g.N, group * g.Cg, g.Cg, *g.padding, g.F, group * fg, fg, g.OH,
                            g.OW, u_layout="ck", bias=None if bias is None else bias[group * fg:(group + 1) * fg],
                            relu=relu, m=m, isa=gemm.isa())
    return y


def conv_backward_data(dy, w, g: ConvGeometry, m: int | None = None):
    """dx (C, H, W, N) from dy (F, OH, OW, N): the forward of the transposed convolution (the filters rotated by 180
    degrees, input and output channels swapped), padding 2 - p; m: the tile of dx (default ``output_tile``)."""
    _check(g)
    m = m or output_tile(g.H, g.W)
    fg = g.F // g.groups
    dx = np.empty(g.x_shape, dtype=np.float32)
    ph, pw = g.padding
    for group in range(g.groups):
        u = _filters(w, g, group, m, True, g.H, g.W)
        lib().winograd_conv(dy, u, dx, g.F, g.OH, g.OW, g.N, group * fg, fg, 2 - ph, 2 - pw, g.C, group * g.Cg, g.Cg,
                            g.H, g.W, u_layout="kc", m=m, isa=gemm.isa())
    return dx


def conv_backward_filter(x, dy, g: ConvGeometry, m: int | None = None):
    """dw (C/groups, 3, 3, F) from x (C, H, W, N) and dy (F, OH, OW, N): per group the fused products D, a block
    (E, Cg, Fg) per kind of tile (``convnet._cpu.winograd_filter_products``: each element one chain over the tiles and
    images in order, in two fixed halves of the tiles), then dw = the kinds' G^T D G summed; m: the tile of dy
    (default ``output_tile``)."""
    _check(g)
    m = m or output_tile(g.OH, g.OW)
    fg = g.F // g.groups
    dw = np.empty(g.w_shape, dtype=np.float32)
    d = np.empty(_elements(m, g.OH, g.OW) * g.Cg * fg, dtype=np.float32)
    for group in range(g.groups):
        lib().winograd_filter_products(x, dy, d, g.C, g.H, g.W, g.N, group * g.Cg, g.Cg, *g.padding, g.F, group * fg,
                                       fg, g.OH, g.OW, m=m, isa=gemm.isa())
        lib().winograd_filter_grad(d, dw, g.Cg, g.F, group * fg, fg, m=m, oh=g.OH, ow=g.OW)
    return dw
