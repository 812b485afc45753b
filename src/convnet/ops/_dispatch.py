"""The one path from a validated op call to its result, on every device.

An op validates its arguments (``_checks``), computes its geometry (``convnet.geometry``) and then calls
:func:`produce` with its outputs, a reference computation and a kernel launch:

* on the numpy device the NumPy reference computes the result, which is returned as it is (adopted by the device:
  on a virtual ``numpy:i``, i >= 1, its memory is tagged), or, when the caller gave ``out`` or scaling, written into
  ``out`` by the accumulate rule ``out = alpha * result + beta * out``;
* on kernel devices (emu, cuda) each output is validated or allocated on the op's stream, checked not to overlap the
  inputs, and the kernel launch writes it (the kernels apply alpha and beta themselves). The launch is submitted to
  the op's stream (``Device.submit``): on cuda it is queued there; on an emulated emu stream it runs later on the
  stream's worker, so an op returns before its output is written, as on a GPU.

``beta`` is only honoured with a caller's ``out`` (a fresh buffer holds garbage): :func:`alpha_beta`.
"""
from __future__ import annotations

from dataclasses import dataclass

from convnet.devices import Device
from convnet.ops._checks import check_array, check_disjoint, check_in_place_or_disjoint, scalar


@dataclass(frozen=True)
class Output:
    """One output of an op: the name errors use, the caller's array (or None), its shape and dtype."""

    name: str
    given: object
    shape: tuple
    dtype: object


def alpha_beta(alpha, beta, out) -> tuple[float, float]:
    """Validate the accumulate coefficients of ``out = alpha * op + beta * out``. Without a caller's ``out`` there
    is nothing to accumulate into (a new output holds garbage), so beta is 0."""
    alpha, beta = scalar("alpha", alpha), scalar("beta", beta)
    return alpha, (beta if out is not None else 0.0)


def accumulate(out, result, alpha: float, beta: float):
    """out = alpha * result + beta * out, on NumPy or CuPy arrays; ``out`` is not read when beta == 0 (it may
    hold garbage or NaN, as cuda-convnet's scaleTargets = 0 allowed)."""
    scaled = result if alpha == 1.0 else result * out.dtype.type(alpha)
    if beta == 0.0:
        out[...] = scaled
    else:
        out *= out.dtype.type(beta)
        out += scaled
    return out


def check_output(dev: Device, spec: Output):
    """A caller's ``out``: an array of ``dev`` with exactly the output's shape and dtype, and writeable."""
    return check_array(spec.name, spec.given, dev, shape=spec.shape, dtypes=(spec.dtype,), writeable=True)


def _buffer(dev: Device, spec: Output, stream=None):
    """The (already validated) caller's ``out``, or a new array allocated on ``stream``."""
    return spec.given if spec.given is not None else dev.empty(spec.shape, spec.dtype, stream=stream)


def output(dev: Device, spec: Output, stream=None):
    """The caller's ``out`` (validated), or a new array allocated on ``stream``."""
    if spec.given is not None:
        check_output(dev, spec)
    return _buffer(dev, spec, stream)


def launch(dev: Device, kernel: str, *args, stream=None):
    """Call a binding of the device's extension module on the right GPU and stream; device arrays among ``args`` are
    passed as addresses."""
    module = dev.kernels
    converted = [dev.pointer(a) if dev.is_array(a) else a for a in args]
    with dev.activate():
        getattr(module, kernel)(*converted, dev.stream_handle(stream))


def produce(dev: Device, outputs, *, reference, kernel, inputs=None, alpha=1.0, beta=0.0, stream=None,
            elementwise=False):
    """Run an op: ``reference()`` on the numpy device, ``kernel(*buffers)`` elsewhere.

    ``outputs`` is one :class:`Output` or a tuple of them (an entry may be None: an output not wanted, passed to the
    kernel as None); ``reference()`` returns the matching array(s). A caller's output must be writeable and must not
    overlap ``inputs`` (name -> array) nor another output: one rule on every device, so a call that works on numpy
    works on emu and cuda. ``elementwise`` ops may also run exactly in place (``out`` is an input), but never on a
    partial overlap. Allocations and the launch happen on ``stream``.
    Returns the output array(s).
    """
    single = isinstance(outputs, Output)
    specs = (outputs,) if single else tuple(outputs)
    given = [s for s in specs if s is not None and s.given is not None]
    if given:  # a caller's out is validated before any work
        for spec in given:
            check_output(dev, spec)
        inputs = {k: v for k, v in (inputs or {}).items() if v is not None}
        for i, spec in enumerate(given):
            if elementwise:
                check_in_place_or_disjoint(dev, spec.name, spec.given, **inputs)
            else:
                check_disjoint(dev, spec.name, spec.given, **inputs)
            for other in given[i + 1:]:
                check_disjoint(dev, other.name, other.given, **{spec.name: spec.given})
    if dev.runs_reference:
        results = reference()
        results = (results,) if single else tuple(results)
        done = tuple(None if spec is None else _store(dev, spec, r, alpha, beta) for spec, r in zip(specs, results))
    else:
        done = tuple(None if spec is None else _buffer(dev, spec, stream) for spec in specs)
        dev.submit(lambda: kernel(*done), stream)  # on an emulated stream: later, on its worker
    return done[0] if single else done


def _store(dev: Device, spec: Output, result, alpha: float, beta: float):
    """The reference's result as the op's output: itself (adopted by the device: new host memory is tagged with a
    virtual device) when nothing is to be scaled or written into."""
    if result is spec.given and alpha == 1.0 and beta == 0.0:  # a host function that updated ``out`` in place
        return result
    if (spec.given is None and alpha == 1.0 and beta == 0.0 and result.dtype == spec.dtype
            and tuple(result.shape) == tuple(spec.shape) and result.flags.c_contiguous):
        return dev.adopt(result)
    return accumulate(_buffer(dev, spec), result, alpha, beta)
