"""Winograd F(2x2, 3x3) on the cpu device (convnet/cpu/winograd.py, csrc/cpu/winograd.cpp): forward, data gradient
and filter gradient against the float64 reference on random geometries, within the error bound docs/training.md
derives ("Winograd convolutions"), which this file computes independently per element; bits independent of the
thread count and the GEMM's SIMD width; the switch and the cost model; bad input."""

import numpy as np
import pytest
from helpers import CPU, load_benchmark, rand

import convnet.reference.conv as ref_conv
from convnet import _cpu, ops
from convnet.cpu import gemm as cpu_gemm
from convnet.cpu import loop_threads, winograd
from convnet.geometry import ConvGeometry

RNG = np.random.default_rng(11)
U32 = 2.0 ** -24  # float32's unit roundoff

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="Winograd runs on this path's own GEMM only")

# The transforms' matrices per output tile m (F(m x m, 3x3)): the module's, which the C++ kernels must match (the
# float64 algorithm below is checked against the direct convolution, the kernels against the float64 reference).
MATRICES = winograd.MATRICES
TILES = winograd.TILES
SLACK = {2: 10, 3: 30}  # roundings of the transforms (4 passes of up to 4 terms, with F(3x3)'s constants and thirds)

# (C, H, W, N, F, padding, groups): odd sizes, 1x1 and 2x1 images, C = 1, N = 1 and N not a multiple of the
# transforms' 16-image (16-filter) blocks, every padding 0..2 (per axis too), groups.
CASES = [
    (1, 5, 7, 3, 2, 1, 1),
    (4, 6, 6, 5, 8, 0, 2),
    (3, 1, 1, 2, 4, 2, 1),
    (2, 2, 1, 17, 3, (2, 1), 1),
    (16, 9, 11, 7, 6, 1, 1),
    (6, 8, 5, 1, 9, 2, 3),
    (5, 4, 9, 33, 5, (0, 2), 1),
    (12, 7, 7, 16, 12, 1, 4),
    (20, 5, 6, 3, 40, 1, 1),  # filters beyond the filter transforms' 16-filter blocks
]


def _pair(p):
    return (p, p) if isinstance(p, int) else p


def _tiles(a, ph, pw, th, tw, m):
    """a (C, H, W, N) zero-padded and cut into overlapping (m + 2)^2 patches: (C, th, tw, m + 2, m + 2, N), patch
    (t, u) at (m t - ph, m u - pw)."""
    c, h, w, n = a.shape
    al = m + 2
    p = np.zeros((c, m * th + 2, m * tw + 2, n))
    rows, cols = min(h, m * th + 2 - ph), min(w, m * tw + 2 - pw)
    p[:, ph:ph + rows, pw:pw + cols] = a[:, :rows, :cols]
    out = np.empty((c, th, tw, al, al, n))
    for i in range(al):
        for j in range(al):
            out[:, :, :, i, j] = p[:, i:i + m * th:m, j:j + m * tw:m]
    return out


def _winograd64(x, w, ph, pw, oh, ow, m, absolute=False):
    """The algorithm F(m x m, 3x3) in float64, one group: y (F, oh, ow, N). With the matrices' and operands'
    absolute values (absolute=True) it is the magnitude the rounding errors scale with."""
    bt, g, at = (np.abs(a) if absolute else a for a in MATRICES[m])
    th, tw = -(-oh // m), -(-ow // m)
    v = np.einsum("ai,bj,ctuijn->ctuabn", bt, bt, _tiles(x, ph, pw, th, tw, m))
    u = np.einsum("ak,bl,cklf->abcf", g, g, w)
    prod = np.einsum("abcf,ctuabn->ftuabn", u, v)
    y = np.einsum("ia,jb,ftuabn->ftiujn", at, at, prod).reshape(w.shape[3], m * th, m * tw, x.shape[3])
    return y[:, :oh, :ow]


def _filter_grad64(x, dy, ph, pw, m, absolute=False):
    """dw (C, 3, 3, F) of one group by the filter-gradient algorithm F(m x m, 3x3) in float64."""
    bt, g, at = (np.abs(a) if absolute else a for a in MATRICES[m])
    f, oh, ow, n = dy.shape
    th, tw = -(-oh // m), -(-ow // m)
    v = np.einsum("ai,bj,ctuijn->ctuabn", bt, bt, _tiles(x, ph, pw, th, tw, m))
    dyp = np.zeros((f, m * th, m * tw, n))
    dyp[:, :oh, :ow] = dy
    dyt = dyp.reshape(f, th, m, tw, m, n).transpose(0, 1, 3, 2, 4, 5)
    z = np.einsum("ia,jb,ftuijn->ftuabn", at, at, dyt)
    d = np.einsum("ctuabn,ftuabn->abcf", v, z)
    return np.einsum("ak,bl,abcf->cklf", g, g, d)


def _per_group(fn, a, w_or_dy, groups, split_second_on_last):
    """fn on each group's channels of a (C, ...) and of the second operand, results joined along their channels."""
    parts = []
    ca = a.shape[0] // groups
    for gi in range(groups):
        b = w_or_dy
        if split_second_on_last:
            fg = b.shape[3] // groups
            b = b[..., gi * fg:(gi + 1) * fg]
        else:
            fg = b.shape[0] // groups
            b = b[gi * fg:(gi + 1) * fg]
        parts.append(fn(a[gi * ca:(gi + 1) * ca], b))
    return parts


def bounds(x, w, dy, padding, groups, m):
    """The per-element error bounds of y, dx, dw: gamma_(K+slack) times the algorithm run on absolute values (K: the
    products' depth, channels per group / filters per group / tiles x images; SLACK[m] covers the transforms'
    roundings)."""
    ph, pw = padding
    ax, aw, ady = np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), np.abs(dy).astype(np.float64)
    f, oh, ow, _ = dy.shape
    _, h, wd, _ = x.shape

    def gamma(k):
        return (k + SLACK[m]) * U32 / (1 - (k + SLACK[m]) * U32)

    y_mag = np.concatenate(_per_group(lambda a, b: _winograd64(a, b, ph, pw, oh, ow, m, True), ax, aw, groups, True))
    rot = aw[:, ::-1, ::-1, :]  # the data gradient's filters: rotated, input and output channels swapped
    dx_mag = np.concatenate(_per_group(
        lambda a, b: _winograd64(a, b.transpose(3, 1, 2, 0), 2 - ph, 2 - pw, h, wd, m, True), ady,
        np.ascontiguousarray(rot), groups, True))
    dw_mag = np.concatenate(_per_group(lambda a, b: _filter_grad64(a, b, ph, pw, m, True), ax, ady, groups, False),
                            axis=3)
    p = -(-oh // m) * -(-ow // m) * x.shape[3]
    return (gamma(w.shape[0]) * y_mag, gamma(f // groups) * dx_mag, gamma(p) * dw_mag)


def _run(x, w, dy, padding, groups, m=None):
    g = ConvGeometry.of(x.shape, w.shape, stride=1, padding=padding, groups=groups)
    return winograd.conv_forward(x, w, g, m=m), winograd.conv_backward_data(dy, w, g, m=m), \
        winograd.conv_backward_filter(x, dy, g, m=m)


def _case(c, h, w, n, f, padding, groups):
    x, wt = rand(RNG, (c, h, w, n)), rand(RNG, (c // groups, 3, 3, f))
    dy = rand(RNG, ops.conv_output_shape(x.shape, wt.shape, stride=1, padding=padding, groups=groups))
    return x, wt, dy


@pytest.mark.parametrize("m", TILES)
def test_the_float64_algorithm_is_the_convolution(m):
    """The test's own float64 Winograd (the bounds' magnitudes come from it) with the module's matrices is exact:
    the reference's results to float64 rounding, so the matrices are right and the bounds measure the algorithm the
    compiled loops implement."""
    x, w, dy = (a.astype(np.float64) for a in _case(3, 7, 6, 4, 5, 1, 1))
    y = _winograd64(x, w, 1, 1, 7, 6, m)
    np.testing.assert_allclose(y, ref_conv.conv_forward(x, w, padding=1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(_filter_grad64(x, dy, 1, 1, m),
                               ref_conv.conv_backward_filter(x, dy, (3, 3), padding=1), rtol=0, atol=1e-12)


def test_the_output_tile_has_the_fewest_products():
    """output_tile: F(3x3) for fmnist's 13x13 (23 x 23 transformed positions, F(1) last tiles counted, against 27 x 27)
    and 6x6 (10 x 10 against 12 x 12), F(2x2) for a 4x4 output (8 x 8 each: ties go to 2) and a 2x2 one, per axis
    too."""
    assert winograd.output_tile(13, 13) == winograd.output_tile(6, 6) == 3
    assert winograd.output_tile(4, 4) == winograd.output_tile(2, 2) == winograd.output_tile(1, 1) == 2
    assert winograd.output_tile(2, 5) == 2 and winograd.output_tile(3, 9) == 3


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_the_float64_reference_within_the_bound(case, m):
    c, h, wd, n, f, padding, groups = case
    pad = _pair(padding)
    x, w, dy = _case(*case)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    geo = dict(stride=1, padding=pad, groups=groups)
    want = (ref_conv.conv_forward(x64, w64, **geo), ref_conv.conv_backward_data(dy64, w64, (h, wd), **geo),
            ref_conv.conv_backward_filter(x64, dy64, (3, 3), **geo))
    for name, got, exp, bound in zip(("y", "dx", "dw"), _run(x, w, dy, pad, groups, m), want,
                                     bounds(x, w, dy, pad, groups, m)):
        assert got.shape == exp.shape and got.dtype == np.float32
        err = np.abs(got.astype(np.float64) - exp)
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert np.all(err <= bound), f"{name}: error {err[worst]:.3g} above the bound {bound[worst]:.3g} at {worst}"
        # the bound is tight enough to mean something: far below the values themselves (F(3x3)'s larger matrix
        # entries, up to 4 in A^T, make its magnitudes and so its bound about 10x F(2x2)'s)
        assert bound.max() < (1e-3 if m == 2 else 1e-2) * np.abs(exp).max()


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("case", [(6, 7, 5, 70, 40, 1, 1), (4, 5, 5, 97, 6, (2, 0), 2)], ids=str)
def test_many_blocks_of_images_match_the_reference_within_the_bound(case, m):
    """Batches of several blocks of images (32 wide with AVX-512, 16 with AVX2) and a ragged last one: every block's
    outputs land in their place, and the filter gradient's chain runs on across the blocks."""
    c, h, wd, n, f, padding, groups = case
    pad = _pair(padding)
    x, w, dy = _case(*case)
    geo = dict(stride=1, padding=pad, groups=groups)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    want = (ref_conv.conv_forward(x64, w64, **geo), ref_conv.conv_backward_data(dy64, w64, (h, wd), **geo),
            ref_conv.conv_backward_filter(x64, dy64, (3, 3), **geo))
    for name, got, exp, bound in zip(("y", "dx", "dw"), _run(x, w, dy, pad, groups, m), want,
                                     bounds(x, w, dy, pad, groups, m)):
        assert np.all(np.abs(got - exp) <= bound), name


@pytest.mark.parametrize("isa", cpu_gemm.isas())
def test_the_forward_adds_the_bias_and_applies_the_relu_in_its_store(monkeypatch, isa):
    """bias and relu=True give the bits of a bias pass and relu_forward's rule (v > 0 ? v : +0) after the plain
    convolution, zero and negative outputs included."""
    monkeypatch.setattr(cpu_gemm, "isa", lambda: isa)
    x, w, _ = _case(6, 7, 9, 35, 13, 1, 1)
    bias = rand(RNG, 13)
    bias[::4] = 0.0
    g = ConvGeometry.of(x.shape, w.shape, padding=1)
    plain = winograd.conv_forward(x, w, g)
    with_bias = plain + bias[:, None, None, None]
    np.testing.assert_array_equal(winograd.conv_forward(x, w, g, bias=bias), with_bias)
    fused = winograd.conv_forward(x, w, g, bias=bias, relu=True)
    assert (with_bias <= 0).mean() > 0.2  # the ReLU has work
    np.testing.assert_array_equal(fused, np.where(with_bias > 0, with_bias, np.float32(0)))
    assert not np.signbit(fused).any()
    np.testing.assert_array_equal(winograd.conv_forward(x, w, g, relu=True), np.where(plain > 0, plain, 0))


def test_the_ops_on_the_cpu_device_use_it_when_asked():
    """algorithm("winograd") (--cpu-conv winograd): the ops (bias, alpha/beta accumulation included) give the reference's results to
    float32 rounding, and not the direct path's bits (Winograd really ran)."""
    x, w, dy = _case(8, 9, 7, 5, 6, 1, 2)
    bias, prev = rand(RNG, 6), rand(RNG, dy.shape)
    geo = dict(stride=1, padding=1, groups=2)
    direct = ops.conv_forward(CPU, x, w, bias, **geo)
    with winograd.algorithm("winograd"):
        y = ops.conv_forward(CPU, x, w, bias, **geo)
        acc = ops.conv_forward(CPU, x, w, bias, **geo, out=prev.copy(), alpha=0.5, beta=2.0)
        dx = ops.conv_backward_data(CPU, dy, w, (9, 7), **geo)
        dw = ops.conv_backward_filter(CPU, x, dy, (3, 3), **geo)
    assert winograd.algo() == "auto"  # restored on leaving
    want = ref_conv.conv_forward(x.astype(np.float64), w.astype(np.float64), bias.astype(np.float64), **geo)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acc, 0.5 * want + 2.0 * prev, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, ref_conv.conv_backward_data(dy.astype(np.float64), w.astype(np.float64), (9, 7),
                                                               **geo), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_conv.conv_backward_filter(x.astype(np.float64), dy.astype(np.float64), (3, 3),
                                                                 **geo), rtol=1e-5, atol=1e-4)
    assert not np.array_equal(y, direct)


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case", [(20, 10, 9, 37, 72, 1, 1), (72, 5, 6, 67, 64, 2, 1)], ids=str)
def test_threads_and_simd_width_do_not_change_the_bits(monkeypatch, threads, case, m):
    """Every transformed element is one lane's fixed sequence of operations, every product element one chain of
    fused multiply-adds in a fixed order (the filter gradient's over all tiles and images): the same bits at any
    thread count (the forward's split of tiles and blocks of images, the filter gradient's split of filters) and
    with every SIMD width this CPU runs (AVX2, AVX-512: other micro-tiles and blocks of images)."""
    x, w, dy = _case(*case)
    with loop_threads(1):
        one = _run(x, w, dy, _pair(case[5]), 1, m)
    for isa in cpu_gemm.isas():
        monkeypatch.setattr(cpu_gemm, "isa", lambda isa=isa: isa)
        with loop_threads(threads):
            many = _run(x, w, dy, _pair(case[5]), 1, m)
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)


def test_the_switch_and_the_cost_model():
    """auto (the default) what the measured cost model prefers, per pass; direct never; winograd every eligible
    layer. The default fmnist net: every pass of conv2 and conv3 by Winograd. AlexNet's conv3-5: the forward and
    data gradient from 32 images, the filter gradient at any batch; 1-channel layers never."""
    fm2 = ConvGeometry.of((32, 13, 13, 64), (32, 3, 3, 64), padding=1)
    fm3 = ConvGeometry.of((64, 6, 6, 64), (64, 3, 3, 128), padding=1)
    alex = [ConvGeometry.of((256, 13, 13, n), (256, 3, 3, 384), padding=1) for n in (16, 128)] + \
        [ConvGeometry.of((384, 13, 13, 128), (192, 3, 3, 256), padding=1, groups=2)]
    grey = ConvGeometry.of((1, 28, 28, 64), (1, 3, 3, 32), padding=1)  # a first layer: 1 channel
    strided = ConvGeometry.of((256, 13, 13, 16), (256, 3, 3, 384), stride=2, padding=1)
    five = ConvGeometry.of((256, 13, 13, 16), (256, 5, 5, 256), padding=2)
    padded = ConvGeometry.of((256, 13, 13, 16), (256, 3, 3, 256), padding=3)
    assert winograd.algo() == "auto"

    def passes(g):
        return tuple(p for p in winograd.PASSES if winograd.chosen(g, p))

    assert passes(fm2) == passes(fm3) == winograd.PASSES
    assert [passes(g) for g in alex] == [("filter",), winograd.PASSES, winograd.PASSES]
    assert not any(passes(g) for g in (grey, strided, five, padded))
    with winograd.algorithm("winograd"):
        assert all(passes(g) == winograd.PASSES for g in (fm2, fm3, grey, *alex))
        assert not any(passes(g) for g in (strided, five, padded))
        with winograd.algorithm("direct"):
            assert not any(passes(g) for g in (fm2, fm3, *alex))
        assert winograd.algo() == "winograd"
    with pytest.raises(ValueError, match="convolution pass 'backward'"):
        winograd.chosen(fm2, "backward")


def test_ragged_last_tiles_are_f1_where_m_leaves_one_output():
    """tile_kinds: the last tile along an axis is F(1, 3) (the direct products along it) where m leaves one output,
    whole otherwise; the C++ transform lays out the same kinds (its size check agrees on every small output), and
    output_tile counts them: fmnist's 13x13 by F(3x3) is 23 x 23 transformed rows, not 25 x 25."""
    assert winograd.tile_kinds(3, 13, 13) == [(3, 3), (3, 1), (1, 3), (1, 1)]
    assert winograd.tile_kinds(3, 6, 6) == [(3, 3)] and winograd.tile_kinds(3, 14, 13) == [(3, 3), (3, 1)]
    assert winograd.tile_kinds(2, 7, 8) == [(2, 2), (1, 2)] and winograd.tile_kinds(2, 1, 1) == [(1, 1)]
    w = rand(RNG, (2, 3, 3, 4))
    for m in TILES:
        for oh in range(1, 8):
            for ow in range(1, 8):
                elements = sum((a + 2) * (b + 2) for a, b in winograd.tile_kinds(m, oh, ow))
                _cpu.winograd_filter(w, np.empty(elements * 8, np.float32), 2, 4, 0, 4, False, m=m, oh=oh, ow=ow)
                with pytest.raises(ValueError, match="U has"):
                    _cpu.winograd_filter(w, np.empty(elements * 8 - 8, np.float32), 2, 4, 0, 4, False, m=m, oh=oh,
                                         ow=ow)
    assert winograd.output_tile(13, 13) == 3 and winograd.output_tile(7, 7) == 3 and winograd.output_tile(5, 5) == 3


def test_bad_input_is_a_clear_error():
    x, w, _ = _case(2, 5, 5, 3, 4, 1, 1)
    with pytest.raises(ValueError, match="algorithm 'fast': expected one of direct, winograd, auto"):
        winograd.algorithm("fast")
    with pytest.raises(ValueError, match="needs 3x3 filters, stride 1"):
        winograd.conv_forward(x, w, ConvGeometry.of(x.shape, w.shape, stride=2, padding=1))
    g = ConvGeometry.of(x.shape, w.shape, padding=1)
    # u and D for a 5x5 output by F(2x2): 2x2 tiles, F(1) last columns and rows, 49 elements (tile_kinds)
    u, y, d = np.zeros(49 * 2 * 4, np.float32), np.empty(g.y_shape, np.float32), np.empty(49 * 2 * 4, np.float32)
    dy = rand(RNG, g.y_shape)
    _cpu.winograd_conv(x, u, y, 2, 5, 5, 3, 0, 2, 1, 1, 4, 0, 4, 5, 5)  # the right sizes: fine
    _cpu.winograd_filter_products(x, dy, d, 2, 5, 5, 3, 0, 2, 1, 1, 4, 0, 4, 5, 5)
    with pytest.raises(ValueError, match="u has 392 elements, expected 784"):
        _cpu.winograd_conv(x, u, y, 2, 5, 5, 3, 0, 2, 1, 1, 8, 0, 8, 5, 5)
    with pytest.raises(ValueError, match="bad channel range"):
        _cpu.winograd_conv(x, u, y, 2, 5, 5, 3, 1, 2, 1, 1, 4, 0, 4, 5, 5)
    with pytest.raises(ValueError, match="padding must be 0..2"):
        _cpu.winograd_conv(x, u, y, 2, 5, 5, 3, 0, 2, 3, 3, 4, 0, 4, 9, 9)
    with pytest.raises(ValueError, match="output size is not"):
        _cpu.winograd_conv(x, u, y, 2, 5, 5, 3, 0, 2, 1, 1, 4, 0, 4, 4, 5)
    with pytest.raises(ValueError, match="x has 150 elements, expected 200"):
        _cpu.winograd_conv(x, u, y, 2, 5, 5, 4, 0, 2, 1, 1, 4, 0, 4, 5, 5)
    with pytest.raises(ValueError, match="m \\(the output tile\\) must be 2 or 3"):
        _cpu.winograd_conv(x, u, y, 2, 5, 5, 3, 0, 2, 1, 1, 4, 0, 4, 5, 5, m=4)
    with pytest.raises(ValueError, match="m \\(the output tile\\) must be 2 or 3"):
        _cpu.winograd_filter_products(x, dy, d, 2, 5, 5, 3, 0, 2, 1, 1, 4, 0, 4, 5, 5, m=1)
    with pytest.raises(ValueError, match="m \\(the output tile\\) must be 2 or 3"):
        _cpu.winograd_filter(w, u, 2, 4, 0, 4, False, m=5, oh=5, ow=5)
    with pytest.raises(ValueError, match="u_layout must be"):
        _cpu.winograd_conv(x, u, y, 2, 5, 5, 3, 0, 2, 1, 1, 4, 0, 4, 5, 5, u_layout="cf")
    with pytest.raises(ValueError, match="bias must have shape"):
        _cpu.winograd_conv(x, u, y, 2, 5, 5, 3, 0, 2, 1, 1, 4, 0, 4, 5, 5, bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="overlaps x"):
        _cpu.winograd_conv(x, np.zeros(49 * 2 * 2, np.float32), x, 2, 5, 5, 3, 0, 2, 1, 1, 2, 0, 2, 5, 5)
    with pytest.raises(ValueError, match="sizes must be positive"):
        _cpu.winograd_filter_products(x, dy, d, 2, 5, 5, 0, 0, 2, 1, 1, 4, 0, 4, 5, 5)
    with pytest.raises(ValueError, match="dy has 300 elements, expected 600"):
        _cpu.winograd_filter_products(x, dy, d, 2, 5, 5, 3, 0, 2, 1, 1, 8, 0, 4, 5, 5)
    with pytest.raises(ValueError, match="D has 392 elements, expected 196"):
        _cpu.winograd_filter_products(x, dy, d, 2, 5, 5, 3, 0, 1, 1, 1, 4, 0, 4, 5, 5)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.empty((16, 4, 2), np.float32)
        ro.flags.writeable = False
        _cpu.winograd_filter(w, ro, 2, 4, 0, 4, False, m=2, oh=4, ow=4)
    with pytest.raises(ValueError, match="U has 128 elements, expected 224"):
        _cpu.winograd_filter(w, np.empty((16, 4, 2), np.float32), 2, 4, 0, 4, False, m=2, oh=4, ow=5)
    with pytest.raises(TypeError):
        _cpu.winograd_filter(w.astype(np.float64), np.empty((16, 4, 2)), 2, 4, 0, 4, False, m=2, oh=4, ow=4)


def test_the_benchmark_runs(capsys):
    """benchmarks/winograd_bench.py end to end on its smallest layer, leaving the algorithm as it found it."""
    load_benchmark("winograd_bench").main(["--layers", "fmnist conv3", "--rounds", "1", "--repeats", "1"])
    assert winograd.algo() == "auto"
    out = capsys.readouterr().out
    assert "| fmnist conv3 | 64->128, 6x6, 64 | 3x3 |" in out and "| forward, data, filter |" in out
    assert "thread(s)" in out
