"""The run directory (``--out``): locked for the run's life, never holding two runs (another run there is continued
with ``--resume`` or replaced with ``--overwrite``), prepared at the start, and its log.jsonl kept in step with the
checkpoint."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import ConfigError
from ..dirlock import hold, unusable_dir

RUN_FILES = ("checkpoint.npz", "log.jsonl")  # what makes a directory hold a run (never replaced silently)


def existing_run(out) -> list[str]:
    """The run files (checkpoint, log) present in directory ``out``."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()]


def resumes_in(out, resume_path) -> bool:
    """Whether the checkpoint ``resume_path`` (or None) is the run in ``out``: that run is being continued."""
    return resume_path is not None and Path(resume_path).resolve().parent == Path(out).resolve()


def check_out_dir(out, *, resume_path=None, overwrite=False) -> None:
    """ConfigError unless a run may write into ``out``: a directory (or a path that can be created) we can write,
    holding no other run -- unless it is the run being resumed (``resume_path``, a checkpoint in it) or
    ``overwrite``. Changes nothing on disk."""
    out = Path(out)
    problem = unusable_dir(out, f"--out {out}")
    if problem:
        raise ConfigError(problem)
    if not out.exists() or resumes_in(out, resume_path):
        return
    found = existing_run(out)
    if found and not overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(found)}): continue it with --resume {out}, replace "
                          f"it with --overwrite, or choose another --out")


@contextlib.contextmanager
def locked(out, resume_path, overwrite):
    """``out`` for the run's life: locked (a second run there is refused, naming this process) and checked (a run
    there is never replaced silently: ``check_out_dir``, under the lock)."""
    with hold(out, ConfigError, f"--out {out}"):
        check_out_dir(out, resume_path=resume_path, overwrite=overwrite)
        yield


def prepare(out, *, resume_path, overwrite, model_text, summary, history, log) -> None:
    """The run directory at the start: checked (no other run is replaced without ``overwrite``), created, an old
    run's files removed unless it is the one resumed, stale checkpoint temporaries removed, the model file and
    ``summary`` written, log.jsonl rewritten from ``history``."""
    out = Path(out)
    check_out_dir(out, resume_path=resume_path, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not resumes_in(out, resume_path):  # --overwrite (or an empty directory): nothing of an old run survives
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        (out / "log.jsonl.tmp").unlink(missing_ok=True)  # an interrupted write_log's
        stale = ckpt.remove_stale_temporaries(out)
        if stale:
            log(f"removed {len(stale)} stale temporary file(s) of an interrupted checkpoint write in {out}")
        (out / "model.cfg").write_text(model_text)
        (out / "summary.txt").write_text(summary + "\n")
        write_log(out, history)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {out}: {e.strerror or e}") from None


def write_log(out, history) -> None:
    """log.jsonl = one line per epoch of ``history`` (the checkpoint's), replaced atomically: a kill between an
    epoch's checkpoint and its log line loses or duplicates nothing."""
    path = Path(out) / "log.jsonl"
    if not history:  # no epoch finished: no log (and nothing that looks like a run to the next start)
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in history)
    os.replace(tmp, path)


def append_log(out, record) -> None:
    """One epoch's line added to log.jsonl, after the checkpoint that holds it (see :func:`write_log`)."""
    with open(Path(out) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
