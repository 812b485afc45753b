"""PNG plots: error curves, first-layer filters (the paper's Figure 3), top-5 predictions (Figure 4)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def training_plots(out, history, *, final=True, filters=None, kept=(), images=None, classes=None, n=16):
    """What a training run writes into directory ``out``: ``errors.png`` (the history) after every epoch; at the
    end (``final``) ``filters.png`` (``filters``: (w, title) of the first conv layer, or None) and
    ``predictions.png`` (``kept``: [(probs (classes, m), labels (m,))] of the first test images, shown with
    ``images`` (uint8, (n, H, W, C)) and the ``classes`` names)."""
    out = Path(out)
    error_curves(history, out / "errors.png")
    if not final:
        return
    if filters is not None:
        filter_grid(filters[0], out / "filters.png", title=filters[1])
    if kept:
        probs = np.concatenate([k[0] for k in kept], axis=1)
        labels = np.concatenate([k[1] for k in kept])
        n = min(n, len(labels))
        predictions(images[:n], labels[:n], probs[:, :n], classes, out / "predictions.png")


def error_curves(history, path):
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_error"] * 100 for h in history], "o-", label="train top-1 (running, with dropout)")
    tested = [h for h in history if h.get("test_error") is not None]  # --test-every N: not every epoch
    tep = [h["epoch"] for h in tested]
    ax[0].plot(tep, [h["test_error"] * 100 for h in tested], "o-", label="test top-1")
    if tested and tested[0].get("test_top5_error") is not None:
        ax[0].plot(tep, [h["test_top5_error"] * 100 for h in tested], "o--", label="test top-5")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("error (%)")
    ax[0].grid(alpha=0.3)
    ax[0].legend()
    ax[1].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax[1].plot(tep, [h["test_loss"] for h in tested], "o-", label="test")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("cross-entropy")
    ax[1].set_yscale("log")
    ax[1].grid(alpha=0.3)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def filter_grid(w, path, title="conv1 filters", max_filters=96):
    """``w``: conv filters (C, KH, KW, F). Each filter is scaled to [0, 1] on its own; C=3 shown in colour."""
    plt = _plt()
    c, kh, kw, f = w.shape
    f = min(f, max_filters)
    cols = int(np.ceil(np.sqrt(f * 2))) if f > 16 else int(np.ceil(np.sqrt(f)))
    rows = int(np.ceil(f / cols))
    pad = 1
    grid = np.ones((rows * (kh + pad) + pad, cols * (kw + pad) + pad, 3), np.float32)
    for i in range(f):
        k = w[:, :, :, i].astype(np.float64)
        k = (k - k.min()) / (k.max() - k.min() + 1e-12)
        img = np.repeat(k[0][:, :, None], 3, axis=2) if c != 3 else k.transpose(1, 2, 0)
        r, q = divmod(i, cols)
        grid[pad + r * (kh + pad):pad + r * (kh + pad) + kh, pad + q * (kw + pad):pad + q * (kw + pad) + kw] = img
    fig = plt.figure(figsize=(min(12, cols * 0.6 + 1), min(12, rows * 0.6 + 1)))
    plt.imshow(grid, interpolation="nearest")
    plt.axis("off")
    plt.title(f"{title} ({c}x{kh}x{kw}, {f} shown)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def predictions(images, labels, probs, classes, path, k=5):
    """``images`` (n, H, W, C) uint8, ``labels`` (n,), ``probs`` (classes, n): image + top-k bars per image."""
    plt = _plt()
    n = len(labels)
    k = min(k, probs.shape[0])
    cols = 4
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols * 2, figsize=(cols * 4.2, rows * 1.9),
                             gridspec_kw={"width_ratios": [1, 1.6] * cols})
    axes = np.atleast_2d(axes)
    for i in range(rows * cols):
        r, q = divmod(i, cols)
        ai, ab = axes[r, 2 * q], axes[r, 2 * q + 1]
        ai.axis("off")
        if i >= n:
            ab.axis("off")
            continue
        img = images[i]
        ai.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ai.set_title(classes[labels[i]], fontsize=8)
        top = np.argsort(-probs[:, i], kind="stable")[:k]
        colors = ["tab:red" if t == labels[i] else "tab:blue" for t in top]
        ab.barh(np.arange(k)[::-1], probs[top, i], color=colors)
        ab.set_yticks(np.arange(k)[::-1])
        ab.set_yticklabels([classes[t] for t in top], fontsize=7)
        ab.set_xlim(0, 1)
        ab.tick_params(axis="x", labelsize=6)
    fig.suptitle("test images with top-5 predictions (red = true class)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
