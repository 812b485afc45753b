"""Pooling: NumPy reference (gradient checks, conventions) and, when built, the emu/cuda kernels against it."""
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from convnet import ops
from convnet.devices import Device
from convnet.geometry import PoolGeometry, output_size, pair
from convnet.reference import pool as ref
from helpers import (EMU, NUMPY, assert_close, assert_identical, assert_raises_each, assert_schedules_identical,
                     check_grad, misaligned, rand, to_host)


def distinct(rng, shape, dtype=np.float64):
    """Values spaced >= 1e-3 apart: no ties, no kinks for central differences."""
    n = int(np.prod(shape))
    return (rng.permutation(n).astype(dtype) * 1e-2 + rng.uniform(0, 1e-3, n)).reshape(shape) - n * 5e-3


def naive_pool(x, mode, win, st, pad):
    C, H, W, N = x.shape
    OH = (H + 2 * pad[0] - win[0]) // st[0] + 1
    OW = (W + 2 * pad[1] - win[1]) // st[1] + 1
    y = np.zeros((C, OH, OW, N), x.dtype)
    for oh in range(OH):
        for ow in range(OW):
            h0, w0 = oh * st[0] - pad[0], ow * st[1] - pad[1]
            blk = x[:, max(h0, 0):min(h0 + win[0], H), max(w0, 0):min(w0 + win[1], W), :]
            y[:, oh, ow, :] = blk.max(axis=(1, 2)) if mode == "max" else blk.mean(axis=(1, 2))
    return y


def test_alexnet_output_sizes():
    sizes = [55]
    for _ in range(3):
        sizes.append(output_size(sizes[-1], 3, 2, 0))
    assert sizes == [55, 27, 13, 6]
    assert output_size(224, 2, 2, 0) == 112
    assert output_size(7, 3, 2, 1) == 4


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("geom", [(3, 2, 0), (2, 2, 0), (3, 2, 1), ((3, 2), (2, 1), (1, 0)), (1, 1, 0), (5, 3, 2)])
def test_reference_matches_naive(mode, geom):
    rng = np.random.default_rng(1)
    win, st, pad = (pair("g", g) for g in geom)
    x = rng.standard_normal((3, 9, 8, 5))
    y = ref.pool_forward(x, mode=mode, window=win, stride=st, padding=pad)
    np.testing.assert_allclose(y, naive_pool(x, mode, win, st, pad), rtol=1e-12)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("geom", [(3, 2, 0), (2, 2, 0), (3, 2, 1), ((3, 2), (1, 2), (1, 1)), (3, 3, 1)])
def test_reference_gradient(mode, geom):
    rng = np.random.default_rng(2)
    win, st, pad = geom
    x = distinct(rng, (2, 7, 6, 3))
    kw = dict(mode=mode, window=win, stride=st, padding=pad)
    y = ref.pool_forward(x, **kw)
    r = rng.standard_normal(y.shape)
    dx = ref.pool_backward(x, y, r, **kw)
    check_grad(lambda z: float((ref.pool_forward(z, **kw) * r).sum()), x, dx, n=84)


def test_reference_max_ties_all_receive():
    # every input equal to the window max gets the full window gradient (cuda-convnet's recompute rule)
    x = np.zeros((1, 3, 3, 1))
    y = ref.pool_forward(x, mode="max", window=3, stride=2)
    dx = ref.pool_backward(x, y, np.full(y.shape, 2.0), mode="max", window=3, stride=2)
    np.testing.assert_array_equal(dx, np.full(x.shape, 2.0))
    # overlapping windows: a shared maximum collects both windows' gradients
    x = np.array([1., 0, 5, 0, 1]).reshape(1, 1, 5, 1)
    y = ref.pool_forward(x, mode="max", window=(1, 3), stride=(1, 2))
    dx = ref.pool_backward(x, y, np.array([1., 10.]).reshape(1, 1, 2, 1), mode="max", window=(1, 3), stride=(1, 2))
    np.testing.assert_array_equal(dx.ravel(), [0, 0, 11, 0, 0])


def test_reference_float32_dtype():
    x = np.random.default_rng(0).standard_normal((2, 13, 13, 4)).astype(np.float32)
    y = ref.pool_forward(x, mode="avg", window=3, stride=2)
    assert y.dtype == np.float32 and y.shape == (2, 6, 6, 4)
    assert ref.pool_backward(x, y, y, mode="avg", window=3, stride=2).dtype == np.float32


@pytest.mark.parametrize("bad", [dict(window=0), dict(stride=0), dict(padding=2, window=3), dict(window=9)])
def test_reference_bad_geometry(bad):
    kw = dict(mode="max", window=3, stride=2, padding=0)
    kw.update(bad)
    with pytest.raises(ValueError):
        ref.pool_forward(np.zeros((1, 5, 5, 1)), **kw)


# ---------------------------------------------------------------------------------------------------- op layer
def run_pool(dev, x, mode, geom, dy=None):
    """Forward (and backward with dy) on a device from host arrays; returns host arrays."""
    win, st, pad = geom
    kw = dict(mode=mode, window=win, stride=st, padding=pad)
    xd = dev.asarray(x)
    y = ops.pool_forward(dev, xd, **kw)
    if dy is None:
        return to_host(y)
    dx = ops.pool_backward(dev, xd, y, dev.asarray(dy), **kw)
    return to_host(y), to_host(dx)


def assert_bit_identical_to_reference(y, dx, x, dy, **kw):
    """The emulated kernels do the float32 reference's operations in the same order: y and dx are bit-identical
    (NaN where the reference has NaN)."""
    y_ref = ref.pool_forward(x, **kw)
    assert_identical("y", y, y_ref)
    assert_identical("dx", dx, ref.pool_backward(x, y_ref, dy, **kw))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_device_op(dtype):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 7, 7, 4)).astype(dtype)
    out = np.full((3, 3, 3, 4), np.nan, dtype)
    y = ops.pool_forward(NUMPY, x, out=out)
    assert y is out and y.dtype == dtype
    np.testing.assert_array_equal(y, ref.pool_forward(x))
    dx = ops.pool_backward(NUMPY, x, y, y, mode="max", window=3, stride=2, padding=0)
    np.testing.assert_array_equal(dx, ref.pool_backward(x, y, y))


# (C, H, W, N), window, stride, padding: AlexNet's pools at small batch / few channels, 2x2/2, odd sizes, padding
KERNEL_CASES = [
    ((3, 55, 55, 8), 3, 2, 0),          # AlexNet pool1 (55 -> 27), 16-byte path
    ((4, 27, 27, 4), 3, 2, 0),          # pool2 (27 -> 13)
    ((5, 13, 13, 12), 3, 2, 0),         # pool5 (13 -> 6)
    ((2, 8, 8, 32), 2, 2, 0),           # 2x2/2, one full warp of images
    ((3, 9, 7, 5), 3, 2, 1),            # odd N (scalar path), padding
    ((2, 11, 6, 3), (3, 2), (2, 1), (1, 1)),  # rectangular everything, generic window
    ((1, 7, 9, 33), 5, 3, 2),           # large window, padding 2, N = 33
    ((2, 4, 4, 6), 1, 1, 0),            # 1x1 identity
    ((2, 6, 6, 4), 4, 1, 2),            # stride 1, even window, maximal padding
]


def case_id(c):
    return "x".join(map(str, c[0])) + f"-w{c[1]}-s{c[2]}-p{c[3]}"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.sanitize
def test_kernel_matches_reference(kernel_device, case, mode):
    shape, *geom = case
    rng = np.random.default_rng(zlib.crc32(case_id(case).encode()))
    x = rand(rng, shape)
    dy = rand(rng, ops.pool_output_shape(shape, window=geom[0], stride=geom[1], padding=geom[2]))
    y, dx = run_pool(kernel_device, x, mode, geom, dy)
    kw = dict(mode=mode, window=geom[0], stride=geom[1], padding=geom[2])
    y_ref = ref.pool_forward(x, **kw)
    dx_ref = ref.pool_backward(x, y_ref, dy, **kw)
    if kernel_device.kind == "emu":  # same operations in the same order as the float32 reference: bit-exact
        assert_identical("y", y, y_ref)
        assert_identical("dx", dx, dx_ref)
    else:
        assert_close("y", y, y_ref, rtol=1e-6, atol=1e-7)
        assert_close("dx", dx, dx_ref, rtol=1e-6, atol=1e-6)


def test_alexnet_chain(kernel_device):
    rng = np.random.default_rng(11)
    x = rand(rng, (2, 55, 55, 4), low=0.0)
    sizes = []
    d = kernel_device.asarray(x)
    for _ in range(3):
        d = ops.pool_forward(kernel_device, d, mode="max", window=3, stride=2)
        sizes.append(d.shape[1:3])
    assert sizes == [(27, 27), (13, 13), (6, 6)]


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.sanitize
def test_kernel_ties(kernel_device, mode):
    """Integer-valued inputs (many ties, e.g. post-ReLU zeros): every tied maximum receives the window gradient."""
    rng = np.random.default_rng(12)
    x = rng.integers(0, 3, (3, 13, 13, 8)).astype(np.float32)
    x[0] = 0.0  # a whole map of zeros
    dy = rng.integers(1, 4, (3, 6, 6, 8)).astype(np.float32)
    y, dx = run_pool(kernel_device, x, mode, (3, 2, 0), dy)
    dx_ref = ref.pool_backward(x, y, dy, mode=mode, window=3, stride=2)
    assert_close("dx", dx, dx_ref, rtol=1e-6)
    if mode == "max":
        # map 0 is all ties: dx = sum of dy over the windows containing each input
        cover = ref.pool_backward(np.zeros((1, 13, 13, 8)), np.zeros((1, 6, 6, 8)), dy[:1].astype(np.float64),
                                  mode="max", window=3, stride=2)
        np.testing.assert_array_equal(dx[0], cover[0])
        assert dx[0].sum() > dy[0].sum()  # ties are not split: the gradient is replicated


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_schedules_identical(mode):
    rng = np.random.default_rng(13)
    x = rng.integers(0, 4, (2, 9, 9, 8)).astype(np.float32)
    dy = rand(rng, (2, 5, 5, 8))
    assert_schedules_identical(lambda: run_pool(EMU, x, mode, (3, 2, 1), dy), ("y", "dx"), seed=3)


def test_bad_inputs(kernel_device):
    dev = kernel_device
    x = dev.asarray(np.zeros((2, 7, 7, 4), np.float32))
    fwd, bwd = ops.pool_forward, ops.pool_backward
    assert_raises_each(
        (TypeError, "x must have dtype float32", lambda: fwd(dev, dev.asarray(np.zeros((2, 7, 7, 4), np.float64)))),
        (TypeError, "x must be a", lambda: fwd(dev, [[1.0]])),
        (ValueError, "x must be 4-D", lambda: fwd(dev, dev.asarray(np.zeros((7, 7, 4), np.float32)))),
        (ValueError, "C-contiguous", lambda: fwd(dev, x[:, :, :, ::2])),
        (ValueError, "padding", lambda: fwd(dev, x, window=3, padding=2)),
        (ValueError, "larger than the padded input", lambda: fwd(dev, x, window=9)),
        (ValueError, "mode", lambda: fwd(dev, x, mode="min")),
        (ValueError, "stride must be >= 1", lambda: fwd(dev, x, stride=0)),
        (TypeError, "window", lambda: fwd(dev, x, window=2.5)),
        (ValueError, "out must have shape", lambda: fwd(dev, x, out=dev.empty((2, 4, 4, 4), np.float32))),
    )
    y = fwd(dev, x)
    kw = dict(mode="max", window=3, stride=2, padding=0)
    assert_raises_each(
        (ValueError, "dy must have shape", lambda: bwd(dev, x, y, x, **kw)),
        (ValueError, "y .the forward output. is required", lambda: bwd(dev, x, None, y, **kw)),
        (ValueError, "overlap", lambda: bwd(dev, x, y, y, out=x, **kw)),
    )


def test_launcher_rejects_bad_geometry():
    """The C++ launchers re-check geometry and raise ValueError (std::invalid_argument) rather than launch."""
    k = Device("emu").kernels
    buf = np.zeros(64, np.float32)
    p = buf.ctypes.data

    def raw(c, h, w, n, wh, ww, sh, sw, ph, pw, oh=2, ow=2):
        """Named fields as the bindings read them, without convnet.geometry's own validation."""
        return SimpleNamespace(C=c, H=h, W=w, N=n, window_h=wh, window_w=ww, stride_h=sh, stride_w=sw, pad_h=ph,
                               pad_w=pw, OH=oh, OW=ow)

    with pytest.raises(ValueError, match="padding"):
        k.pool_forward(p, p, raw(1, 4, 4, 1, 3, 3, 1, 1, 2, 2), 0, 0)
    with pytest.raises(ValueError, match="mode"):
        k.pool_forward(p, p, raw(1, 4, 4, 1, 3, 3, 1, 1, 0, 0), 7, 0)
    with pytest.raises(ValueError, match="positive"):
        k.pool_forward(p, p, raw(0, 4, 4, 1, 3, 3, 1, 1, 0, 0), 0, 0)
    with pytest.raises(ValueError, match="disagree on the output size"):
        k.pool_forward(p, p, raw(1, 4, 4, 1, 3, 3, 1, 1, 0, 0, oh=3), 0, 0)
    with pytest.raises(ValueError, match="null"):
        k.pool_backward(p, 0, p, p, PoolGeometry.of((1, 4, 4, 1), window=3, stride=1), 0, 0)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_emu_misaligned_pointers(mode):
    """N % 4 == 0 but a pointer off a 16-byte boundary: the launcher must take the scalar path (and be right)."""
    dev = EMU
    rng = np.random.default_rng(14)
    x = misaligned(rand(rng, (3, 11, 11, 8)))
    kw = dict(mode=mode, window=3, stride=2, padding=1)
    y = ops.pool_forward(dev, x, **kw)
    dy = misaligned(rand(rng, y.shape))
    dx = ops.pool_backward(dev, x, y, dy, out=misaligned(np.zeros(x.shape, np.float32)), **kw)
    assert_bit_identical_to_reference(y, dx, x, dy, **kw)


@st.composite
def pool_geometries(draw):
    wh, ww = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, wh // 2)), draw(st.integers(0, ww // 2))
    H = draw(st.integers(max(1, wh - 2 * ph), 14))
    W = draw(st.integers(max(1, ww - 2 * pw), 14))
    C, N = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 4, 5, 8, 12, 33]))
    ties = draw(st.booleans())
    return (C, H, W, N), (wh, ww), (sh, sw), (ph, pw), ties


@settings(max_examples=60, deadline=None)
@given(g=pool_geometries(), mode=st.sampled_from(["max", "avg"]))
def test_emu_random_geometry(g, mode):
    shape, win, stride, pad, ties = g
    rng = np.random.default_rng(abs(hash((shape, win, stride, pad))) % 2**32)
    x = rng.integers(0, 3, shape).astype(np.float32) if ties else rand(rng, shape)
    dy = rand(rng, ops.pool_output_shape(shape, window=win, stride=stride, padding=pad))
    y, dx = run_pool(EMU, x, mode, (win, stride, pad), dy)
    assert_bit_identical_to_reference(y, dx, x, dy, mode=mode, window=win, stride=stride, padding=pad)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_emu_nan_propagates_like_reference(mode):
    dev = EMU
    rng = np.random.default_rng(15)
    for shape in ((2, 9, 9, 8), (2, 9, 9, 3)):    # 16-byte and scalar paths; 3x3/2 takes the strip kernel for max
        x = rand(rng, shape)
        x[0, 4, 4, :] = np.nan
        x[1, 0, 0, 1] = np.nan
        kw = dict(mode=mode, window=3, stride=2, padding=1)
        y = ops.pool_forward(dev, x, **kw)
        y_ref = ref.pool_forward(x, **kw)
        assert np.isnan(y_ref).any()
        assert_identical("y", y, y_ref)
        dy = rand(rng, y.shape)
        assert_identical("dx", ops.pool_backward(dev, x, y, dy, **kw), ref.pool_backward(x, y_ref, dy, **kw))


# (C, H, W, N), window, stride, padding, mode: AlexNet's 3x3/2, blocks of 32 images and a ragged last block (45),
# odd and non-square windows, padding and avg (the reference's path on cpu)
RELU_INPUT_CASES = [((3, 9, 11, 45), 3, 2, 0, "max"), ((2, 8, 7, 3), (3, 2), (2, 1), 0, "max"),
                    ((2, 9, 9, 33), 3, 2, 1, "max"), ((2, 7, 8, 5), 3, 2, 0, "avg")]


@pytest.mark.parametrize("case", RELU_INPUT_CASES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_relu_input_is_the_relu_backward_of_the_pool_gradient(any_device, case, threads):
    """pool_backward(relu_input=True) == relu_backward(x, pool_backward(...)) bit for bit (the mask the net fuses
    into the pool: the pool's input is the ReLU's output), on every device, 1 and 2 loop threads; x with ties (small
    integers through a ReLU: many zeros, equal maxima) and x with negatives (not a ReLU's output: still that rule)."""
    from convnet.cpu import loop_threads
    dev = any_device
    shape, win, stride, pad, mode = case
    kw = dict(mode=mode, window=win, stride=stride, padding=pad)
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    ties = np.maximum(rng.integers(-3, 4, shape), 0).astype(np.float32)
    for x in (ties, rand(rng, shape)):
        x = dev.asarray(x)
        y = ops.pool_forward(dev, x, **kw)
        dy = dev.asarray(rand(rng, y.shape))
        with loop_threads(threads):
            fused = to_host(ops.pool_backward(dev, x, y, dy, relu_input=True, **kw))
            unfused = to_host(ops.relu_backward(dev, x, ops.pool_backward(dev, x, y, dy, **kw)))
        assert fused.dtype == np.float32 and (fused == 0).any() and (fused != 0).any()
        np.testing.assert_array_equal(fused.view(np.uint32), unfused.view(np.uint32))  # +0 and -0 apart too
        # against the reference: up to 4 overlapping windows' dy summed, the cpu loop's order may differ (an ulp)
        want = ref.pool_backward(to_host(x), to_host(y), to_host(dy), relu_input=True, **kw)
        assert_close("dx", fused, want, rtol=1e-6, atol=1e-6)


def test_relu_input_must_be_a_bool():
    x = rand(np.random.default_rng(3), (1, 5, 5, 2))
    y = ops.pool_forward(NUMPY, x)
    with pytest.raises(TypeError, match="relu_input"):
        ops.pool_backward(NUMPY, x, y, y, mode="max", window=3, stride=2, padding=0, relu_input=1)
