"""Checkpoints: one ``.npz`` file, written atomically (temporary file in the same directory, fsync, rename).

Contents: ``param/<layer>/<name>`` (weights), ``velocity/<layer>/<name>`` (SGD momentum), ``mean`` (the mean
image used for preprocessing) and ``meta``: a JSON string with the epoch / batch position, global step, learning
rate schedule state, RNG state, the training configuration, the model-file text and the history of per-epoch
results. No pickles: ``np.load(..., allow_pickle=False)`` reads it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

FORMAT = "convnet-checkpoint-1"


class CheckpointError(RuntimeError):
    pass


def save(path, *, params, velocity, mean, meta):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"param/{k}": np.asarray(v) for k, v in params.items()}
    arrays.update({f"velocity/{k}": np.asarray(v) for k, v in velocity.items()})
    if mean is not None:
        arrays["mean"] = np.asarray(mean)
    meta = dict(meta, format=FORMAT)
    arrays["meta"] = np.array(json.dumps(meta))
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the checkpoint ordinary file permissions
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def load(path):
    """Return dict(params=..., velocity=..., mean=..., meta=...)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.npz"
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            params = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
            velocity = {k[len("velocity/"):]: z[k] for k in z.files if k.startswith("velocity/")}
            mean = z["mean"] if "mean" in z.files else None
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read checkpoint '{path}': {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a {FORMAT} file (format={meta.get('format')!r})")
    return {"params": params, "velocity": velocity, "mean": mean, "meta": meta, "path": str(path)}
