"""Finite-difference gradient checking in float64 (shared by the pool/lrn/softmax/fc tests)."""
import numpy as np


def numeric_grad(f, x, eps=1e-6, idx=None):
    """Central differences of scalar f at x for the flat indices idx (all when None)."""
    x = np.array(x, dtype=np.float64)
    flat = x.reshape(-1)
    idx = range(flat.size) if idx is None else idx
    g = {}
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def check_grad(f, x, analytic, *, eps=1e-6, n=60, rtol=1e-5, atol=1e-7, seed=0):
    rng = np.random.default_rng(seed)
    size = np.asarray(x).size
    idx = rng.choice(size, size=min(n, size), replace=False)
    num = numeric_grad(f, x, eps, idx)
    a = np.asarray(analytic).reshape(-1)
    for i, v in num.items():
        assert abs(a[i] - v) <= atol + rtol * abs(v), f"flat index {i}: analytic {a[i]!r} vs numeric {v!r}"
