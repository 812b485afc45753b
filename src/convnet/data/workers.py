"""Decoding in worker processes for prepared datasets (:class:`.loader.PreparedLoader` with ``workers`` > 0).

The parent (the consumer's process) owns ``slots`` shared-memory blocks (:mod:`multiprocessing.shared_memory`),
each one batch in the layout contract ``(C, H, W, N)``, and hands batch jobs ``(seq, epoch, batch, view, slot)``
to ``workers`` processes (forked; spawned where there is no fork) (batch ``b``'s jobs always to worker ``b % workers``, so the ten test views of a
batch are decoded once). A worker decodes, crops, flips, adds the lighting, subtracts the mean and scales with the
same code as the in-thread loader (:meth:`.loader.PreparedLoader._host_part` and ``_finish`` on the host), writes
the batch into its slot and reports ``(seq, slot, labels)``. The parent yields batches in sequence order, copying
each out of its slot onto the device (CUDA: through pinned memory, an asynchronous copy on a stream of its own),
then gives the slot back; so at most ``slots`` batches are ready or in the making ahead of the consumer.

Every random choice is keyed on (seed, epoch, image index) (:func:`.augment.image_rng`), so a batch is the same
bits for any number of workers, and for the in-thread loader.

Shutdown (the generator's ``finally``: the epoch ended, the consumer closed it, an exception, Ctrl-C): a stop job
to each worker, join, terminate what did not stop, unlink every block. Workers ignore SIGINT (the parent decides)
and exit by themselves when the parent process is gone.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import signal
import traceback
from multiprocessing import shared_memory

import numpy as np

from .base import DataError

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
            seq, epoch, b, view, slot = job
            try:
                if epoch not in orders:
                    orders = {epoch: loader.order(epoch)}
                x, y = loader._finish(*loader._host_part(epoch, b, orders[epoch], view))
                if slot not in blocks:
                    blocks[slot] = shared_memory.SharedMemory(name=names[slot])
                dst = np.ndarray(x.shape, x.dtype, buffer=blocks[slot].buf)
                dst[...] = x
                del dst
                results.put(("ok", seq, slot, x.shape, np.asarray(y)))
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
                msg = f"{type(e).__name__}: {e}"
                results.put(("err", seq, slot, msg, traceback.format_exc()))
    finally:
        for blk in blocks.values():
            blk.close()


class _Uploader:
    """Host batch (a view of a shared block) -> the loader's device, as a copy: NumPy for the host devices; CUDA:
    into one of two pinned buffers, then an asynchronous copy on a non-blocking stream whose event the consumer's
    stream waits for (the pinned buffer is reused only after its copy finished). Not run on a GPU yet."""

    def __init__(self, device):
        self.device = device
        self.cuda = device is not None and "cuda" in str(device).lower()
        self._pinned, self._events, self._k, self._stream = [None, None], [None, None], 0, None

    def __call__(self, host, labels):
        dev = self.device
        if dev is None:
            return np.array(host), np.asarray(labels, np.int32)
        if not self.cuda:
            return dev.asarray(np.array(host)), dev.asarray(np.asarray(labels, np.int32))
        import cupy as cp
        import cupyx
        with dev.activate():
            if self._stream is None:
                self._stream = cp.cuda.Stream(non_blocking=True)
            k, self._k = self._k, self._k ^ 1
            if self._events[k] is not None:
                self._events[k].synchronize()
            if self._pinned[k] is None or self._pinned[k].nbytes < host.nbytes:
                self._pinned[k] = cupyx.empty_pinned(host.size, host.dtype)
            pin = self._pinned[k][:host.size].reshape(host.shape)
            np.copyto(pin, host)
            x = cp.empty(host.shape, host.dtype)
            x.set(pin, stream=self._stream)
            ev = self._stream.record()
            cp.cuda.get_current_stream().wait_event(ev)
            self._events[k] = ev
            return x, dev.asarray(np.asarray(labels, np.int32))


def epoch(loader, epoch_, start=0):
    """Batches ``start..`` of ``epoch_`` (and their test views) made by ``loader.workers`` processes (module doc)."""
    items = [(b, v) for b in range(start, len(loader)) for v in loader.view_list()]
    if not items:
        return
    nw = int(loader.workers)
    nslots = max(1, int(loader.prefetch)) + nw
    oh, ow = loader.out_hw
    nbytes = 3 * oh * ow * loader.batch_size * loader.dtype.itemsize
    # fork where there is one (Linux, as PyTorch's DataLoader): starts in milliseconds and needs no
    # ``if __name__ == "__main__"`` guard in the user's script; the workers touch neither CUDA nor BLAS
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    token = f"convnet-{os.getpid()}-{secrets.token_hex(4)}"
    blocks, procs, tasks, results = [], [], [], None
    upload = _Uploader(loader.device)
    try:
        for i in range(nslots):
            blocks.append(shared_memory.SharedMemory(name=f"{token}-{i}", create=True, size=nbytes))
        names = [b.name for b in blocks]
        results = ctx.Queue()
        state = loader.worker_state()
        for w in range(nw):
            tasks.append(ctx.Queue())
            p = ctx.Process(target=_worker, args=(state, tasks[w], results, names, os.getpid()),
                            name=f"convnet-data-{w}", daemon=True)
            p.start()
            procs.append(p)
        free = list(range(nslots))[::-1]
        nxt = 0
        ready = {}
        for seq in range(len(items)):
            while free and nxt < len(items):
                b, v = items[nxt]
                tasks[b % nw].put((nxt, epoch_, b, v, free.pop()))
                nxt += 1
            while seq not in ready:
                try:
                    msg = results.get(timeout=POLL_S)
                except queue.Empty:
                    dead = [p for p in procs if not p.is_alive()]
                    if dead:
                        raise DataError(f"data worker {dead[0].name} died (exit code {dead[0].exitcode})") from None
                    continue
                if msg[0] == "err":
                    raise DataError(f"data worker: {msg[3]}\n{msg[4]}")
                ready[msg[1]] = msg
            _, _, slot, shape, labels = ready.pop(seq)
            host = np.ndarray(shape, loader.dtype, buffer=blocks[slot].buf)
            out = upload(host, labels)
            del host
            free.append(slot)
            yield out
    finally:
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
        for q in tasks + ([results] if results is not None else []):
            q.close()
            q.cancel_join_thread()
        for blk in blocks:
            blk.close()
            try:
                blk.unlink()
            except FileNotFoundError:
                pass
