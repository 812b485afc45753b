"""CUDA streams and events emulated on the host, for the ``emu`` device: what makes a missing event wait between two
towers a wrong result in CI instead of a bug only a GPU shows.

* :class:`HostStream` -- work submitted to a stream runs in submission order on a worker thread of its own,
  asynchronously to the host (the submitting thread returns at once), as launches on a CUDA stream do. The
  emulator runs one grid at a time (its blocks spread over its own threads), so two streams' launches interleave
  in whatever order their events allow, while the host and the array-module work go on beside them.
* :class:`HostEvent` -- recorded on a stream (it fires when the work submitted before it is done) and waited on by
  another stream (that stream's later work waits) or by the host: ``cudaEventRecord`` / ``cudaStreamWaitEvent``.
* Errors are deferred as on a GPU: an exception in a stream's work is kept, the stream's later work is skipped (it
  would read what the failed work did not write) but its events still fire (another stream waiting on them must not
  hang), and the error is raised by the stream's next ``submit`` or ``synchronize``.
* ``delay`` (seconds, default 0) sleeps before each piece of work: tests make one stream slow so that a missing wait
  reads memory that is not written yet, every time.

A fresh emu array is filled with NaN (``HostDevice._allocate``), so reading it before the kernel that writes it shows.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref

# How long a stream waits for an event before calling it a deadlock (a recorded event fires once the work before it
# is done; only a bug leaves one waiting for ever).
EVENT_TIMEOUT_S = 600.0


class HostEvent:
    """An event recorded on a :class:`HostStream`: set when every piece of work submitted to that stream before it
    has run."""

    def __init__(self, where: str = ""):
        self.where = where
        self._fired = threading.Event()

    @property
    def done(self) -> bool:
        return self._fired.is_set()

    def _fire(self):
        self._fired.set()

    def wait(self, timeout: float = EVENT_TIMEOUT_S) -> None:
        """Block the calling thread (the host, or a stream's worker) until the event has fired."""
        if not self._fired.wait(timeout):
            raise RuntimeError(f"waited {timeout:.0f} s for an event recorded on {self.where}: a deadlock between "
                               f"streams (an event waited on before the work it follows was submitted?)")


class _State:
    """What a stream's worker thread shares with the stream (not the stream itself: a stream that nobody references
    any more is collected, and its worker then ends)."""

    def __init__(self, name):
        self.name = name
        self.work = queue.SimpleQueue()
        self.error = None       # the first exception of the stream's work, until raised by submit/synchronize
        self.delay = 0.0


def _worker(state: _State) -> None:
    while True:
        task = state.work.get()
        if task is None:
            return
        fn, control = task
        if control:  # event records and waits run even after an error: other streams may wait on them
            try:
                fn()
            except BaseException as exc:  # a wait that timed out
                if state.error is None:
                    state.error = exc
            continue
        if state.error is not None:
            continue
        if state.delay:
            time.sleep(state.delay)
        try:
            fn()
        except BaseException as exc:
            exc.add_note(f"(raised on the host by the next call on stream {state.name}: the work failed there, "
                         f"asynchronously, and the stream skipped its later work)")
            state.error = exc


class HostStream:
    """An emulated stream of device ``name`` (``emu:1``): see the module docstring."""

    def __init__(self, name: str):
        self.name = name
        self._state = _State(name)
        thread = threading.Thread(target=_worker, args=(self._state,), name=f"convnet {name} stream", daemon=True)
        thread.start()
        weakref.finalize(self, self._state.work.put, None)  # the worker ends when the stream is collected

    def __repr__(self):
        return f"HostStream({self.name!r})"

    @property
    def delay(self) -> float:
        return self._state.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._state.delay = float(seconds)

    def _raise_deferred(self):
        error, self._state.error = self._state.error, None
        if error is not None:
            raise error

    def submit(self, fn, *, control: bool = False) -> None:
        """Queue ``fn()`` after everything submitted so far; returns at once. Raises a deferred error of earlier
        work first (as a CUDA call returns an earlier launch's error)."""
        self._raise_deferred()
        self._state.work.put((fn, control))

    def record(self) -> HostEvent:
        """An event that fires when the work submitted so far has run."""
        event = HostEvent(self.name)
        self._state.work.put((event._fire, True))
        return event

    def wait(self, event: HostEvent) -> None:
        """Work submitted after this waits for ``event`` (the host does not)."""
        self._state.work.put((event.wait, True))

    def synchronize(self) -> None:
        """Block the host until the work submitted so far has run; raise its deferred error, if any."""
        self.record().wait()
        self._raise_deferred()
