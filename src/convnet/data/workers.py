"""Decoding in worker processes for prepared datasets (:class:`.loader.PreparedLoader` with ``workers`` > 0).

A :class:`Pool` belongs to one loader and lives across epochs (started by its first epoch; no process start per
epoch): ``slots`` shared-memory blocks (:mod:`multiprocessing.shared_memory`), each one batch in the layout
contract ``(C, H, W, N)``, and ``workers`` processes (spawned, never forked: below) holding a copy of the
loader. An epoch hands out batch jobs ``(generation, seq, epoch, batch, view, slot)`` (batch ``b``'s jobs always to
worker ``b % workers``, so the ten test views of a batch are decoded once). A worker writes the batch straight into
its slot (:meth:`.loader.PreparedLoader.host_batch`, the in-thread loader's code; for a GPU the uint8 crops,
:meth:`.loader.PreparedLoader.crops_chwn`) and reports ``(generation, seq, slot, labels, lighting)``. The parent
yields batches in sequence order, copying each out of its slot onto the device (CUDA: the uint8 crops through pinned
memory, an asynchronous copy and the float work on the loader's stream), then gives the slot back; so
at most ``slots`` batches are ready or in the making ahead of the consumer. A consumer that leaves an epoch early
leaves jobs in flight: their slots come back when their (older generation's) results arrive.

Every random choice is keyed on (seed, epoch, image index) (:func:`.augment.image_rng`), so a batch is the same
bits for any number of workers, and for the in-thread loader.

Start: the workers are spawned (:func:`.base.process_context`), never forked from this process, whose other threads
could leave a lock held in a forked child forever; each gets the loader pickled and imports the main module again, so
a script that uses workers runs its main code under ``if __name__ == "__main__":``.

Shutdown (:meth:`Pool.close`: the loader's ``close``, a worker's error or death, garbage collection of the pool,
the end of the program): a stop job to each worker, join, terminate what did not stop, unlink every block. Workers
ignore SIGINT (the parent decides) and exit by themselves when the parent process is gone.
"""
from __future__ import annotations

import os
import queue
import secrets
import signal
import traceback
import weakref
from multiprocessing import shared_memory

import numpy as np

from .base import DataError, process_context
from .loader import Batch

POLL_S = 0.2  # how often a waiting side checks that the other is alive


def default_workers():
    """The default worker count: the CPU cores this process may use, less one for the trainer; at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n - 1)


def _worker(loader, tasks, results, names, parent):
    """A worker process: jobs from ``tasks`` until a None (or the parent's death); batches into the blocks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    blocks = {}
    orders = {}
    shape = (3, *loader.out_hw)
    try:
        while True:
            try:
                job = tasks.get(timeout=POLL_S)
            except queue.Empty:
                if os.getppid() != parent:
                    return
                continue
            if job is None:
                return
            gen, seq, epoch, b, view, slot = job
            try:
                if epoch not in orders:
                    orders = {epoch: loader.order(epoch)}
                if slot not in blocks:
                    blocks[slot] = shared_memory.SharedMemory(name=names[slot])
                dtype = np.uint8 if loader.uint8_batches else loader.dtype
                dst = np.ndarray((*shape, loader.batch_size_of(b)), dtype, buffer=blocks[slot].buf)
                if loader.uint8_batches:
                    _, labels, light = loader.crops_chwn(epoch, b, orders[epoch], view, out=dst)
                else:
                    labels, light = loader.host_batch(epoch, b, orders[epoch], view, out=dst)[1], None
                results.put(("ok", gen, seq, slot, dst.shape, np.asarray(labels), light))
                del dst
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
                msg = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
                results.put(("err", gen, seq, slot, msg, traceback.format_exc()))
    finally:
        for blk in blocks.values():
            blk.close()


class _WorkerTraceback(Exception):
    """A worker's traceback, as text: the cause of the parent's error (shown by ``--debug``, not in its message)."""

    def __str__(self):
        return "\n" + self.args[0]


class _Uploader:
    """A batch in a shared block -> ``loader``'s device, as a :class:`.loader.Batch`: NumPy for the host devices;
    on a GPU, on the loader's stream (:meth:`.loader.Loader._on_loader_stream`): the uint8 crops into one of two
    pinned buffers, an asynchronous copy, then the float work there (:meth:`.loader.PreparedLoader.convert`). A
    pinned buffer is reused only after its copy has finished (the copy two batches back)."""

    def __init__(self, loader):
        self.loader, self.device = loader, loader.device
        self._pinned, self._events, self._k = [None, None], [None, None], 0

    def __call__(self, host, labels, light):
        dev = self.device
        if dev is None:
            return Batch((np.array(host), np.asarray(labels, np.int32)))
        if not self.loader.uploads_uint8():
            return Batch((dev.asarray(np.array(host)), dev.asarray(np.asarray(labels, np.int32))))
        return self.loader._on_loader_stream(lambda: self._upload(host, labels, light))

    def _upload(self, host, labels, light):
        import cupy as cp
        import cupyx
        k, self._k = self._k, self._k ^ 1
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copy that last read this pinned buffer
        if self._pinned[k] is None or self._pinned[k].nbytes < host.nbytes:
            self._pinned[k] = cupyx.empty_pinned(host.size, host.dtype)
        pin = self._pinned[k][:host.size].reshape(host.shape)
        np.copyto(pin, host)
        stream = cp.cuda.get_current_stream()  # the loader's
        x = cp.empty(host.shape, host.dtype)
        x.set(pin, stream=stream)  # asynchronous (pinned memory, a stream given); None would be synchronous
        self._events[k] = stream.record()
        return self.loader.convert(x, light, labels)


def _shutdown(procs, tasks, results, blocks):
    """Stop the workers (a stop job, then terminate, then kill), close the queues, unlink the blocks (the lists
    are the pool's, filled while it starts)."""
    for q in tasks:
        try:
            q.put(None)
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(timeout=2)
        if p.is_alive():
            p.terminate()
            p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join()
    for q in tasks + results:
        q.close()
        q.cancel_join_thread()
    for blk in blocks:
        blk.close()
        try:
            blk.unlink()
        except FileNotFoundError:
            pass


class Pool:
    """``loader.workers`` processes and ``prefetch + workers`` shared blocks serving ``loader``'s epochs (module
    doc). The workers copy the loader when the pool starts: a loader changed later needs a new pool."""

    def __init__(self, loader):
        nw = int(loader.workers)
        nslots = max(1, int(loader.prefetch)) + nw
        oh, ow = loader.out_hw
        self.uint8 = loader.uploads_uint8()  # the workers send uint8 crops, finished on the GPU
        nbytes = 3 * oh * ow * loader.batch_size * (1 if self.uint8 else loader.dtype.itemsize)
        ctx = process_context()
        token = f"convnet-{os.getpid()}-{secrets.token_hex(4)}"
        self.procs, self.tasks, self.blocks, self._results = [], [], [], []
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.tasks, self._results, self.blocks)
        self._generation = 0
        self._stale = set()  # slots of jobs in flight from an epoch the consumer left
        try:
            for i in range(nslots):
                self.blocks.append(shared_memory.SharedMemory(name=f"{token}-{i}", create=True, size=nbytes))
            self._results.append(ctx.Queue())
            state = loader.worker_state()
            names = [b.name for b in self.blocks]
            for w in range(nw):
                self.tasks.append(ctx.Queue())
                p = ctx.Process(target=_worker, args=(state, self.tasks[w], self._results[0], names, os.getpid()),
                                name=f"convnet-data-{w}", daemon=True)
                p.start()
                self.procs.append(p)
        except BaseException:
            self.close()
            raise

    @property
    def alive(self):
        return self._finalizer.alive

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    def close(self):
        self._finalizer()

    def _result(self):
        while True:
            try:
                return self._results[0].get(timeout=POLL_S)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    self.close()
                    p = dead[0]
                    # a job's error comes back as a message: exit code 1 is an exception while the worker started
                    hint = ("; it failed to start (its traceback is above): a script that uses data workers must run "
                            "its main code under `if __name__ == \"__main__\":`") if p.exitcode == 1 else ""
                    raise DataError(f"data worker {p.name} died (exit code {p.exitcode}){hint}") from None

    def batches(self, loader, epoch, start=0):
        """Batches ``start..`` of ``epoch`` (and their test views) on ``loader``'s device (module doc)."""
        items = [(b, v) for b in loader.batch_numbers(start) for v in loader.view_list()]
        self._generation += 1
        gen, nw = self._generation, len(self.procs)
        free = [s for s in range(len(self.blocks)) if s not in self._stale][::-1]
        pending = {}  # seq -> slot of the jobs handed out whose result has not come back
        ready = {}
        nxt = 0
        upload = _Uploader(loader)
        try:
            for seq in range(len(items)):
                loader._release()
                while seq not in ready:
                    while free and nxt < len(items):
                        b, v = items[nxt]
                        pending[nxt] = free.pop()
                        self.tasks[b % nw].put((gen, nxt, epoch, b, v, pending[nxt]))
                        nxt += 1
                    msg = self._result()
                    if msg[1] != gen:  # a job of an epoch left early: its slot is free again
                        self._stale.discard(msg[3])
                        free.append(msg[3])
                        continue
                    del pending[msg[2]]
                    if msg[0] == "err":
                        self.close()
                        raise DataError(f"data worker: {msg[4]}") from _WorkerTraceback(msg[5])
                    ready[msg[2]] = msg
                _, _, _, slot, shape, labels, light = ready.pop(seq)
                host = np.ndarray(shape, np.uint8 if self.uint8 else loader.dtype, buffer=self.blocks[slot].buf)
                out = upload(host, labels, light)
                del host
                free.append(slot)
                loader._receive(out)
                yield out
        finally:
            self._stale.update(pending.values())
