"""Winograd F(2x2, 3x3) convolutions on the fast CPU path: 3x3 filters, stride 1, padding at most 2 (any groups,
images, channels). Each output 2x2 tile costs 16 multiplications per (input channel, filter) instead of 36: the
input, filter and output transforms are compiled loops (csrc/cpu/winograd.cpp, which states the layouts and the
matrices), and the products are 16 GEMMs of this path's GEMM (convnet/cpu/gemm.py), one per element of the 4x4
transformed tile. The data gradient is the forward of the transposed convolution (filters rotated 180 degrees,
padding 2 - p); the filter gradient is G^T [(A dY A^T) (B^T d B)] G summed over tiles by the GEMMs.

Deterministic like the direct path: a fixed transform order, every GEMM element a fixed order of fused multiply-adds
(convnet/cpu/gemm.py), chunks of images fixed by the shapes, so the bits do not depend on the SIMD width or the
thread count. Not the direct path's bits: the transforms round
differently, within the tolerance docs/training.md derives ("Winograd convolutions"); tests/test_winograd.py holds
them to it against the float64 reference.

Which algorithm a layer gets: the process's choice, set with ``algorithm(name)`` (a context manager; ``python -m
convnet.train --cpu-conv`` and the model file's ``[train] cpu_conv`` enter it for the run): ``direct``, the default;
``winograd``: every eligible layer; ``auto``: the measured cost model ``prefers_winograd``.
"""
from __future__ import annotations

import numpy as np

from convnet.config import CPU_CONV_ALGOS
from convnet.cpu import gemm, lib
from convnet.geometry import ConvGeometry
from convnet.reference.conv import image_chunks

ALGOS = CPU_CONV_ALGOS  # direct, winograd, auto: the choices of --cpu-conv / [train] cpu_conv
_algo = "direct"


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


# The cost model, measured on a 2-vCPU AMD EPYC with AVX-512 (docs/results.md, "Winograd F(2x2, 3x3)"): the
# transforms are memory passes over 4x the input and output (about channels x pixels), the GEMMs save 2.25x of the
# multiply-adds (less the ragged tiles of odd outputs), which pays reliably once the GEMMs are deep and wide enough:
# AlexNet's conv3-5 (256-384 channels) 1.25-1.6x faster; the default fmnist net's conv3 (64 -> 128) 1.0-1.45x (within
# the loaded machine's noise), its conv2 (32 -> 64) 0.6-0.9x.
MIN_CHANNELS = 128


def prefers_winograd(g: ConvGeometry) -> bool:
    """The cost model of ``auto``: Winograd where eligible and both the group's input channels and its filters are at
    least ``MIN_CHANNELS`` (smaller GEMMs run below peak and the transforms' memory passes dominate)."""
    return eligible(g) and g.Cg >= MIN_CHANNELS and g.F // g.groups >= MIN_CHANNELS


def chosen(g: ConvGeometry) -> bool:
    """Whether the cpu device runs this convolution by Winograd (the chosen ``algo()`` and the cost model)."""
    choice = algo()
    if choice == "direct":
        return False
    if choice == "winograd":
        return eligible(g)
    return prefers_winograd(g)


DOT_FORM_MAX = 4096  # elements of D_e up to which the filter gradient's GEMMs take the dot form


def _tiles(oh: int, ow: int) -> tuple[int, int]:
    return (oh + 1) // 2, (ow + 1) // 2


def _check(g: ConvGeometry):
    if not eligible(g):
        raise ValueError(f"Winograd F(2x2, 3x3) needs 3x3 filters, stride 1 and padding 0..2 and this path's GEMM, got "
                         f"{g.KH}x{g.KW} filters, stride {tuple(g.stride)}, padding {tuple(g.padding)}")


def _chunks(n: int, th: int, tw: int, channels: int):
    """Chunks [(n0, n1)] of the n images whose transformed tensors (16 x th x tw x channels floats per image, channels
    counting both sides) fit the reference's im2col budget (convnet/reference/conv.py): the extra memory stays about
    the direct path's. Fixed by the shapes alone, so the bits do not depend on anything else."""
    return image_chunks(n, 16 * th * tw * channels)


def _transformed_forward(x, u_of, c_in, c_out, groups, h, w, n, ph, pw, oh, ow):
    """y (groups * c_out, oh, ow, n) from x (groups * c_in, h, w, n): per group and chunk of images, V = input
    transform, 16 GEMMs with the filters ``u_of(group)`` (16, c_out, c_in: a view), output transform."""
    th, tw = _tiles(oh, ow)
    y = np.empty((groups * c_out, oh, ow, n), dtype=np.float32)
    chunks = _chunks(n, th, tw, c_in + c_out)
    most = max(n1 - n0 for n0, n1 in chunks)
    v_all = np.empty(16 * c_in * th * tw * most, dtype=np.float32)
    m_all = np.empty(16 * c_out * th * tw * most, dtype=np.float32)
    isa = gemm.isa()
    for group in range(groups):
        u = u_of(group)
        for n0, n1 in chunks:
            p = th * tw * (n1 - n0)
            v, m = v_all[:16 * c_in * p].reshape(16, c_in, p), m_all[:16 * c_out * p].reshape(16, c_out, p)
            lib().winograd_input(x, v, groups * c_in, h, w, n, n0, n1 - n0, group * c_in, c_in, ph, pw, th, tw)
            for e in range(16):
                lib().gemm(u[e], v[e], m[e], isa=isa)
            lib().winograd_output(m, y, groups * c_out, oh, ow, n, n0, n1 - n0, group * c_out, c_out, th, tw)
    return y


def conv_forward(x, w, g: ConvGeometry):
    """y (F, OH, OW, N) = the convolution of x (C, H, W, N) with w (C/groups, 3, 3, F), no bias (the caller adds it)."""
    _check(g)
    fg = g.F // g.groups
    u = np.empty((16, g.Cg, fg), dtype=np.float32)

    def u_of(group):
        lib().winograd_filter(w, u, g.Cg, g.F, group * fg, fg, False)
        return u.transpose(0, 2, 1)  # the GEMMs read it transposed (measured as fast as a contiguous copy)

    return _transformed_forward(x, u_of, g.Cg, fg, g.groups, g.H, g.W, g.N, *g.padding, g.OH, g.OW)


def conv_backward_data(dy, w, g: ConvGeometry):
    """dx (C, H, W, N) from dy (F, OH, OW, N): the forward of the transposed convolution, padding 2 - p."""
    _check(g)
    fg = g.F // g.groups
    u = np.empty((16, g.Cg, fg), dtype=np.float32)

    def u_of(group):
        lib().winograd_filter(w, u, g.Cg, g.F, group * fg, fg, True)
        return u

    ph, pw = g.padding
    return _transformed_forward(dy, u_of, fg, g.Cg, g.groups, g.OH, g.OW, g.N, 2 - ph, 2 - pw, g.H, g.W)


def conv_backward_filter(x, dy, g: ConvGeometry):
    """dw (C/groups, 3, 3, F) from x (C, H, W, N) and dy (F, OH, OW, N); the GEMMs of every chunk of images after
    the first add into D (so the chunks, fixed by the shapes, set the summation order, not the threads)."""
    _check(g)
    fg = g.F // g.groups
    th, tw = _tiles(g.OH, g.OW)
    chunks = _chunks(g.N, th, tw, g.Cg + fg)
    most = max(n1 - n0 for n0, n1 in chunks)
    v_all = np.empty(16 * g.Cg * th * tw * most, dtype=np.float32)
    z_all = np.empty(16 * fg * th * tw * most, dtype=np.float32)
    dw = np.empty(g.w_shape, dtype=np.float32)
    d = np.empty((16, g.Cg, fg), dtype=np.float32)
    isa = gemm.isa()
    # D_e = V_e @ Z_e.T: V_e taken as a 1x1 convolution's image (Cg, 1, 1, P), so that the filter-gradient GEMM's
    # forms apply: the dot form (both operands read along P, nothing packed) for a small D_e (measured 2.6x faster
    # than the packed form for fmnist's conv2, 32 x 64; slower for its conv3, 64 x 128)
    form = "dot" if g.Cg * fg <= DOT_FORM_MAX else "packed"
    for group in range(g.groups):
        for n0, n1 in chunks:
            p = th * tw * (n1 - n0)
            v, z = v_all[:16 * g.Cg * p].reshape(16, g.Cg, p), z_all[:16 * fg * p].reshape(16, fg, p)
            lib().winograd_input(x, v, g.C, g.H, g.W, g.N, n0, n1 - n0, group * g.Cg, g.Cg, *g.padding, th, tw)
            lib().winograd_grad(dy, z, g.F, g.OH, g.OW, g.N, n0, n1 - n0, group * fg, fg, th, tw)
            for e in range(16):
                lib().conv_gemm_filter(v[e].reshape(g.Cg, 1, 1, p), z[e], d[e], g.Cg, 1, 1, p, 0, g.Cg, 0, p, 1, 1,
                                       1, 1, 0, 0, 1, 1, accumulate=n0 > 0, isa=isa, form=form)
        lib().winograd_filter_grad(d, dw, g.Cg, g.F, group * fg, fg)
    return dw
