"""SGD (the paper's update rule, per-layer multipliers) and learning-rate schedules."""
import numpy as np
import pytest

from convnet.layers import FC, Data, SoftmaxCost
from convnet.graph import Net
from convnet.optim import SGD, Schedule


def _net():
    return Net([Data("data", channels=1, size=2), FC("fc", "data", outputs=3, init_w=0.5, init_b=0.1, lr_w=2.0,
                                                      lr_b=3.0, wd_w=1.0, wd_b=0.0),
                SoftmaxCost("probs", "fc")], dtype="float64", seed=0)


def test_sgd_is_the_paper_update_rule():
    net = _net()
    opt = SGD(net, lr=0.1, momentum=0.9, weight_decay=5e-4)
    fc = net.layers["fc"]
    rng = np.random.default_rng(0)
    w, b = fc.params["w"].copy(), fc.params["b"].copy()
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for step in range(3):
        gw, gb = rng.standard_normal(w.shape), rng.standard_normal(b.shape)
        fc.grads = {"w": gw.copy(), "b": gb.copy()}
        opt.step()
        # v <- 0.9 v - 0.0005 * eps * w - eps * g ; w <- w + v, eps = lr * layer multiplier; no decay on biases
        vw = 0.9 * vw - 5e-4 * (0.1 * 2.0) * w - (0.1 * 2.0) * gw
        w = w + vw
        vb = 0.9 * vb - (0.1 * 3.0) * gb
        b = b + vb
        np.testing.assert_allclose(fc.params["w"], w, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(fc.params["b"], b, rtol=1e-12, atol=1e-15)


def test_sgd_state_roundtrip():
    net = _net()
    opt = SGD(net, lr=0.1)
    fc = net.layers["fc"]
    fc.grads = {"w": np.ones_like(fc.params["w"]), "b": np.ones_like(fc.params["b"])}
    opt.step()
    st = opt.state_dict()
    opt2 = SGD(net, lr=0.5)
    opt2.load_state_dict(st)
    assert opt2.lr == 0.1 and np.array_equal(opt2.velocity["fc/w"], opt.velocity["fc/w"])
    st["velocity"]["fc/w"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="fc/w"):
        opt2.load_state_dict(st)


def test_step_schedule():
    s = Schedule("step", 0.1, steps=[3, 5], gamma=0.1)
    assert [round(s.lr_at(e), 6) for e in range(7)] == [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert Schedule("constant", 0.3).lr_at(50) == 0.3
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("cosine", 0.1)


def test_plateau_schedule_divides_by_ten_at_most_max_drops_times():
    s = Schedule("plateau", 0.01, patience=2, max_drops=2)
    errs = [0.5, 0.4, 0.41, 0.40, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    lrs = []
    for e in errs:
        lrs.append(s.lr_at(0))
        s.observe(e)
    assert lrs[:4] == [0.01] * 4
    assert lrs[4] == pytest.approx(0.001)  # 0.41, 0.40: two epochs without improvement
    assert lrs[-1] == pytest.approx(0.0001)  # and never below max_drops
    st = s.state_dict()
    t = Schedule("plateau", 0.01, patience=2, max_drops=2)
    t.load_state_dict(st)
    assert t.lr_at(0) == s.lr_at(0) and t.best == s.best


def test_linear_schedule():
    s = Schedule("linear", 0.1, total_epochs=4)
    assert s.lr_at(0) == 0.1 and s.lr_at(2) == pytest.approx(0.05) and s.lr_at(3, 0.5) == pytest.approx(0.0125)
    assert s.lr_at(4) == 0.0
    with pytest.raises(ValueError, match="number of epochs"):
        Schedule("linear", 0.1)
