"""Softmax + cross-entropy (fused gradient) and top-k error counts: the op API. Kernels in
csrc/kernels/softmax.cu, reference in convnet/reference/softmax.py.

Layout: logits ``(classes, N)``, labels ``(N,)`` int32 in ``[0, classes)``.

* ``softmax_cross_entropy`` -> ``(loss_sum, probs, dlogits)``: ``loss_sum`` a 0-d device array, the sum over the batch
  of ``-log p[label]`` computed stably in log space (finite for logits of 1e4); ``dlogits = probs - onehot`` (not
  divided by N; scale it by 1/N yourself for a mean loss).
* ``softmax_forward`` -> ``probs`` alone (no labels): what inference and evaluation need.
* ``topk_errors`` -> tuple of ints: image n is a top-k error when at least k other classes score at least as high
  as its label (ties count against it: saturated probabilities tie at 0), or when any of its scores is NaN or
  infinite (a diverged net is never right). Give it logits (or log-probabilities) to rank exactly.
  Counted on the device; only the counts come back to the host.
* The kernels index with 32-bit ints: ``classes * N`` must be below 2**31 (checked before anything is allocated).
* Labels in host memory (numpy and emu) are range-checked.  On cuda they are not (that would need a
  device-to-host sync every step): an out-of-range label gives a NaN loss and counts as an error, and
  ``softmax_cross_entropy`` adds the number of such labels to its ``bad_labels`` counter when given one, for the
  caller to read at a point where it synchronises anyway.
* Storage: logits float32 (float64 on the numpy device) or, for ``softmax_forward`` and ``softmax_cross_entropy``,
  bfloat16 (``convnet.ops._checks.BFLOAT16``): the math runs in float32 on the upcast logits; ``probs`` and
  ``dlogits`` are bfloat16 (an activation and an activation gradient), each rounded once; the loss and its batch sum
  stay float32 (``convnet.reference.storage``). ``topk_errors`` ranks float32 (or float64) scores.
"""
from __future__ import annotations

import numbers

import numpy as np

from convnet.geometry import INT32_MAX
from convnet.ops._checks import (BFLOAT16, as_device, check_array, check_disjoint, storage_dtypes,
                                 storage_kernel)
from convnet.ops._dispatch import Output, launch, produce
from convnet.reference import softmax as ref

MAX_KS = 8


def _check_logits(dev, name, logits):
    check_array(name, logits, dev, ndim=2, dtypes=storage_dtypes(dev))
    K, N = logits.shape
    if K < 1 or N < 1:
        raise ValueError(f"{name} must have shape (classes, N) with classes >= 1 and N >= 1, got {tuple(logits.shape)}")
    if K * N > INT32_MAX:
        raise ValueError(f"{name} has {K} x {N} = {K * N} elements; the kernels support fewer than 2**31")
    return K, N


def _check_inputs(dev, name, logits, labels, stream):
    K, N = _check_logits(dev, name, logits)
    check_array("labels", labels, dev, shape=(N,), dtypes=(np.int32,))
    # values checked where they are final and in host memory (on a GPU or an emulated stream a copy may still be
    # writing them, and a check would cost a sync): elsewhere the kernels count bad labels (``bad_labels``)
    if isinstance(labels, np.ndarray) and dev.runs_at_issue(stream):
        if labels.size and (labels.min() < 0 or labels.max() >= K):
            bad = int(labels[(labels < 0) | (labels >= K)][0])
            raise ValueError(f"labels must be in [0, {K}) (the number of classes), found {bad}")
    return K, N


def softmax_forward(device, logits, *, out=None, stream=None):
    """probs = softmax over classes (axis 0) of logits (classes, N), max-subtracted."""
    dev = as_device(device)
    K, N = _check_logits(dev, "logits", logits)
    return produce(dev, Output("out", out, (K, N), logits.dtype), inputs=dict(logits=logits), stream=stream,
                   reference=lambda: dev.host_function(ref.softmax)(logits),
                   kernel=lambda probs: launch(dev, storage_kernel("softmax_forward", logits.dtype), logits, probs, K,
                                               N, stream=stream))


def softmax_cross_entropy(device, logits, labels, *, bad_labels=None, stream=None):
    """(loss_sum, probs, dlogits) of logits (classes, N) and labels (N,) int32.

    bad_labels: optional (1,) int32 device array the kernel adds the number of out-of-range labels to; read it at a
    synchronisation point. (On host devices labels are range-checked before the launch with a ValueError, so there
    it stays untouched.)
    """
    dev = as_device(device)
    K, N = _check_inputs(dev, "logits", logits, labels, stream)
    dtype = logits.dtype
    loss_dtype = np.dtype(np.float32) if dtype == BFLOAT16 else dtype
    if bad_labels is not None:
        check_array("bad_labels", bad_labels, dev, shape=(1,), dtypes=(np.int32,), writeable=True)
        check_disjoint(dev, "bad_labels", bad_labels, logits=logits, labels=labels)

    def kernel(loss, probs, dlogits):
        per_image = dev.empty((N,), loss_dtype, stream=stream)
        launch(dev, storage_kernel("softmax_cross_entropy", dtype), logits, labels, probs, dlogits, per_image, loss,
               bad_labels if bad_labels is not None else 0, K, N, stream=stream)

    outputs = (Output("loss", None, (), loss_dtype), Output("probs", None, (K, N), dtype),
               Output("dlogits", None, (K, N), dtype))
    return produce(dev, outputs, stream=stream, kernel=kernel,
                   reference=lambda: dev.host_function(ref.softmax_cross_entropy)(logits, labels))


def _ks(ks):
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    if not isinstance(ks, (tuple, list)) or not 1 <= len(ks) <= MAX_KS or any(
            isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= INT32_MAX for k in ks):
        raise ValueError(f"ks must be 1 to {MAX_KS} positive ints below 2**31, got {ks!r}")
    return tuple(int(k) for k in ks)


def topk_errors(device, logits_or_probs, labels, ks=(1, 5), *, stream=None):
    """Number of images whose label is not among the top k scores, for each k in ks (a tuple of ints)."""
    dev = as_device(device)
    ks = _ks(ks)
    check_array("logits_or_probs", logits_or_probs, dev)  # float32 (float64 on numpy) only: no bfloat16 variant
    K, N = _check_inputs(dev, "logits_or_probs", logits_or_probs, labels, stream)
    scores = logits_or_probs  # an image with a NaN or infinite score is an error for every k (reference and kernel)
    counts = produce(
        dev, Output("counts", None, (len(ks),), np.dtype(np.int32)), stream=stream,
        reference=lambda: np.asarray(dev.host_function(ref.topk_errors)(scores, labels, ks), np.int32),
        kernel=lambda c: launch(dev, "topk_errors", scores, labels, c, list(ks), K, N, stream=stream))
    with dev.on_stream(stream):  # reading the counts waits for the op's stream
        return tuple(int(c) for c in dev.to_numpy(counts))
