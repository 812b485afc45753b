"""Copies between devices: the one op the layer graph uses for every activation and gradient that crosses devices.

* cuda -> cuda: ``cudaMemcpyPeerAsync`` between two GPUs after enabling peer access once per pair (staged through
  pinned host memory, said once, when a pair cannot access each other), ``cudaMemcpyAsync`` device to device within
  one GPU; on the consumer's stream, ordered after the producer's stream by events, never a host synchronisation
  (:class:`convnet.devices.backend_cuda.GpuCopier`);
* host devices (numpy, cpu, emu and their virtual indices): a real copy into the destination's memory (an array
  tagged with a virtual device ``emu:1``: :mod:`convnet.devices._host`);
* between kinds (emu -> cuda, ...): staged through the host (not a training step's path).
"""
from __future__ import annotations

import numpy as np

from convnet.ops._checks import as_device, check_array, check_disjoint
from convnet.ops._dispatch import Output, output, produce


def copy(dev, a, src, *, out=None, stream=None, src_stream=None):
    """Copy ``a``, an array of device ``src``, onto device ``dev`` (the consumer: the op's device, first as in every
    op). Returns a new array of ``dev`` (or ``out``: same shape and dtype, on ``dev``, not overlapping ``a``), always a
    copy, also when ``src == dev``. Any dtype (labels are int32). ``stream``: the consumer's stream the copy is
    ordered on; ``src_stream``: the stream that wrote ``a`` (None: the devices' current streams; cuda only)."""
    dev, src = as_device(dev), as_device(src)
    check_array("a", a, src, dtypes=(a.dtype,) if hasattr(a, "dtype") else None)
    spec = Output("out", out, tuple(a.shape), a.dtype)
    inputs = {"a": a} if dev.is_array(a) and dev.kind == src.kind else None  # same memory: must not overlap
    if src.kind == dev.kind and not dev.runs_reference:
        # The device orders the copy itself, from the host: the consumer's stream waits for an event recorded on
        # the producer's (done inside a launch on the consumer's stream, that record would come too late).
        o = output(dev, spec, stream)
        check_disjoint(dev, "out", out, **(inputs or {}))
        return dev.copy(a, src, o, stream, src_stream)

    def reference():  # the numpy and cpu devices: a new host array
        return np.array(src.to_numpy(a), dtype=a.dtype, copy=True)

    def kernel(o):  # between kinds (emu -> cuda): staged through the host, which waits for the producer
        host = dev.asarray(src.to_numpy(a), a.dtype)
        o[...] = host

    return produce(dev, spec, reference=reference, kernel=kernel, inputs=inputs, stream=stream)
