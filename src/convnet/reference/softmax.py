"""NumPy reference for softmax + cross-entropy and top-k error counts (float32 and float64).

Layout: logits ``(classes, N)``, labels ``(N,)`` integers in ``[0, classes)``.

* Stable: ``p = exp(l - max_c l) / sum_c exp(l - max_c l)``; the per-image loss is computed in log space as
  ``log(sum_c exp(l_c - m)) - (l_label - m)``, so logits of 1e4 give no inf/NaN.
* ``softmax_cross_entropy`` returns ``(loss_sum, probs, dlogits)``: ``loss_sum`` is a 0-d array (sum over the batch,
  not the mean), ``dlogits = probs - onehot(labels)`` (not divided by N).
* Top-k rule: an image counts as a top-k error when at least ``k`` other classes score *at least as high* as the
  true class (ties count against it: when the softmax saturates, probabilities that underflowed to 0 all tie, and a
  label scored 0 must not count as inside the top k), or when any of its scores is NaN or infinite (a diverged net
  is never scored right). Works on logits or probabilities alike; ranking logits is exact.
* bfloat16 logits (``convnet.reference.storage``): float32 math on the upcast values; ``probs`` and ``dlogits`` are
  rounded once to bfloat16 (they are an activation and an activation gradient), the loss and its sum stay float32.
"""
from __future__ import annotations

import numpy as np

from convnet.reference.storage import bf16_storage

__all__ = ["softmax", "softmax_cross_entropy", "per_image_loss", "topk_errors"]


@bf16_storage
def softmax(logits):
    l = np.asarray(logits)
    e = np.exp(l - l.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def per_image_loss(logits, labels):
    l = np.asarray(logits)
    n = l.shape[1]
    m = l.max(axis=0)
    s = np.exp(l - m).sum(axis=0)
    return np.log(s) - (l[labels, np.arange(n)] - m)


@bf16_storage(rounded=(1, 2))  # probs and dlogits; the loss stays float32
def softmax_cross_entropy(logits, labels):
    l = np.asarray(logits)
    labels = np.asarray(labels)
    n = l.shape[1]
    m = l.max(axis=0, keepdims=True)
    e = np.exp(l - m)
    s = e.sum(axis=0, keepdims=True)
    probs = e / s
    cols = np.arange(n)
    loss = np.log(s[0]) - (l[labels, cols] - m[0])
    loss_sum = np.asarray(loss.sum(dtype=np.float64), dtype=l.dtype)
    d = probs.copy()
    d[labels, cols] -= 1
    return loss_sum, probs, d


def topk_errors(scores, labels, ks=(1, 5)):
    s = np.asarray(scores)
    labels = np.asarray(labels)
    true = s[labels, np.arange(s.shape[1])]
    rank = (s >= true[None, :]).sum(axis=0) - 1  # the other classes scoring at least as high as the label
    rank[~np.isfinite(s).all(axis=0)] = s.shape[0]  # a NaN or infinite score: an error for every k
    return tuple(int((rank >= k).sum()) for k in ks)
