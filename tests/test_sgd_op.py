"""The SGD update op (``ops.sgd_update``): every implementation against the NumPy reference, bit for bit (each
statement is rounded to float32 in the reference's order on every device), the reference against the rule written
out in float64, and bad arguments."""
import numpy as np
import pytest
from helpers import NUMPY, assert_identical, assert_raises_each, rand

from convnet import ops
from convnet.devices import Device
from convnet.reference import sgd as ref

RNG = np.random.default_rng(14)
SHAPES = [(1,), (7,), (17, 3), (33, 5, 5, 31), (256, 4608), (3, 1, 1, 1000003)]  # odd sizes: every SIMD tail


def _params(shape, dtype=np.float32):
    return rand(RNG, shape, dtype), rand(RNG, shape, dtype, -0.1, 0.1), rand(RNG, shape, dtype, -0.01, 0.01)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_update_is_the_reference_bit_for_bit(kernel_device, shape, wd):
    dev = kernel_device
    w, g, v = _params(shape)
    want_w, want_v = w.copy(), v.copy()
    ref.sgd_update(want_w, g, want_v, lr=0.05, momentum=0.9, weight_decay=wd)
    dw, dg, dv = dev.asarray(w.copy()), dev.asarray(g), dev.asarray(v.copy())
    got = ops.sgd_update(dev, dw, dg, dv, lr=0.05, momentum=0.9, weight_decay=wd)
    assert got[0] is dw and got[1] is dv  # in place
    assert_identical("w", dw, want_w)
    assert_identical("v", dv, want_v)
    assert_identical("g untouched", dg, g)


def test_several_steps_stay_bit_identical(kernel_device):
    """Ten updates in a row (the velocity carries over), with a zero weight decay for half the steps."""
    dev = kernel_device
    w, g, v = _params((129, 65))
    ww, vv = w.copy(), v.copy()
    dw, dv = dev.asarray(w.copy()), dev.asarray(v.copy())
    for step in range(10):
        g = rand(RNG, w.shape, low=-0.1, high=0.1)
        wd = 5e-4 if step % 2 else 0.0
        ref.sgd_update(ww, g, vv, lr=0.01 * (step + 1), momentum=0.9, weight_decay=wd)
        ops.sgd_update(dev, dw, dev.asarray(g), dv, lr=0.01 * (step + 1), momentum=0.9, weight_decay=wd)
    assert_identical("w after 10 steps", dw, ww)
    assert_identical("v after 10 steps", dv, vv)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_is_the_rule(dtype):
    """v = m v - wd lr w - lr g, w += v: the reference within rounding of the rule in float64, on both dtypes."""
    w, g, v = _params((50, 7), dtype)
    lr, m, wd = 0.03, 0.9, 1e-3
    want_v = m * v.astype(np.float64) - wd * lr * w.astype(np.float64) - lr * g.astype(np.float64)
    want_w = w.astype(np.float64) + want_v
    got_w, got_v = ops.sgd_update(NUMPY, w, g, v, lr=lr, momentum=m, weight_decay=wd)
    assert got_w.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(got_v, want_v, rtol=tol, atol=tol)
    np.testing.assert_allclose(got_w, want_w, rtol=tol, atol=tol)


def test_zero_weight_decay_skips_the_decay_term(kernel_device):
    """wd = 0 never reads w into v (an infinite weight does not turn v into NaN), as the optimizer always did."""
    dev = kernel_device
    w = np.array([np.inf, 1.0, -2.0], np.float32)
    g, v = np.full(3, 0.5, np.float32), np.zeros(3, np.float32)
    dw, dv = dev.asarray(w), dev.asarray(v)
    ops.sgd_update(dev, dw, dev.asarray(g), dv, lr=0.1, momentum=0.9, weight_decay=0.0)
    assert_identical("v", dv, np.full(3, np.float32(-0.05), np.float32))


def test_bad_arguments_raise_clear_errors(kernel_device):
    dev = kernel_device
    w, g, v = (dev.asarray(a) for a in _params((4, 5)))
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.0)
    whole = dev.asarray(np.zeros(40, np.float32))
    read_only = np.zeros((4, 5), np.float32)
    read_only.flags.writeable = False
    cases = [
        (ValueError, "g must have shape", lambda: ops.sgd_update(dev, w, dev.asarray(np.zeros((5, 4), np.float32)), v,
                                                                 **kw)),
        (ValueError, "v must have shape", lambda: ops.sgd_update(dev, w, g, dev.asarray(np.zeros(20, np.float32)),
                                                                 **kw)),
        (TypeError, "dtype", lambda: ops.sgd_update(dev, w, g, dev.asarray(np.zeros((4, 5), np.float64)), **kw)),
        (TypeError, "g must be a", lambda: ops.sgd_update(dev, w, [[0.0] * 5] * 4, v, **kw)),
        (ValueError, "C-contiguous", lambda: ops.sgd_update(dev, w, g, dev.asarray(np.zeros((4, 10), np.float32))[:, ::2],
                                                            **kw)),
        (ValueError, "must not overlap", lambda: ops.sgd_update(dev, w, w, v, **kw)),
        (ValueError, "must not overlap", lambda: ops.sgd_update(dev, w, g, w, **kw)),
        (ValueError, "overlap", lambda: ops.sgd_update(dev, whole[:20].reshape(4, 5), g, whole[10:30].reshape(4, 5),
                                                       **kw)),
        (TypeError, "lr must be a finite", lambda: ops.sgd_update(dev, w, g, v, lr=float("nan"), momentum=0.9,
                                                                  weight_decay=0.0)),
        (TypeError, "momentum must be a finite", lambda: ops.sgd_update(dev, w, g, v, lr=0.1, momentum="0.9",
                                                                        weight_decay=0.0)),
    ]
    if dev.kind != "cuda":  # a read-only host array (CuPy arrays are always writeable)
        cases.append((ValueError, "read-only", lambda: ops.sgd_update(dev, dev.asarray(read_only), g, v, **kw)))
    assert_raises_each(*cases)


@pytest.mark.parametrize("kind", ["numpy", "cpu", "emu"])
def test_wrong_device_is_rejected(kind):
    """Arrays of another (virtual) device: a TypeError naming the argument and both devices."""
    w, g, v = _params((3, 3))
    other = Device(kind, 1)
    with pytest.raises(TypeError, match=f"w must be a .* for device {kind}:1"):
        ops.sgd_update(other, w, other.asarray(g), other.asarray(v), lr=0.1, momentum=0.9, weight_decay=0.0)
    with pytest.raises(TypeError, match=f"v must be a .* for device {kind}, got .* of {kind}:1"):
        ops.sgd_update(Device(kind), w, g, other.asarray(v), lr=0.1, momentum=0.9, weight_decay=0.0)


def test_float64_on_the_host_devices_only(kernel_device):
    """A float64 net's parameters: updated on the host devices (the reference's float64 arithmetic on cpu too), a
    TypeError on emu and cuda (float32 devices)."""
    dev = kernel_device
    w, g, v = _params((6, 7), np.float64)
    if dev.kind != "cpu":
        with pytest.raises(TypeError, match="dtype float32"):
            ops.sgd_update(dev, dev.asarray(w, np.float64), dev.asarray(g, np.float64), dev.asarray(v, np.float64),
                           lr=0.1, momentum=0.9, weight_decay=5e-4)
        return
    want_w, want_v = ref.sgd_update(w.copy(), g, v.copy(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ops.sgd_update(dev, w, g, v, lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert_identical("w", w, want_w)
    assert_identical("v", v, want_v)


# ------------------------------------------------------------------------------------ many parameters in one call
MANY_SHAPES = [(1,), (33, 5, 5, 31), (7,), (17, 3), (3, 1, 1, 40001)]  # odd sizes; the last is several work items


def _many(shapes):
    return [tuple(a.copy() for a in _params(shape)) for shape in shapes]


@pytest.mark.parametrize("threads", [1, 2])
def test_update_many_is_one_update_per_parameter_bit_for_bit(kernel_device, threads):
    """Each parameter its own lr, momentum and weight decay (one zero): the bits of the reference's update of each
    in turn, on 1 and 2 of the cpu device's loop threads (the work items never change a result bit)."""
    from convnet.cpu import loop_threads
    dev = kernel_device
    params = _many(MANY_SHAPES)
    lrs, momentums, wds = [0.05, 0.01, 0.2, 0.03, 0.1], [0.9, 0.5, 0.9, 0.0, 0.95], [5e-4, 0.0, 1e-3, 5e-4, 2e-4]
    want = [(w.copy(), v.copy()) for w, _, v in params]
    for (ww, vv), (_, g, _), lr, m, wd in zip(want, params, lrs, momentums, wds):
        ref.sgd_update(ww, g, vv, lr=lr, momentum=m, weight_decay=wd)
    ws, gs, vs = ([dev.asarray(p[i]) for p in params] for i in range(3))
    with loop_threads(threads):
        got_w, got_v = ops.sgd_update_many(dev, ws, gs, vs, lrs=lrs, momentums=momentums, weight_decays=wds)
    assert all(a is b for a, b in zip(got_w + got_v, ws + vs))  # in place
    for k, ((ww, vv), (_, g, _)) in enumerate(zip(want, params)):
        assert_identical(f"w[{k}]", ws[k], ww)
        assert_identical(f"v[{k}]", vs[k], vv)
        assert_identical(f"g[{k}] untouched", gs[k], g)


def test_update_many_of_nothing_is_nothing(kernel_device):
    assert ops.sgd_update_many(kernel_device, [], [], [], lrs=[], momentums=[], weight_decays=[]) == ([], [])


def test_update_many_bad_arguments_raise_clear_errors(kernel_device):
    dev = kernel_device
    (w0, g0, v0), (w1, g1, v1) = ([dev.asarray(a) for a in p] for p in _many([(4, 5), (6,)]))
    kw = dict(lrs=[0.1, 0.1], momentums=[0.9, 0.9], weight_decays=[0.0, 5e-4])
    whole = dev.asarray(np.zeros(40, np.float32))
    read_only = np.zeros(6, np.float32)
    read_only.flags.writeable = False
    cases = [
        (ValueError, "same length", lambda: ops.sgd_update_many(dev, [w0, w1], [g0, g1], [v0], **kw)),
        (ValueError, "same length", lambda: ops.sgd_update_many(dev, [w0, w1], [g0, g1], [v0, v1], lrs=[0.1],
                                                                momentums=[0.9, 0.9], weight_decays=[0.0, 0.0])),
        (ValueError, r"gs\[1\] must have shape", lambda: ops.sgd_update_many(dev, [w0, w1], [g0, g0], [v0, v1], **kw)),
        (TypeError, r"vs\[1\] (must have|has) dtype", lambda: ops.sgd_update_many(
            dev, [w0, w1], [g0, g1], [v0, dev.asarray(np.zeros(6, np.float64))], **kw)),
        (ValueError, "C-contiguous", lambda: ops.sgd_update_many(
            dev, [w0, w1], [g0, dev.asarray(np.zeros(12, np.float32))[::2]], [v0, v1], **kw)),
        (ValueError, r"ws\[0\] and gs\[1\] overlap|gs\[1\] and ws\[0\] overlap", lambda: ops.sgd_update_many(
            dev, [w0, w1], [g0, w0.reshape(-1)[:6]], [v0, v1], **kw)),  # one parameter's gradient is another's weights
        (ValueError, "overlap", lambda: ops.sgd_update_many(
            dev, [whole[:20].reshape(4, 5), w1], [g0, g1], [whole[15:35].reshape(4, 5), v1], **kw)),
        (TypeError, r"lrs\[1\] must be a finite", lambda: ops.sgd_update_many(
            dev, [w0, w1], [g0, g1], [v0, v1], lrs=[0.1, float("inf")], momentums=[0.9, 0.9],
            weight_decays=[0.0, 0.0])),
    ]
    if dev.kind != "cuda":  # a read-only host array (CuPy arrays are always writeable)
        cases.append((ValueError, "read-only", lambda: ops.sgd_update_many(dev, [w0, dev.asarray(read_only)],
                                                                           [g0, g1], [v0, v1], **kw)))
    assert_raises_each(*cases)
