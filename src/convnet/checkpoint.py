"""Checkpoints: one ``.npz`` file, written atomically (temporary file in the same directory, fsync, rename).

Contents: ``param/<layer>/<name>`` (weights), ``velocity/<layer>/<name>`` (SGD momentum), ``mean`` (the mean
image used for preprocessing) and ``meta``: a JSON string with the epoch / batch position, global step, learning
rate schedule state, RNG state, the training configuration, the model-file text and the history of per-epoch
results. No pickles: ``np.load(..., allow_pickle=False)`` reads it.

A checkpoint holds finite numbers only: :func:`save` refuses NaN or infinite parameters, momentum or mean (the
state of a diverged run is never written) and :func:`load` refuses them too, so "the last good checkpoint" really
is the last finite state. A file that cannot be read (truncated, empty, corrupted, not a checkpoint) is a
:class:`CheckpointError` naming the file and what is wrong, never a zip or NumPy traceback. A write interrupted by
kill -9 leaves a ``checkpoint.npz.*.tmp`` file; :func:`remove_stale_temporaries` deletes them.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .config import ConfigError

FORMAT = "convnet-checkpoint-1"
# what a training checkpoint's metadata must hold (checked by check_training_state before a resume)
TRAINING_META = {"epoch": int, "batch": int, "step": int, "history": list, "partial": dict, "schedule": dict,
                 "optimizer": dict, "config": dict}
# a history entry (an epoch's record, training.report.epoch_record): the numbers it must hold, those it holds when
# present (older records lack the times), and the only values that may be null (an epoch not tested, top-5 of 5
# classes or fewer)
HISTORY_NUMBERS = ("epoch", "step", "lr", "train_loss", "train_error")
HISTORY_TIMES = ("train_time_s", "elapsed_s", "cpu_s")
HISTORY_NULLABLE = ("test_loss", "test_error", "test_top5_error", "images_per_s")
# settings that define which images a batch index holds: changing one in the middle of an epoch would skip or repeat
# data, so a mid-epoch resume refuses it (at an epoch boundary the position is 0 and any value is fine)
POSITION_SETTINGS = ("batch_size", "seed", "dataset", "synthetic_train")
STATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # what parameters and momentum are saved as


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file and what is wrong."""


def _one_line(e) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


def non_finite(arrays) -> list[str]:
    """The names of the arrays (name -> array) holding a NaN or an infinity."""
    bad = []
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad.append(k)
    return bad


def save(path, *, params, velocity, mean, meta):
    """Write the checkpoint atomically. CheckpointError (nothing written) when a parameter, a momentum buffer or the
    mean image holds a NaN or an infinity."""
    path = Path(path)
    arrays = {f"param/{k}": np.asarray(v) for k, v in params.items()}
    arrays.update({f"velocity/{k}": np.asarray(v) for k, v in velocity.items()})
    if mean is not None:
        arrays["mean"] = np.asarray(mean)
    bad = non_finite(arrays)
    if bad:
        raise CheckpointError(f"not writing {path}: non-finite values (NaN or inf) in {', '.join(bad[:4])}"
                              f"{' ...' if len(bad) > 4 else ''}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, format=FORMAT, entries=sorted(arrays))  # entries: a flipped bit in a member name is caught
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
    """Return dict(params=..., velocity=..., mean=..., meta=..., path=...). CheckpointError when the file is missing,
    unreadable, truncated, corrupted, not a convnet checkpoint, or holds non-finite values."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.npz"
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if not magic:
            raise CheckpointError(f"cannot read checkpoint '{path}': the file is empty (0 bytes)")
        if magic != b"PK\x03\x04":  # every .npz is a zip archive
            raise CheckpointError(f"cannot read checkpoint '{path}': not an .npz archive (truncated or another "
                                  f"kind of file)")
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise ValueError("no 'meta' entry")
            meta = json.loads(str(z["meta"]))
            entries = meta.get("entries") if isinstance(meta, dict) else None
            if entries is not None and sorted(f for f in z.files if f != "meta") != sorted(entries):
                raise ValueError("its arrays are not the ones it lists (a corrupted member name)")
            params = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
            velocity = {k[len("velocity/"):]: z[k] for k in z.files if k.startswith("velocity/")}
            mean = z["mean"] if "mean" in z.files else None
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint '{path}': {e.strerror or _one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - zip, zlib, EOF, NumPy format and JSON errors: all mean a bad file
        raise CheckpointError(f"cannot read checkpoint '{path}': truncated or corrupted ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"'{path}' is not a {FORMAT} file (format={fmt!r})")
    bad = non_finite({**{f"param/{k}": v for k, v in params.items()},
                      **{f"velocity/{k}": v for k, v in velocity.items()},
                      **({"mean": mean} if mean is not None else {})})
    if bad:
        raise CheckpointError(f"checkpoint '{path}' holds non-finite values (NaN or inf) in {', '.join(bad[:4])}"
                              f"{' ...' if len(bad) > 4 else ''}: the state of a diverged run cannot be used")
    return {"params": params, "velocity": velocity, "mean": mean, "meta": meta, "path": str(path)}


def check_training_state(state) -> None:
    """CheckpointError unless ``state`` (from :func:`load`) has everything a resume needs: the position, history,
    schedule, optimizer and config metadata, the model-file text, and a momentum buffer for every parameter."""
    path, meta = state["path"], state["meta"]
    for key, kind in TRAINING_META.items():
        v = meta.get(key)
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
            got = "missing" if key not in meta else f"{type(v).__name__} {v!r}"[:60]
            raise CheckpointError(f"checkpoint '{path}' is incomplete: metadata '{key}' should be "
                                  f"{'an integer >= 0' if kind is int else 'a ' + kind.__name__}, got {got}")
    if not isinstance(meta["config"].get("model_text"), str):
        raise CheckpointError(f"checkpoint '{path}' is incomplete: its config has no model-file text")
    if set(state["params"]) != set(state["velocity"]):
        missing = sorted(set(state["params"]) ^ set(state["velocity"]))
        raise CheckpointError(f"checkpoint '{path}' is incomplete: parameters and momentum buffers differ "
                              f"({', '.join(missing[:4])})")
    for part in ("params", "velocity"):  # a hand-edited file: casting would silently change the numbers
        for k, a in state[part].items():
            if a.dtype not in STATE_DTYPES:
                what = "parameter" if part == "params" else "momentum of"
                raise CheckpointError(f"checkpoint '{path}': {what} '{k}' has dtype {a.dtype}; a checkpoint holds "
                                      f"float32 or float64")
    _check_history(path, meta)


def check_position(meta, path, cfg, batches_per_epoch) -> None:
    """ConfigError when the settings ``cfg`` would reinterpret the saved position: a mid-epoch resume whose
    :data:`POSITION_SETTINGS` differ, or an epoch that now has fewer batches than the saved batch index."""
    saved = meta["config"]
    if meta["batch"] != 0:  # mid-epoch: the position is a batch index under the saved settings
        for k in POSITION_SETTINGS:
            if k in saved and saved[k] != getattr(cfg, k):
                flag = "--" + k.replace("_", "-")
                raise ConfigError(
                    f"{flag} {getattr(cfg, k)} differs from the checkpoint's {saved[k]}, and {path} stopped in the "
                    f"middle of epoch {meta['epoch'] + 1} (batch {meta['batch']}): the saved position would skip or "
                    f"repeat images. Resume with {flag} {saved[k]}; it may change at an epoch boundary")
    if meta["batch"] > batches_per_epoch:
        raise ConfigError(f"{path} stopped at batch {meta['batch']} of epoch {meta['epoch'] + 1}, but an epoch now has "
                          f"{batches_per_epoch} batches: the training data changed")


def _check_history(path, meta):
    """CheckpointError unless the history has one entry per finished epoch, each with its numbers, and the global
    step agrees with the position: the last entry's step plus the batches done in the current epoch (dropout masks
    and the linear schedule are functions of the step: a wrong one would silently change the training)."""
    history = meta["history"]
    for i, rec in enumerate(history, 1):
        if not isinstance(rec, dict):
            raise CheckpointError(f"checkpoint '{path}': history entry {i} is not a record ({rec!r:.40})")
        bad = [k for k in HISTORY_NUMBERS if not _is_number(rec.get(k))]
        bad += [k for k, v in rec.items() if k not in HISTORY_NUMBERS and (
            (v is None and k not in HISTORY_NULLABLE) or (k in HISTORY_TIMES and not _is_number(v)))]
        if bad:
            got = ", ".join(f"{k} = {json.dumps(rec.get(k))}" for k in bad[:3])
            raise CheckpointError(f"checkpoint '{path}': history entry {i} has a missing or invalid value: {got}")
        if rec["epoch"] != i:
            raise CheckpointError(f"checkpoint '{path}': history entry {i} says epoch {rec['epoch']}")
    if len(history) != meta["epoch"]:
        raise CheckpointError(f"checkpoint '{path}': epoch {meta['epoch']} but {len(history)} history entries (one "
                              f"per finished epoch)")
    last = history[-1]["step"] if history else 0
    if meta["step"] != last + meta["batch"]:
        raise CheckpointError(f"checkpoint '{path}': step {meta['step']} is inconsistent with epoch {meta['epoch']}, "
                              f"batch {meta['batch']}: the finished epochs end at step {last}, so the step is "
                              f"{last + meta['batch']}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def remove_stale_temporaries(directory, name="checkpoint.npz") -> list[Path]:
    """Delete the ``<name>.*.tmp`` files an interrupted :func:`save` (kill -9, power loss) left in ``directory``;
    returns them. Only one run may write to a directory at a time, so no live write is removed."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.glob(f"{name}.*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
