"""ReLU and dropout: kernels (emu, cuda) against the NumPy reference; dropout masks bit-identical everywhere."""
import math

import numpy as np
import pytest

from convnet import ops
from convnet.devices import Device, DeviceUnavailable
from convnet.reference import elementwise as ref
from helpers import (EMU, NUMPY, SCHEDULES, assert_identical, assert_raises_each, numeric_grad, offset_view, rand,
                     schedule)

# Sizes that are not multiples of 4, of a warp or of a block, plus ones spanning several blocks.
SIZES = [1, 3, 4, 5, 31, 33, 255, 257, 1000, 4099, 70001]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.sanitize
def test_relu_forward_backward_match_reference(kernel_device, n):
    rng = np.random.default_rng(n)
    x = rand(rng, n)
    dy = rand(rng, n)
    y = ops.relu_forward(kernel_device, kernel_device.asarray(x))
    assert_identical("relu y", y, ref.relu_forward(x))
    dx = ops.relu_backward(kernel_device, y, kernel_device.asarray(dy))
    assert_identical("relu dx", dx, ref.relu_backward(ref.relu_forward(x), dy))


@pytest.mark.sanitize
def test_relu_nd_unaligned_and_in_place(kernel_device):
    rng = np.random.default_rng(1)
    x = rand(rng, (3, 5, 7, 11))
    view = offset_view(kernel_device, x, rng)  # contiguous but not 16-byte aligned (the scalar path)
    y = ops.relu_forward(kernel_device, view)
    assert_identical("relu unaligned", y, ref.relu_forward(x))
    ops.relu_forward(kernel_device, view, out=view)  # in place
    assert_identical("relu in place", view, ref.relu_forward(x))


def test_relu_special_values(kernel_device):
    x = np.array([np.nan, -0.0, 0.0, -np.inf, np.inf, 1e-38, -1e-38, 3.0], np.float32)
    y = ops.relu_forward(kernel_device, kernel_device.asarray(x))
    assert_identical("relu specials", y, ref.relu_forward(x))
    assert np.signbit(kernel_device.to_numpy(y)).sum() == 0  # -0 becomes +0, NaN becomes 0


@pytest.mark.parametrize("order", SCHEDULES)
def test_every_schedule_gives_identical_results(kernel_device, order):
    rng = np.random.default_rng(7)
    x = kernel_device.asarray(rand(rng, 5003))
    with schedule(kernel_device, order, seed=3):
        y = ops.relu_forward(kernel_device, x)
        d = ops.dropout_forward(kernel_device, x, 0.6, seed=11, offset=2)
    assert_identical("relu", y, ref.relu_forward(kernel_device.to_numpy(x)))
    assert_identical("dropout", d, ref.dropout_forward(kernel_device.to_numpy(x), 0.6, 11, 2))


def test_relu_gradient_finite_difference():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 50)
    x[np.abs(x) < 0.05] = 0.5  # stay away from the kink at 0
    dy = rng.standard_normal(50)
    dx = ops.relu_backward(NUMPY, ops.relu_forward(NUMPY, x), dy)
    numeric = numeric_grad(lambda z: np.dot(dy, ref.relu_forward(z)), x, eps=1e-6)
    np.testing.assert_allclose(dx, numeric, rtol=1e-7, atol=1e-9)


# ---- dropout ----------------------------------------------------------------------------------------------
def test_philox_known_answers():
    # Known-answer vectors of Random123's philox4x32-10 (counter, key) -> output.
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        got = ref.philox4x32_10(*[[c] for c in counter], *key)
        assert tuple(int(g[0]) for g in got) == want


@pytest.mark.parametrize("n", [1, 5, 1023, 4097])
@pytest.mark.parametrize("keep", [0.5, 0.9])
@pytest.mark.sanitize
def test_dropout_masks_and_outputs_bit_identical_across_devices(kernel_device, n, keep):
    rng = np.random.default_rng(n)
    x = rand(rng, n)
    seed, offset = 2**40 + 12345, 2**33 + 7  # exercise the high words of seed and offset
    mask = ops.dropout_mask(kernel_device, n, keep, seed, offset)
    want_mask = ops.dropout_mask(NUMPY, n, keep, seed, offset)
    assert_identical("mask", mask, want_mask)
    y = ops.dropout_forward(kernel_device, kernel_device.asarray(x), keep, seed, offset)
    assert_identical("dropout y", y, ops.dropout_forward(NUMPY, x, keep, seed, offset))
    dx = ops.dropout_backward(kernel_device, kernel_device.asarray(x), keep, seed, offset)
    assert_identical("dropout dx", dx, y)  # same mask and scale, regenerated
    # The kept values are x / keep rounded once; the others exactly 0.
    host = kernel_device.to_numpy(y)
    assert np.array_equal(host[want_mask], x[want_mask] * np.float32(1 / keep))
    assert not host[~want_mask].any()


@pytest.mark.parametrize("start", [1, 2, 3, 4, 4094, 2 * 3 * 1001 + 1])
@pytest.mark.sanitize
def test_dropout_start_draws_the_slice_of_a_larger_mask(kernel_device, start):
    """A tensor with ``start=s`` draws elements [s, s + n) of the mask a tensor of s + n elements draws from 0 (tower
    b's units of a dropout layer split across two towers), on the vector path (start % 4 == 0, aligned) and the
    scalar one, forward and backward."""
    rng = np.random.default_rng(start)
    n, keep, seed, offset = 1001, 0.5, 2**40 + 5, 2**33 + 3
    whole = ops.dropout_mask(NUMPY, start + n, keep, seed, offset)
    mask = ops.dropout_mask(kernel_device, (7, 11, 13), keep, seed, offset, start=start)
    assert_identical("mask slice", mask, whole[start:].reshape(7, 11, 13))
    x = rand(rng, n)
    want = np.where(whole[start:], x * np.float32(1 / keep), np.float32(0))
    for a in (kernel_device.asarray(x), offset_view(kernel_device, x, rng)):
        assert_identical("dropout slice", ops.dropout_forward(kernel_device, a, keep, seed, offset, start=start), want)
        assert_identical("dropout dx slice", ops.dropout_backward(kernel_device, a, keep, seed, offset, start), want)


def test_dropout_start_beyond_32_bits_matches_reference(kernel_device):
    """The stream index is 64 bits: a start past 2**32 elements (its high word in the Philox counter) agrees with
    the reference on every device."""
    start = 2**34 + 6
    assert_identical("mask", ops.dropout_mask(kernel_device, 999, 0.3, 8, 1, start=start),
                     ref.dropout_mask(999, 0.3, 8, 1, start))


def _cuts(rng, B, ranks):
    """``ranks`` shards [a, b) covering [0, B): equal ones when ranks divides B, else random (some maybe empty)."""
    if B % ranks == 0:
        return [(r * B // ranks, (r + 1) * B // ranks) for r in range(ranks)]
    edges = [0, *sorted(int(v) for v in rng.integers(0, B + 1, ranks - 1)), B]
    return list(zip(edges[:-1], edges[1:]))


# (leading shape, global batch B, ranks): conv-side (C, H, W, N) and fc-side (F, N), B not a multiple of 4 or 32,
# odd sizes, 3 shards, a single row, and vector-path shapes (B and the shards multiples of 4)
SHARD_CASES = [((3, 5, 7), 16, 2), ((6, 3, 3), 13, 3), ((37,), 33, 3), ((5, 2, 3), 70, 2), ((2, 3, 4), 128, 2),
               ((256,), 96, 3), ((), 10, 3), ((1, 1, 1), 9, 2), ((9, 4, 4), 12, 3), ((3, 1, 2), 31, 3)]


@pytest.mark.parametrize("lead, B, ranks", SHARD_CASES)
@pytest.mark.sanitize
def test_dropout_shards_draw_their_part_of_the_whole_batchs_mask(any_device, lead, B, ranks):
    """``batch=(B, first)``: a data-parallel rank's images [first, first + n) of a (..., B) tensor draw exactly that
    part of the whole tensor's mask, so the shards' masks and outputs concatenated along N are the single-process
    ones bit for bit (forward, backward, the mask; aligned and unaligned arrays, with and without a ``start``), on
    every device, the reference's shard form included."""
    dev = any_device
    rng = np.random.default_rng(B * 7 + ranks)
    seed, offset = 2**40 + 77, 2**33 + 5
    unit = math.prod(lead[1:]) * B  # elements per unit (channel or feature) of the whole batch
    for start, keep in ((0, 0.5), (9 * unit, 0.8), (3, 0.5)):  # from 0, a tower's units (maskStart = 9), odd
        x = rand(rng, (*lead, B))
        whole_mask = ops.dropout_mask(NUMPY, x.shape, keep, seed, offset, start)
        whole_y = ops.dropout_forward(NUMPY, x, keep, seed, offset, start)
        masks, ys, dxs = [], [], []
        for a, b in _cuts(rng, B, ranks):
            part = np.ascontiguousarray(x[..., a:b])
            masks.append(ops.dropout_mask(dev, part.shape, keep, seed, offset, start, batch=(B, a)))
            arr = offset_view(dev, part, rng) if b - a > 2 and a % 2 else dev.asarray(part)  # some on the scalar path
            ys.append(ops.dropout_forward(dev, arr, keep, seed, offset, start, batch=(B, a)))
            dxs.append(ops.dropout_backward(dev, arr, keep, seed, offset, start=start, batch=(B, a)))
        cat = lambda arrays: np.concatenate([dev.to_numpy(m) for m in arrays], axis=-1)  # noqa: E731
        assert_identical("shard masks", cat(masks), whole_mask)
        assert_identical("shard y", cat(ys), whole_y)
        assert_identical("shard dx", cat(dxs), whole_y)


def test_dropout_whole_batch_is_the_plain_call(kernel_device):
    """``batch=(N, 0)`` (the whole batch, one process) is the call without it, bit for bit: existing masks stay."""
    x = rand(np.random.default_rng(2), (6, 5, 5, 12))
    a = ops.dropout_forward(kernel_device, kernel_device.asarray(x), 0.5, 3, 1, start=40)
    b = ops.dropout_forward(kernel_device, kernel_device.asarray(x), 0.5, 3, 1, start=40, batch=(12, 0))
    assert_identical("batch=(N, 0)", b, a)
    assert_identical("against numpy", a, ref.dropout_forward(x, 0.5, 3, 1, 40))


def test_dropout_shard_beyond_32_bits_matches_reference(kernel_device):
    """Stream indices past 2**32 (a big start, rows * B past 2**32) in the shard form agree with the reference's
    whole-batch mask on every device: the 64-bit index arithmetic of the row mapping."""
    start, B = 2**34 + 2, 2**31 + 3
    mask = ops.dropout_mask(kernel_device, (3, 5), 0.3, 8, 1, start=start, batch=(B, B - 7))
    want = np.stack([ref.dropout_mask(5, 0.3, 8, 1, start + r * B + B - 7) for r in range(3)])
    assert_identical("mask", mask, want)


@pytest.mark.sanitize
def test_dropout_unaligned_matches(kernel_device):
    rng = np.random.default_rng(5)
    x = rand(rng, 1001)
    view = offset_view(kernel_device, x, rng)
    y = ops.dropout_forward(kernel_device, view, 0.7, seed=9)
    assert_identical("dropout unaligned", y, ops.dropout_forward(NUMPY, x, 0.7, seed=9))


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.8])
def test_dropout_keep_rate_statistics(kernel_device, keep):
    n = 200_003
    mask = kernel_device.to_numpy(ops.dropout_mask(kernel_device, n, keep, seed=2024))
    rate = mask.mean()
    sigma = np.sqrt(keep * (1 - keep) / n)
    assert abs(rate - keep) < 5 * sigma, f"keep rate {rate:.5f} vs {keep} (5 sigma = {5 * sigma:.5f})"
    # No structure in the mask: each of the four Philox words and consecutive pairs behave independently.
    for lane in range(4):
        assert abs(mask[lane::4].mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / (n / 4))
    both = (mask[:-1] & mask[1:]).mean()
    assert abs(both - keep * keep) < 6 * np.sqrt(keep * keep * (1 - keep * keep) / n)


def test_dropout_seeds_and_offsets_give_different_masks():
    a = ops.dropout_mask(NUMPY, 4096, 0.5, seed=1, offset=0)
    for other in (ops.dropout_mask(NUMPY, 4096, 0.5, seed=2, offset=0),
                  ops.dropout_mask(NUMPY, 4096, 0.5, seed=1, offset=1)):
        agreement = (a == other).mean()
        assert 0.45 < agreement < 0.55  # independent masks agree about half the time


def test_dropout_keep_one_is_identity(kernel_device):
    x = rand(np.random.default_rng(3), 999)
    y = ops.dropout_forward(kernel_device, kernel_device.asarray(x), 1.0, seed=5)
    assert_identical("keep=1", y, x)


def test_dropout_float64_reference_matches_float32_mask():
    x = np.random.default_rng(4).uniform(0.5, 1.0, 1000)  # no zeros, so the mask is visible in the output
    y64 = ops.dropout_forward(NUMPY, x, 0.5, seed=3)
    y32 = ops.dropout_forward(NUMPY, x.astype(np.float32), 0.5, seed=3)
    assert np.array_equal(y64 != 0, y32 != 0)
    np.testing.assert_allclose(y64[y64 != 0], 2 * x[y64 != 0], rtol=1e-15)


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(kernel_device):
    dev = kernel_device
    good = dev.asarray(np.ones(8, np.float32))
    assert_raises_each(
        (TypeError, "dtype float32", lambda: ops.relu_forward(dev, dev.asarray(np.ones(8, np.float64)))),
        (TypeError, "x must be a", lambda: ops.relu_forward(dev, [1.0, 2.0])),
        (ValueError, "C-contiguous", lambda: ops.relu_forward(dev, dev.asarray(np.ones((4, 4), np.float32))[:, ::2])),
        (ValueError, "dy must have shape", lambda: ops.relu_backward(dev, good, dev.asarray(np.ones(9, np.float32)))),
        (ValueError, "out must have shape",
         lambda: ops.relu_forward(dev, good, out=dev.asarray(np.ones(7, np.float32)))),
        (ValueError, "keep must be > 0", lambda: ops.dropout_forward(dev, good, 0.0, seed=1)),
        (ValueError, "keep must be <= 1", lambda: ops.dropout_forward(dev, good, 1.5, seed=1)),
        (ValueError, "seed must be an integer", lambda: ops.dropout_forward(dev, good, 0.5, seed=-1)),
        (TypeError, "keep must be a finite", lambda: ops.dropout_forward(dev, good, float("nan"), seed=1)),
        (ValueError, r"start must be an integer in \[0, 2\*\*64\)", lambda: ops.dropout_forward(dev, good, 0.5, 1,
                                                                                            start=-4)),
        (ValueError, r"start \+ the number of elements must be below 2\*\*64",
         lambda: ops.dropout_backward(dev, good, 0.5, 1, start=2**64 - 8)),
        (ValueError, r"start \+ the number of elements", lambda: ops.dropout_mask(dev, 9, 0.5, 1, start=2**64 - 9)),
    )
    shard = dev.asarray(np.ones((3, 4), np.float32))  # 3 rows of 4 images
    assert_raises_each(
        (ValueError, r"batch must be a pair \(global_n, first\)", lambda: ops.dropout_forward(dev, shard, 0.5, 1,
                                                                                                batch=8)),
        (ValueError, r"batch must be a pair", lambda: ops.dropout_forward(dev, shard, 0.5, 1, batch=(8, 1, 2))),
        (ValueError, r"batch must be a pair", lambda: ops.dropout_forward(dev, shard, 0.5, 1, batch=(8.0, 0))),
        (ValueError, r"batch must be a pair", lambda: ops.dropout_backward(dev, shard, 0.5, 1, batch=(True, 0))),
        (ValueError, r"must hold this array's 4 images: 0 <= first and first \+ 4 <= global_n",
         lambda: ops.dropout_forward(dev, shard, 0.5, 1, batch=(8, 5))),
        (ValueError, r"must hold this array's 4 images", lambda: ops.dropout_forward(dev, shard, 0.5, 1, batch=(3, 0))),
        (ValueError, r"must hold this array's 4 images", lambda: ops.dropout_backward(dev, shard, 0.5, 1,
                                                                                       batch=(8, -1))),
        (ValueError, r"must hold this array's 4 images", lambda: ops.dropout_mask(dev, (2, 4), 0.5, 1, batch=(6, 3))),
        (ValueError, r"batch needs an array with a batch axis", lambda: ops.dropout_mask(dev, (), 0.5, 1,
                                                                                          batch=(1, 0))),
        (ValueError, r"start \+ the number of elements of the whole batch \(3 x 9223372036854775808\) must be below",
         lambda: ops.dropout_forward(dev, shard, 0.5, 1, batch=(2**63, 0))),
        (ValueError, r"of the whole batch", lambda: ops.dropout_mask(dev, (3, 4), 0.5, 1, start=2**64 - 20,
                                                                     batch=(8, 2))),
    )


def test_dropout_launchers_recheck_the_shard():
    """Past the Python checks, the emu/cuda launcher and the cpu loop re-check a shard's (batch, first) and the 64-bit
    stream range: a ValueError, never a launch (tests call the private bindings directly)."""
    from convnet import _cpu
    k, x, m = EMU.kernels, np.ones((3, 4), np.float32), np.zeros((3, 4), np.uint8)
    t = ref.keep_threshold(0.5)
    with pytest.raises(ValueError, match="first \\+ cols must be at most batch"):
        k.dropout_mask(m.ctypes.data, 3, 4, 8, 5, t, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="start \\+ rows \\* batch must be below 2\\^64"):
        k.dropout_apply(x.ctypes.data, x.ctypes.data, 3, 4, 2**63, 0, t, 2.0, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="rows and cols must be non-negative"):
        k.dropout_mask(m.ctypes.data, -1, 4, 8, 0, t, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="first \\+ the shard's images must be at most the batch"):
        _cpu.dropout_apply(x, np.empty_like(x), t, 2.0, 1, 0, (0, 8, 5))
    with pytest.raises(ValueError, match="overflow 64 bits"):
        _cpu.dropout_apply(x, np.empty_like(x), t, 2.0, 1, 0, (2**64 - 20, 8, 0))


def test_numpy_array_on_cuda_device_is_rejected():
    try:
        import cupy  # noqa: F401
    except ImportError:  # without CuPy the cuda device itself is the problem, and the error says so
        with pytest.raises(DeviceUnavailable, match="CuPy is not installed"):
            ops.relu_forward(Device("cuda"), np.ones(4, np.float32))
        return
    with pytest.raises(TypeError, match="cupy.ndarray"):
        ops.relu_forward(Device("cuda"), np.ones(4, np.float32))
