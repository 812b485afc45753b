"""One writer per directory: an OS lock on a run directory (``--out``) or a prepared dataset's destination.

``with DirLock(directory):`` creates the directory if needed, takes ``fcntl.flock`` on ``directory/.lock`` without
waiting, and writes its PID into the file. The kernel drops the lock when the process ends, however it ends (kill -9
included), so a lock file left behind by a dead process is no obstacle: the next process locks it again. A second
process is refused at once with :class:`DirectoryLocked`, naming the holder's PID. Leaving the ``with`` unlinks the
lock file (and the directory, if this lock created it and it stayed empty), then releases the lock.

Processes forked while the lock is held close their copy of its descriptor (``os.register_at_fork``): a data or
preparation worker that outlives its parent does not keep the directory locked. Where the file system cannot lock
(``ENOLCK``, no ``fcntl``), :attr:`DirLock.locked` is False and nothing is enforced.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

LOCK_NAME = ".lock"
_HELD: set = set()  # descriptors of the locks this process holds


class DirectoryLocked(Exception):
    """Another live process holds the directory's lock; ``pid`` is its PID (None if it had not written it yet)."""

    def __init__(self, directory, pid):
        self.directory, self.pid = Path(directory), pid
        self.holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{directory} is in use by {self.holder} (it holds {Path(directory) / LOCK_NAME})")


def _close_in_child():
    for fd in _HELD:  # the child's copies only: the parent's lock stays (flock belongs to the open file)
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _holder(fd, wait_s=0.5):
    """The PID written in the lock file, waiting briefly for a holder that has locked but not yet written it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        if text.isdigit():
            return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


class DirLock:
    """The lock of ``directory`` (module doc); acquired by ``with`` or :meth:`acquire`. Raises
    :class:`DirectoryLocked` when another process holds it, OSError when the directory cannot be created or the lock
    file written."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd = None
        self.locked = False
        self._created = False

    def acquire(self):
        if fcntl is None:
            return self
        for _ in range(100):  # retried only when a releasing holder removes the file or directory under us
            if not self.directory.is_dir():
                try:
                    self.directory.mkdir(parents=True)
                    self._created = True
                except FileExistsError:
                    pass
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    pid = _holder(fd)
                    os.close(fd)
                    raise DirectoryLocked(self.directory, pid) from None
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return self  # a file system without locks: nothing enforced
                raise
            try:  # the last holder may have unlinked the file between our open and flock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                os.close(fd)
                raise
            self.fd, self.locked = fd, True
            _HELD.add(fd)
            return self
        raise OSError(errno.EAGAIN, "the lock file keeps disappearing", str(self.path))

    def release(self):
        if self.fd is None:
            return
        fd, self.fd, self.locked = self.fd, None, False
        _HELD.discard(fd)
        try:  # unlinked while still held: a process that opened the old file sees it is gone and retries
            self.path.unlink()
            if self._created:
                self.directory.rmdir()  # only if empty: a run that stopped before writing anything leaves nothing
        except OSError:
            pass
        os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


@contextlib.contextmanager
def hold(directory, error, name):
    """``directory``'s lock for the body of the ``with``. A lock held by another process, or a directory that is a
    file, under a file, not writable (:func:`unusable_dir`) or cannot be created, is an ``error`` (an exception class:
    the caller's user error) whose message names the directory as ``name``."""
    problem = unusable_dir(directory, name)
    if problem:
        raise error(problem)
    lock = DirLock(directory)
    try:
        lock.acquire()
    except DirectoryLocked as e:
        raise error(f"{name} is in use by {e.holder}, which holds {lock.path}: wait for it to finish, or use another "
                    f"directory") from None
    except OSError as e:
        raise error(f"cannot write to {name}: {e.strerror or e}") from None
    try:
        yield lock
    finally:
        lock.release()


def unusable_dir(path, name):
    """Why ``path`` cannot be a directory this process writes into (a file, under a file, not writable, a name the
    file system refuses), as a sentence naming it as ``name``; None if it can. Changes nothing on disk."""
    path = Path(path)
    try:
        if path.exists():
            if not path.is_dir():
                return f"{name} exists and is not a directory"
            if not os.access(path, os.W_OK | os.X_OK):
                return f"{name}: the directory is not writable"
            return None
        parent = path.absolute().parent
        while not parent.exists():
            parent = parent.parent
    except OSError as e:  # ENAMETOOLONG, ELOOP, EACCES on a parent
        return f"{name}: {e.strerror or e}"
    if not parent.is_dir():
        return f"{name}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{name}: cannot create it ({parent} is not writable)"
    return None
