"""bfloat16 storage of pooling, cross-map LRN, ReLU, dropout and softmax, in both storage dtypes on every device.

The oracle (convnet.reference.storage): an op on arrays of dtype D computes the float32 reference on the float32
images of its inputs and rounds each result once to D. ``check`` compares an op's output with that float32 result:
bit for bit where the op only selects or scales exactly, else within the float32 kernel's tolerance (the op's own
tests) widened by one bfloat16 rounding.
"""
import numpy as np
import pytest

from convnet import ops
from convnet.ops._checks import BFLOAT16
from convnet.reference import elementwise as elementwise_ref
from convnet.reference import lrn as lrn_ref
from convnet.reference import pool as pool_ref
from convnet.reference import softmax as softmax_ref
from convnet.reference.precision import to_bf16
from helpers import assert_close, assert_identical, assert_raises_each, rand, to_host

FLOAT32 = np.dtype(np.float32)
DTYPES = [pytest.param(FLOAT32, id="float32"), pytest.param(BFLOAT16, id="bfloat16")]

# bfloat16 keeps 8 significant bits: rounding to nearest moves a value by at most 2**-8 of its magnitude.
BF16_ROUNDING = 2.0**-8


def as_dtype(a, dtype) -> np.ndarray:
    return to_bf16(a) if dtype == BFLOAT16 else np.asarray(a, dtype)


def data(rng, shape, dtype, low=-1.0, high=1.0) -> np.ndarray:
    """Random values (never zeros) stored in ``dtype``."""
    return as_dtype(rand(rng, shape, low=low, high=high), dtype)


def image(a, dtype=np.float32) -> np.ndarray:
    """The float32 (or float64) image of an op's array (exact for bfloat16)."""
    return to_host(a).astype(dtype)


def check(name, got, want32, dtype, *, exact=False, rtol=0.0, atol=0.0):
    """``got`` (an op's output) has ``dtype`` and is the float32 reference result ``want32`` rounded once to it.

    exact: bit for bit. Else within the float32 kernel's tolerance (rtol, atol) of ``want32``, plus for bfloat16 the
    one rounding of that float32 result: |round(v) - v| <= 2**-8 |v| with |v| <= |want32| (1 + rtol) + atol.
    """
    got = to_host(got)
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, want {dtype}"
    if exact:
        assert_identical(name, got, as_dtype(want32, dtype))
        return
    if dtype == BFLOAT16:
        rtol, atol = rtol + BF16_ROUNDING * (1 + rtol), atol * (1 + BF16_ROUNDING)
    assert_close(name, got.astype(np.float32), np.asarray(want32), rtol=rtol, atol=atol)


def offset_copy(dev, a, rng):
    """``a`` on ``dev`` one element into a buffer of its dtype: contiguous, not aligned for 4-element accesses."""
    buf = dev.asarray(data(rng, a.size + 1, a.dtype))
    view = buf[1:].reshape(a.shape)
    view[...] = dev.asarray(a)
    return view


# ---------------------------------------------------------------------------------------------------- ReLU, dropout
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 33, 1003])  # not a multiple of 4 (the vector path's tail), several blocks
def test_relu(any_device, dtype, n):
    dev, rng = any_device, np.random.default_rng(n)
    x, dy = data(rng, n, dtype), data(rng, n, dtype)
    y = ops.relu_forward(dev, dev.asarray(x))
    check("relu y", y, elementwise_ref.relu_forward(image(x)), dtype, exact=True)
    dx = ops.relu_backward(dev, y, dev.asarray(dy))
    check("relu dx", dx, elementwise_ref.relu_backward(image(y), image(dy)), dtype, exact=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_unaligned_in_place_and_specials(any_device, dtype):
    dev, rng = any_device, np.random.default_rng(1)
    x = data(rng, (3, 5, 7), dtype)
    x.reshape(-1)[:4] = as_dtype([np.nan, -0.0, -np.inf, np.inf], dtype)
    view = offset_copy(dev, x, rng)  # the scalar path on the compiled devices
    check("relu unaligned", ops.relu_forward(dev, view), elementwise_ref.relu_forward(image(x)), dtype, exact=True)
    ops.relu_forward(dev, view, out=view)
    check("relu in place", view, elementwise_ref.relu_forward(image(x)), dtype, exact=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, batch", [((1001,), None), ((6, 4, 12), None), ((5, 3, 7), (16, 5))])
def test_dropout(any_device, dtype, shape, batch):
    """Kept values times 1/keep (0.6: not a power of two, so bfloat16 rounds), exactly the float32 product rounded."""
    dev, rng = any_device, np.random.default_rng(len(shape))
    x = data(rng, shape, dtype)
    keep, seed, offset = 0.6, 17, 3
    want = elementwise_ref.dropout_forward(image(x), keep, seed, offset, 0, batch)
    y = ops.dropout_forward(dev, dev.asarray(x), keep, seed, offset, batch=batch)
    check("dropout y", y, want, dtype, exact=True)
    dx = ops.dropout_backward(dev, dev.asarray(x), keep, seed, offset, batch=batch)
    check("dropout dx", dx, want, dtype, exact=True)
    unaligned = ops.dropout_forward(dev, offset_copy(dev, x, rng), keep, seed, offset, batch=batch)
    check("dropout y unaligned", unaligned, want, dtype, exact=True)
    mask = to_host(ops.dropout_mask(dev, shape, keep, seed, offset, batch=batch))
    assert np.array_equal(mask, want != 0)  # the same mask for both dtypes (random data has no zeros)


# ---------------------------------------------------------------------------------------------------- pooling
# (window, stride, padding): 3x3/2 takes the max strip kernel, 2x2 and 3x3 the unrolled ones, the rest the generic.
POOL_GEOMETRIES = [(3, 2, 0), (2, 2, 0), (3, 2, 1), ((3, 2), (2, 1), (1, 0)), (3, 1, 1), (4, 3, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("geom", POOL_GEOMETRIES, ids=str)
@pytest.mark.parametrize("n", [5, 8])  # the scalar and the 4-wide path
def test_pool(any_device, dtype, mode, geom, n):
    """Max forward selects (exact); avg forward and both backward passes sum in float (the float32 kernels'
    tolerances of tests/test_pool.py, plus one rounding)."""
    dev, rng = any_device, np.random.default_rng(n)
    window, stride, padding = geom
    kw = dict(mode=mode, window=window, stride=stride, padding=padding)
    x = data(rng, (3, 9, 8, n), dtype)
    y = ops.pool_forward(dev, dev.asarray(x), **kw)
    check("pool y", y, pool_ref.pool_forward(image(x), **kw), dtype, exact=mode == "max", rtol=1e-6, atol=1e-7)
    dy = data(rng, y.shape, dtype)
    dx = ops.pool_backward(dev, dev.asarray(x), y, dev.asarray(dy), **kw)
    check("pool dx", dx, pool_ref.pool_backward(image(x), image(y), image(dy), **kw), dtype, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pool_bf16_unaligned_is_the_vector_paths_result(compiled_device, mode):
    dev, rng = compiled_device, np.random.default_rng(2)
    kw = dict(mode=mode, window=3, stride=2, padding=0)
    x = data(rng, (2, 7, 7, 8), BFLOAT16)
    y = ops.pool_forward(dev, dev.asarray(x), **kw)
    assert_identical("pool y unaligned", ops.pool_forward(dev, offset_copy(dev, x, rng), **kw), y)
    dy = data(rng, y.shape, BFLOAT16)
    dx = ops.pool_backward(dev, dev.asarray(x), y, dev.asarray(dy), **kw)
    dx_unaligned = ops.pool_backward(dev, offset_copy(dev, x, rng), offset_copy(dev, to_host(y), rng),
                                     offset_copy(dev, dy, rng), **kw)
    assert_identical("pool dx unaligned", dx_unaligned, dx)


# ---------------------------------------------------------------------------------------------------- LRN
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, groups, n", [(5, 1, 8), (3, 1, 5), (4, 2, 8)])  # registers, generic size, groups
@pytest.mark.parametrize("method", ["recompute", "reuse"])
def test_lrn(any_device, dtype, size, groups, n, method):
    """Tolerances of tests/test_lrn.py (__powf's few ulps) plus one rounding. recompute works from the float32 y and
    denom it recomputes from x; reuse from the (rounded) ones the forward stored: each is the float32 reference on the
    float32 images of what it reads."""
    dev, rng = any_device, np.random.default_rng(size + n)
    kw = dict(size=size, alpha=1e-2, beta=0.75, k=2.0, convention="sum")
    x, dy = data(rng, (8, 3, 3, n), dtype, -3, 3), data(rng, (8, 3, 3, n), dtype)
    y, d = ops.lrn_forward(dev, dev.asarray(x), groups=groups, **kw)
    dx = ops.lrn_backward(dev, dev.asarray(x), y, d, dev.asarray(dy), groups=groups, method=method, **kw)
    cg = 8 // groups
    for g in range(groups):
        s = slice(g * cg, (g + 1) * cg)
        yr, dr = lrn_ref.lrn_forward(image(x)[s], **kw)
        check("lrn denom", to_host(d)[s], dr, dtype, rtol=1e-6)
        check("lrn y", to_host(y)[s], yr, dtype, rtol=2e-6, atol=1e-7)
        yb, db = (image(y)[s], image(d)[s]) if method == "reuse" else (yr, dr)
        check("lrn dx", to_host(dx)[s], lrn_ref.lrn_backward(image(x)[s], yb, db, image(dy)[s], **kw), dtype,
              rtol=1e-5, atol=2e-6)


def test_lrn_bf16_unaligned_is_the_vector_paths_result(compiled_device):
    dev, rng = compiled_device, np.random.default_rng(3)
    kw = dict(size=5, alpha=1e-2, beta=0.75, k=2.0, convention="sum")
    x, dy = data(rng, (6, 2, 3, 8), BFLOAT16), data(rng, (6, 2, 3, 8), BFLOAT16)
    y, d = ops.lrn_forward(dev, dev.asarray(x), **kw)
    y1, d1 = ops.lrn_forward(dev, offset_copy(dev, x, rng), **kw)
    assert_identical("lrn y unaligned", y1, y)
    assert_identical("lrn denom unaligned", d1, d)
    dx = ops.lrn_backward(dev, dev.asarray(x), None, None, dev.asarray(dy), **kw)
    dx1 = ops.lrn_backward(dev, offset_copy(dev, x, rng), None, None, offset_copy(dev, dy, rng), **kw)
    assert_identical("lrn dx unaligned", dx1, dx)


# ---------------------------------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K, N", [(10, 37), (100, 8), (3, 5)])  # N not a multiple of 32; fewer classes than lanes
def test_softmax(any_device, dtype, K, N):
    """probs and dlogits stored in the logits' dtype (tests/test_softmax.py's tolerances against the float64
    reference, plus one rounding); the loss is float32 whatever the logits are, within the float32 kernel's tolerance.
    """
    dev, rng = any_device, np.random.default_rng(K + N)
    logits = as_dtype(rng.standard_normal((K, N)) * 4, dtype)
    labels = rng.integers(0, K, N).astype(np.int32)
    loss, probs, dlogits = ops.softmax_cross_entropy(dev, dev.asarray(logits), dev.asarray(labels))
    loss_r, probs_r, dlogits_r = softmax_ref.softmax_cross_entropy(image(logits, np.float64), labels)
    assert to_host(loss).dtype == FLOAT32 and to_host(loss).shape == ()
    assert abs(float(to_host(loss)) - float(loss_r)) <= 1e-5 * max(1.0, abs(float(loss_r)))
    check("probs", probs, probs_r, dtype, rtol=1e-5, atol=1e-8)
    check("dlogits", dlogits, dlogits_r, dtype, rtol=1e-5, atol=1e-7)
    check("softmax_forward", ops.softmax_forward(dev, dev.asarray(logits)), probs_r, dtype, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------- dtype mixing
def test_mixed_storage_dtypes_are_type_errors(any_device):
    dev, rng = any_device, np.random.default_rng(4)
    x32 = dev.asarray(data(rng, (2, 5, 5, 4), FLOAT32))
    x16 = dev.asarray(data(rng, (2, 5, 5, 4), BFLOAT16))
    y16 = ops.pool_forward(dev, x16)
    y32 = ops.pool_forward(dev, x32)
    logits16 = dev.asarray(data(rng, (5, 4), BFLOAT16))
    labels = dev.asarray(np.arange(4, dtype=np.int32))
    lrn = dict(size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum")
    assert_raises_each(
        (TypeError, "dy has dtype float32 but y has bfloat16", lambda: ops.relu_backward(dev, x16, x32)),
        (TypeError, "out must have dtype bfloat16", lambda: ops.relu_forward(dev, x16, out=dev.empty(x16.shape))),
        (TypeError, "out must have dtype bfloat16",
         lambda: ops.dropout_forward(dev, x16, 0.5, seed=1, out=dev.empty(x16.shape))),
        (TypeError, "has dtype float32 but x has bfloat16",
         lambda: ops.pool_backward(dev, x16, y32, y16, mode="max", window=3, stride=2, padding=0)),
        (TypeError, "has dtype bfloat16 but x has float32",
         lambda: ops.pool_backward(dev, x32, y32, y16, mode="max", window=3, stride=2, padding=0)),
        (TypeError, "has dtype float32 but x has bfloat16", lambda: ops.lrn_backward(dev, x16, None, None, x32, **lrn)),
        (TypeError, "out must have dtype bfloat16",
         lambda: ops.softmax_forward(dev, logits16, out=dev.empty((5, 4)))),
        (TypeError, "logits_or_probs must have dtype", lambda: ops.topk_errors(dev, logits16, labels)),
        (TypeError, "x must have dtype", lambda: ops.relu_forward(dev, dev.asarray(np.zeros(3, np.float16)))),
    )

