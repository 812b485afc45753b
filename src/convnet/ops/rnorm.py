"""Same-map response normalisation (``rnorm``) and contrast normalisation (``cnorm``), CHWN: the op API. Kernels
in csrc/kernels/rnorm.cu, reference (and the formulas) in convnet/reference/rnorm.py.

``denom_p = k + a * sum_{q in W(p)} s_q**2``, ``y_p = x_p * denom_p**(-beta)`` over the ``size`` x ``size`` window
``W(p)`` within p's map (rows and columns ``[i - size//2, i - size//2 + size)``, clipped to the image), with
``a = alpha / size**2`` (cuda-convnet's ``scale`` divided by the window's area); ``s = x`` (rnorm) or ``s = x -`` its
window mean (cnorm).

``rnorm_forward`` returns ``(y, denom)``, ``cnorm_forward`` ``(y, mean_diff, denom)``: what the backward reads.
Both backward passes are exact (cnorm's includes the gradient through the window mean, which cuda-convnet's omits).
On emu and cuda: rnorm one kernel each way; cnorm two each way (the mean difference, then the normalisation; the
backward goes through a scratch tensor of x's size).
"""
from __future__ import annotations

from convnet.geometry import RnormGeometry
from convnet.ops._checks import as_device, check_array, check_same_dtype
from convnet.ops._dispatch import Output, launch, produce
from convnet.reference import rnorm as ref


def _params(g: RnormGeometry) -> dict:
    return dict(size=g.size, alpha=g.alpha, beta=g.beta, k=g.k)


def _outputs(out, names, shape, dtype):
    """Output specs for a tuple result; ``out`` is None or a tuple/list of len(names) arrays."""
    if out is None:
        out = (None,) * len(names)
    elif not isinstance(out, (tuple, list)) or len(out) != len(names):
        raise ValueError(f"out must be None or a tuple ({', '.join(names)}) of arrays")
    return tuple(Output(f"out[{i}]", o, shape, dtype) for i, o in enumerate(out))


def rnorm_forward(device, x, *, size=5, alpha=1e-3, beta=0.75, k=1.0, out=None, stream=None):
    """Returns ``(y, denom)``. ``out`` may be a pair ``(y, denom)`` of preallocated arrays."""
    dev = as_device(device)
    check_array("x", x, dev, ndim=4)
    g = RnormGeometry.of(x.shape, size=size, alpha=alpha, beta=beta, k=k)

    def reference():
        return dev.host_function(ref.rnorm_forward)(x, **_params(g))

    def kernel(y, denom):
        launch(dev, "rnorm_forward", x, x, y, denom, g, stream=stream)

    return produce(dev, _outputs(out, ("y", "denom"), x.shape, x.dtype), inputs=dict(x=x), stream=stream,
                   reference=reference, kernel=kernel)


def rnorm_backward(device, x, denom, dy, *, size, alpha, beta, k, out=None, stream=None):
    """dx, exact, from the forward's input x and its denom (the forward's parameters are required)."""
    dev = as_device(device)
    check_array("x", x, dev, ndim=4)
    g = RnormGeometry.of(x.shape, size=size, alpha=alpha, beta=beta, k=k)
    check_array("denom", denom, dev, shape=x.shape)
    check_array("dy", dy, dev, shape=x.shape)
    check_same_dtype(x=x, denom=denom, dy=dy)

    def reference():
        return dev.host_function(ref.rnorm_backward)(x, denom, dy, **_params(g))

    def kernel(dx):
        launch(dev, "rnorm_backward", x, x, denom, dy, dx, False, g, stream=stream)

    return produce(dev, Output("out", out, x.shape, x.dtype), inputs=dict(x=x, denom=denom, dy=dy), stream=stream,
                   reference=reference, kernel=kernel)


def cnorm_forward(device, x, *, size=5, alpha=1e-3, beta=0.75, k=1.0, out=None, stream=None):
    """Returns ``(y, mean_diff, denom)``. ``out`` may be a triple of preallocated arrays."""
    dev = as_device(device)
    check_array("x", x, dev, ndim=4)
    g = RnormGeometry.of(x.shape, size=size, alpha=alpha, beta=beta, k=k)

    def reference():
        return dev.host_function(ref.cnorm_forward)(x, **_params(g))

    def kernel(y, mean_diff, denom):
        launch(dev, "cnorm_mean_diff", x, mean_diff, g, stream=stream)
        launch(dev, "rnorm_forward", x, mean_diff, y, denom, g, stream=stream)

    return produce(dev, _outputs(out, ("y", "mean_diff", "denom"), x.shape, x.dtype), inputs=dict(x=x),
                   stream=stream, reference=reference, kernel=kernel)


def cnorm_backward(device, x, mean_diff, denom, dy, *, size, alpha, beta, k, out=None, stream=None):
    """dx, exact, from the forward's input x and its mean_diff and denom (the forward's parameters are required)."""
    dev = as_device(device)
    check_array("x", x, dev, ndim=4)
    g = RnormGeometry.of(x.shape, size=size, alpha=alpha, beta=beta, k=k)
    for name, a in (("mean_diff", mean_diff), ("denom", denom), ("dy", dy)):
        check_array(name, a, dev, shape=x.shape)
    check_same_dtype(x=x, mean_diff=mean_diff, denom=denom, dy=dy)
    # the adjoint u of the mean difference, read over windows by the second kernel
    scratch = None if dev.runs_reference else dev.empty(x.shape, x.dtype, stream=stream)

    def reference():
        return dev.host_function(ref.cnorm_backward)(x, mean_diff, denom, dy, **_params(g))

    def kernel(dx):
        launch(dev, "rnorm_backward", x, mean_diff, denom, dy, scratch, True, g, stream=stream)
        launch(dev, "cnorm_backward_mean", dy, denom, scratch, dx, g, stream=stream)

    return produce(dev, Output("out", out, x.shape, x.dtype),
                   inputs=dict(x=x, mean_diff=mean_diff, denom=denom, dy=dy), stream=stream, reference=reference,
                   kernel=kernel)
