"""Softmax + cross-entropy and top-k errors: NumPy reference and, when built, the kernels."""
import numpy as np
import pytest

from convnet import ops
from convnet.devices import Device
from convnet.reference import softmax as ref
from helpers import (EMU, NUMPY, assert_close, assert_raises_each, assert_schedules_identical, check_grad, schedule,
                     to_host)


def test_reference_values():
    rng = np.random.default_rng(7)
    l = rng.standard_normal((10, 6))
    lab = rng.integers(0, 10, 6).astype(np.int32)
    loss, p, d = ref.softmax_cross_entropy(l, lab)
    e = np.exp(l)
    pn = e / e.sum(0)
    np.testing.assert_allclose(p, pn, rtol=1e-13)
    np.testing.assert_allclose(loss, -np.log(pn[lab, np.arange(6)]).sum(), rtol=1e-13)
    assert loss.shape == ()
    oh = np.zeros_like(pn)
    oh[lab, np.arange(6)] = 1
    np.testing.assert_allclose(d, pn - oh, atol=1e-15)


def test_reference_gradient():
    rng = np.random.default_rng(8)
    l = rng.standard_normal((7, 5)) * 3
    lab = rng.integers(0, 7, 5).astype(np.int32)
    _, _, d = ref.softmax_cross_entropy(l, lab)
    check_grad(lambda z: float(ref.softmax_cross_entropy(z, lab)[0]), l, d, n=35)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_huge_logits(dtype):
    l = np.array([[1e4, -1e4, 0], [0, 1e4, 1e4], [-1e4, 0, 1e4]], dtype=dtype)
    lab = np.array([1, 1, 0], np.int32)
    loss, p, d = ref.softmax_cross_entropy(l, lab)
    assert np.isfinite(loss) and np.isfinite(p).all() and np.isfinite(d).all()
    # columns are images: img0 label logit 0 vs max 1e4 -> 1e4; img1 label is the max -> ~0;
    # img2 label logit 0 vs two logits of 1e4 -> 1e4 + log 2
    np.testing.assert_allclose(loss, 2e4 + np.log(2), rtol=1e-6)


def _topk_by_counting(scores, labels, ks):
    """The top-k rule spelled out: image n is wrong for k when k or more other classes score at least as high as
    its label (ties count against it)."""
    K, N = scores.shape
    ranks = [sum(1 for c in range(K) if c != labels[n] and scores[c, n] >= scores[labels[n], n]) for n in range(N)]
    return tuple(sum(r >= k for r in ranks) for k in ks)


def test_reference_topk():
    s = np.array([[5, 1, 0, 3],
                  [4, 2, 0, 3],
                  [3, 3, 0, 3],
                  [2, 4, 0, 3],
                  [1, 5, 0, 3],
                  [0, 6, 0, 3]], float)
    lab = np.array([0, 0, 2, 5], np.int32)
    # ranks (other classes at least as high): img0 0, img1 5, img2 5 (all tie), img3 5 (all tie)
    assert ref.topk_errors(s, lab, ks=(1, 5)) == (3, 3)
    assert ref.topk_errors(s, lab, ks=(1, 6, 2)) == (3, 0, 3)
    rng = np.random.default_rng(35)
    s = rng.integers(0, 4, (12, 50)).astype(np.float32)  # many ties
    lab = rng.integers(0, 12, 50).astype(np.int32)
    assert ref.topk_errors(s, lab, ks=(1, 2, 5, 11, 12)) == _topk_by_counting(s, lab, (1, 2, 5, 11, 12))


def _fake_gpu(monkeypatch):
    from fake_cupy import FakeCupy
    FakeCupy(devices=1).install(monkeypatch)
    return Device("cuda", 0)


@pytest.mark.parametrize("where", ["numpy", "cpu", "emu", "cuda-on-fake"])
def test_topk_saturated_softmax_label_ranked_last_is_an_error_on_every_device(monkeypatch, where):
    """10 classes, class 0 scored 200 and class c -c, label 9: a top-1 and a top-5 error, from the logits and from
    their softmax alike (whose classes 1..9 underflow to the same 0, and used to count as inside the top 5); plus
    random tied scores against the rule spelled out."""
    dev = _fake_gpu(monkeypatch) if where == "cuda-on-fake" else Device(where)
    logits = -np.arange(10, dtype=np.float32)[:, None].repeat(3, axis=1)
    logits[0] = 200
    labels = np.array([9, 0, 4], np.int32)  # the label ranked last; the top class; fifth of the tied zeros
    probs = ref.softmax(logits)
    assert (probs[1:] == 0).all()  # the softmax saturated
    for scores in (logits, probs):
        assert ops.topk_errors(dev, dev.asarray(scores), dev.asarray(labels), ks=(1, 5)) == \
            ((2, 1) if scores is logits else (2, 2))  # logits: label 4 is fifth; probs: it ties with 8 others
    rng = np.random.default_rng(36)
    s = rng.integers(-3, 3, (40, 70)).astype(np.float32)
    lab = rng.integers(0, 40, 70).astype(np.int32)
    ks = (1, 2, 5, 39, 40)
    assert ops.topk_errors(dev, dev.asarray(s), dev.asarray(lab), ks=ks) == _topk_by_counting(s, lab, ks)


# ---------------------------------------------------------------------------------------------------- op layer
def run_xent(dev, logits, labels):
    loss, p, d = ops.softmax_cross_entropy(dev, dev.asarray(logits), dev.asarray(labels))
    assert loss.shape == ()
    return float(to_host(loss)), to_host(p), to_host(d)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_device_op(dtype):
    rng = np.random.default_rng(30)
    l = rng.standard_normal((10, 7)).astype(dtype)
    lab = rng.integers(0, 10, 7).astype(np.int32)
    loss, p, d = ops.softmax_cross_entropy(NUMPY, l, lab)
    lr, pr, dr = ref.softmax_cross_entropy(l, lab)
    assert loss == lr and p.dtype == dtype
    assert ops.topk_errors(NUMPY, l, lab, ks=(1, 3)) == ref.topk_errors(l, lab, (1, 3))


# (classes, N): AlexNet's 1000 classes; fewer classes than lanes; N not a multiple of 32
XENT_CASES = [(1000, 8), (10, 37), (3, 5), (1, 4), (100, 64)]


@pytest.mark.parametrize("K,N", XENT_CASES)
@pytest.mark.sanitize
def test_kernel_matches_reference(kernel_device, K, N):
    rng = np.random.default_rng(31 + K + N)
    l = (rng.standard_normal((K, N)) * 4).astype(np.float32)
    lab = rng.integers(0, K, N).astype(np.int32)
    loss, p, d = run_xent(kernel_device, l, lab)
    lr, pr, dr = ref.softmax_cross_entropy(l.astype(np.float64), lab)
    assert abs(loss - float(lr)) <= 1e-5 * max(1.0, abs(float(lr)))
    assert_close("probs", p, pr, rtol=1e-5, atol=1e-8)
    assert_close("dlogits", d, dr, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.sanitize
def test_kernel_huge_logits(kernel_device, scale):
    rng = np.random.default_rng(32)
    K, N = 20, 9
    l = (rng.choice([-1.0, 0.0, 1.0], (K, N)) * scale).astype(np.float32)
    lab = rng.integers(0, K, N).astype(np.int32)
    loss, p, d = run_xent(kernel_device, l, lab)
    assert np.isfinite(loss) and np.isfinite(p).all() and np.isfinite(d).all()
    lr, pr, dr = ref.softmax_cross_entropy(l.astype(np.float64), lab)
    assert abs(loss - float(lr)) <= 1e-6 * abs(float(lr)) + 1e-3
    assert_close("probs", p, pr, rtol=1e-6, atol=1e-7)


@pytest.mark.sanitize
def test_kernel_topk(kernel_device):
    rng = np.random.default_rng(33)
    K, N = 1000, 70
    s = rng.integers(0, 6, (K, N)).astype(np.float32)  # heavy ties
    lab = rng.integers(0, K, N).astype(np.int32)
    s[lab[:10], np.arange(10)] = 9.0                     # ten sure hits
    ks = (1, 5, 100, 1000, 2000)
    got = ops.topk_errors(kernel_device, kernel_device.asarray(s), kernel_device.asarray(lab), ks=ks)
    assert got == ref.topk_errors(s, lab, ks)
    assert got[-1] == 0 and got[-2] == 0
    l = rng.standard_normal((10, 37)).astype(np.float32)
    lab = rng.integers(0, 10, 37).astype(np.int32)
    assert ops.topk_errors(kernel_device, kernel_device.asarray(l), kernel_device.asarray(lab)) == \
        ref.topk_errors(l, lab)


def test_schedules_identical():
    rng = np.random.default_rng(34)
    l = rng.standard_normal((50, 40)).astype(np.float32)
    lab = rng.integers(0, 50, 40).astype(np.int32)
    assert_schedules_identical(lambda: run_xent(EMU, l, lab) + (ops.topk_errors(EMU, l, lab, ks=(1, 2, 5)),),
                               ("loss", "probs", "dlogits", "top-k errors"), seed=7)


def test_bad_inputs(kernel_device):
    dev = kernel_device
    l = dev.asarray(np.zeros((5, 4), np.float32))
    lab = dev.asarray(np.zeros(4, np.int32))
    xent, topk = ops.softmax_cross_entropy, ops.topk_errors
    assert_raises_each(
        (TypeError, "labels must have dtype int32", lambda: xent(dev, l, dev.asarray(np.zeros(4, np.int64)))),
        (ValueError, r"labels must have shape \(4\)", lambda: xent(dev, l, dev.asarray(np.zeros(3, np.int32)))),
        (ValueError, "2-D", lambda: xent(dev, dev.asarray(np.zeros(5, np.float32)), lab)),
        (TypeError, "dtype float32", lambda: xent(dev, dev.asarray(np.zeros((5, 4), np.float64)), lab)),
        (ValueError, "ks must be", lambda: topk(dev, l, lab, ks=(0,))),
        (ValueError, "ks must be", lambda: topk(dev, l, lab, ks=tuple(range(1, 11)))),
    )
    if dev.kind != "cuda":  # labels are range-checked in host memory only
        assert_raises_each(
            (ValueError, r"labels must be in \[0, 5\)",
             lambda: xent(dev, l, dev.asarray(np.array([0, 1, 5, 2], np.int32)))),
            (ValueError, "labels must be in", lambda: topk(dev, l, dev.asarray(np.array([0, -1, 1, 2], np.int32)))),
        )


def test_kernel_invalid_label_is_nan():
    """Past the Python checks (as on cuda, which does not sync to check labels) a bad label gives a NaN loss."""
    dev = Device("emu")
    k = dev.kernels
    l = np.zeros((5, 2), np.float32)
    lab = np.array([1, 7], np.int32)
    p, d, per = np.empty_like(l), np.empty_like(l), np.empty(2, np.float32)
    loss = np.empty((), np.float32)
    k.softmax_cross_entropy(*(a.ctypes.data for a in (l, lab, p, d, per, loss)), 0, 5, 2, 0)  # 0: no counter
    assert np.isfinite(per[0]) and np.isnan(per[1]) and np.isnan(loss)
    errors = np.empty(2, np.int32)
    k.topk_errors(l.ctypes.data, lab.ctypes.data, errors.ctypes.data, [1, 5], 5, 2, 0)
    assert list(errors) == [2, 1]  # image 0 ties with the 4 other classes: a top-1 error, inside the top 5


BAD_LABELS = {3: -1, 10: 17, 11: 17, 40: -2**31, 68: 2**31 - 1, 69: 0}  # image -> label (K = 17; 0 is valid)


def _labels_with_bad(K, N, seed):
    lab = np.random.default_rng(seed).integers(0, K, N).astype(np.int32)
    for n, v in BAD_LABELS.items():
        lab[n] = v
    return lab, int(((lab < 0) | (lab >= K)).sum())


def test_kernel_counts_invalid_labels():
    """Past the Python checks (as on cuda) the kernel adds the number of out-of-range labels to the counter: across
    blocks (70 images = 3 blocks of 32), for negative, == K and extreme labels, under every emulator schedule, on
    top of what the counter held; the other outputs are bit-identical to a launch without a counter."""
    k = EMU.kernels
    K, N = 17, 70
    l = np.random.default_rng(5).standard_normal((K, N)).astype(np.float32)
    lab, n_bad = _labels_with_bad(K, N, 6)
    assert n_bad == 5

    def run(counter):
        p, d, per, loss = np.empty_like(l), np.empty_like(l), np.empty(N, np.float32), np.empty((), np.float32)
        k.softmax_cross_entropy(*(a.ctypes.data for a in (l, lab, p, d, per, loss)),
                                0 if counter is None else counter.ctypes.data, K, N, 0)
        return p, d, per

    counter = np.array([3], np.int32)
    runs = [run(counter) for _ in range(2)]
    assert counter[0] == 3 + 2 * n_bad  # added to, never reset
    without = run(None)
    for got in runs:
        for name, a, b in zip(("probs", "dlogits", "loss per image"), got, without):
            assert np.array_equal(a, b, equal_nan=True), name
    bad = (lab < 0) | (lab >= K)
    assert np.isnan(without[2][bad]).all() and np.isfinite(without[2][~bad]).all()

    def counted():
        c = np.zeros(1, np.int32)
        run(c)
        return (c,)

    assert_schedules_identical(counted, ("bad-label count",), seed=11)
    assert counted()[0][0] == n_bad


def test_op_bad_labels_counter(monkeypatch):
    """Through the op: valid labels leave the counter alone (emu and numpy, whose labels are checked on the host);
    with the host check out of the way, as on cuda, the op hands the counter to the kernel, which counts."""
    import convnet.ops.softmax as softmax_mod

    K, N = 17, 70
    l = np.random.default_rng(8).standard_normal((K, N)).astype(np.float32)
    good = np.random.default_rng(9).integers(0, K, N).astype(np.int32)
    for dev in (NUMPY, EMU):
        counter = dev.asarray(np.array([4], np.int32))
        loss, p, d = ops.softmax_cross_entropy(dev, dev.asarray(l), dev.asarray(good), bad_labels=counter)
        assert to_host(counter)[0] == 4
        if dev is EMU:
            loss0, p0, d0 = ops.softmax_cross_entropy(dev, l, good)
            for a, b in ((loss, loss0), (p, p0), (d, d0)):
                assert np.array_equal(to_host(a), to_host(b))
    bad, n_bad = _labels_with_bad(K, N, 10)
    with pytest.raises(ValueError, match="labels must be in"):  # host memory: rejected before the launch
        ops.softmax_cross_entropy(EMU, l, bad, bad_labels=np.zeros(1, np.int32))
    check = softmax_mod._check_inputs
    monkeypatch.setattr(softmax_mod, "_check_inputs",  # as on cuda: shapes and dtypes checked, values not
                        lambda dev, name, logits, labels, stream: check(dev, name, logits, np.zeros_like(labels),
                                                                        stream))
    counter = np.array([1], np.int32)
    loss, _, _ = ops.softmax_cross_entropy(EMU, l, bad, bad_labels=counter)
    assert counter[0] == 1 + n_bad and np.isnan(to_host(loss))


def test_op_bad_labels_counter_rejects_bad_arrays():
    l = np.zeros((5, 4), np.float32)
    lab = np.zeros(4, np.int32)
    xent = ops.softmax_cross_entropy
    assert_raises_each(
        (ValueError, r"bad_labels must have shape \(1\)", lambda: xent(EMU, l, lab, bad_labels=np.zeros(2, np.int32))),
        (TypeError, "bad_labels must have dtype int32", lambda: xent(EMU, l, lab, bad_labels=np.zeros(1, np.int64))),
        (TypeError, "bad_labels must be a", lambda: xent(EMU, l, lab, bad_labels=[0])),
        (ValueError, "bad_labels is read-only",
         lambda: xent(EMU, l, lab, bad_labels=np.frombuffer(np.zeros(1, np.int32).tobytes(), np.int32))),
        (ValueError, "bad_labels must not overlap labels", lambda: xent(EMU, l, lab, bad_labels=lab[:1])),
    )


def test_cuda_counts_invalid_labels(cuda_device):
    """On a GPU labels are not checked on the host: the op's counter reports them (read after a sync)."""
    dev = cuda_device
    K, N = 17, 70
    l = np.random.default_rng(12).standard_normal((K, N)).astype(np.float32)
    bad, n_bad = _labels_with_bad(K, N, 13)
    counter = dev.zeros((1,), np.int32)
    loss, _, _ = ops.softmax_cross_entropy(dev, dev.asarray(l), dev.asarray(bad), bad_labels=counter)
    assert int(to_host(counter)[0]) == n_bad and np.isnan(float(to_host(loss)))
    good = np.clip(bad, 0, K - 1)
    ops.softmax_cross_entropy(dev, dev.asarray(l), dev.asarray(good), bad_labels=counter)
    assert int(to_host(counter)[0]) == n_bad


# ---------------------------------------------------------------------------------------------------- softmax_forward
@pytest.mark.parametrize("shape", [(10, 7), (1, 3), (1000, 33), (17, 64)])
@pytest.mark.sanitize
def test_softmax_forward(kernel_device, shape):
    """Probabilities without labels (inference, evaluation): the same kernel as softmax_cross_entropy's probs."""
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    l = (rng.standard_normal(shape) * 30).astype(np.float32)
    lab = rng.integers(0, shape[0], shape[1]).astype(np.int32)
    dev = kernel_device
    p = ops.softmax_forward(dev, dev.asarray(l))
    assert_close("probs", p, ref.softmax(l.astype(np.float64)), rtol=1e-5, atol=1e-7)
    _, p_xent, _ = ops.softmax_cross_entropy(dev, dev.asarray(l), dev.asarray(lab))
    np.testing.assert_array_equal(to_host(p), to_host(p_xent))  # bit-identical to the fused kernel's probs
    out = dev.asarray(np.full(shape, np.nan, np.float32))
    assert ops.softmax_forward(dev, dev.asarray(l), out=out) is out
    np.testing.assert_array_equal(to_host(out), to_host(p))


def test_softmax_forward_numpy_and_bad_inputs():
    l = np.random.default_rng(3).standard_normal((5, 4))
    np.testing.assert_array_equal(ops.softmax_forward(NUMPY, l), ref.softmax(l))
    for dev in (NUMPY, EMU):
        with pytest.raises(ValueError, match="2-D"):
            ops.softmax_forward(dev, np.zeros((5,), np.float32))
        with pytest.raises(ValueError, match="out must have shape"):
            ops.softmax_forward(dev, np.zeros((5, 4), np.float32), out=np.zeros((4, 5), np.float32))
        x = np.ones((5, 4), np.float32)
        with pytest.raises(ValueError, match="overlap"):
            ops.softmax_forward(dev, x, out=x)


def test_topk_nonfinite_scores_are_errors_in_reference_and_kernel():
    """The rule lives in the reference and in the kernel themselves (not in a host-side pass of the op): an image
    with any NaN or infinite score is an error for every k, whatever the other scores."""
    rng = np.random.default_rng(11)
    K, N = 37, 70  # several blocks of 32 images, classes spread over the 16 lanes unevenly
    s = rng.standard_normal((K, N)).astype(np.float32)
    labels = rng.integers(0, K, N).astype(np.int32)
    s[:, 0] = np.nan
    s[labels[1], 1] = np.nan       # only the label's score
    s[(labels[2] + 1) % K, 2] = np.inf
    s[K - 1, 40] = -np.inf         # a class in the last lane, in the second block
    bad = np.zeros(N, bool)
    bad[[0, 1, 2, 40]] = True
    clean = ref.topk_errors(s[:, ~bad], labels[~bad], ks=(1, 5, K))
    want = tuple(c + int(bad.sum()) for c in clean)
    assert ref.topk_errors(s, labels, ks=(1, 5, K)) == want
    k = EMU.kernels
    for order in ("forward", "reverse", "random"):
        with schedule(EMU, order):
            errors = np.empty(3, np.int32)
            k.topk_errors(s.ctypes.data, labels.ctypes.data, errors.ctypes.data, [1, 5, K], K, N, 0)
            assert tuple(errors) == want, order
