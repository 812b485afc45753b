"""What is specific to the fast CPU path (the ``cpu`` device, ``convnet.cpu`` + ``convnet._cpu``). Every op already
runs on ``cpu`` against the NumPy reference in its own test file (``kernel_device``); here: the compiled loops'
own argument checks, thread-count independence, the chunked-batch paths, and a few training steps against numpy."""
import os

import numpy as np
import pytest
from helpers import CPU, NUMPY, assert_close, rand

import convnet.reference.conv as ref_conv
import convnet.reference.pool as ref_pool
from convnet import _cpu, ops
from convnet.cpu import loop_threads
from convnet.model_file import load_model
from convnet.optim import SGD

RNG = np.random.default_rng(5)


def test_loops_check_their_arguments():
    """A wrong call into the compiled loops is a Python exception, never an out-of-bounds access."""
    x = rand(RNG, (2, 5, 5, 3))
    cols = np.empty((2 * 9, 9 * 3), np.float32)
    _cpu.im2col(x, cols, 2, 5, 5, 3, 0, 2, 0, 3, 3, 3, 2, 2, 1, 1, 3, 3)  # the right sizes: fine
    with pytest.raises(ValueError, match="cols: 486 elements, expected 972"):
        _cpu.im2col(x, cols, 2, 5, 5, 3, 0, 2, 0, 3, 3, 3, 2, 2, 1, 1, 3, 6)
    with pytest.raises(ValueError, match="bad range"):
        _cpu.im2col(x, cols, 2, 5, 5, 3, 1, 2, 0, 3, 3, 3, 2, 2, 1, 1, 3, 3)  # channels [1, 3) of 2
    with pytest.raises(ValueError, match="positive"):
        _cpu.maxpool_forward(x, np.empty((2, 2, 2, 3), np.float32), 2, 5, 5, 3, 3, 3, 0, 2, 2, 2)
    with pytest.raises(ValueError, match="window outside the image"):
        _cpu.maxpool_forward(x, np.empty((2, 3, 3, 3), np.float32), 2, 5, 5, 3, 3, 3, 2, 2, 3, 3)
    with pytest.raises(TypeError):
        _cpu.relu_forward(x.astype(np.float64), np.empty(x.shape, np.float64))  # float32 only, never converted
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _cpu.relu_forward(x, ro)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        _cpu.set_threads(0)
    w, g, v = rand(RNG, 10), rand(RNG, 10), rand(RNG, 10)
    with pytest.raises(ValueError, match="g: 9 elements, expected 10"):
        _cpu.sgd_update(w, g[:9], v, 0.9, 0.0, False, 0.1)
    with pytest.raises(ValueError, match="must not overlap"):
        _cpu.sgd_update(w, g, w, 0.9, 0.0, False, 0.1)
    many = dict(momentum=[0.9], decay_lr=[0.0], decay=[False], lr=[0.1])
    with pytest.raises(ValueError, match="g: 9 elements, expected 10"):
        _cpu.sgd_update_many([w], [g[:9]], [v], **many)
    with pytest.raises(ValueError, match="same length"):
        _cpu.sgd_update_many([w], [g], [v], momentum=[0.9, 0.9], decay_lr=[0.0], decay=[False], lr=[0.1])
    with pytest.raises(ValueError, match="must not overlap"):  # across parameters too
        _cpu.sgd_update_many([w, v], [g, rand(RNG, 10)], [rand(RNG, 10), w], **{k: x * 2 for k, x in many.items()})
    for bad in (w.astype(np.float64), rand(RNG, 20)[::2]):  # never a converted copy: w is updated in place
        with pytest.raises(TypeError, match=r"ws\[0\] must be a C-contiguous float32"):
            _cpu.sgd_update_many([bad], [g], [v], **many)
    with pytest.raises(ValueError, match="bias: 2 elements, expected 3"):
        _cpu.bias_add(x, np.zeros(2, np.float32), 3, x.size // 3)
    with pytest.raises(ValueError, match="db: 3 elements, expected 2"):
        _cpu.bias_sum(x, np.zeros(3, np.float32), 2, x.size // 2)
    with pytest.raises(ValueError, match="threshold above 2"):
        _cpu.dropout_apply(x, np.empty_like(x), 2**32 + 1, 1.0, 1, 0, 0)
    from convnet.cpu import conv as fast_conv

    with pytest.raises(TypeError, match="computes in float32, got float64"):  # never a silent downcast
        fast_conv.conv_forward(x.astype(np.float64), rand(RNG, (2, 3, 3, 4)).astype(np.float64))


def _conv_all(x, w, dy, **geo):
    return (ops.conv_forward(CPU, x, w, **geo), ops.conv_backward_data(CPU, dy, w, x.shape[1:3], **geo),
            ops.conv_backward_filter(CPU, x, dy, w.shape[1:3], **geo))


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_do_not_change_results(threads):
    """The loops split work by channel (no reduction is split), so any thread count gives the same bits."""
    x, w = rand(RNG, (6, 11, 11, 5)), rand(RNG, (3, 3, 3, 8))
    geo = dict(stride=2, padding=1, groups=2)
    dy = rand(RNG, ops.conv_output_shape(x.shape, w.shape, **geo))
    pool = dict(mode="max", window=3, stride=2, padding=0)
    y = ops.pool_forward(CPU, x, **pool)
    g, gx = rand(RNG, y.shape), rand(RNG, x.shape)

    p, pg, pv = rand(RNG, 70001), rand(RNG, 70001), rand(RNG, 70001)
    big = rand(RNG, (3, 7, 7, 1001))

    def run():
        pw, pvel = p.copy(), pv.copy()
        ops.sgd_update(CPU, pw, pg, pvel, lr=0.1, momentum=0.9, weight_decay=5e-4)
        return (*_conv_all(x, w, dy, **geo), ops.pool_forward(CPU, x, **pool), ops.pool_backward(CPU, x, y, g, **pool),
                ops.relu_forward(CPU, x), ops.relu_backward(CPU, x, gx), ops.conv_backward_bias(CPU, big),
                ops.dropout_forward(CPU, big, 0.6, seed=3, offset=1, start=5), pw, pvel)

    with loop_threads(1):
        one = run()
    with loop_threads(threads):
        assert _cpu.get_threads() == threads
        many = run()
    assert _cpu.get_threads() == 1  # restored
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("geo", [dict(stride=1, padding=2, groups=1), dict(stride=3, padding=1, groups=2),
                                 dict(stride=2, padding=0, groups=4)])
def test_chunked_batches_match_the_reference(monkeypatch, geo):
    """Batches too big for one im2col matrix are cut into chunks of images (the reference's budget, made tiny)."""
    x, w = rand(RNG, (8, 9, 10, 7)), rand(RNG, (8 // geo["groups"], 3, 3, 12))
    dy = rand(RNG, ops.conv_output_shape(x.shape, w.shape, **geo))
    want = (ref_conv.conv_forward(x, w, **geo), ref_conv.conv_backward_data(dy, w, x.shape[1:3], **geo),
            ref_conv.conv_backward_filter(x, dy, w.shape[1:3], **geo))
    monkeypatch.setattr(ref_conv, "_COL_BUDGET", 8 * 9 * 60)  # about 2 images per chunk: 4 chunks, a ragged last
    assert len(ref_conv.image_chunks(7, 8 * 9 * 30)) > 2
    for name, got, exp in zip(("y", "dx", "dw"), _conv_all(x, w, dy, **geo), want):
        assert_close(name, got, exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 32, 45, 70])
def test_max_pooling_blocks_of_images_match_the_reference(n):
    """The pooling loops work on blocks of 32 images and a shorter last block; ties (small integers) get every
    tied window's gradient, summed in the scatter order."""
    x = RNG.integers(-3, 4, (3, 9, 11, n)).astype(np.float32)
    pool = dict(mode="max", window=3, stride=2, padding=0)
    y = ops.pool_forward(CPU, x, **pool)
    assert_close("y", y, ref_pool.pool_forward(x, **pool), rtol=0)
    dy = rand(RNG, y.shape)
    assert_close("dx", ops.pool_backward(CPU, x, y, dy, **pool), ref_pool.pool_backward(x, y, dy, **pool),
                 rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("start", [0, 3, 4099, 2**32 - 6])
@pytest.mark.parametrize("threads", [1, 2])
def test_dropout_across_work_items_is_the_reference(start, threads):
    """Dropout's work items (4096 elements, each starting on a Philox group) and blocks of 16 groups, from any start:
    the reference's mask and values bit for bit."""
    import convnet.reference.elementwise as ref_el

    x = rand(RNG, (5, 4001))
    with loop_threads(threads):
        got = ops.dropout_forward(CPU, x, 0.7, seed=2**40 + 9, offset=3, start=start)
    np.testing.assert_array_equal(got, ref_el.dropout_forward(x, 0.7, 2**40 + 9, 3, start))


@pytest.mark.parametrize("case", [((5, 4001), 0.7, 3, None), ((3, 7, 5, 9), 0.3, 0, (16, 4)),
                                  ((64, 6, 6, 64), 0.75, 2**32 - 6, None), ((4, 33), 1.0, 0, None)], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_dropout_backward_with_the_forwards_mask_is_the_reference(case, threads):
    """The backward applies the mask its forward kept (convnet.cpu.elementwise._MASKS) instead of drawing it again:
    bit for bit the backward that draws it (a call without a forward before it) and the reference, for shards of a
    batch, awkward sizes, keep = 1, 1 and 2 threads."""
    import convnet.cpu.elementwise as fast_el
    import convnet.reference.elementwise as ref_el

    shape, keep, start, batch = case
    x, dy = rand(RNG, shape), rand(RNG, shape)
    args = (keep, 2**40 + 9, 3, start)
    fast_el._MASKS.clear()
    with loop_threads(threads):
        drawn = ops.dropout_backward(CPU, dy, *args, batch=batch)  # no forward: the mask is drawn
        assert not fast_el._MASKS
        y = ops.dropout_forward(CPU, x, *args, batch=batch)
        assert len(fast_el._MASKS) == 1
        kept = ops.dropout_backward(CPU, dy, *args, batch=batch)
        assert not fast_el._MASKS  # used once
    host_batch = None if batch is None or len(shape) == 1 else batch
    np.testing.assert_array_equal(y.view(np.uint32), ref_el.dropout_forward(x, *args, host_batch).view(np.uint32))
    want = ref_el.dropout_backward(dy, *args, host_batch)
    for got in (drawn, kept):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    if keep < 1:
        assert (kept == 0).any() and (kept != 0).any()


def test_dropout_keeps_a_few_masks_and_never_a_wrong_one():
    """Only the last few forwards' masks are kept; a backward with other parameters (another seed) draws its own."""
    import convnet.cpu.elementwise as fast_el
    import convnet.reference.elementwise as ref_el

    fast_el._MASKS.clear()
    x = rand(RNG, (3, 50))
    for seed in range(fast_el._MASKS_KEPT + 3):
        ops.dropout_forward(CPU, x, 0.5, seed)
    assert len(fast_el._MASKS) == fast_el._MASKS_KEPT
    got = ops.dropout_backward(CPU, x, 0.5, 1000)
    np.testing.assert_array_equal(got, ref_el.dropout_forward(x, 0.5, 1000))
    fast_el._MASKS.clear()


def test_dropout_mask_arguments_are_checked():
    x = rand(RNG, (4, 10))
    y = np.empty_like(x)
    with pytest.raises(TypeError, match="uint8"):
        _cpu.dropout_apply(x, y, 2**31, 2.0, 1, 0, 0, np.empty(x.shape, np.float32))
    with pytest.raises(ValueError, match="mask: 39 elements, expected 40"):
        _cpu.dropout_apply(x, y, 2**31, 2.0, 1, 0, 0, np.empty(39, np.uint8))
    ro = np.empty(x.shape, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _cpu.dropout_apply(x, y, 2**31, 2.0, 1, 0, 0, ro)
    with pytest.raises(TypeError, match="uint8"):
        _cpu.dropout_apply_mask(x, np.ones(x.shape, bool)[:, ::2], y, 2.0)
    with pytest.raises(ValueError, match="mask: 20 elements"):
        _cpu.dropout_apply_mask(x, np.ones(20, np.uint8), y, 2.0)


def test_malloc_settings_leave_a_users_own_alone(monkeypatch):
    """The cpu path asks glibc to keep freed memory (no page faults per step), unless the user set malloc's knobs."""
    import convnet.cpu as fast

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(fast.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(fast.sys, "platform", "linux")
    for var in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    fast._keep_freed_memory()
    assert calls == [(fast._M_MMAP_THRESHOLD, 64 << 20), (fast._M_TRIM_THRESHOLD, 256 << 20)]
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    fast._keep_freed_memory()
    assert calls == []


def test_training_steps_follow_the_reference():
    """A few SGD steps of the default model on cpu and on numpy, from the same parameters: the same losses to float32
    rounding (the two differ only in summation order)."""
    nets = {}
    for dev in (CPU, NUMPY):
        net, _ = load_model("fmnist", device=dev, seed=3)
        nets[dev.kind] = (net, SGD(net, lr=0.05, momentum=0.9, weight_decay=5e-4))
    x = rand(RNG, (1, 28, 28, 16), low=-0.5, high=0.5)
    y = RNG.integers(0, 10, 16).astype(np.int32)
    losses = {k: [] for k in nets}
    for step in range(4):
        for k, (net, opt) in nets.items():
            net.forward(x, y, train=True, step=step)
            net.backward()
            opt.step()
            losses[k].append(float(net.loss))
    np.testing.assert_allclose(losses["cpu"], losses["numpy"], rtol=1e-4)
    assert len(set(losses["cpu"])) == len(losses["cpu"])  # the steps moved the parameters


@pytest.mark.parametrize("cores, busy, want", [(2, 0.1, 2), (2, 0.9, 1), (2, 3.8, 1), (16, 2.2, 8), (16, 11.0, 5),
                                               (1, 0.0, 1)])
def test_default_threads_are_the_idle_cores(monkeypatch, cores, busy, want):
    """The default thread count: the cores other work leaves idle (a spinning thread pool on busy cores stalls)."""
    from convnet.devices import _host, default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(_host, "busy_cores", lambda: busy)
    assert default_threads() == want


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="busy_cores reads Linux's /proc/stat")
def test_busy_cores_sees_a_busy_thread():
    """A spinning thread in this process shows as about one busy core (Linux /proc/stat)."""
    import threading
    import time

    from convnet.devices._host import busy_cores

    stop = time.perf_counter() + 1.0
    spinner = threading.Thread(target=lambda: [None for _ in iter(lambda: time.perf_counter() < stop, False)])
    spinner.start()
    try:
        assert busy_cores(0.3) > 0.6
    finally:
        spinner.join()


@pytest.mark.parametrize("user", [{}, {"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_the_openmp_threads_spin_briefly_unless_the_user_chose(user):
    """convnet.cpu sets OMP_WAIT_POLICY=PASSIVE and a short GOMP_SPINCOUNT for libgomp (waiting threads spin tens of
    microseconds between the step's parallel regions, then sleep) -- before convnet._cpu loads libgomp -- and leaves
    both alone when the user set either."""
    import subprocess
    import sys

    from helpers import subprocess_env
    env = {k: v for k, v in subprocess_env().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import os, convnet.cpu as c; c.lib(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), c.SPIN_COUNT)")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **user}, capture_output=True, text=True,
                         check=True).stdout.split()
    if user:
        assert out[:2] == [user.get("OMP_WAIT_POLICY", "None"), user.get("GOMP_SPINCOUNT", "None")]
    else:
        assert out == ["PASSIVE", out[2], out[2]] and 0 < int(out[2]) <= 100_000
