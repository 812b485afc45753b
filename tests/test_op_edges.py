"""Edges of the op API, on numpy and emu alike (and cuda when a GPU works, where the
rule applies):

* a read-only ``out`` (``np.frombuffer(bytes)``, a read-only memmap) is a ValueError from every op that writes one,
  never written (on emu it crashed the process or wrote into an immutable ``bytes``);
* ``out`` partially (or wholly) overlapping an input is rejected by every non-element-wise op on every device: one
  rule, so a call that works on numpy works on the kernels;
* integers too large for the kernels' 32-bit arguments are a named ValueError before pybind11 sees them;
  ``softmax_cross_entropy`` checks its 2**31 limit before allocating; ``dropout_mask`` takes integer shapes only;
* top-k counts a NaN or infinite score as an error;
* an array of another virtual device (``emu:0`` given to an op on ``emu:1``) is a TypeError from every op;
* the emulator's controls reject NaN / negative watchdog times.
"""
import math
import sys

import numpy as np
import pytest

from convnet import emu, ops
from convnet.devices import Device
from helpers import EMU, NUMPY, rand, to_host

DEVICES = [pytest.param(NUMPY, id="numpy"), pytest.param(EMU, id="emu")]


def _inputs(dev, rng):
    a = dict(x=rand(rng, (4, 6, 6, 2)), w=rand(rng, (4, 3, 3, 4)), y=rand(rng, (4, 6, 6, 2)),
             p=rand(rng, (4, 2, 2, 2)), logits=rand(rng, (5, 3)), fx=rand(rng, (6, 3)), fw=rand(rng, (4, 6)),
             fy=rand(rng, (4, 3)), b=rand(rng, (4,)), lw=rand(rng, (36, 4, 3, 3, 4)), lb=rand(rng, (4, 6, 6)))
    return {k: dev.asarray(v) for k, v in a.items()}


# op -> (output shape, call(dev, a, out))
OUT_OPS = {
    "relu_forward": ((4, 6, 6, 2), lambda d, a, o: ops.relu_forward(d, a["x"], out=o)),
    "relu_backward": ((4, 6, 6, 2), lambda d, a, o: ops.relu_backward(d, a["x"], a["y"], out=o)),
    "dropout_forward": ((4, 6, 6, 2), lambda d, a, o: ops.dropout_forward(d, a["x"], 0.5, 1, out=o)),
    "dropout_backward": ((4, 6, 6, 2), lambda d, a, o: ops.dropout_backward(d, a["x"], 0.5, 1, out=o)),
    "neuron_forward": ((4, 6, 6, 2), lambda d, a, o: ops.neuron_forward(d, a["x"], "softrelu", out=o)),
    "neuron_backward": ((4, 6, 6, 2), lambda d, a, o: ops.neuron_backward(d, a["x"], a["y"], a["y"], "brelu[2]",
                                                                          out=o)),
    "eltsum_forward": ((4, 6, 6, 2), lambda d, a, o: ops.eltsum_forward(d, [a["x"], a["y"]], [1.0, 0.5], out=o)),
    "eltsum_backward": ((4, 6, 6, 2), lambda d, a, o: ops.eltsum_backward(d, a["y"], 0.5, out=o)),
    "eltmax_forward": ((4, 6, 6, 2), lambda d, a, o: ops.eltmax_forward(d, [a["x"], a["y"]], out=o)),
    "eltmax_backward": ((4, 6, 6, 2), lambda d, a, o: ops.eltmax_backward(
        d, ops.eltmax_forward(d, [a["x"], a["y"]])[1], a["y"], 1, out=o)),
    "conv_forward": ((4, 6, 6, 2), lambda d, a, o: ops.conv_forward(d, a["x"], a["w"], a["b"], padding=1, out=o)),
    "conv_backward_data": ((4, 6, 6, 2), lambda d, a, o: ops.conv_backward_data(d, a["y"], a["w"], (6, 6), padding=1,
                                                                                out=o)),
    "conv_backward_filter": ((4, 3, 3, 4), lambda d, a, o: ops.conv_backward_filter(d, a["x"], a["y"], 3, padding=1,
                                                                                    out=o)),
    "conv_backward_bias": ((4,), lambda d, a, o: ops.conv_backward_bias(d, a["y"], out=o)),
    "local_forward": ((4, 6, 6, 2), lambda d, a, o: ops.local_forward(d, a["x"], a["lw"], a["lb"], padding=1,
                                                                      out=o)),
    "local_backward_data": ((4, 6, 6, 2), lambda d, a, o: ops.local_backward_data(d, a["y"], a["lw"], (6, 6),
                                                                                  padding=1, out=o)),
    "local_backward_filter": ((36, 4, 3, 3, 4), lambda d, a, o: ops.local_backward_filter(d, a["x"], a["y"], 3,
                                                                                          padding=1, out=o)),
    "local_backward_bias": ((4, 6, 6), lambda d, a, o: ops.local_backward_bias(d, a["y"], shared=False, out=o)),
    "pool_forward": ((4, 2, 2, 2), lambda d, a, o: ops.pool_forward(d, a["x"], out=o)),
    "pool_backward": ((4, 6, 6, 2), lambda d, a, o: ops.pool_backward(d, a["x"], ops.pool_forward(d, a["x"]), a["p"],
                                                                      mode="max", window=3, stride=2, padding=0,
                                                                      out=o)),
    "lrn_forward": ((4, 6, 6, 2), lambda d, a, o: ops.lrn_forward(d, a["x"], out=o)),
    "lrn_forward denom": ((4, 6, 6, 2), lambda d, a, o: ops.lrn_forward(d, a["x"], out=(d.zeros((4, 6, 6, 2)), o))),
    "lrn_backward": ((4, 6, 6, 2), lambda d, a, o: ops.lrn_backward(d, a["x"], None, None, a["y"], size=5, alpha=1e-2,
                                                                    beta=0.75, k=2.0, convention="sum", out=o)),
    "rnorm_forward": ((4, 6, 6, 2), lambda d, a, o: ops.rnorm_forward(d, a["x"], size=3,
                                                                      out=(o, d.zeros((4, 6, 6, 2))))),
    "rnorm_backward": ((4, 6, 6, 2), lambda d, a, o: ops.rnorm_backward(
        d, a["x"], ops.rnorm_forward(d, a["y"], size=3)[1], a["y"], size=3, alpha=1e-3, beta=0.75, k=1.0, out=o)),
    "cnorm_forward": ((4, 6, 6, 2), lambda d, a, o: ops.cnorm_forward(
        d, a["x"], size=3, out=(d.zeros((4, 6, 6, 2)), o, d.zeros((4, 6, 6, 2))))),
    "cnorm_backward": ((4, 6, 6, 2), lambda d, a, o: ops.cnorm_backward(
        d, a["x"], *ops.cnorm_forward(d, a["x"], size=3)[1:], a["y"], size=3, alpha=1e-3, beta=0.75, k=1.0, out=o)),
    "softmax_forward": ((5, 3), lambda d, a, o: ops.softmax_forward(d, a["logits"], out=o)),
    "fc_forward": ((4, 3), lambda d, a, o: ops.fc_forward(d, a["fx"], a["fw"], a["b"], out=o)),
    "fc_backward_data": ((6, 3), lambda d, a, o: ops.fc_backward_data(d, a["fy"], a["fw"], out=o)),
    "fc_backward_weights": ((4, 6), lambda d, a, o: ops.fc_backward_weights(d, a["fx"], a["fy"], out=o)),
    "fc_backward_bias": ((4,), lambda d, a, o: ops.fc_backward_bias(d, a["fy"], out=o)),
}


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("op", list(OUT_OPS))
def test_read_only_out_is_rejected(dev, op):
    """Every op that takes ``out`` refuses a read-only one (emu segfaulted on a read-only memmap and wrote
    into immutable bytes)."""
    shape, call = OUT_OPS[op]
    a = _inputs(dev, np.random.default_rng(0))
    frozen = bytes(4 * math.prod(shape))
    out = np.frombuffer(frozen, np.float32).reshape(shape)
    with pytest.raises(ValueError, match="out.* is read-only"):
        call(dev, a, out)
    assert frozen == bytes(len(frozen))  # untouched
    call(dev, a, dev.zeros(shape))  # the same call with a writeable out works


class _Recording(dict):
    """An op call's inputs, recording which of them the call reads."""

    def __init__(self, arrays):
        super().__init__(arrays)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("kind", ["numpy", "cpu", "emu"])
@pytest.mark.parametrize("op", list(OUT_OPS))
def test_every_op_rejects_each_array_of_another_virtual_device(kind, op):
    """On kind:1 every array argument and ``out`` of kind:0 is a TypeError naming both devices,
    and the other way round (a copy between virtual devices left out fails); with its own arrays the call works."""
    shape, call = OUT_OPS[op]
    for dev, other in ((Device(kind, 1), Device(kind, 0)), (Device(kind, 0), Device(kind, 1))):
        a = _Recording(_inputs(dev, np.random.default_rng(3)))
        call(dev, a, dev.zeros(shape))
        assert a.read
        wrong = fr"must be a numpy.ndarray for device {dev}, got numpy.ndarray of {other.kind}:{other.index}\b"
        for key in sorted(a.read):
            swapped = dict(a, **{key: other.asarray(dict.__getitem__(a, key))})
            with pytest.raises(TypeError, match=wrong):
                call(dev, swapped, dev.zeros(shape))
        with pytest.raises(TypeError, match=r"^out\S* " + wrong):
            call(dev, a, other.zeros(shape))


@pytest.mark.parametrize("kind", ["numpy", "cpu", "emu"])
def test_every_op_result_on_a_virtual_device_is_of_that_device(kind):
    """What an op returns on kind:1 (allocated, or the reference's result adopted) is accepted there, not on kind:0."""
    dev, other = Device(kind, 1), Device(kind, 0)
    a = _inputs(dev, np.random.default_rng(4))
    for op, (_, call) in OUT_OPS.items():
        result = call(dev, a, None)
        for r in result if isinstance(result, tuple) else (result,):
            assert dev.is_array(r) and not other.is_array(r), op


@pytest.mark.parametrize("kind", ["numpy", "emu"])
def test_dropout_mask_on_a_virtual_device_is_of_that_device(kind):
    mask = ops.dropout_mask(Device(kind, 1), (3, 4), 0.5, 7)
    assert Device(kind, 1).is_array(mask) and not Device(kind, 0).is_array(mask)


@pytest.mark.parametrize("dev", DEVICES)
def test_read_only_memmap_out_is_rejected(dev, tmp_path):
    path = tmp_path / "ro.bin"
    path.write_bytes(bytes(4 * 4 * 6 * 6 * 2))
    out = np.memmap(path, np.float32, mode="r", shape=(4, 6, 6, 2))
    a = _inputs(dev, np.random.default_rng(1))
    for op in ("relu_forward", "conv_forward", "pool_backward", "lrn_forward"):
        with pytest.raises(ValueError, match="read-only"):
            OUT_OPS[op][1](dev, a, out)
    del out
    assert path.read_bytes() == bytes(4 * 4 * 6 * 6 * 2)


def _overlapping(dev, shape, shift):
    """(input, out): views of one buffer, ``shift`` elements apart (0: the same array)."""
    n = math.prod(shape)
    buf = dev.asarray(rand(np.random.default_rng(2), (n + abs(shift),)))
    a = buf[max(0, -shift):max(0, -shift) + n].reshape(shape)
    b = buf[max(0, shift):max(0, shift) + n].reshape(shape)
    return a, b


# op -> (input shape, call(dev, input, out)): out has the input's shape
OVERLAP_OPS = {
    "conv_forward": ((4, 6, 6, 2), lambda d, x, o: ops.conv_forward(d, x, d.asarray(np.ones((4, 3, 3, 4), np.float32)),
                                                                    padding=1, out=o)),
    "conv_backward_data": ((4, 6, 6, 2), lambda d, dy, o: ops.conv_backward_data(
        d, dy, d.asarray(np.ones((4, 3, 3, 4), np.float32)), (6, 6), padding=1, out=o)),
    "conv_backward_filter": ((4, 3, 3, 4), lambda d, x, o: ops.conv_backward_filter(
        d, x, d.asarray(np.ones((4, 3, 3, 4), np.float32)), 3, padding=1, out=o)),
    "local_forward": ((4, 6, 6, 2), lambda d, x, o: ops.local_forward(
        d, x, d.asarray(np.ones((36, 4, 3, 3, 4), np.float32)), padding=1, out=o)),
    "local_backward_data": ((4, 6, 6, 2), lambda d, dy, o: ops.local_backward_data(
        d, dy, d.asarray(np.ones((36, 4, 3, 3, 4), np.float32)), (6, 6), padding=1, out=o)),
    "pool_backward": ((4, 6, 6, 2), lambda d, x, o: ops.pool_backward(
        d, x, None, d.asarray(np.ones((4, 2, 2, 2), np.float32)), mode="avg", window=3, stride=2, padding=0, out=o)),
    "eltsum_forward": ((4, 6, 6, 2), lambda d, x, o: ops.eltsum_forward(
        d, [d.asarray(np.ones((4, 6, 6, 2), np.float32)), x], out=o)),
    "eltmax_forward": ((4, 6, 6, 2), lambda d, x, o: ops.eltmax_forward(
        d, [d.asarray(np.ones((4, 6, 6, 2), np.float32)), x], out=o)),
    "lrn_forward": ((4, 6, 6, 2), lambda d, x, o: ops.lrn_forward(d, x, out=o)),
    "lrn_backward": ((4, 6, 6, 2), lambda d, x, o: ops.lrn_backward(d, x, None, None, x, size=3, alpha=1e-2,
                                                                    beta=0.75, k=2.0, convention="sum", out=o)),
    "rnorm_forward": ((4, 6, 6, 2), lambda d, x, o: ops.rnorm_forward(d, x, out=(o, d.zeros((4, 6, 6, 2))))),
    "rnorm_backward": ((4, 6, 6, 2), lambda d, x, o: ops.rnorm_backward(
        d, x, d.asarray(np.full((4, 6, 6, 2), 2.0, np.float32)), x, size=3, alpha=1e-3, beta=0.75, k=1.0, out=o)),
    "cnorm_forward": ((4, 6, 6, 2), lambda d, x, o: ops.cnorm_forward(d, x, out=(d.zeros((4, 6, 6, 2)), o,
                                                                                 d.zeros((4, 6, 6, 2))))),
    "cnorm_backward": ((4, 6, 6, 2), lambda d, x, o: ops.cnorm_backward(
        d, x, x, d.asarray(np.full((4, 6, 6, 2), 2.0, np.float32)), x, size=3, alpha=1e-3, beta=0.75, k=1.0,
        out=o)),
    "softmax_forward": ((5, 3), lambda d, x, o: ops.softmax_forward(d, x, out=o)),
    "fc_backward_weights": ((6, 6), lambda d, x, o: ops.fc_backward_weights(d, x, d.asarray(np.ones((6, 6),
                                                                                                   np.float32)),
                                                                            out=o)),
}


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("op", list(OVERLAP_OPS))
@pytest.mark.parametrize("shift", [0, 1, -3])
def test_out_overlapping_an_input_is_rejected_on_every_device(dev, op, shift):
    """One overlap rule on numpy and emu (numpy used to let conv's ``out`` alias its input)."""
    shape, call = OVERLAP_OPS[op]
    x, out = _overlapping(dev, shape, shift)
    before = to_host(x).copy()
    with pytest.raises(ValueError, match="overlap"):
        call(dev, x, out)
    assert np.array_equal(to_host(x), before)


@pytest.mark.parametrize("dev", DEVICES)
def test_elementwise_partial_overlap_is_rejected_exact_in_place_allowed(dev):
    x, out = _overlapping(dev, (40,), 1)
    with pytest.raises(ValueError, match="partially overlaps"):
        ops.relu_forward(dev, x, out=out)
    with pytest.raises(ValueError, match="partially overlaps"):
        ops.dropout_forward(dev, x, 0.5, 3, out=out)
    want = np.maximum(to_host(x), 0)
    assert ops.relu_forward(dev, x, out=x) is x and np.array_equal(to_host(x), want)


BIG = 2**31


@pytest.mark.parametrize("dev", DEVICES)
def test_integers_beyond_32_bits_are_named_value_errors(dev):
    """Stride, padding, window and LRN size >= 2**31 are a ValueError naming the argument (emu used to raise
    pybind11's cast error; numpy accepted some of them)."""
    x = dev.asarray(np.zeros((4, 4, 4, 2), np.float32))
    w = dev.asarray(np.zeros((4, 1, 1, 4), np.float32))
    dy = dev.asarray(np.zeros((4, 1, 1, 2), np.float32))
    cases = [
        ("stride", lambda: ops.conv_forward(dev, x, w, stride=BIG)),
        ("stride", lambda: ops.conv_forward(dev, x, w, stride=(1, 2**64))),
        ("padding", lambda: ops.conv_forward(dev, x, w, padding=BIG)),
        ("stride", lambda: ops.conv_backward_data(dev, dy, w, (4, 4), stride=BIG)),
        ("stride", lambda: ops.conv_backward_filter(dev, x, dy, 1, stride=BIG)),
        ("groups", lambda: ops.conv_forward(dev, x, w, groups=BIG)),
        ("stride", lambda: ops.local_forward(dev, x, dev.asarray(np.zeros((16, 4, 1, 1, 4), np.float32)),
                                             stride=BIG)),
        ("padding", lambda: ops.local_backward_filter(dev, x, dy, 1, padding=BIG)),
        ("stride", lambda: ops.pool_forward(dev, x, window=1, stride=BIG)),
        ("window", lambda: ops.pool_forward(dev, x, window=BIG, stride=1)),
        ("size", lambda: ops.lrn_forward(dev, x, size=BIG)),
        ("size", lambda: ops.lrn_backward(dev, x, None, None, x, size=2**40, alpha=1e-4, beta=0.75, k=2.0,
                                          convention="sum")),
        ("size", lambda: ops.rnorm_forward(dev, x, size=BIG)),
        ("size", lambda: ops.cnorm_backward(dev, x, x, x, x, size=2**40, alpha=1e-3, beta=0.75, k=1.0)),
        ("ks", lambda: ops.topk_errors(dev, dev.asarray(np.zeros((5, 2), np.float32)),
                                       dev.asarray(np.zeros(2, np.int32)), ks=(1, BIG))),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"{name}.*2\*\*31"):
            call()
    with pytest.raises(ValueError, match="float32"):  # a constant the kernels would turn into inf
        ops.lrn_forward(dev, x, k=1e39)


@pytest.mark.parametrize("dev", DEVICES)
def test_softmax_checks_the_2_31_limit_before_allocating(dev, monkeypatch):
    """(classes, N) with classes * N >= 2**31 is refused before any output is allocated. The logits are a
    stride trick (a tiny buffer that claims 2**31 elements): nothing may read them."""
    logits = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(4, 2**29), strides=(4 * 2**29, 4),
                                             writeable=False)
    assert logits.flags.c_contiguous
    labels = dev.asarray(np.zeros(4, np.int32))

    def no_alloc(*a, **k):
        raise AssertionError("allocated before checking the size")

    monkeypatch.setattr(Device, "empty", no_alloc)
    for name in ("softmax", "softmax_cross_entropy", "topk_errors"):  # the numpy device would compute the reference
        monkeypatch.setattr(sys.modules["convnet.ops.softmax"].ref, name, no_alloc)
    for call in (lambda: ops.softmax_cross_entropy(dev, logits, labels),
                 lambda: ops.softmax_forward(dev, logits),
                 lambda: ops.topk_errors(dev, logits, labels)):
        with pytest.raises(ValueError, match=r"4 x 536870912 = 2147483648 elements; .* fewer than 2\*\*31"):
            call()


@pytest.mark.parametrize("dev", DEVICES)
def test_dropout_mask_takes_integer_shapes_only(dev):
    for shape in ((2.5, 3), (2, 3.0), "12", (True, 2), 1.0, None):
        with pytest.raises(TypeError, match="shape must be an int or a tuple of ints"):
            ops.dropout_mask(dev, shape, 0.5, 1)
    with pytest.raises(ValueError, match="non-negative"):
        ops.dropout_mask(dev, (2, -1), 0.5, 1)
    assert to_host(ops.dropout_mask(dev, (np.int64(2), 3), 0.5, 1)).shape == (2, 3)
    assert to_host(ops.dropout_mask(dev, 5, 0.5, 1)).shape == (5,)


@pytest.mark.parametrize("dev", DEVICES)
def test_non_finite_scores_are_top_k_errors(dev):
    """All-NaN logits count as errors on every device (they once gave zero errors on numpy and emu)."""
    rng = np.random.default_rng(3)
    s = rand(rng, (10, 6))
    labels = np.array([0, 1, 2, 3, 4, 5], np.int32)
    clean = ops.topk_errors(dev, dev.asarray(s), dev.asarray(labels), ks=(1, 5))
    assert ops.topk_errors(dev, dev.asarray(np.full((10, 6), np.nan, np.float32)), dev.asarray(labels),
                           ks=(1, 5)) == (6, 6)
    bad = s.copy()
    bad[labels[0], 0] = np.nan  # the label's own score
    bad[3, 1] = np.inf          # another class's score (the label would rank below it anyway)
    bad[:, 2] = -np.inf
    got = ops.topk_errors(dev, dev.asarray(bad), dev.asarray(labels), ks=(1, 5, 10))
    rest = ops.topk_errors(dev, dev.asarray(np.ascontiguousarray(s[:, 3:])), dev.asarray(labels[3:]),
                           ks=(1, 5, 10))
    assert got == tuple(r + 3 for r in rest), (got, rest, clean)


def test_emulator_controls_reject_bad_values():
    """NaN or negative watchdog times are refused before they reach C++."""
    for bad in (float("nan"), -1.0, float("inf"), "5", None):
        with pytest.raises(ValueError, match="watchdog time"):
            emu.set_watchdog(bad)
    for bad in (0, -1, 2**31):
        with pytest.raises(ValueError, match="emulator workers"):
            emu.set_num_workers(bad)
    with pytest.raises(TypeError, match="emulator workers must be an int"):
        emu.set_num_workers(2.5)
    with pytest.raises(TypeError, match="schedule seed"):
        with emu.schedule("random", seed=1.5):
            pass
    emu.set_watchdog(0)  # off: valid
    emu.set_watchdog(120)  # the default again
