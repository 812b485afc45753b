"""The test-set evaluation: the loss and the top-1 and top-5 errors of one view per image, the image and its mirror
(``--multiview``, ``--eval-crops 2``) or ten crops (``--eval-crops 10``), the views' softmax outputs averaged.
Errors are ranked on the logits (for several views, the log of their summed probabilities): probabilities that
underflowed to 0 would tie, and a label ranked last would count as inside the top 5."""
from __future__ import annotations

import contextlib

from .. import ops


def evaluate(net, loader, device, ranks, *, mirror, keep_probs=0):
    """(summed loss, images wrong in the top 1, in the top 5 or None, images, kept) over ``loader``'s test batches
    (on the net's ``device``), summed over the ``ranks`` (each evaluates its share of every batch). ``mirror``: the
    image's mirror image is a second view (when the loader gives one view); ``kept``: (probs, labels) of this
    process's first ``keep_probs`` images, on the host. The sums are made where the probabilities are (the softmax
    layer's device)."""
    out = net.cost_layer.device
    xp = out.xp
    k5 = net.num_classes > 5
    n = wrong1 = wrong5 = 0
    loss = 0.0
    kept = []
    views, acc, log_acc, k = loader.views, None, None, 0  # views > 1: each batch that many times
    mirror = views == 1 and mirror
    # closed here: a Ctrl-C in close() propagates
    with contextlib.closing(loader.epoch(0)) as batches, out.activate():
        for x, y in batches:
            p = net.forward(x)
            y = labels_on(out, y, device)
            scores = net.logits
            if mirror:
                with device.activate():
                    mirrored = device.adopt(xp.ascontiguousarray(x[:, :, ::-1, :]))
                p = out.adopt((p + net.forward(mirrored)) * p.dtype.type(0.5))
                scores = out.adopt(xp.logaddexp(_log_softmax(xp, scores), _log_softmax(xp, net.logits)))
            if views > 1:  # the softmax outputs of the views, summed in view order, then averaged
                acc = p.copy() if k == 0 else acc + p
                log_acc = (_log_softmax(xp, scores) if k == 0 else
                           out.adopt(xp.logaddexp(log_acc, _log_softmax(xp, scores))))
                k += 1
                if k < views:
                    continue
                p, acc, k = out.adopt(acc * p.dtype.type(1 / views)), None, 0
                scores, log_acc = log_acc, None
            errs = ops.topk_errors(out, scores, y, ks=(1, 5) if k5 else (1,))
            wrong1 += errs[0]
            wrong5 += errs[1] if k5 else 0
            m = y.shape[0]
            loss += float(-xp.log(xp.maximum(p[y, xp.arange(m)], 1e-30)).sum())
            n += m
            if sum(len(a[1]) for a in kept) < keep_probs:
                kept.append((out.to_numpy(p), out.to_numpy(y)))
    loss, wrong1, wrong5, n = ranks.sum("the test sums", loss, wrong1, wrong5, n)
    return loss, int(wrong1), (int(wrong5) if k5 else None), int(n), kept


def labels_on(dev, y, src):
    """The labels ``y`` of a batch (on ``src``, the net's device, as the loaders give them) on ``dev``."""
    if dev == src:
        return y
    with dev.activate():
        return ops.copy(dev, y, src)


def _log_softmax(xp, logits):
    """log(softmax(logits)) over classes (axis 0), without underflow: finite wherever the logits are."""
    z = logits - logits.max(axis=0, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=0, keepdims=True))
