"""Cross-map local response normalisation (CHWN): the op API. Kernels in csrc/kernels/lrn.cu, reference in
convnet/reference/lrn.py.

``denom_c = k + a * sum_{j in W(c)} x_j**2``, ``y_c = x_c * denom_c**(-beta)``, window ``W(c) = [c - size//2,
c - size//2 + size - 1]`` clipped to the channels.  The alpha convention is explicit:

* ``convention="sum"``:  ``a = alpha``         — the 2012 paper as printed (k=2, n=5, alpha=1e-4, beta=0.75);
* ``convention="mean"``: ``a = alpha / size``  — Caffe, torch.nn.LocalResponseNorm, cuda-convnet's ``scale``.

So ``(alpha=5e-4, convention="mean")`` equals ``(alpha=1e-4, convention="sum")`` for size 5.
``lrn_forward`` returns ``(y, denom)`` (``with_denom=False``: ``(y, None)``, one write stream less).

The backward pass is exact, in two variants (``method=``):

* ``"recompute"`` (default): the kernel reads only x and dy and recomputes denom and y in registers with the forward
  pass's operations in the forward pass's order (bit-identical values).  LRN is memory-bound, so recomputing is
  cheaper than reading: 3 memory streams (x, dy in; dx out) instead of 5.  ``y`` and ``denom`` may be None.
* ``"reuse"``: the kernel reads the forward's y and denom (x, y, denom, dy in; dx out), the textbook reuse.

Both give the same dx up to float rounding of the final sums (tested against each other and the reference).
"""
from __future__ import annotations

import numbers

from convnet.ops._checks import as_device, check_array, check_disjoint, check_same_dtype, launch, output, scalar
from convnet.geometry import LrnGeometry
from convnet.reference import lrn as ref

__all__ = ["lrn_forward", "lrn_backward"]


def _params(size, alpha, beta, k, convention):
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if convention not in ref.CONVENTIONS:
        raise ValueError(f"convention must be 'sum' (a = alpha, the paper) or 'mean' (a = alpha/size, Caffe/torch/"
                         f"cuda-convnet), got {convention!r}")
    alpha = scalar("alpha", alpha, low=0.0)
    beta = scalar("beta", beta, low=0.0)
    k = scalar("k", k, low=0.0, low_open=True)
    return int(size), alpha, beta, k, convention


METHODS = ("recompute", "reuse")


def lrn_forward(device, x, *, size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum", out=None, stream=None,
                with_denom=True):
    """Returns ``(y, denom)``. ``out`` may be ``y`` or a pair ``(y, denom)`` of preallocated arrays.

    ``with_denom=False`` skips writing denom (returns ``(y, None)``): what a GPU training step needs when the
    backward pass uses ``method="recompute"``.
    """
    dev = as_device(device)
    size, alpha, beta, k, convention = _params(size, alpha, beta, k, convention)
    check_array("x", x, dev, ndim=4)
    if any(s < 1 for s in x.shape):
        raise ValueError(f"x must have a non-empty shape (C, H, W, N), got {tuple(x.shape)}")
    out_y, out_d = out if isinstance(out, (tuple, list)) else (out, None)
    y = output("out[0]" if out_d is not None else "out", out_y, dev, x.shape, x.dtype)
    denom = output("out[1]", out_d, dev, x.shape, x.dtype) if with_denom else None
    check_disjoint(dev, "out", out_y, x=x, denom=out_d)
    check_disjoint(dev, "out[1]", out_d, x=x)
    if dev.kind == "numpy":
        yr, dr = ref.lrn_forward(x, size=size, alpha=alpha, beta=beta, k=k, convention=convention)
        y[...] = yr
        if denom is not None:
            denom[...] = dr
    else:
        a = ref.lrn_scale(alpha, size, convention)
        launch(dev, "lrn_forward", x, y, denom if denom is not None else 0,
               LrnGeometry.of(x.shape, size=size, alpha=alpha, beta=beta, k=k, convention=convention), stream=stream)
    return y, denom


def lrn_backward(device, x, y, denom, dy, *, size, alpha, beta, k, convention, out=None, stream=None,
                 method="recompute"):
    """dx, exact, from the forward's input x (and its output y and denom: required for ``method="reuse"``,
    optional for ``"recompute"``, the default)."""
    dev = as_device(device)
    size, alpha, beta, k, convention = _params(size, alpha, beta, k, convention)
    if method not in METHODS:
        raise ValueError(f"method must be 'recompute' or 'reuse', got {method!r}")
    check_array("x", x, dev, ndim=4)
    if method == "reuse" and (y is None or denom is None):
        raise ValueError("method='reuse' needs y and denom from lrn_forward (with_denom=True)")
    for name, a in (("y", y), ("denom", denom), ("dy", dy)):
        if a is not None or name == "dy":
            check_array(name, a, dev, shape=x.shape)
    check_same_dtype(x=x, y=y, denom=denom, dy=dy)
    dx = output("out", out, dev, x.shape, x.dtype)
    check_disjoint(dev, "out", out, x=x, y=y, denom=denom, dy=dy)
    kw = dict(size=size, alpha=alpha, beta=beta, k=k, convention=convention)
    if dev.kind == "numpy":
        if y is None or denom is None:
            y, denom = ref.lrn_forward(x, **kw)
        dx[...] = ref.lrn_backward(x, y, denom, dy, **kw)
    else:
        a = ref.lrn_scale(alpha, size, convention)
        reuse = method == "reuse"
        launch(dev, "lrn_backward", x, y if reuse else 0, denom if reuse else 0, dy, dx,
               LrnGeometry.of(x.shape, size=size, alpha=alpha, beta=beta, k=k, convention=convention), 1 if reuse else 0,
               stream=stream)
    return dx
