"""Neurons (cuda-convnet's activation functions) and the eltsum / eltmax joins: the reference against independent
definitions and finite differences (float64), the kernels (emu, cuda) and the cpu device against the reference."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet import neurons, ops
from convnet.neurons import NEURONS, Neuron, parse
from convnet.reference import neuron as ref
from helpers import (EMU, NUMPY, assert_close, assert_identical, assert_raises_each, assert_schedules_identical,
                     check_grad, offset_view, rand)

SIZES = [1, 3, 31, 33, 257, 4099, 70001]  # not multiples of 4, a warp or a block; several blocks
EVERY = [Neuron("relu"), Neuron("tanh", 1.7159, 0.6667), Neuron("logistic"), Neuron("abs"), Neuron("square"),
         Neuron("sqrt"), Neuron("softrelu"), Neuron("brelu", 0.6), Neuron("linear", -1.5, 0.25)]
assert sorted(n.name for n in EVERY) == sorted(NEURONS)  # a new neuron gets its tests here
IDS = [str(n) for n in EVERY]


def _inputs(rng, neuron, shape, dtype=np.float32, scale=3.0):
    """Random inputs of the neuron's domain (sqrt: positive), kept away from its kinks (relu, brelu, abs: 0 and a)
    so that finite differences and float rounding cannot straddle one."""
    x = rng.uniform(-scale, scale, size=shape)
    if neuron.name == "sqrt":
        x = np.abs(x) + 0.05
    for kink in (0.0, neuron.a if neuron.name == "brelu" else 0.0):
        near = np.abs(x - kink) < 0.02
        x[near] = kink + 0.05
    return x.astype(dtype)


# The definitions, one element at a time with Python's math (float64), written independently of the reference.
def _f(name, a, b, v):
    return {"relu": lambda: max(v, 0.0), "tanh": lambda: a * math.tanh(b * v),
            "logistic": lambda: 1.0 / (1.0 + math.exp(-v)), "abs": lambda: abs(v), "square": lambda: v * v,
            "sqrt": lambda: math.sqrt(v), "softrelu": lambda: math.log(1.0 + math.exp(v)),
            "brelu": lambda: min(max(v, 0.0), a), "linear": lambda: a * v + b}[name]()


def _df(name, a, b, v):
    return {"relu": lambda: float(v > 0), "tanh": lambda: a * b / math.cosh(b * v) ** 2,
            "logistic": lambda: math.exp(-v) / (1.0 + math.exp(-v)) ** 2, "abs": lambda: 1.0 if v > 0 else -1.0,
            "square": lambda: 2 * v, "sqrt": lambda: 0.5 / math.sqrt(v),
            "softrelu": lambda: 1.0 / (1.0 + math.exp(-v)), "brelu": lambda: float(0 < v < a),
            "linear": lambda: a}[name]()


@pytest.mark.parametrize("neuron", EVERY, ids=IDS)
def test_reference_matches_the_definitions(neuron):
    rng = np.random.default_rng(neuron.code)
    x = _inputs(rng, neuron, 200, np.float64)
    dy = rand(rng, 200, np.float64)
    y = ref.neuron_forward(x, neuron)
    dx = ref.neuron_backward(x, y, dy, neuron)
    want_y = [_f(neuron.name, neuron.a, neuron.b, v) for v in x]
    want_dx = [_df(neuron.name, neuron.a, neuron.b, v) * g for v, g in zip(x, dy)]
    np.testing.assert_allclose(y, want_y, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-11, atol=1e-13)
    # float32 in, float32 out, close to float64
    y32 = ref.neuron_forward(x.astype(np.float32), neuron)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, want_y, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("neuron", EVERY, ids=IDS)
def test_gradient_matches_finite_differences(neuron):
    rng = np.random.default_rng(10 + neuron.code)
    x = _inputs(rng, neuron, (3, 4, 5, 7), np.float64)
    dy = rand(rng, x.shape, np.float64)
    y = ops.neuron_forward(NUMPY, x, neuron)
    dx = ops.neuron_backward(NUMPY, x, y, dy, neuron)
    check_grad(lambda z: float(np.sum(dy * ref.neuron_forward(z, neuron))), x, dx, n=80, rtol=1e-6, atol=1e-9)


def test_softrelu_is_exact_for_large_and_small_inputs():
    x = np.array([-100.0, -30.0, -5.0, 3.9, 4.0, 4.1, 20.0, 100.0])
    y = ref.neuron_forward(x, Neuron("softrelu"))
    want = [math.log1p(math.exp(v)) if v < 30 else v + math.log1p(math.exp(-v)) for v in x]
    np.testing.assert_allclose(y, want, rtol=1e-15)  # e^-100 is not lost, and nothing overflows
    assert np.isfinite(ref.neuron_forward(np.float32([1e30, -1e30]), Neuron("softrelu"))).all()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("neuron", EVERY, ids=IDS)
@pytest.mark.sanitize
def test_neuron_matches_reference(kernel_device, neuron, n):
    rng = np.random.default_rng(n + 100 * neuron.code)
    x = _inputs(rng, neuron, n)
    dy = rand(rng, n)
    y = ops.neuron_forward(kernel_device, kernel_device.asarray(x), neuron)
    want_y = ref.neuron_forward(x, neuron)
    assert_close(f"{neuron} y", y, want_y, rtol=2e-6, atol=1e-6)
    # the backward from the reference's y, so that both read the same values
    dx = ops.neuron_backward(kernel_device, kernel_device.asarray(x), kernel_device.asarray(want_y),
                             kernel_device.asarray(dy), neuron)
    assert_close(f"{neuron} dx", dx, ref.neuron_backward(x, want_y, dy, neuron), rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("neuron", EVERY, ids=IDS)
def test_neuron_in_place_unaligned_and_unused_operand(kernel_device, neuron):
    rng = np.random.default_rng(3)
    x = _inputs(rng, neuron, (2, 3, 5, 9))
    dy = rand(rng, x.shape)
    want_y = ref.neuron_forward(x, neuron)
    want_dx = ref.neuron_backward(x, want_y, dy, neuron)
    xv = offset_view(kernel_device, x, rng)  # not 16-byte aligned
    y = ops.neuron_forward(kernel_device, xv, neuron)
    assert_close("unaligned y", y, want_y, rtol=2e-6, atol=1e-6)
    uses = neuron.kind.uses  # the operand the backward does not read may be None
    xd = kernel_device.asarray(x) if uses == "x" else None
    yd = kernel_device.asarray(want_y) if uses == "y" else None
    g = kernel_device.asarray(dy)
    ops.neuron_backward(kernel_device, xd, yd, g, neuron, out=g)  # in place
    assert_close("in-place dx", g, want_dx, rtol=4e-6, atol=1e-6)
    ops.neuron_forward(kernel_device, xv, neuron, out=xv)
    assert_close("in-place y", xv, want_y, rtol=2e-6, atol=1e-6)


def test_neuron_special_values(kernel_device):
    x = np.array([np.nan, -0.0, 0.0, -np.inf, np.inf, 1e-38, -3.0, 3.0], np.float32)
    for neuron in (Neuron("relu"), Neuron("brelu", 2.0)):  # NaN -> 0, -0 -> +0, as relu_forward
        y = kernel_device.to_numpy(ops.neuron_forward(kernel_device, kernel_device.asarray(x), neuron))
        assert_identical(str(neuron), y, ref.neuron_forward(x, neuron))
        assert not np.isnan(y).any() and np.signbit(y).sum() == 0
    relu = kernel_device.to_numpy(ops.relu_forward(kernel_device, kernel_device.asarray(x)))
    assert_identical("neuron relu is relu", ops.neuron_forward(kernel_device, kernel_device.asarray(x), "relu"), relu)
    y = kernel_device.to_numpy(ops.neuron_forward(kernel_device, kernel_device.asarray(x), "logistic"))
    assert y[3] == 0 and y[4] == 1 and np.isnan(y[0])


@st.composite
def _cases(draw):
    """A neuron with random parameters, a shape of 1 to 4 axes of odd sizes, and a seed."""
    name = draw(st.sampled_from(sorted(NEURONS)))
    value = st.floats(-3, 3).filter(lambda v: abs(v) > 0.05)
    a, b = draw(value), draw(value)
    neuron = Neuron(name, *(abs(a) if name == "brelu" else a, b)[:len(NEURONS[name].params)])
    shape = tuple(draw(st.lists(st.integers(1, 13), min_size=1, max_size=4)))
    return neuron, shape, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(case=_cases())
def test_random_neurons_and_shapes_emu(case):
    neuron, shape, seed = case
    rng = np.random.default_rng(seed)
    x, dy = _inputs(rng, neuron, shape), rand(rng, shape)
    want_y = ref.neuron_forward(x, neuron)
    assert_close(f"{neuron} y", ops.neuron_forward(EMU, EMU.asarray(x), neuron), want_y, rtol=4e-6, atol=2e-6)
    dx = ops.neuron_backward(EMU, EMU.asarray(x), EMU.asarray(want_y), EMU.asarray(dy), neuron)
    assert_close(f"{neuron} dx", dx, ref.neuron_backward(x, want_y, dy, neuron), rtol=8e-6, atol=4e-6)


def test_every_schedule_gives_identical_results():
    rng = np.random.default_rng(5)
    host = [rand(rng, 3001) for _ in range(3)]
    xs = [EMU.asarray(a) for a in host]

    def run():
        y = ops.neuron_forward(EMU, xs[0], "tanh[1.5,0.5]")
        dx = ops.neuron_backward(EMU, None, y, xs[1], "tanh[1.5,0.5]")
        s = ops.eltsum_forward(EMU, xs, [0.5, -1.0, 2.0])
        m, which = ops.eltmax_forward(EMU, xs)
        return [EMU.to_numpy(a) for a in (y, dx, s, m, which)]

    assert_schedules_identical(run, ("tanh", "tanh dx", "eltsum", "eltmax", "eltmax which"), seed=2)
    y, dx, s, m, which = run()
    assert_identical("eltmax", m, ref.eltmax_forward(host)[0])
    assert_identical("eltmax which", which, ref.eltmax_forward(host)[1])


def test_parse_reads_cuda_convnet_spellings():
    assert parse("tanh[1.7159,0.6667]") == Neuron("tanh", 1.7159, 0.6667)
    assert parse(" brelu[ 6 ] ") == Neuron("brelu", 6.0)
    assert parse("linear[2,-1]") == Neuron("linear", 2.0, -1.0)
    assert parse("softrelu") == Neuron("softrelu") and parse("RELU") == Neuron("relu")
    for none in (None, "", "linear", "ident"):
        assert parse(none) is None
    assert str(Neuron("tanh", 1.5, 0.5)) == "tanh[1.5,0.5]" and str(Neuron("abs")) == "abs"
    assert Neuron("brelu", np.float32(2.0)) == Neuron("brelu", 2) == "brelu[2]" != "brelu[3]"
    assert "tanh[a,b]" in neurons.forms() and "brelu[a]" in neurons.forms()
    assert_raises_each(
        (ValueError, r"unknown neuron 'drelu\[1\]'.*known: relu, tanh\[a,b\]", lambda: parse("drelu[1]")),
        (ValueError, r"tanh takes 2 parameters \(written tanh\[a,b\]\), got 1", lambda: parse("tanh[1]")),
        (ValueError, r"brelu takes 1 parameter \(written brelu\[a\]\), got 0", lambda: parse("brelu")),
        (ValueError, r"relu takes 0 parameters", lambda: parse("relu[1]")),
        (ValueError, r"parameters must be numbers", lambda: parse("tanh[a,b]")),
        (ValueError, r"tanh\[a,b\] needs a != 0", lambda: parse("tanh[0,1]")),
        (ValueError, r"brelu\[a\] needs a > 0", lambda: parse("brelu[-1]")),
        (ValueError, r"a must be a finite number", lambda: parse("linear[inf,0]")),
        (ValueError, r"must be text", lambda: parse(3)),
    )


def test_neuron_bad_inputs(any_device):
    dev = any_device
    x = dev.asarray(rand(np.random.default_rng(0), (4, 5)))
    assert_raises_each(
        (ValueError, r"unknown neuron 'swish'", lambda: ops.neuron_forward(dev, x, "swish")),
        (ValueError, r"the identity needs no op", lambda: ops.neuron_forward(dev, x, "linear")),
        (ValueError, r"abs's backward reads the forward's input x: got None",
         lambda: ops.neuron_backward(dev, None, x, x, "abs")),
        (ValueError, r"logistic's backward reads the forward's output y: got None",
         lambda: ops.neuron_backward(dev, x, None, x, "logistic")),
        (ValueError, r"y must have shape \(4, 5\)", lambda: ops.neuron_backward(dev, x, x[:2], x, "relu")),
        (TypeError, r"x must be a", lambda: ops.neuron_forward(dev, [1.0, 2.0], "relu")),
        (ValueError, r"out partially overlaps x",
         lambda: ops.neuron_forward(dev, x.reshape(-1)[:10], "relu", out=x.reshape(-1)[5:15])),
    )


def test_kernel_rejects_bad_codes_and_parameters():
    x = EMU.asarray(rand(np.random.default_rng(0), 8))
    k = EMU.kernels
    p = EMU.pointer(x)
    assert_raises_each(
        (ValueError, r"unknown neuron code 9", lambda: k.neuron_forward(p, p, 8, 9, 1.0, 1.0, 0)),
        (ValueError, r"tanh\[a,b\] needs a != 0", lambda: k.neuron_forward(p, p, 8, 1, 0.0, 1.0, 0)),
        (ValueError, r"brelu\[a\] needs a > 0", lambda: k.neuron_backward(p, p, p, p, 8, 7, 0.0, 0.0, 0)),
        (ValueError, r"reads its input x: null pointer", lambda: k.neuron_backward(0, p, p, p, 8, 3, 0.0, 0.0, 0)),
        (ValueError, r"reads its output y: null pointer", lambda: k.neuron_backward(p, 0, p, p, 8, 0, 0.0, 0.0, 0)),
        (ValueError, r"must be non-negative", lambda: k.neuron_forward(p, p, -1, 0, 0.0, 0.0, 0)),
        (ValueError, r"index must be in \[0, 256\)", lambda: k.eltmax_backward(p, p, p, 8, 256, 0)),
    )


# ---- eltsum, eltmax -----------------------------------------------------------------------------------------
def test_join_references_match_the_definitions():
    rng = np.random.default_rng(1)
    xs = [rand(rng, (3, 4, 5), np.float64) for _ in range(3)]
    c = [0.5, -2.0, 1.25]
    np.testing.assert_allclose(ref.eltsum_forward(xs, c), 0.5 * xs[0] - 2.0 * xs[1] + 1.25 * xs[2], rtol=1e-15)
    y, which = ref.eltmax_forward(xs)
    np.testing.assert_array_equal(y, np.max(xs, axis=0))
    np.testing.assert_array_equal(which, np.argmax(xs, axis=0))  # argmax: the first of tied inputs too
    ties = [np.array([1.0, 2.0, np.nan, 0.0]), np.array([1.0, 3.0, 1.0, np.nan]), np.array([5.0, 3.0, 2.0, np.nan])]
    y, which = ref.eltmax_forward(ties)
    np.testing.assert_array_equal(which, [2, 1, 0, 1])  # ties: the first; the first NaN wins
    assert np.isnan(y[2]) and np.isnan(y[3])


def test_join_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    xs = [rand(rng, (2, 3, 4, 5), np.float64) for _ in range(3)]
    dy = rand(rng, xs[0].shape, np.float64)
    c = [0.5, -2.0, 1.25]
    _, which = ops.eltmax_forward(NUMPY, xs)
    for i in range(3):
        def f_sum(z, i=i):
            return float(np.sum(dy * ref.eltsum_forward(xs[:i] + [z] + xs[i + 1:], c)))

        def f_max(z, i=i):
            return float(np.sum(dy * ref.eltmax_forward(xs[:i] + [z] + xs[i + 1:])[0]))

        check_grad(f_sum, xs[i], ops.eltsum_backward(NUMPY, dy, c[i]), rtol=1e-6, atol=1e-9)
        check_grad(f_max, xs[i], ops.eltmax_backward(NUMPY, which, dy, i), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.sanitize
def test_joins_match_reference(kernel_device, n, k):
    rng = np.random.default_rng(n * 7 + k)
    xs = [rand(rng, n) for _ in range(k)]
    if k > 1:
        xs[1][::5] = xs[0][::5]  # ties
    c = list(rng.uniform(-2, 2, k))
    dy = rand(rng, n)
    dev = kernel_device
    d_xs = [dev.asarray(x) for x in xs]
    assert_close("eltsum", ops.eltsum_forward(dev, d_xs, c), ref.eltsum_forward(xs, c), rtol=1e-6, atol=1e-6)
    y, which = ops.eltmax_forward(dev, d_xs)
    want_y, want_which = ref.eltmax_forward(xs)
    assert_identical("eltmax y", y, want_y)
    assert_identical("eltmax which", which, want_which)
    total = np.zeros(n, np.float32)
    for i in range(k):
        dx = dev.to_numpy(ops.eltmax_backward(dev, which, dev.asarray(dy), i))
        assert_identical(f"eltmax dx[{i}]", dx, ref.eltmax_backward(want_which, dy, i))
        total += dx
        assert_close(f"eltsum dx[{i}]", ops.eltsum_backward(dev, dev.asarray(dy), c[i]),
                     ref.eltsum_backward(dy, c[i]), rtol=1e-7)
    assert_identical("eltmax gradients add up to dy", total, dy)


def test_joins_nan_and_garbage_outputs(kernel_device):
    dev = kernel_device
    a = np.array([np.nan, 1.0, -1.0, 2.0], np.float32)
    b = np.array([0.0, np.nan, -1.0, 3.0], np.float32)
    y, which = ops.eltmax_forward(dev, [dev.asarray(a), dev.asarray(b)])
    assert_identical("which", which, np.uint8([0, 1, 0, 1]))
    out = dev.asarray(np.full(4, np.nan, np.float32))  # a NaN-filled out is not read (beta = 0 on the first input)
    ops.eltsum_forward(dev, [dev.asarray(b[2:]), dev.asarray(a[2:])], [1.0, 2.0], out=out[:2])
    assert_identical("eltsum into NaN", out[:2], np.float32([-3.0, 7.0]))


def test_join_bad_inputs(any_device):
    dev = any_device
    rng = np.random.default_rng(0)
    a, b = dev.asarray(rand(rng, (3, 4))), dev.asarray(rand(rng, (3, 4)))
    which = dev.asarray(np.zeros((3, 4), np.uint8))
    assert_raises_each(
        (ValueError, r"xs must hold 1 to 256 arrays, got 0", lambda: ops.eltsum_forward(dev, [])),
        (ValueError, r"xs must hold 1 to 256 arrays, got 257", lambda: ops.eltmax_forward(dev, [a] * 257)),
        (TypeError, r"xs must be a list", lambda: ops.eltmax_forward(dev, a)),
        (ValueError, r"xs\[1\] must have shape \(3, 4\)", lambda: ops.eltsum_forward(dev, [a, a[:2]])),
        (ValueError, r"coeffs must be a list of 2 numbers", lambda: ops.eltsum_forward(dev, [a, b], [1.0])),
        (TypeError, r"coeffs\[1\] must be a finite real number", lambda: ops.eltsum_forward(dev, [a, b], [1, np.nan])),
        (ValueError, r"out overlaps xs\[1\]|out partially overlaps|overlap", lambda: ops.eltsum_forward(dev, [a, b], out=b)),
        (TypeError, r"which must have dtype uint8", lambda: ops.eltmax_backward(dev, a, b, 0)),
        (ValueError, r"index must be an integer in \[0, 256\)", lambda: ops.eltmax_backward(dev, which, b, 256)),
        (ValueError, r"index must be an integer", lambda: ops.eltmax_backward(dev, which, b, True)),
    )


def test_cuda_path_on_the_fake_gpu_matches_the_reference(monkeypatch):
    """The cuda device's Python (allocation on the op's stream, the launches, None for an unread operand) on
    tests/fake_cupy.py, with the emulator's kernels behind it."""
    from convnet.devices import Device
    from fake_cupy import FakeCupy
    FakeCupy(devices=1).install(monkeypatch)
    dev = Device("cuda", 0)
    rng = np.random.default_rng(9)
    x, dy = rand(rng, (3, 5, 7, 9)), rand(rng, (3, 5, 7, 9))
    for neuron in EVERY:
        xs = _inputs(rng, neuron, x.shape)
        y = ops.neuron_forward(dev, dev.asarray(xs), neuron)
        want_y = ref.neuron_forward(xs, neuron)
        assert_close(f"{neuron} y", y, want_y, rtol=2e-6, atol=1e-6)
        uses = neuron.kind.uses
        dx = ops.neuron_backward(dev, dev.asarray(xs) if uses == "x" else None,
                                 dev.asarray(want_y) if uses == "y" else None, dev.asarray(dy), neuron)
        assert_close(f"{neuron} dx", dx, ref.neuron_backward(xs, want_y, dy, neuron), rtol=4e-6, atol=1e-6)
    xs = [x, dy, rand(rng, x.shape)]
    assert_close("eltsum", ops.eltsum_forward(dev, [dev.asarray(a) for a in xs], [1, -2, 0.5]),
                 ref.eltsum_forward(xs, [1, -2, 0.5]), rtol=1e-6, atol=1e-6)
    y, which = ops.eltmax_forward(dev, [dev.asarray(a) for a in xs])
    assert_identical("eltmax", y, ref.eltmax_forward(xs)[0])
    assert_identical("eltmax dx", ops.eltmax_backward(dev, which, dev.asarray(dy), 2),
                     ref.eltmax_backward(ref.eltmax_forward(xs)[1], dy, 2))


def test_the_python_table_and_the_kernels_agree_on_the_codes():
    import re
    from helpers import ROOT
    header = (ROOT / "csrc" / "kernels" / "neuron.h").read_text()
    codes = {m.group(1).lower(): int(m.group(2)) for m in re.finditer(r"kNeuron(\w+) = (\d+)", header)}
    assert codes.pop("count") == len(NEURONS)
    assert codes == {name: kind.code for name, kind in NEURONS.items()}
    x = rand(np.random.default_rng(0), 64)
    for neuron in EVERY:  # each code computes its own neuron on the kernels
        want = ref.neuron_forward(x if neuron.name != "sqrt" else np.abs(x), neuron)
        got = ops.neuron_forward(EMU, EMU.asarray(x if neuron.name != "sqrt" else np.abs(x)), neuron)
        assert_close(str(neuron), got, want, rtol=2e-6, atol=1e-6)
