"""Synthetic data: class-dependent random patterns + noise at any shape (learnable; for smoke tests and speed)."""
from __future__ import annotations

import numpy as np

from .base import Dataset, register


def synthetic(shape=(3, 32, 32), classes=10, n_train=1280, n_test=256, seed=0):
    """Learnable synthetic data: each class has a smooth random prototype; images = prototype + noise."""
    c, h, w = shape
    rng = np.random.default_rng([seed, 12345])
    ph, pw = max(1, h // 4), max(1, w // 4)
    protos = rng.uniform(0, 255, size=(classes, ph, pw, c))
    protos = np.repeat(np.repeat(protos, -(-h // ph), axis=1), -(-w // pw), axis=2)[:, :h, :w, :]

    protos = (protos * 0.6).astype(np.float32)

    def make(n, r):
        y = r.integers(0, classes, size=n).astype(np.int32)
        x = np.empty((n, h, w, c), np.uint8)
        for i in range(0, n, 256):  # chunks: 224x224 images in float would need gigabytes
            j = min(n, i + 256)
            noise = r.random(size=(j - i, h, w, c), dtype=np.float32) * np.float32(255 * 0.4)
            x[i:j] = np.clip(protos[y[i:j]] + noise, 0, 255).astype(np.uint8)
        return x, y

    tx, ty = make(n_train, np.random.default_rng([seed, 1]))
    vx, vy = make(n_test, np.random.default_rng([seed, 2]))
    return Dataset("synthetic", tx, ty, vx, vy, [f"class{i}" for i in range(classes)])


@register("synthetic")
def _read(data_dir, *, shape, classes, seed, synthetic_size, **_):
    return synthetic(shape, classes, *synthetic_size, seed=seed)
