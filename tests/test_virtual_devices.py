"""Virtual devices of the host: ``numpy:1``, ``cpu:1``, ``emu:1`` stand for a second GPU, and
their arrays are tagged with their device, so an op rejects an array of another device (a missing copy fails)
while index 0 keeps accepting every untagged NumPy array (single-device code is unchanged). Every op's rejection
is in tests/test_op_edges.py; a copy left out of the two-tower graph in tests/test_two_towers.py."""
import gc

import numpy as np
import pytest

from convnet import ops
from convnet.devices import Device, _host
from helpers import rand

KINDS = ("numpy", "cpu", "emu")


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def _pair(kind):
    return Device(kind, 0), Device(kind, 1)


def test_an_op_rejects_an_array_of_another_virtual_device_naming_the_argument_and_both(kind):
    d0, d1 = _pair(kind)
    rng = np.random.default_rng(0)
    x0, x1 = d0.asarray(rand(rng, (2, 5, 5, 3))), d1.asarray(rand(rng, (2, 5, 5, 3)))
    w1 = d1.asarray(rand(rng, (2, 3, 3, 4)))
    with pytest.raises(TypeError, match=f"^x must be a numpy.ndarray for device {kind}:1, got numpy.ndarray of "
                                        fr"{kind}:0 \(untagged host memory\)$"):
        ops.relu_forward(d1, x0)
    with pytest.raises(TypeError, match=f"^x must be a numpy.ndarray for device {kind}, got numpy.ndarray of "
                                        f"{kind}:1$"):
        ops.relu_forward(d0, x1)
    with pytest.raises(TypeError, match=f"^w must be .* for device {kind}, got numpy.ndarray of {kind}:1$"):
        ops.conv_forward(d0, x0, w1)
    with pytest.raises(TypeError, match=f"^out must be .* for device {kind}:1, got numpy.ndarray of {kind}:0"):
        ops.relu_forward(d1, x1, out=d0.empty(x1.shape))
    two = Device(kind, 2)
    with pytest.raises(TypeError, match=f"for device {kind}:2, got numpy.ndarray of {kind}:1$"):
        ops.relu_forward(two, x1)
    assert np.array_equal(ops.relu_forward(d1, x1), np.maximum(x1, 0))  # its own device's arrays are fine


def test_the_same_index_of_another_kind_is_another_device():
    x = Device("emu", 1).asarray(np.ones((3, 2), np.float32))
    assert not Device("numpy", 1).is_array(x) and Device("emu", 1).is_array(x)
    with pytest.raises(TypeError, match="for device numpy:1, got numpy.ndarray of emu:1"):
        ops.softmax_forward(Device("numpy", 1), x)


def test_index_0_accepts_every_untagged_array_and_tags_nothing(kind):
    """Single-device use is unchanged: a NumPy array a user makes is an array of kind:0, and ops there add no tag."""
    d0, d1 = _pair(kind)
    tags = set(_host._TAGS)
    x = rand(np.random.default_rng(1), (2, 4, 4, 3))
    assert d0.is_array(x) and not d1.is_array(x)
    y = ops.relu_forward(d0, x)
    z = ops.conv_forward(d0, x, d0.asarray(rand(np.random.default_rng(2), (2, 3, 3, 2))), padding=1)
    for a in (y, z, d0.zeros((3,)), d0.empty((3,)), d0.asarray([1.0, 2.0], np.float32), d0.adopt(y + z)):
        assert d0.is_array(a) and not d1.is_array(a) and Device("numpy").is_array(a)
    assert not set(_host._TAGS) - tags


def test_views_keep_their_device_and_new_memory_is_adopted(kind):
    d0, d1 = _pair(kind)
    a = d1.zeros((4, 3, 2, 5))
    views = [a[1:], a[1:][0], a.reshape(12, 10), a.T, a[..., ::2], np.asarray(a), a.view(np.int32), a[None]]
    for v in views:
        assert d1.is_array(v) and not d0.is_array(v), v.shape
    assert np.array_equal(ops.relu_forward(d1, a[2:]), a[2:])  # a contiguous view works in an op
    s = a + 1  # new memory computed from a device's arrays belongs to none until the device adopts it
    assert d0.is_array(s) and not d1.is_array(s)
    assert d1.adopt(s) is s and d1.is_array(s[1:]) and not d0.is_array(s)
    with pytest.raises(TypeError, match=f"a numpy.ndarray of {kind}:1 cannot become an array of {kind}:2 without a "
                                        "copy"):
        Device(kind, 2).adopt(a[1:])
    with pytest.raises(TypeError, match=f"of {kind}:1 cannot become an array of {kind}:0"):
        d0.adopt(a)


def test_asarray_copies_onto_a_virtual_device_never_claiming_a_callers_array(kind):
    d0, d1 = _pair(kind)
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    a = d1.asarray(host)
    assert d1.is_array(a) and d0.is_array(host) and not np.shares_memory(a, host)  # the caller's array stays host's
    assert d1.asarray(a) is a  # already there with that dtype: no copy
    b = d0.asarray(a)  # to index 0: a copy into untagged memory
    assert d0.is_array(b) and not np.shares_memory(a, b) and np.array_equal(a, b)
    c = d1.asarray(host.astype(np.float64), np.float32)  # converted: the new array is claimed, not copied again
    assert d1.is_array(c) and c.dtype == np.float32 and np.array_equal(c, host)
    d = Device(kind, 2).asarray(a)
    assert Device(kind, 2).is_array(d) and not d1.is_array(d) and not np.shares_memory(a, d)


@pytest.mark.parametrize("src, dst", [(0, 1), (1, 0), (1, 2), (1, 1)], ids=lambda i: f"{i}")
def test_copy_lands_in_the_destinations_memory(kind, src, dst):
    s, d = Device(kind, src), Device(kind, dst)
    a = s.asarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    b = ops.copy(d, a, s)
    assert d.is_array(b) and np.array_equal(b, a) and not np.shares_memory(a, b)
    assert src == dst or not s.is_array(b)
    out = d.zeros(a.shape)
    assert ops.copy(d, a, s, out=out) is out and np.array_equal(out, a)
    if src != dst:
        with pytest.raises(TypeError, match=f"^a must be a numpy.ndarray for device {s}, got numpy.ndarray of "):
            ops.copy(d, b, s)  # the array is not of the source named
        with pytest.raises(TypeError, match=f"^out must be a numpy.ndarray for device {d}, got"):
            ops.copy(d, a, s, out=s.zeros(a.shape))


def test_copy_between_kinds_lands_in_the_destinations_memory():
    a = Device("numpy", 1).asarray(np.arange(6, dtype=np.float32))
    b = ops.copy(Device("emu", 1), a, Device("numpy", 1))
    assert Device("emu", 1).is_array(b) and not Device("numpy", 1).is_array(b) and np.array_equal(a, b)


def test_softmax_cross_entropy_checks_labels_and_counter_devices(kind):
    d0, d1 = _pair(kind)
    logits = d1.asarray(rand(np.random.default_rng(3), (4, 3)))
    labels0, labels1 = d0.asarray(np.array([0, 3, 1], np.int32)), d1.asarray(np.array([0, 3, 1], np.int32))
    with pytest.raises(TypeError, match=f"labels must be .* for device {kind}:1, got numpy.ndarray of {kind}:0"):
        ops.softmax_cross_entropy(d1, logits, labels0)
    with pytest.raises(TypeError, match=f"bad_labels must be .* for device {kind}:1, got numpy.ndarray of {kind}:0"):
        ops.softmax_cross_entropy(d1, logits, labels1, bad_labels=d0.zeros((1,), np.int32))
    with pytest.raises(TypeError, match=f"labels must be .* for device {kind}:1, got numpy.ndarray of {kind}:0"):
        ops.topk_errors(d1, logits, labels0, ks=(1,))
    loss, probs, dlogits = ops.softmax_cross_entropy(d1, logits, labels1, bad_labels=d1.zeros((1,), np.int32))
    assert all(d1.is_array(r) and not d0.is_array(r) for r in (loss, probs, dlogits))


def test_a_tag_is_dropped_with_its_memory_and_kept_by_its_views():
    d1 = Device("emu", 1)
    a = d1.zeros((1000,))
    key = id(a)
    v = a[10:]
    del a
    gc.collect()
    assert key in _host._TAGS and d1.is_array(v)  # the view keeps the memory, and so the tag, alive
    del v
    gc.collect()
    assert key not in _host._TAGS
