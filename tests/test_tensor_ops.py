"""The layer graph's whole-array ops (``ops.concat``, ``ops.add``, ``ops.scale``, ``ops.window``,
``ops.multiply``): every device against the NumPy reference, bit for bit (one rounding per element on every device), on random data and awkward shapes; in place where
allowed; and bad arguments as clear errors."""
import numpy as np
import pytest
from helpers import NUMPY, assert_identical, assert_raises_each, rand

from convnet import ops
from convnet.devices import Device
from convnet.reference import tensor as ref

RNG = np.random.default_rng(21)
# (first-axis sizes of the parts, the shape after the first axis): one part, odd sizes, the two-tower joins' forms
CONCATS = [((3,), (5,)), ((1, 1), (1,)), ((2, 7, 1), (3, 3, 5)), ((48, 48), (13, 13, 8)), ((4608, 4608), (9,)),
           ((5, 0, 3), (2, 7))]
SHAPES = [(1,), (7,), (17, 3), (3, 5, 5, 31), (2, 1, 1, 10007)]


@pytest.mark.parametrize("sizes, rest", CONCATS, ids=str)
def test_concat_is_the_reference(kernel_device, sizes, rest):
    parts = [rand(RNG, (s, *rest)) for s in sizes]
    got = ops.concat(kernel_device, [kernel_device.asarray(p) for p in parts])
    assert_identical("concat", got, ref.concat(parts))
    assert_identical("concat", got, np.concatenate(parts))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_and_scale_are_the_reference(kernel_device, shape):
    dev = kernel_device
    a, b = rand(RNG, shape), rand(RNG, shape, low=-3, high=3)
    da, db = dev.asarray(a), dev.asarray(b)
    assert_identical("add", ops.add(dev, da, db), a + b)
    assert_identical("scale", ops.scale(dev, da, 0.3), a * np.float32(0.3))
    assert_identical("inputs untouched", da, a)


def test_add_and_scale_in_place(kernel_device):
    dev = kernel_device
    a, b = rand(RNG, (33, 7)), rand(RNG, (33, 7))
    da, db = dev.asarray(a.copy()), dev.asarray(b.copy())
    assert ops.add(dev, da, db, out=da) is da
    assert_identical("a += b", da, a + b)
    assert ops.scale(dev, db, -2.5, out=db) is db
    assert_identical("b *= -2.5", db, b * np.float32(-2.5))


def test_float64_on_the_numpy_device():
    a, b = rand(RNG, (4, 5), np.float64), rand(RNG, (4, 5), np.float64)
    assert_identical("add", ops.add(NUMPY, a, b), a + b)
    assert_identical("concat", ops.concat(NUMPY, [a, b]), np.concatenate([a, b]))


def test_bad_arguments_are_clear_errors(kernel_device):
    dev = kernel_device
    a, b = dev.asarray(rand(RNG, (4, 5))), dev.asarray(rand(RNG, (4, 6)))
    buf = dev.asarray(rand(RNG, (12, 5)))
    other = Device(dev.kind, 1) if dev.kind != "cuda" else NUMPY
    assert_raises_each(
        (TypeError, "non-empty list", lambda: ops.concat(dev, [])),
        (TypeError, "non-empty list", lambda: ops.concat(dev, a)),
        (ValueError, r"arrays\[1\] has shape \(4, 6\)", lambda: ops.concat(dev, [a, b])),
        (ValueError, "at least 1-D", lambda: ops.concat(dev, [dev.zeros(())])),
        (TypeError, r"arrays\[0\] must be a", lambda: ops.concat(dev, [[1.0, 2.0]])),
        (ValueError, r"b must have shape \(4, 5\)", lambda: ops.add(dev, a, b)),
        (TypeError, "b must have dtype", lambda: ops.add(dev, a, np.zeros((4, 5), np.int32))),
        (TypeError, "factor must be a finite real number", lambda: ops.scale(dev, a, float("nan"))),
        (ValueError, "out must have shape", lambda: ops.add(dev, a, a, out=dev.asarray(rand(RNG, (5, 4))))),
        (ValueError, "partially overlaps", lambda: ops.scale(dev, a.reshape(-1)[:10], 2.0, out=a.reshape(-1)[5:15])),
        (ValueError, r"must not overlap arrays\[0\]", lambda: ops.concat(dev, [buf[:4], a], out=buf[2:10])),
    )
    if dev.kind != "cuda":
        with pytest.raises(TypeError, match=f"for device {dev}"):
            ops.add(dev, a, other.asarray(rand(RNG, (4, 5))))


WINDOWS = [((0, 0), (7, 8), 0.0), ((-2, 1), (4, 9), -np.inf), ((1, 2), (3, 3), 0.0), ((6, 0), (2, 2), 1.5),
           ((-1, -1), (7, 8), 0.0), ((2, 3), (3, 3), -np.inf)]


@pytest.mark.parametrize("start, size, fill", WINDOWS, ids=str)
def test_window_is_a_written_out_crop_and_pad(kernel_device, start, size, fill):
    x = rand(RNG, (2, 5, 6, 3))
    want = np.full((2, *size, 3), fill, np.float32)
    for i in range(size[0]):
        for j in range(size[1]):
            r, c = start[0] + i, start[1] + j
            if 0 <= r < 5 and 0 <= c < 6:
                want[:, i, j] = x[:, r, c]
    assert_identical("window", ops.window(NUMPY, x, start, size, fill), want)
    assert_identical("window", ops.window(kernel_device, kernel_device.asarray(x), start, size, fill), want)


def test_multiply_broadcasts_the_factor(kernel_device):
    dev = kernel_device
    x, f = rand(RNG, (3, 5, 6, 33)), rand(RNG, (1, 5, 6, 1), low=0.5, high=4)
    assert_identical("multiply", ops.multiply(dev, dev.asarray(x), dev.asarray(f)), x * f)
    assert_raises_each(
        (ValueError, "does not broadcast", lambda: ops.multiply(dev, dev.asarray(x), dev.asarray(f[:, :4]))),
        (TypeError, "start must be a pair of integers", lambda: ops.window(dev, dev.asarray(x), 0, (2, 2))),
        (ValueError, "size must be positive", lambda: ops.window(dev, dev.asarray(x), (0, 0), (0, 2))),
        (ValueError, "x must be 4-D|x must have 4 dimensions|ndim", lambda: ops.window(dev, dev.asarray(f[0]), (0, 0),
                                                                                     (1, 1))))
