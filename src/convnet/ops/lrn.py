"""Cross-map local response normalisation (CHWN): the op API. Kernels in csrc/kernels/lrn.cu, reference in
convnet/reference/lrn.py.

``denom_c = k + a * sum_{j in W(c)} x_j**2``, ``y_c = x_c * denom_c**(-beta)``, window ``W(c) = [c - size//2,
c - size//2 + size - 1]`` clipped to the channels.  The alpha convention is explicit:

* ``convention="sum"``:  ``a = alpha``         — the 2012 paper as printed (k=2, n=5, alpha=1e-4, beta=0.75);
* ``convention="mean"``: ``a = alpha / size``  — Caffe, torch.nn.LocalResponseNorm, cuda-convnet's ``scale``.

So ``(alpha=5e-4, convention="mean")`` equals ``(alpha=1e-4, convention="sum")`` for size 5.
``lrn_forward`` returns ``(y, denom)`` (``with_denom=False``: ``(y, None)``, one write stream less).

``groups=G`` splits the channels into G equal groups and normalises each on its own (the window never crosses a
group boundary): the two-tower AlexNet's per-tower LRN on the joined activations. One kernel launch per group (a
group is a contiguous slice of the CHWN tensor).

The backward pass is exact, in two variants (``method=``):

* ``"recompute"`` (default): the kernel reads only x and dy and recomputes denom and y in registers with the forward
  pass's operations in the forward pass's order (bit-identical values).  LRN is memory-bound, so recomputing is
  cheaper than reading: 3 memory streams (x, dy in; dx out) instead of 5.  ``y`` and ``denom`` may be None.
* ``"reuse"``: the kernel reads the forward's y and denom (x, y, denom, dy in; dx out), the textbook reuse.

Both give the same dx up to float rounding of the final sums (tested against each other and the reference).

Storage: float32 (float64 on the numpy device) or bfloat16 (``convnet.ops._checks.BFLOAT16``) for x, y, denom, dy
and dx alike (else TypeError): on bfloat16 the math runs in float32 and each result is rounded once to bfloat16
(``convnet.reference.storage``). ``"recompute"`` then works from the float32 y and denom it recomputes from x,
``"reuse"`` from the rounded ones the forward stored (the two differ by about a bfloat16 rounding).
"""
from __future__ import annotations

import numpy as np

from convnet.geometry import LrnGeometry
from convnet.ops._checks import BFLOAT16, as_device, check_array, check_same_dtype, storage_dtypes, storage_kernel
from convnet.ops._dispatch import Output, launch, produce
from convnet.reference import lrn as ref

METHODS = ("recompute", "reuse")


def _geometry(x_shape, size, alpha, beta, k, convention, groups) -> LrnGeometry:
    return LrnGeometry.of(x_shape, size=size, alpha=alpha, beta=beta, k=k, convention=convention, groups=groups)


def _params(g: LrnGeometry) -> dict:
    return dict(size=g.size, alpha=g.alpha, beta=g.beta, k=g.k, convention=g.convention)


def _group_slices(g: LrnGeometry):
    return [slice(i * g.Cg, (i + 1) * g.Cg) for i in range(g.groups)]


def _float_image(x):
    """x as the kernels compute with it: bfloat16 upcast to float32 (exact), other dtypes as they are."""
    return x.astype(np.float32) if x.dtype == BFLOAT16 else x


def _join(parts):
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def lrn_forward(device, x, *, size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum", groups=1, out=None,
                stream=None, with_denom=True):
    """Returns ``(y, denom)``. ``out`` may be ``y`` or a pair ``(y, denom)`` of preallocated arrays.

    ``with_denom=False`` skips writing denom (returns ``(y, None)``): what a GPU training step needs when the
    backward pass uses ``method="recompute"``.
    """
    dev = as_device(device)
    check_array("x", x, dev, ndim=4, dtypes=storage_dtypes(dev))
    g = _geometry(x.shape, size, alpha, beta, k, convention, groups)
    out_y, out_d = out if isinstance(out, (tuple, list)) else (out, None)
    outputs = (Output("out[0]" if out_d is not None else "out", out_y, x.shape, x.dtype),
               Output("out[1]", out_d, x.shape, x.dtype) if with_denom else None)
    slices = _group_slices(g)

    def reference():
        parts = [dev.host_function(ref.lrn_forward)(x[s], **_params(g)) for s in slices]
        return _join([p[0] for p in parts]), _join([p[1] for p in parts])

    def kernel(y, denom):
        for s in slices:
            launch(dev, storage_kernel("lrn_forward", x.dtype), x[s], y[s], denom[s] if denom is not None else 0,
                   g.group(), stream=stream)

    return produce(dev, outputs, inputs=dict(x=x), stream=stream, reference=reference, kernel=kernel)


def lrn_backward(device, x, y, denom, dy, *, size, alpha, beta, k, convention, groups=1, out=None, stream=None,
                 method="recompute"):
    """dx, exact, from the forward's input x (and its output y and denom: required for ``method="reuse"``,
    optional for ``"recompute"``, the default)."""
    dev = as_device(device)
    if method not in METHODS:
        raise ValueError(f"method must be 'recompute' or 'reuse', got {method!r}")
    check_array("x", x, dev, ndim=4, dtypes=storage_dtypes(dev))
    g = _geometry(x.shape, size, alpha, beta, k, convention, groups)
    if method == "reuse" and (y is None or denom is None):
        raise ValueError("method='reuse' needs y and denom from lrn_forward (with_denom=True)")
    for name, a in (("y", y), ("denom", denom), ("dy", dy)):
        if a is not None or name == "dy":
            check_array(name, a, dev, shape=x.shape, dtypes=storage_dtypes(dev))
    check_same_dtype(x=x, y=y, denom=denom, dy=dy)
    reuse = method == "reuse"
    slices = _group_slices(g)

    def reference():
        parts, forward, backward = [], dev.host_function(ref.lrn_forward), dev.host_function(ref.lrn_backward)
        for s in slices:
            # recompute: the y and denom the float32 forward computes from x (before any rounding to bfloat16)
            ys, ds = (y[s], denom[s]) if reuse else forward(_float_image(x[s]), **_params(g))
            parts.append(backward(x[s], ys, ds, dy[s], **_params(g)))
        return _join(parts)

    def kernel(dx):
        for s in slices:
            launch(dev, storage_kernel("lrn_backward", x.dtype), x[s], y[s] if reuse else 0,
                   denom[s] if reuse else 0, dy[s], dx[s], g.group(), 1 if reuse else 0, stream=stream)

    return produce(dev, Output("out", out, x.shape, x.dtype), inputs=dict(x=x, y=y, denom=denom, dy=dy),
                   stream=stream, reference=reference, kernel=kernel)
