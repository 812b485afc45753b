"""What is specific to the fast CPU path (the ``cpu`` device, ``convnet.cpu`` + ``convnet._cpu``). Every op already
runs on ``cpu`` against the NumPy reference in its own test file (``kernel_device``); here: the compiled loops'
own argument checks, thread-count independence, the chunked-batch paths, and a few training steps against numpy."""
import os

import numpy as np
import pytest
from helpers import CPU, NUMPY, assert_close, rand

import convnet.reference.conv as ref_conv
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

    def run():
        return (*_conv_all(x, w, dy, **geo), ops.pool_forward(CPU, x, **pool), ops.pool_backward(CPU, x, y, g, **pool),
                ops.relu_forward(CPU, x), ops.relu_backward(CPU, x, gx))

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
    assert len(ref_conv._chunks(7, 8 * 9 * 30)) > 2
    for name, got, exp in zip(("y", "dx", "dw"), _conv_all(x, w, dy, **geo), want):
        assert_close(name, got, exp, rtol=1e-5, atol=1e-5)


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
