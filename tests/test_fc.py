"""Fully-connected layers: NumPy reference, then the op on every available device."""
import re

import numpy as np
import pytest

from convnet import ops
from convnet.reference import fc as ref
from convnet.devices import Device
from convnet.ops.fc import round_bf16_on, round_tf32_on, to_bf16_on
from convnet.reference.precision import round_bf16, round_tf32, to_bf16
from convnet.reference.storage import BFLOAT16
from helpers import assert_close, assert_raises_each, check_grad, to_host, NUMPY


def test_reference_gradients():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 4))
    w = rng.standard_normal((5, 6))
    b = rng.standard_normal(5)
    r = rng.standard_normal((5, 4))
    f = lambda xx, ww, bb: float((ref.fc_forward(xx, ww, bb) * r).sum())
    check_grad(lambda z: f(z, w, b), x, ref.fc_backward_data(r, w))
    check_grad(lambda z: f(x, z, b), w, ref.fc_backward_weights(x, r))
    check_grad(lambda z: f(x, w, z), b, ref.fc_backward_bias(r))


# ---------------------------------------------------------------------------------------------------- op layer
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 0.0), (2.0, 1.0), (-1.0, 0.25)])
@pytest.mark.sanitize
def test_ops_match_reference(any_device, alpha, beta):
    dev = any_device
    rng = np.random.default_rng(40)
    I, O, N = 33, 17, 12
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((I, N), (O, I), (O,)))
    dy = rng.standard_normal((O, N)).astype(np.float32)
    cases = [
        (ops.fc_forward, (x, w, b), ref.fc_forward(x, w, b), (O, N)),
        (ops.fc_forward, (x, w), ref.fc_forward(x, w), (O, N)),
        (ops.fc_backward_data, (dy, w), ref.fc_backward_data(dy, w), (I, N)),
        (ops.fc_backward_weights, (x, dy), ref.fc_backward_weights(x, dy), (O, I)),
        (ops.fc_backward_bias, (dy,), ref.fc_backward_bias(dy), (O,)),
    ]
    for fn, args, want, shape in cases:
        prior = rng.standard_normal(shape).astype(np.float32)
        if beta == 0.0:
            prior[...] = np.nan  # beta = 0 must not read out
        out = dev.asarray(prior.copy())
        got = fn(dev, *(dev.asarray(a) for a in args), out=out, alpha=alpha, beta=beta)
        assert got is out
        expect = alpha * want + (beta * prior if beta else 0)
        assert_close(fn.__name__, got, expect, rtol=1e-5, atol=1e-5)
        fresh = fn(dev, *(dev.asarray(a) for a in args))
        assert_close(fn.__name__ + " (fresh)", fresh, want, rtol=1e-5, atol=1e-5)


def test_float64_on_numpy():
    rng = np.random.default_rng(41)
    x, w = rng.standard_normal((5, 3)), rng.standard_normal((4, 5))
    y = ops.fc_forward("numpy", x, w)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, w @ x)


def test_bad_inputs(any_device):
    dev = any_device
    x = dev.asarray(np.zeros((5, 3), np.float32))
    w = dev.asarray(np.zeros((4, 5), np.float32))
    a = dev.asarray(np.zeros((4, 4), np.float32))
    assert_raises_each(
        (ValueError, r"x must have shape \(5, N\)",
         lambda: ops.fc_forward(dev, dev.asarray(np.zeros((6, 3), np.float32)), w)),
        (ValueError, r"bias must have shape \(4\)",
         lambda: ops.fc_forward(dev, x, w, dev.asarray(np.zeros(5, np.float32)))),
        (ValueError, "dy must have shape", lambda: ops.fc_backward_data(dev, x, w)),
        (ValueError, "same number of images",
         lambda: ops.fc_backward_weights(dev, x, dev.asarray(np.zeros((4, 2), np.float32)))),
        (ValueError, "out must have shape",
         lambda: ops.fc_forward(dev, x, w, out=dev.asarray(np.zeros((3, 4), np.float32)))),
        (TypeError, "alpha", lambda: ops.fc_forward(dev, x, w, alpha="1")),
        (ValueError, "out must not overlap x",
         lambda: ops.fc_forward(dev, a, dev.asarray(np.zeros((4, 4), np.float32)), out=a)),
    )


@pytest.mark.sanitize
def test_beta_without_out_does_not_read_a_new_buffer(kernel_device):
    """beta scales the caller's ``out``; with no ``out`` there is nothing to accumulate into (regression: a freshly
    allocated output's garbage used to be scaled in)."""
    rng = np.random.default_rng(0)
    host = {"x": rng.uniform(-1, 1, (2, 7, 6, 5)).astype(np.float32),
            "w": rng.uniform(-1, 1, (2, 3, 3, 4)).astype(np.float32),
            "a": rng.uniform(-1, 1, (6, 5)).astype(np.float32), "m": rng.uniform(-1, 1, (3, 6)).astype(np.float32)}
    d = {k: kernel_device.asarray(v) for k, v in host.items()}
    calls = [
        (lambda dev, a, **k: ops.conv_forward(dev, a["x"], a["w"], padding=1, **k)),
        (lambda dev, a, **k: ops.conv_backward_bias(dev, a["x"], **k)),
        (lambda dev, a, **k: ops.fc_forward(dev, a["a"], a["m"], **k)),
        (lambda dev, a, **k: ops.fc_backward_bias(dev, a["a"], **k)),
    ]
    for call in calls:
        want = 2.0 * call("numpy", host)
        for _ in range(2):  # a reused allocation would hold the previous result
            got = call(kernel_device, d, alpha=2.0, beta=0.5)
            np.testing.assert_allclose(kernel_device.to_numpy(got), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- TF32
# ``precision="tf32"``: the GEMM operands rounded to TF32 (cvt.rna), products accumulated in FP32.
#
# Tolerance, per element, against the float64 reference on TF32-rounded inputs, S = the same GEMM of absolute values
# (plus |bias|): the product of two TF32 values (11 significant bits each) is exact in FP32, so only FP32 rounding errs:
# K - 1 additions, the bias and the alpha scaling, each at most u = 2**-24 relative to S, in any summation order:
# |got - want| <= (K + 3) u |alpha| S, plus with beta 2 u |beta prior| (its product and the final addition); doubled
# for a GPU's adder tree, which may truncate. A missing rounding (or the truncation a tensor core applies to raw FP32) errs by up to
# 2**-10 S per product: each case with K >= 7 also checks that the result is at least 20 times closer to the rounded
# reference than the exact (unrounded) result is, so an unrounded GEMM fails.

U = 2.0 ** -24
# (I, O, N): awkward sizes, N not a multiple of 4, K = 1, long reductions
FC_SHAPES = [(33, 17, 12), (1, 5, 3), (7, 1, 1), (130, 9, 5), (64, 64, 64), (257, 31, 7), (9, 300, 2)]


def _tf32_cases(rng, I, O, N):
    x, w, b, dy = (rng.uniform(-1, 1, s).astype(np.float32) for s in ((I, N), (O, I), (O,), (O, N)))
    r = lambda *a: [round_tf32(v).astype(np.float64) for v in a]
    xr, wr, dyr = r(x, w, dy)
    a64 = lambda v: np.abs(v.astype(np.float64))
    return [  # (op, args, rounded reference, exact reference, S, K)
        (ops.fc_forward, (x, w, b), ref.fc_forward(xr, wr, b.astype(np.float64)),
         ref.fc_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)),
         ref.fc_forward(a64(xr), a64(wr), a64(b)), I),
        (ops.fc_backward_data, (dy, w), ref.fc_backward_data(dyr, wr),
         ref.fc_backward_data(dy.astype(np.float64), w.astype(np.float64)), ref.fc_backward_data(a64(dyr), a64(wr)), O),
        (ops.fc_backward_weights, (x, dy), ref.fc_backward_weights(xr, dyr),
         ref.fc_backward_weights(x.astype(np.float64), dy.astype(np.float64)),
         ref.fc_backward_weights(a64(xr), a64(dyr)), N),
    ]


def _check_tf32(dev, shape):
    """Every tf32 GEMM op on ``dev`` against the rounded float64 reference, with and without alpha and beta."""
    rng = np.random.default_rng(sum(shape))
    for alpha, beta in ((1.0, 0.0), (-0.5, 0.75)):
        for fn, args, want, exact, S, K in _tf32_cases(rng, *shape):
            prior = rng.uniform(-1, 1, want.shape).astype(np.float32)
            out = dev.asarray(prior.copy()) if beta else None
            got = dev.to_numpy(fn(dev, *(dev.asarray(a) for a in args), out=out, alpha=alpha, beta=beta,
                                  precision="tf32")).astype(np.float64)
            want = alpha * want + beta * prior
            exact = alpha * exact + beta * prior
            bound = 2 * ((K + 3) * U * abs(alpha) * S + (2 * U * abs(beta) * np.abs(prior) if beta else 0))
            err = np.abs(got - want)
            assert (err <= bound).all(), f"{fn.__name__} {shape}: worst excess {np.max(err - bound):.3g}"
            if K >= 7:  # the rounding shows: got is far closer to the rounded reference than the exact result is
                assert 20 * np.max(err) < np.max(np.abs(exact - want)), f"{fn.__name__} {shape}: rounding unseen"


@pytest.mark.parametrize("shape", FC_SHAPES, ids=[f"I{i}-O{o}-N{n}" for i, o, n in FC_SHAPES])
def test_tf32_matches_the_float64_reference_on_rounded_inputs(any_device, shape):
    _check_tf32(any_device, shape)


def test_tf32_rounds_on_the_device_as_the_reference_does(any_device):
    """Ties away from zero, a carry into the exponent (to inf at the top), subnormals, signed zeros, inf and NaN."""
    bits = np.array([0x3F800FFF, 0x3F801000, 0x3F801001, 0xBF801000, 0x3F802000, 0x7F7FF000, 0x7F7FEFFF, 0x00001000,
                     0x00000FFF, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0x3FFFF000],
                    np.uint32)
    values = np.concatenate([bits.view(np.float32),
                             np.random.default_rng(3).standard_normal(200).astype(np.float32)]).reshape(5, -1)
    got = to_host(round_tf32_on(dev := any_device, dev.asarray(values)))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), round_tf32(values).view(np.uint32))


def test_tf32_on_numpy_in_float64_accumulates_in_float64():
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((40, 3)), rng.standard_normal((6, 40))
    y = ops.fc_forward(NUMPY, x, w, precision="tf32")
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, round_tf32(w).astype(np.float64) @ round_tf32(x).astype(np.float64), rtol=1e-12)


def test_fp32_is_the_default_bit_for_bit(kernel_device):
    dev = kernel_device
    rng = np.random.default_rng(6)
    x, w, b = (dev.asarray(rng.uniform(-1, 1, s).astype(np.float32)) for s in ((37, 5), (11, 37), (11,)))
    np.testing.assert_array_equal(to_host(ops.fc_forward(dev, x, w, b, precision="fp32")),
                                  to_host(ops.fc_forward(dev, x, w, b)))


@pytest.mark.parametrize("precision,message", [
    ("fp16", "precision must be one of 'fp32', 'tf32', 'bf16', got 'fp16'"),
    (None, "precision must be one of")])
def test_an_unknown_or_unimplemented_precision_is_a_clear_error(precision, message):
    x, w = np.ones((3, 2), np.float32), np.ones((4, 3), np.float32)
    for call in (lambda: ops.fc_forward(NUMPY, x, w, precision=precision),
                 lambda: ops.fc_backward_data(NUMPY, np.ones((4, 2), np.float32), w, precision=precision),
                 lambda: ops.fc_backward_weights(NUMPY, x, np.ones((4, 2), np.float32), precision=precision)):
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


# ``precision="bf16"``: the activation operands (x, dy) float32 rounded to bfloat16 (nearest even) on load, or
# bfloat16 arrays; w float32 rounded to bfloat16 for the product; FP32 sums. The tolerance is the tf32 one (the product
# of two bfloat16 values, 8 significant bits each, is exact in FP32 as well), and a bfloat16 result adds its one
# rounding to nearest even: at most 2**-9 of its magnitude, bounded by 2**-8 |want| + the FP32 bound again.
def _bf16_cases(rng, I, O, N, stored):
    x, w, b, dy = (rng.uniform(-1, 1, s).astype(np.float32) for s in ((I, N), (O, I), (O,), (O, N)))
    if stored:  # the activations as the bf16 mode keeps them
        x, dy = to_bf16(x), to_bf16(dy)
    r = lambda *a: [round_bf16(v.astype(np.float32)).astype(np.float64) for v in a]
    xr, wr, dyr = r(x, w, dy)
    a64 = lambda v: np.abs(v.astype(np.float64))
    exact = lambda v: v.astype(np.float32).astype(np.float64)
    return [  # (op, args, rounded reference, exact reference, S, K, may the result be bfloat16)
        (ops.fc_forward, (x, w, b), ref.fc_forward(xr, wr, b.astype(np.float64)),
         ref.fc_forward(exact(x), exact(w), b.astype(np.float64)), ref.fc_forward(a64(xr), a64(wr), a64(b)), I, True),
        (ops.fc_backward_data, (dy, w), ref.fc_backward_data(dyr, wr), ref.fc_backward_data(exact(dy), exact(w)),
         ref.fc_backward_data(a64(dyr), a64(wr)), O, True),
        (ops.fc_backward_weights, (x, dy), ref.fc_backward_weights(xr, dyr),
         ref.fc_backward_weights(exact(x), exact(dy)), ref.fc_backward_weights(a64(xr), a64(dyr)), N, False),
    ]


def _check_bf16(dev, shape):
    """Every bf16 GEMM op on ``dev`` against the rounded float64 reference: float32 and bfloat16 operands, float32
    and bfloat16 results, with and without alpha and beta."""
    rng = np.random.default_rng(sum(shape) + 1)
    for stored, out_dtype, alpha, beta in ((False, np.float32, 1.0, 0.0), (True, np.float32, -0.5, 0.75),
                                           (True, BFLOAT16, 1.0, 0.0), (False, BFLOAT16, 2.0, -0.5)):
        for fn, args, want, exact, S, K, bf16_out in _bf16_cases(rng, *shape, stored):
            dtype = out_dtype if bf16_out else np.float32
            prior = rng.uniform(-1, 1, want.shape).astype(np.float32).astype(dtype)
            out = dev.asarray(prior.copy()) if beta or dtype == BFLOAT16 else None
            got = to_host(fn(dev, *(dev.asarray(a) for a in args), out=out, alpha=alpha, beta=beta,
                             precision="bf16"))
            assert got.dtype == dtype, (fn.__name__, got.dtype)
            got = got.astype(np.float64)
            prior = prior.astype(np.float64)
            want = alpha * want + beta * prior
            exact = alpha * exact + beta * prior
            bound = 2 * ((K + 3) * U * abs(alpha) * S + (2 * U * abs(beta) * np.abs(prior) if beta else 0))
            if dtype == BFLOAT16:
                bound = 2 ** -8 * np.abs(want) + 2 * bound
            err = np.abs(got - want)
            assert (err <= bound).all(), f"{fn.__name__} {shape}: worst excess {np.max(err - bound):.3g}"
            if K >= 7 and dtype == np.float32 and not (stored and fn is ops.fc_backward_weights):
                # the input rounding shows (bfloat16 x and dy are their own rounding: nothing to see)
                assert 20 * np.max(err) < np.max(np.abs(exact - want)), f"{fn.__name__} {shape}: rounding unseen"


@pytest.mark.parametrize("shape", FC_SHAPES, ids=[f"I{i}-O{o}-N{n}" for i, o, n in FC_SHAPES])
def test_bf16_matches_the_float64_reference_on_rounded_inputs(any_device, shape):
    _check_bf16(any_device, shape)


def test_bf16_rounds_on_the_device_as_the_reference_does(any_device):
    """Ties to even (both ways, both signs), a carry into the exponent (to inf at the top), subnormals, signed zeros,
    inf and NaN (NaN stays NaN: compared as NaN, the payload is free)."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0xBF808000, 0xBF818000, 0x3F807FFF, 0x7F7F8000, 0x7F7F7FFF,
                     0x00008000, 0x00018000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0xFFFFFFFF],
                    np.uint32)
    values = np.concatenate([bits.view(np.float32),
                             np.random.default_rng(4).standard_normal(224).astype(np.float32)]).reshape(8, -1)
    got = to_host(round_bf16_on(dev := any_device, dev.asarray(values), np.float32))
    want = round_bf16(values)
    assert got.dtype == np.float32
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    stored = to_host(round_bf16_on(dev, dev.asarray(to_bf16(values)), np.float32))  # bfloat16: exactly its values
    np.testing.assert_array_equal(np.isnan(stored), nan)
    np.testing.assert_array_equal(stored[~nan], want[~nan])


def test_bias_gradients_of_bfloat16_dy_are_float32_sums(any_device):
    """fc_backward_bias and conv_backward_bias on a bfloat16 dy: float32 results, the FP32 sums of its values (K - 1
    additions: (K + 1) u of the sum of magnitudes, doubled for a GPU's order), with alpha and beta."""
    dev = any_device
    rng = np.random.default_rng(11)
    for dy_shape in ((13, 7), (5, 3, 2, 9)):
        dy = to_bf16(rng.uniform(-1, 1, dy_shape))
        values = dy.astype(np.float64).reshape(dy_shape[0], -1)
        prior = rng.uniform(-1, 1, dy_shape[0]).astype(np.float32)
        want = 0.5 * values.sum(axis=1) - 2.0 * prior
        bound = 2 * (values.shape[1] + 3) * U * (0.5 * np.abs(values).sum(axis=1) + 2.0 * np.abs(prior))
        op = ops.fc_backward_bias if len(dy_shape) == 2 else ops.conv_backward_bias
        got = to_host(op(dev, dev.asarray(dy), out=dev.asarray(prior.copy()), alpha=0.5, beta=-2.0))
        assert got.dtype == np.float32
        assert (np.abs(got - want) <= bound).all(), op.__name__
        assert to_host(op(dev, dev.asarray(dy))).dtype == np.float32


def test_bf16_operand_rules_are_clear_errors():
    x, w, dy = np.ones((3, 2), np.float32), np.ones((4, 3), np.float32), to_bf16(np.ones((4, 2)))
    with pytest.raises(TypeError, match="w must have dtype float32 or float64"):
        ops.fc_forward(NUMPY, x, to_bf16(w), precision="bf16")  # FP32 master weights
    with pytest.raises(TypeError, match="bfloat16"):
        ops.fc_forward(NUMPY, to_bf16(x), w, precision="fp32")  # bfloat16 arrays need precision bf16
    with pytest.raises(TypeError, match="out must have dtype float32"):
        ops.fc_backward_weights(NUMPY, x, dy, out=np.empty((4, 3), BFLOAT16), precision="bf16")
    with pytest.raises(TypeError, match="x has dtype float64 but dy has float32"):
        ops.fc_backward_weights(NUMPY, x.astype(np.float64), dy.astype(np.float32), precision="bf16")


# ---------------------------------------------------------------------------------------------------- cuda path
# The cuda path on the fake GPU (tests/fake_cupy.py): CuPy's calls as this machine runs them, the elementwise kernels
# compiled from their source by the host's C++ compiler, cuBLAS's gemmEx computed from its column-major arguments
# (a wrong transpose or leading dimension gives a wrong product or an error). The same checks as on every device.
FAKE_SHAPES = [(33, 17, 12), (1, 5, 3), (7, 1, 1), (130, 9, 5), (9, 30, 2)]
_FAKE_IDS = [f"I{i}-O{o}-N{n}" for i, o, n in FAKE_SHAPES]


@pytest.fixture
def fake_gpu(monkeypatch):
    from fake_cupy import FakeCupy
    fake = FakeCupy(devices=1).install(monkeypatch)
    fake.recording = True
    return fake, Device("cuda", 0)


# the CuPy calls a rounding on the device made before (several elementwise operations per operand)
_SEVERAL_OPS = {"where", "__and__", "__add__", "__or__", "__rshift__", "__ne__", "__eq__"}


@pytest.mark.parametrize("shape", FAKE_SHAPES, ids=_FAKE_IDS)
def test_tf32_on_the_fake_gpu_rounds_in_one_kernel_per_operand_then_uses_cublas_tf32(fake_gpu, shape):
    """The fake's TF32 GEMM truncates its inputs (tests/fake_cupy.py): only inputs rounded first give the rounded
    reference's products; each operand is rounded by one kernel; the compute type is TF32 for the GEMM only."""
    fake, dev = fake_gpu
    _check_tf32(dev, shape)
    names = [c[0] for c in fake.calls]
    assert names.count("elementwise convnet_round_tf32") == 2 * names.count("matmul tf32") == 2 * 6
    assert not _SEVERAL_OPS & set(names), sorted(_SEVERAL_OPS & set(names))
    linalg = fake._core._routines_linalg
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT


@pytest.mark.parametrize("shape", FAKE_SHAPES, ids=_FAKE_IDS)
def test_bf16_on_the_fake_gpu_is_one_bf16_gemm_on_operands_converted_in_one_kernel(fake_gpu, shape):
    """bf16 on cuda: float32 operands converted to bfloat16 by one kernel each (bfloat16 ones as they are), then one
    cuBLAS gemmEx per call on the bfloat16 arrays (never CuPy's FP32 matmul); a bfloat16 result rounded by the same
    kernel."""
    fake, dev = fake_gpu
    _check_bf16(dev, shape)
    names = [c[0] for c in fake.calls]
    assert "matmul" not in names and not _SEVERAL_OPS & set(names), sorted(_SEVERAL_OPS & set(names))
    assert names.count("gemmEx") == 12  # 4 cases of 3 ops
    # per case, the float32 operands of the 3 ops plus the bfloat16 results (fc_forward's, fc_backward_data's):
    # float32 x and dy (2 + 2 + 2), bfloat16 x and dy (w only: 1 + 1 + 0), then 2 results in the 3rd and 4th cases
    assert names.count("elementwise convnet_round_bf16") == 6 + 2 + (2 + 2) + (6 + 2)
    fake.calls.clear()
    x, dy = (dev.asarray(to_bf16(np.ones(s))) for s in ((4, 3), (2, 3)))
    ops.fc_backward_weights(dev, x, dy, precision="bf16")  # bfloat16 x and dy: nothing to convert
    assert [c[0] for c in fake.calls if c[0].startswith(("elementwise", "gemmEx"))] == ["gemmEx"]


def test_the_rounding_kernels_are_bit_identical_to_the_reference_on_the_fake_gpu(fake_gpu):
    _, dev = fake_gpu
    _check_tf32_rounding(dev)
    _check_bf16_conversion(dev)


def test_to_bf16_on_the_device_is_bit_identical_to_the_reference(any_device):
    _check_bf16_conversion(any_device)


def _special_bf16_values(seed):
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0xBF808000, 0xBF818000, 0x3F807FFF, 0x7F7F8000, 0x7F7F7FFF,
                     0x00008000, 0x00018000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0xFFFFFFFF,
                     0xFF7FFFFF, 0x7FFFFFFF, 0xFF800001, 0x00007FFF],
                    np.uint32)
    return np.concatenate([bits.view(np.float32),
                           np.random.default_rng(seed).standard_normal(220).astype(np.float32)]).reshape(8, -1)


def _check_bf16_conversion(dev):
    """ops.fc.to_bf16_on: the bits of ``to_bf16`` (NaN included: ml_dtypes' quiet NaN, signed), for a contiguous
    array and a transposed view; a bfloat16 array as it is."""
    values = _special_bf16_values(12)
    for a in (dev.asarray(values), dev.asarray(values.T.copy()).T):
        got = to_host(to_bf16_on(dev, a))
        assert got.dtype == BFLOAT16 and got.shape == values.shape
        np.testing.assert_array_equal(got.view(np.uint16), to_bf16(values).view(np.uint16))
    stored = dev.asarray(to_bf16(values))
    assert to_bf16_on(dev, stored) is stored


def _check_tf32_rounding(dev):
    bits = np.array([0x3F800FFF, 0x3F801000, 0x3F801001, 0xBF801000, 0x3F802000, 0x7F7FF000, 0x7F7FEFFF, 0x00001000,
                     0x00000FFF, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 0x3FFFF000],
                    np.uint32)
    values = np.concatenate([bits.view(np.float32),
                             np.random.default_rng(3).standard_normal(200).astype(np.float32)]).reshape(5, -1)
    for a in (dev.asarray(values), dev.asarray(values.T.copy()).T):
        got = to_host(round_tf32_on(dev, a))
        assert got.dtype == np.float32 and got.shape == values.shape
        np.testing.assert_array_equal(got.view(np.uint32), round_tf32(values).view(np.uint32))


def test_the_fake_gemm_computes_from_the_column_major_arguments(fake_gpu):
    """gemm_bf16's cuBLAS call on the fake, and the fake's gemmEx itself: the right arguments give a @ b; a transpose
    flag or a leading dimension that does not fit the memory gives another product or an error (so the fc tests on
    the fake GPU catch such a mistake)."""
    from convnet.devices.backend_cuda import gemm_bf16
    from fake_cupy import CublasError
    fake, dev = fake_gpu
    rng = np.random.default_rng(13)
    M, K, N = 5, 7, 3
    a, b = to_bf16(rng.uniform(-1, 1, (M, K))), to_bf16(rng.uniform(-1, 1, (K, N)))
    want = a.astype(np.float64) @ b.astype(np.float64)
    bound = 2 * (K + 1) * U * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    da, db = dev.asarray(a), dev.asarray(b)
    for x, y in ((da, db), (dev.asarray(a.T.copy()).T, db), (da, dev.asarray(b.T.copy()).T)):  # C and F layouts
        got = to_host(gemm_bf16(fake, x, y))
        assert got.dtype == np.float32 and (np.abs(got - want) <= bound).all()
    assert_raises_each(
        (TypeError, "a must be a 2-D bfloat16 array", lambda: gemm_bf16(fake, dev.asarray(a.astype(np.float32)), db)),
        (ValueError, r"a \(5, 7\) and b \(5, 7\) do not multiply", lambda: gemm_bf16(fake, da, da)),
        (ValueError, "out must be a C-contiguous float32 array of shape",
         lambda: gemm_bf16(fake, da, db, out=dev.empty((N, M), np.float32))))
    blas, rt = fake.cuda.cublas, fake.cuda.runtime
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    square = dev.asarray(to_bf16(rng.uniform(-1, 1, (K, K))))
    c = dev.empty((K, K), np.float32)

    def gemm(transa=blas.CUBLAS_OP_N, lda=K, ldc=K):  # column-major: c.T = square.T @ square.T, i.e. c = sq @ sq
        blas.gemmEx(fake.cuda.get_cublas_handle(), transa, blas.CUBLAS_OP_N, K, K, K, one.ctypes.data,
                    square.data.ptr, rt.CUDA_R_16BF, lda, square.data.ptr, rt.CUDA_R_16BF, K, zero.ctypes.data,
                    c.data.ptr, rt.CUDA_R_32F, ldc, blas.CUBLAS_COMPUTE_32F, blas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)
        return to_host(c).astype(np.float64)

    sq = to_host(square).astype(np.float64)
    np.testing.assert_allclose(gemm(), sq @ sq, rtol=0, atol=1e-5)
    assert np.max(np.abs(gemm(transa=blas.CUBLAS_OP_T) - sq @ sq)) > 1e-2  # a wrong transpose: another product
    for wrong in (dict(lda=K + 1), dict(lda=K - 1), dict(ldc=K + 1)):
        with pytest.raises(CublasError, match="gemmEx"):
            gemm(**wrong)
