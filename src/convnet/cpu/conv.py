"""Convolution on the fast CPU path (CHWN), the reference's method -- im2col + one GEMM per group -- with this
path's GEMM (convnet/cpu/gemm.py): the forward and filter-gradient GEMMs pack their im2col operand straight from the
image (no im2col matrix in memory) and write straight into the output; the data gradient's GEMM writes the column
matrix that the compiled col2im sums (per chunk of images, as the reference). The forward's GEMM adds the bias and
applies the ReLU (``relu=True``) in the store of each output tile, while it is in registers (csrc/cpu/gemm.h's
Epilogue): the same bits as a bias pass and relu_forward after it, without their two passes over y. The bias
gradient is summed by a compiled loop. Same results as convnet/reference/conv.py up to the summation order (one
fused multiply-add chain per element; the bias sums are done in double). Where this path's GEMM is not available (a CPU without AVX2),
NumPy's BLAS multiplies an im2col matrix built by the compiled loops. The 3x3 stride-1 convolutions can run by
Winograd F(2x2, 3x3) instead (convnet/cpu/winograd.py; ``--cpu-conv`` chooses, direct by default)."""
from __future__ import annotations

import numpy as np

from convnet.cpu import contiguous, gemm, lib, winograd
from convnet.geometry import ConvGeometry
from convnet.reference.conv import image_chunks


def _image_args(g: ConvGeometry, group: int, n0: int, n1: int) -> tuple:
    """The im2col operand's geometry for convnet._cpu: channels of ``group``, images [n0, n1)."""
    return (g.C, g.H, g.W, g.N, group * g.Cg, g.Cg, n0, n1 - n0, g.KH, g.KW, *g.stride, *g.padding, g.OH, g.OW)


def _cols(x, g: ConvGeometry, group: int, n0: int, n1: int):
    """The im2col matrix (Cg*KH*KW, OH*OW*(n1-n0)) of one group and chunk of images of x (C, H, W, N)."""
    cols = np.empty((g.Cg * g.KH * g.KW, g.OH * g.OW * (n1 - n0)), dtype=np.float32)
    lib().im2col(x, cols, *_image_args(g, group, n0, n1))
    return cols


def _filters(w, g: ConvGeometry, group: int):
    """The group's filters as the GEMM's (Cg*KH*KW, F/groups) matrix (a view)."""
    fg = g.F // g.groups
    return w[:, :, :, group * fg:(group + 1) * fg].reshape(g.Cg * g.KH * g.KW, fg)


def _image_chunks(g: ConvGeometry):
    """The chunks of images whose im2col matrix fits the reference's budget ([(n0, n1)], usually one)."""
    return image_chunks(g.N, g.Cg * g.KH * g.KW * g.OH * g.OW)


def _dy_rows(dy, g: ConvGeometry, group: int, n0: int, n1: int):
    """The group's output gradient for images [n0, n1) as the GEMM's (F/groups, OH*OW*(n1-n0)) matrix."""
    fg = g.F // g.groups
    return dy[group * fg:(group + 1) * fg, :, :, n0:n1].reshape(fg, -1)


def _bias_relu(y, bias, relu: bool, g: ConvGeometry):
    """y += bias[:, None, None, None], then y = relu(y), as passes over y (where no GEMM of ours computed y)."""
    if bias is not None:
        lib().bias_add(y, bias, g.F, g.OH * g.OW * g.N)
    if relu:
        lib().relu_forward(y, y)


def conv_forward(x, w, bias=None, stride=1, padding=0, groups=1, *, relu=False):
    """The reference's conv_forward; relu=True: then relu_forward's rule (v > 0 ? v : +0), the same bits as
    calling it after."""
    x, w = contiguous(x, w)
    g = ConvGeometry.of(x.shape, w.shape, stride=stride, padding=padding, groups=groups)
    fg = g.F // g.groups
    if bias is not None:
        (bias,) = contiguous(bias)
        bias = bias.reshape(-1)
    if winograd.chosen(g, "forward"):
        return winograd.conv_forward(x, w, g, bias=bias, relu=relu)
    y = np.empty(g.y_shape, dtype=np.float32)
    if gemm.available():  # no im2col matrix: the whole batch in one GEMM per group, bias and ReLU in its store
        for group in range(g.groups):
            rows = slice(group * fg, (group + 1) * fg)
            lib().conv_gemm_forward(_filters(w, g, group).T, x, y[rows].reshape(fg, -1), *_image_args(g, group, 0, g.N),
                                    isa=gemm.isa(), bias=None if bias is None else bias[rows], relu=relu)
        return y
    for group in range(g.groups):
        wt, yg = _filters(w, g, group).T, y[group * fg:(group + 1) * fg]
        chunks = _image_chunks(g)
        for n0, n1 in chunks:
            if len(chunks) == 1:  # the group's rows of y are contiguous: the GEMM writes them
                np.matmul(wt, _cols(x, g, group, n0, n1), out=yg.reshape(fg, -1))
            else:
                yg[..., n0:n1] = (wt @ _cols(x, g, group, n0, n1)).reshape(fg, g.OH, g.OW, n1 - n0)
    _bias_relu(y, bias, relu, g)
    return y


def conv_backward_data(dy, w, input_hw, stride=1, padding=0, groups=1):
    dy, w = contiguous(dy, w)
    g = ConvGeometry.of_backward_data(dy.shape, w.shape, input_hw, stride=stride, padding=padding, groups=groups)
    if winograd.chosen(g, "data"):
        return winograd.conv_backward_data(dy, w, g)
    dx = np.empty(g.x_shape, dtype=np.float32)
    for group in range(g.groups):
        wg = _filters(w, g, group)
        for n0, n1 in _image_chunks(g):
            lib().col2im(gemm.matmul(wg, _dy_rows(dy, g, group, n0, n1)), dx, *_image_args(g, group, n0, n1))
    return dx


def conv_backward_filter(x, dy, filter_hw, stride=1, padding=0, groups=1):
    x, dy = contiguous(x, dy)
    g = ConvGeometry.of_backward_filter(x.shape, dy.shape, filter_hw, stride=stride, padding=padding,
                                        groups=groups)
    if winograd.chosen(g, "filter"):
        return winograd.conv_backward_filter(x, dy, g)
    fg = g.F // g.groups
    dw = np.empty(g.w_shape, dtype=np.float32)
    for group in range(g.groups):
        if gemm.available():  # no im2col matrix: the whole batch in one GEMM
            dwg = dw.reshape(-1, g.F)[:, group * fg:(group + 1) * fg]
            lib().conv_gemm_filter(x, dy[group * fg:(group + 1) * fg].reshape(fg, -1), dwg,
                                   *_image_args(g, group, 0, g.N), isa=gemm.isa())
            continue
        acc = None
        for n0, n1 in _image_chunks(g):
            part = _cols(x, g, group, n0, n1) @ _dy_rows(dy, g, group, n0, n1).T
            acc = part if acc is None else np.add(acc, part, out=acc)
        dw[..., group * fg:(group + 1) * fg] = acc.reshape(g.Cg, g.KH, g.KW, fg)
    return dw


def conv_backward_bias(dy):
    """db[f] = sum over (OH, OW, N) of dy[f] (any shape (F, ...); summed in double, rounded once)."""
    (dy,) = contiguous(dy)
    db = np.empty(dy.shape[0], dtype=np.float32)
    if dy.size == 0:
        db[...] = 0.0
    else:
        lib().bias_sum(dy, db, dy.shape[0], dy.size // dy.shape[0])
    return db
