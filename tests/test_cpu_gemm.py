"""The cpu device's GEMM (``convnet._cpu.gemm``, ``conv_gemm_forward``, ``conv_gemm_filter``; csrc/cpu/gemm*.cpp)
against NumPy in float64 on random data: every SIMD width this CPU runs, strided and transposed operands, sizes that
are not multiples of any tile, the convolutions' im2col operand (strides, padding, groups, part of the batch), both
forms of the filter gradient; results independent of the width and the thread count (one fused multiply-add chain
per element, or the dot form's fixed lanes); the store's epilogue (bias, ReLU) bit-identical to the separate passes
it replaces; bad input is a Python exception."""
import numpy as np
import pytest
from helpers import CPU, rand

import convnet.cpu.gemm as cpu_gemm
import convnet.reference.conv as ref_conv
import convnet.cpu.conv as cpu_conv
from convnet import _cpu, ops
from convnet.cpu import loop_threads, winograd
from convnet.geometry import ConvGeometry

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="this CPU has neither AVX-512 nor AVX2+FMA")

RNG = np.random.default_rng(11)
ISAS = cpu_gemm.isas() if cpu_gemm.available() else ()
EPS = np.finfo(np.float32).eps


def assert_gemm_close(got, a, b, c0=None, relu=False):
    """|got - a @ b (+ c0)| within float32 rounding of the sum of |products| (the error bound of any summation
    order), element by element, with a and b's float64 product as the truth; relu: of max(a @ b (+ c0), 0), within
    the same bound (max(., 0) is 1-Lipschitz: clamping both sides does not increase their difference)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want = a64 @ b64 + (0 if c0 is None else c0)
    if relu:
        want = np.maximum(want, 0.0)
    bound = 2 * EPS * (a.shape[1] + 2) * (np.abs(a64) @ np.abs(b64) + (0 if c0 is None else np.abs(c0))) + 1e-30
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= bound), f"worst error {np.max(err / bound):.2f}x the bound"
    # and not a trivially loose bound: the values are those of the product
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


SHAPES = [(1, 1, 1), (7, 33, 5), (8, 32, 256), (13, 100, 700), (65, 3, 257), (3, 1000, 17), (40, 70, 600),
          (300, 9, 31)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_gemm_matches_numpy(isa, m, n, k):
    a, b = rand(RNG, (m, k)), rand(RNG, (k, n))
    c = np.full((m, n), np.nan, np.float32)
    _cpu.gemm(a, b, c, isa=isa)
    assert_gemm_close(c, a, b)
    c0 = rand(RNG, (m, n))
    c = c0.copy()
    _cpu.gemm(a, b, c, accumulate=True, isa=isa)
    assert_gemm_close(c, a, b, c0.astype(np.float64))


@pytest.mark.parametrize("layout", ["a.T", "b.T", "both.T", "sliced", "c.T", "reversed"])
def test_gemm_takes_any_strides(layout):
    m, n, k = 37, 45, 70
    a, b = rand(RNG, (m, k)), rand(RNG, (k, n))
    c = np.empty((m, n), np.float32)
    if layout == "a.T":
        a = np.ascontiguousarray(a.T).T
    elif layout == "b.T":
        b = np.ascontiguousarray(b.T).T
    elif layout == "both.T":
        a, b = np.ascontiguousarray(a.T).T, np.ascontiguousarray(b.T).T
    elif layout == "sliced":
        a = rand(RNG, (2 * m, 3 * k))[::2, 1::3]
        b = rand(RNG, (k + 5, 2 * n))[5:, ::2]
    elif layout == "c.T":
        c = np.empty((n, m), np.float32).T
    else:
        a, b = a[::-1], b[:, ::-1]
    _cpu.gemm(a, b, c)
    assert_gemm_close(c, a, b)


def test_gemm_of_nothing():
    """K = 0: c = 0 (or left as it is when accumulating); an empty c: nothing to do."""
    c = rand(RNG, (3, 4))
    _cpu.gemm(np.empty((3, 0), np.float32), np.empty((0, 4), np.float32), c)
    np.testing.assert_array_equal(c, 0)
    c0 = rand(RNG, (3, 4))
    c = c0.copy()
    _cpu.gemm(np.empty((3, 0), np.float32), np.empty((0, 4), np.float32), c, accumulate=True)
    np.testing.assert_array_equal(c, c0)
    _cpu.gemm(rand(RNG, (0, 5)), rand(RNG, (5, 4)), np.empty((0, 4), np.float32))


def assert_same_bits(got, want):
    """Bit for bit: -0 is not +0, NaN matches NaN of the same payload."""
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def separate_passes(c, bias, relu):
    """What the store's epilogue replaces: the cpu device's bias pass, then relu_forward (compiled loops)."""
    c = c.copy()
    if bias is not None:
        _cpu.bias_add(c, bias, c.shape[0], c.shape[1])
    if relu:
        _cpu.relu_forward(c, c)
    return c


EPILOGUES = [(False, True), (True, False), (True, True)]  # (bias, relu)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, n, k", SHAPES + [(70, 300, 800)])  # 800: three blocks of k, the epilogue in the last
def test_gemm_store_adds_bias_and_relu(isa, m, n, k):
    """c = relu(a @ b + bias[:, None]) in the store: the GEMM then the separate passes, bit for bit (also from an
    accumulated c and on 2 threads), and the float64 truth within the GEMM's bound."""
    a, b, bias = rand(RNG, (m, k)), rand(RNG, (k, n)), rand(RNG, (m,))
    plain = np.empty((m, n), np.float32)
    _cpu.gemm(a, b, plain, isa=isa)
    c0 = rand(RNG, (m, n))
    accumulated = c0.copy()
    _cpu.gemm(a, b, accumulated, accumulate=True, isa=isa)
    for with_bias, relu in EPILOGUES:
        bb = bias if with_bias else None
        for threads in (1, 2):
            c = np.full((m, n), np.nan, np.float32)
            with loop_threads(threads):
                _cpu.gemm(a, b, c, bias=bb, relu=relu, isa=isa)
            assert_same_bits(c, separate_passes(plain, bb, relu))
            c = c0.copy()
            with loop_threads(threads):
                _cpu.gemm(a, b, c, accumulate=True, bias=bb, relu=relu, isa=isa)
            assert_same_bits(c, separate_passes(accumulated, bb, relu))
        c = np.empty((m, n), np.float32)
        _cpu.gemm(a, b, c, bias=bb, relu=relu, isa=isa)
        assert_gemm_close(c, a, b, None if bb is None else bb.astype(np.float64)[:, None], relu=relu)
        if relu:
            assert (c >= 0).all() and (c == 0).any() == (separate_passes(plain, bb, False) <= 0).any()


@pytest.mark.parametrize("isa", ISAS)
def test_gemm_store_keeps_relus_special_values(isa):
    """relu_forward's rule in the store: NaN -> +0, -0 -> +0; and without relu or bias nothing is added (a -0 stays
    -0). -0 comes from accumulating -0 * x onto c = -0; NaN from a NaN in a; on a full tile and an edge tile."""
    m, n, k = 19, 70, 9
    a, b = rand(RNG, (m, k)), np.abs(rand(RNG, (k, n))) + 0.5
    a[0] = -0.0          # row 0: -0 * b = -0, added to c's -0: -0
    a[17] = -0.0         # and in the edge tile's rows
    a[5, 3] = np.nan     # row 5: NaN
    c0 = np.full((m, n), -0.0, np.float32)
    for with_bias, relu in [(False, False), *EPILOGUES]:
        bias = -np.zeros(m, np.float32) if with_bias else None  # -0 + -0 = -0: the bias keeps the sign too
        c = c0.copy()
        with np.errstate(invalid="ignore"):
            _cpu.gemm(a, b, c, accumulate=True, bias=bias, relu=relu, isa=isa)
        assert_same_bits(c, separate_passes(_plain_accumulated(a, b, c0, isa), bias, relu))
        for row in (0, 17):
            assert (c[row] == 0).all() and np.signbit(c[row]).all() != relu
        assert np.isnan(c[5]).all() != relu and (relu <= (c[5] == 0).all())


def _plain_accumulated(a, b, c0, isa):
    c = c0.copy()
    with np.errstate(invalid="ignore"):
        _cpu.gemm(a, b, c, accumulate=True, isa=isa)
    return c


@pytest.mark.parametrize("threads", [2, 3])
def test_gemm_bits_do_not_depend_on_width_or_threads(threads):
    a, b = rand(RNG, (70, 300)), rand(RNG, (300, 530))
    results = []
    for isa in ISAS:
        for t in (1, threads):
            c = np.empty((70, 530), np.float32)
            with loop_threads(t):
                _cpu.gemm(a, b, c, isa=isa)
            results.append(c)
    for c in results[1:]:
        np.testing.assert_array_equal(c, results[0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("a_layout", ["row-major", "column-major"])
def test_an_unpacked_a_gives_the_packed_bits(isa, a_layout):
    """A plain A that few column tiles use (a fully-connected layer's weights against a batch) is read where it lies
    (rows past the last whole micro-panel packed); the same chains as the packed A of a wide product, bit for bit:
    M not a multiple of either micro-tile, K over two k blocks, with and without accumulation."""
    a = rand(RNG, (53, 700))
    if a_layout == "column-major":
        a = np.asfortranarray(a)
    b = rand(RNG, (700, 640))
    c0 = rand(RNG, (53, 640))
    for accumulate in (False, True):
        narrow, wide = c0[:, :40].copy(), c0.copy()
        _cpu.gemm(a, np.ascontiguousarray(b[:, :40]), narrow, accumulate=accumulate, isa=isa)  # unpacked A
        _cpu.gemm(a, b, wide, accumulate=accumulate, isa=isa)  # 20 column tiles: A packed
        np.testing.assert_array_equal(narrow, wide[:, :40])
        np.testing.assert_allclose(narrow, a.astype(np.float64) @ b[:, :40] + (c0[:, :40] if accumulate else 0),
                                   rtol=1e-4, atol=1e-4)


# (x shape (C, H, W, N), filter (KH, KW), F, stride, padding, groups, images [n0, n1))
CONVS = [((1, 28, 28, 64), (5, 5), 32, 1, 2, 1, (0, 64)),      # the default net's conv1
         ((32, 13, 13, 64), (3, 3), 64, 1, 1, 1, (0, 64)),     # conv2
         ((3, 11, 9, 7), (3, 2), 6, (2, 1), (1, 0), 1, (0, 7)),  # odd everything
         ((6, 8, 8, 5), (3, 3), 8, 3, 1, 2, (1, 4)),           # groups, stride > 1, part of the batch
         ((4, 5, 5, 3), (5, 5), 8, 1, 4, 4, (0, 3)),           # padding that leaves whole rows outside
         ((2, 7, 7, 40), (1, 1), 5, 2, 0, 1, (3, 40)),
         ((2, 3, 3, 1100), (2, 2), 3, 1, 1, 1, (0, 1100))]        # runs of images longer than the dot form's


def _conv_case(case):
    xs, (kh, kw), f, stride, padding, groups, (n0, n1) = case
    x = rand(RNG, xs)
    g = ConvGeometry.of(xs, (xs[0] // groups, kh, kw, f), stride=stride, padding=padding, groups=groups)
    return x, g, n0, n1


def _args(g, group, n0, n1):
    return (g.C, g.H, g.W, g.N, group * g.Cg, g.Cg, n0, n1 - n0, g.KH, g.KW, *g.stride, *g.padding, g.OH, g.OW)


def _cols(x, g, group, n0, n1):
    cols = np.empty((g.Cg * g.KH * g.KW, g.OH * g.OW * (n1 - n0)), np.float32)
    _cpu.im2col(x, cols, *_args(g, group, n0, n1))
    return cols


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CONVS)
def test_conv_forward_gemm_packs_the_image(isa, case):
    x, g, n0, n1 = _conv_case(case)
    fg, k = g.F // g.groups, g.Cg * g.KH * g.KW
    for group in range(g.groups):
        w = rand(RNG, (k, fg)).T  # transposed, as conv_forward passes it
        y = np.full((fg, g.OH * g.OW * (n1 - n0)), np.nan, np.float32)
        _cpu.conv_gemm_forward(w, x, y, *_args(g, group, n0, n1), isa=isa)
        assert_gemm_close(y, w, _cols(x, g, group, n0, n1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CONVS)
def test_conv_forward_gemm_adds_bias_and_relu_in_its_store(isa, case):
    """y = relu(w @ im2col(x) + bias[:, None]) in the GEMM's store: the GEMM then the bias pass and relu_forward,
    bit for bit, on 1 and 2 threads; and the float64 truth (clamped) within the GEMM's bound."""
    x, g, n0, n1 = _conv_case(case)
    fg, k = g.F // g.groups, g.Cg * g.KH * g.KW
    group = g.groups - 1
    w, bias = rand(RNG, (k, fg)).T, rand(RNG, (fg,))
    plain = np.empty((fg, g.OH * g.OW * (n1 - n0)), np.float32)
    _cpu.conv_gemm_forward(w, x, plain, *_args(g, group, n0, n1), isa=isa)
    for with_bias, relu in EPILOGUES:
        bb = bias if with_bias else None
        for threads in (1, 2):
            y = np.full(plain.shape, np.nan, np.float32)
            with loop_threads(threads):
                _cpu.conv_gemm_forward(w, x, y, *_args(g, group, n0, n1), isa=isa, bias=bb, relu=relu)
            assert_same_bits(y, separate_passes(plain, bb, relu))
        assert_gemm_close(y, w, _cols(x, g, group, n0, n1), None if bb is None else bb.astype(np.float64)[:, None],
                          relu=relu)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("geo", [dict(stride=1, padding=2, groups=1), dict(stride=2, padding=1, groups=2),
                                 dict(stride=(2, 1), padding=(0, 1), groups=3)])
def test_cpu_conv_forward_fuses_bias_and_relu(monkeypatch, isa, threads, geo):
    """ops.conv_forward(CPU, ..., relu=True) with and without bias = the unfused forward then relu_forward, bit for
    bit, for each width (CONVNET_CPU_GEMM) and thread count, on awkward shapes (N = 7, odd sizes, groups); the
    bias and ReLU happen in the GEMM's store: the separate passes are not called."""
    monkeypatch.setenv(cpu_gemm.ENV, isa)
    cpu_gemm.isa.cache_clear()
    monkeypatch.setattr(winograd, "chosen", lambda g, pass_="forward": False)
    try:
        x, w, b = rand(RNG, (6, 11, 9, 7)), rand(RNG, (6 // geo["groups"], 3, 5, 12)), rand(RNG, (12,))
        with loop_threads(threads):
            unfused = [ops.relu_forward(CPU, ops.conv_forward(CPU, x, w, bias, **geo)) for bias in (b, None)]

            class NoPasses:  # convnet._cpu without the separate passes
                def __getattr__(self, name):
                    assert name not in ("bias_add", "relu_forward"), f"{name} called: not fused"
                    return getattr(_cpu, name)

            monkeypatch.setattr(cpu_conv, "lib", lambda: NoPasses())
            fused = [ops.conv_forward(CPU, x, w, bias, relu=True, **geo) for bias in (b, None)]
        for got, want in zip(fused, unfused):
            assert_same_bits(got, want)
        want = np.maximum(ref_conv.conv_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                                **geo), 0.0)
        np.testing.assert_allclose(fused[0], want, rtol=1e-5, atol=1e-5)
        assert (fused[0] == 0).mean() > 0.1 and (fused[0] > 0).mean() > 0.1  # the ReLU clamped something
    finally:
        cpu_gemm.isa.cache_clear()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_fc_forward_adds_the_bias_in_the_store(monkeypatch, isa, threads):
    """ops.fc_forward(CPU, x, w, b) = the GEMM then + b[:, None], bit for bit, the bias passed to the GEMM (its
    store adds it); with alpha/beta the op's accumulate rule is unchanged."""
    monkeypatch.setenv(cpu_gemm.ENV, isa)
    cpu_gemm.isa.cache_clear()
    try:
        x, w, b = rand(RNG, (300, 37)), rand(RNG, (75, 300)), rand(RNG, (75,))
        with loop_threads(threads):
            plain = ops.fc_forward(CPU, x, w)
            biases = []
            gemm = _cpu.gemm
            monkeypatch.setattr(_cpu, "gemm", lambda *args, bias=None, **kw: (biases.append(bias),
                                                                              gemm(*args, bias=bias, **kw)))
            got = ops.fc_forward(CPU, x, w, b)
            out = rand(RNG, (75, 37))
            scaled = ops.fc_forward(CPU, x, w, b, out=out.copy(), alpha=0.5, beta=2.0)
        assert len(biases) == 2 and biases[0] is not None and biases[1] is None
        assert_same_bits(got, plain + b[:, None])
        assert_same_bits(scaled, out * np.float32(2.0) + (plain + b[:, None]) * np.float32(0.5))
        np.testing.assert_allclose(got, w.astype(np.float64) @ x + b[:, None], rtol=1e-5, atol=1e-5)
    finally:
        cpu_gemm.isa.cache_clear()


@pytest.mark.parametrize("form", ["packed", "dot"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CONVS)
def test_conv_filter_gemm_packs_the_image(form, isa, case):
    x, g, n0, n1 = _conv_case(case)
    fg, k, p = g.F // g.groups, g.Cg * g.KH * g.KW, g.OH * g.OW * (n1 - n0)
    for group in range(g.groups):
        dy = rand(RNG, (fg, p))
        dw = np.full((k, fg), np.nan, np.float32)
        _cpu.conv_gemm_filter(x, dy, dw, *_args(g, group, n0, n1), isa=isa, form=form)
        cols = _cols(x, g, group, n0, n1)
        assert_gemm_close(dw, cols, dy.T)
        dw0 = rand(RNG, (k, fg))
        dw = dw0.copy()
        _cpu.conv_gemm_filter(x, dy, dw, *_args(g, group, n0, n1), accumulate=True, isa=isa, form=form)
        assert_gemm_close(dw, cols, dy.T, dw0.astype(np.float64))


@pytest.mark.parametrize("form", ["packed", "dot"])
@pytest.mark.parametrize("case", [CONVS[1], CONVS[2], ((5, 9, 9, 24), (3, 3), 16, 1, 1, 1, (0, 24)),
                                  ((3, 10, 10, 48), (5, 5), 9, 1, 2, 1, (0, 48)),
                                  ((3, 16, 16, 20), (3, 3), 7, 1, 1, 1, (0, 20))], ids=str)
def test_conv_filter_bits_do_not_depend_on_width_or_threads(form, case):
    """The dot form's lanes take the same k whatever the tile's rows (the width's tile height, the thread split) and
    blocks of k (the last case: runs of 20 images, which a block's end cuts off their lane pattern, over several
    blocks)."""
    x, g, n0, n1 = _conv_case(case)
    dy = rand(RNG, (g.F, g.OH * g.OW * g.N))
    results = []
    for isa in ISAS:
        for t in (1, 2, 3):
            dw = np.empty((g.Cg * g.KH * g.KW, g.F), np.float32)
            with loop_threads(t):
                _cpu.conv_gemm_filter(x, dy, dw, *_args(g, 0, 0, g.N), isa=isa, form=form)
            results.append(dw)
    for dw in results[1:]:
        np.testing.assert_array_equal(dw, results[0])


def test_conv_filter_propagates_non_finite_values_like_the_reference():
    """The image's padding takes part as zeros, as in the reference's im2col matrix: 0 * inf is NaN in both."""
    x = rand(RNG, (1, 4, 4, 16))
    w = rand(RNG, (1, 3, 3, 2))
    dy = rand(RNG, (2, 4, 4, 16))
    dy[0, 0, 0, 0] = np.inf  # output (0, 0) reads the padding for ky = 0 or kx = 0
    with np.errstate(invalid="ignore"):
        want = ref_conv.conv_backward_filter(x, dy, (3, 3), stride=1, padding=1)
    got = ops.conv_backward_filter(CPU, x, dy, (3, 3), stride=1, padding=1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))


def test_cpu_convolutions_without_this_gemm_use_numpys(monkeypatch):
    """Where this GEMM is not available (no AVX2), the cpu device's convolutions and fc layers run on NumPy's BLAS
    over an im2col matrix: still the reference's results."""
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    x, w = rand(RNG, (6, 9, 8, 5)), rand(RNG, (3, 3, 3, 8))
    geo = dict(stride=2, padding=1, groups=2)
    dy = rand(RNG, ops.conv_output_shape(x.shape, w.shape, **geo))
    b = rand(RNG, (8,))
    relu = np.maximum(ref_conv.conv_forward(x, w, b, **geo), 0)
    np.testing.assert_allclose(ops.conv_forward(CPU, x, w, b, relu=True, **geo), relu, rtol=1e-5, atol=1e-5)
    got = (ops.conv_forward(CPU, x, w, **geo), ops.conv_backward_data(CPU, dy, w, x.shape[1:3], **geo),
           ops.conv_backward_filter(CPU, x, dy, w.shape[1:3], **geo))
    want = (ref_conv.conv_forward(x, w, **geo), ref_conv.conv_backward_data(dy, w, x.shape[1:3], **geo),
            ref_conv.conv_backward_filter(x, dy, w.shape[1:3], **geo))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    fx, fw = rand(RNG, (20, 7)), rand(RNG, (9, 20))
    np.testing.assert_allclose(ops.fc_forward(CPU, fx, fw), fw.astype(np.float64) @ fx, rtol=1e-5, atol=1e-5)


def test_gemm_checks_its_arguments():
    a, b, c = rand(RNG, (4, 5)), rand(RNG, (5, 6)), np.empty((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"a is \(4, 5\) but b is \(6, 5\)"):
        _cpu.gemm(a, b.T.copy(), c)
    with pytest.raises(ValueError, match=r"c has shape \(4, 5\), expected \(4, 6\)"):
        _cpu.gemm(a, b, np.empty((4, 5), np.float32))
    with pytest.raises(ValueError, match="must be a matrix"):
        _cpu.gemm(a[None], b, c)
    with pytest.raises(TypeError):
        _cpu.gemm(a.astype(np.float64), b, c)  # float32 only, never converted
    ro = np.empty((4, 6), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _cpu.gemm(a, b, ro)
    big = rand(RNG, (6, 6))
    with pytest.raises(ValueError, match="c overlaps b"):
        _cpu.gemm(rand(RNG, (6, 6)), big, big)  # c is b
    with pytest.raises(ValueError, match="isa 'sse9' is not available"):
        _cpu.gemm(a, b, c, isa="sse9")
    x = rand(RNG, (2, 5, 5, 3))
    y = np.empty((4, 27), np.float32)
    with pytest.raises(ValueError, match="w has 9 columns, expected 18"):
        _cpu.conv_gemm_forward(rand(RNG, (4, 9)), x, y, 2, 5, 5, 3, 0, 2, 0, 3, 3, 3, 2, 2, 1, 1, 3, 3)
    with pytest.raises(ValueError, match="bad channel/image range"):
        _cpu.conv_gemm_forward(rand(RNG, (4, 18)), x, y, 2, 5, 5, 3, 1, 2, 0, 3, 3, 3, 2, 2, 1, 1, 3, 3)
    with pytest.raises(ValueError, match="x: 150 elements, expected 300"):
        _cpu.conv_gemm_forward(rand(RNG, (4, 18)), x, y, 4, 5, 5, 3, 0, 2, 0, 3, 3, 3, 2, 2, 1, 1, 3, 3)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        _cpu.gemm(a, b, c, bias=rand(RNG, (6,)))
    with pytest.raises(TypeError):
        _cpu.gemm(a, b, c, bias=rand(RNG, (4,)).astype(np.float64))  # float32 only, never converted
    with pytest.raises(ValueError, match="c overlaps bias"):
        _cpu.gemm(a, b, c, bias=c[0, :4])
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        _cpu.conv_gemm_forward(rand(RNG, (4, 18)), x, y, 2, 5, 5, 3, 0, 2, 0, 3, 3, 3, 2, 2, 1, 1, 3, 3,
                               bias=rand(RNG, (3,)))
    with pytest.raises(ValueError, match="form must be"):
        _cpu.conv_gemm_filter(x, rand(RNG, (4, 27)), np.empty((18, 4), np.float32), 2, 5, 5, 3, 0, 2, 0, 3, 3, 3,
                              2, 2, 1, 1, 3, 3, form="fast")


def test_the_width_can_be_chosen(monkeypatch):
    """CONVNET_CPU_GEMM picks the cpu device's width (every width gives the same bits through the ops), or NumPy's
    BLAS; a width this CPU does not run is a clear error."""
    x, w = rand(RNG, (6, 9, 8, 16)), rand(RNG, (3, 3, 3, 8))
    geo = dict(stride=1, padding=1, groups=2)
    dy = rand(RNG, ops.conv_output_shape(x.shape, w.shape, **geo))
    fx, fw = rand(RNG, (20, 7)), rand(RNG, (9, 20))

    def run():
        cpu_gemm.isa.cache_clear()
        return (ops.conv_forward(CPU, x, w, **geo), ops.conv_backward_data(CPU, dy, w, x.shape[1:3], **geo),
                ops.conv_backward_filter(CPU, x, dy, w.shape[1:3], **geo), ops.fc_forward(CPU, fx, fw))

    try:
        results = {}
        for choice in (*ISAS, "numpy"):
            monkeypatch.setenv(cpu_gemm.ENV, choice)
            results[choice] = run()
            assert cpu_gemm.isa() == (None if choice == "numpy" else choice)
        for choice in ISAS[1:]:
            for a, b in zip(results[choice], results[ISAS[0]]):
                np.testing.assert_array_equal(a, b)
        for a, b in zip(results["numpy"], results[ISAS[0]]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        monkeypatch.setenv(cpu_gemm.ENV, "sse9")
        cpu_gemm.isa.cache_clear()
        with pytest.raises(ValueError, match="CONVNET_CPU_GEMM='sse9': this CPU and build run"):
            ops.conv_forward(CPU, x, w, **geo)
    finally:
        monkeypatch.delenv(cpu_gemm.ENV, raising=False)
        cpu_gemm.isa.cache_clear()
