"""Data-parallel training: N copies of the net, one per rank, each on its own device and shard of every batch, with
the gradients averaged after every backward (``python -m convnet.train --distributed`` under ``mpirun``).

Engines, not a home-made transport: MPI (mpi4py) launches the ranks and carries the CPU collectives (the host
devices' gradients, the loss sums, the stop decision, the parameter checksums); NCCL (``cupy.cuda.nccl``) reduces
GPU gradients on a communication stream of its own.

* :class:`World` -- this process's rank, the number of ranks, its rank on its node (``local_rank``: which GPU it
  takes), and the few CPU collectives the loop needs, each with a timeout (a rank that never arrives is an error
  naming the collective, never a silent hang).
  :meth:`World.check_agree` compares a dict of settings over the ranks (the command line, the resolved settings,
  the data: :func:`data_facts`) and names every difference on every rank (:class:`RanksDisagree`).
* :func:`job_to_abort` -- after an error, the communicator whose ``Abort`` ends the job (starting MPI for that when
  the error came before it started); a rank whose ``MPI_Init`` waits for a rank that never starts MPI is ended by a
  watchdog after ``CONVNET_DIST_TIMEOUT`` seconds.
* :func:`rank_device` -- the device of a rank: ``cuda:<local rank>``; the host kinds (numpy, cpu, emu) as named.
* :class:`GradReducer` -- averages the gradients over the ranks in *buckets* (about ``bucket_mb`` MB of parameters,
  in backward order). :meth:`GradReducer.on_grads` is the hook of :meth:`convnet.graph.Net.backward`: when the last
  layer of a bucket has its gradients, that bucket's reduction starts, overlapping the rest of the backward (as
  PyTorch's DDP does); :meth:`GradReducer.finish` makes the optimizer's stream wait for the reductions (on a GPU a
  stream wait, no host synchronisation). Two transports:

  - :class:`NcclTransport` (cuda): the bucket's gradients are copied into one flat buffer on the communication stream
    (after it waits for an event recorded on the layer's stream), ``allReduce`` (sum) in place, scaled by 1/N, copied
    back, and an event recorded; the compute stream waits for that event before the update. Every stream is
    non-blocking, so nothing but these events orders the all-reduce with the rest of the backward (they overlap).
  - :class:`HostTransport` (numpy, cpu, emu): the same flat buffer on the host, reduced by a non-blocking
    MPI reduce-scatter (each rank sums one block and scales it by 1/N) and all-gather, driven forward at every hook
    call (MPI progresses when it is called).

  With one rank neither transport does anything (the gradients are their own average).
  Both give every rank the same bits: each element is summed once, on one rank (NCCL's ring; the reduce-scatter's
  owner), then copied to all -- the parameters stay identical without a broadcast. :func:`param_checksums` and
  :meth:`World.check_same` verify that every ``check_every`` steps (an error naming the first parameter that
  differs).

Semantics (docs/training.md, "Data-parallel training"): ``--batch-size`` is the global batch; rank r takes images
``[r*B/N, (r+1)*B/N)`` of every batch, drawn from the single-process loader's (seed, epoch, index) keys, so the union
of the shards is the single-process batch. Each rank's cost layer averages over its B/N images; the mean of the
ranks' gradients is the mean over the B images. The trainer's forward passes the shard's place in the batch
(``net.forward(..., batch=(B, r*B/N))``), so each rank's dropout layers draw its images' part of the single-process
masks.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

from .config import ConfigError

DEFAULT_TIMEOUT_S = float(os.environ.get("CONVNET_DIST_TIMEOUT", "600"))  # a collective waiting longer is an error
BUCKET_MB = 25.0  # PyTorch DDP's default bucket size

_WORLD = None  # the World of this process, once made (job_to_abort: train.main ends the job through it)


class DistributedError(RuntimeError):
    """Data-parallel training cannot go on: the ranks' parameters diverged, a collective timed out, ..."""


class RanksDisagree(ConfigError):
    """The ranks were started with different settings, model or data (every rank raises it, naming them)."""


_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")  # set by the launchers (MPICH/Intel/Slurm, Open MPI)
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def launched_ranks() -> int:
    """How many ranks the MPI launcher started, from its environment, before MPI starts: 0 when not under a launcher,
    2 when a launcher is there but does not say (as good as several)."""
    for var in _SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 2 if any(v in os.environ for v in _RANK_VARS) else 0


def _mpi():
    """mpi4py's MPI module, started, or a ConfigError saying how to install it.

    Starting MPI (``MPI_Init``, on import) waits until every rank of the job starts it: a rank that never does (it
    ended before: an error, a missing package; or it runs without --distributed) would hold this one there forever,
    holding the GIL. So a watchdog process ends this one, with a message, when MPI has not started within
    ``CONVNET_DIST_TIMEOUT`` seconds; the launcher then ends the job."""
    dog = None
    if "mpi4py.MPI" not in sys.modules and launched_ranks() > 1:
        dog = _watchdog(DEFAULT_TIMEOUT_S)
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConfigError(f"--distributed needs mpi4py and an MPI library ({e}): pip install 'convnet[mpi]' (mpi4py and "
                          f"the mpich wheel), then launch with mpirun -n N python -m convnet.train --distributed ...") \
            from None
    finally:
        if dog is not None:
            os.close(dog[1])  # the watchdog sees the pipe's end and leaves
            dog[0].wait()
    return MPI


_WATCHDOG = """
import os, select, signal, sys
fd, pid, limit, message = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if not select.select([fd], [], [], limit)[0]:
    os.write(2, message.encode())
    os.kill(pid, signal.SIGKILL)
"""


def _watchdog(timeout_s):
    """(process, pipe's write end): a process that kills this one unless the pipe ends within ``timeout_s``."""
    rank = next((os.environ[v] for v in _RANK_VARS if v in os.environ), "?")
    message = (f"error (rank {rank}): MPI did not start within {timeout_s:g} s: another rank of the job ended before "
               f"starting it (an error there, or a rank without --distributed); CONVNET_DIST_TIMEOUT sets the limit\n")
    r, w = os.pipe()
    try:
        dog = subprocess.Popen([sys.executable, "-I", "-c", _WATCHDOG, str(r), str(os.getpid()), str(timeout_s),
                                message], pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    return dog, w


def job_to_abort(asked_distributed):
    """The communicator to ``Abort`` after an error on this process, so that no other rank of the job waits for it
    forever, or None (one process; or every rank saw the error: :class:`RanksDisagree`). Before a :class:`World`
    exists (the command line did not parse), MPI is started here when the command asked for --distributed under a
    launcher of several ranks: the others are waiting in ``MPI_Init`` for this one."""
    world = _WORLD
    if world is not None:
        return world.comm if world.size > 1 and not world.failed_together else None
    if not asked_distributed or launched_ranks() <= 1:
        return None
    try:
        MPI = _mpi()
    except ConfigError:
        return None
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def active_world():
    """The :class:`World` this process made, or None (not distributed)."""
    return _WORLD


class World:
    """The ranks of this job (``comm``: an mpi4py communicator, default ``COMM_WORLD``)."""

    def __init__(self, comm=None, *, timeout_s=None):
        global _WORLD
        self.MPI = _mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)  # the ranks sharing this node
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        self.failed_together = False  # an error every rank raised at once (nothing to abort)
        _WORLD = self

    def __repr__(self):
        return f"World(rank {self.rank} of {self.size}, local rank {self.local_rank} of {self.local_size})"

    # -- waiting with a timeout ------------------------------------------------------------------------------------
    def wait(self, request, what, timeout_s=None):
        """Wait for a non-blocking MPI ``request`` (polling, sleeping between tests: a rank waiting for a slower one
        does not spin a core that the slower one may need); DistributedError after ``timeout_s``."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        start, nap = time.monotonic(), 0.0
        while not request.Test():
            if time.monotonic() - start > timeout_s:
                raise DistributedError(f"rank {self.rank}: {what} did not complete within {timeout_s:g} s: another "
                                       f"rank stopped or hangs (CONVNET_DIST_TIMEOUT sets the limit)")
            time.sleep(nap)
            nap = min(0.002, nap + 0.0001)

    # -- the CPU collectives of the loop ---------------------------------------------------------------------------
    def sum(self, values, what="a sum over the ranks"):
        """The element-wise sum over the ranks of ``values`` (float64 or int64 numbers), as a NumPy array."""
        a = np.ascontiguousarray(values)
        out = np.empty_like(a)
        self.wait(self.comm.Iallreduce(a, out, op=self.MPI.SUM), what)
        return out

    def any(self, flag, what="a decision of the ranks") -> bool:
        """True if ``flag`` is true on any rank (the ranks stop together)."""
        return bool(self.sum(np.array([int(bool(flag))], np.int64), what)[0])

    def gather(self, values, what="a gather"):
        """Every rank's ``values`` (a 1-d array of one length and dtype on all ranks), as (size, len) on every rank."""
        a = np.ascontiguousarray(values)
        out = np.empty((self.size, a.size), a.dtype)
        self.wait(self.comm.Iallgather(a, out), what)
        return out

    def barrier(self, what="a barrier"):
        self.wait(self.comm.Ibarrier(), what)

    def bcast(self, obj, root=0):
        """A Python object from rank ``root`` (pickled; below 2 GB)."""
        return self.comm.bcast(obj, root=root)

    def check_same(self, names, checksums, where):
        """DistributedError unless every rank holds the same ``checksums`` (one int64 per name): the ranks' parameters
        are bit-identical after every step, else they diverged (a bug, a broken reduction, a bad node)."""
        table = self.gather(np.asarray(checksums, np.int64), f"the parameter check {where}")
        bad = np.nonzero((table != table[0]).any(axis=0))[0]
        if len(bad):
            ranks = [r for r in range(self.size) if table[r, bad[0]] != table[0, bad[0]]]
            raise DistributedError(f"the ranks' parameters diverged {where}: '{names[bad[0]]}' differs on rank(s) "
                                   f"{', '.join(map(str, ranks))} from rank 0 ({len(bad)} of {len(names)} parameters "
                                   f"differ); every rank must hold identical parameters after every step")

    def check_agree(self, settings, what):
        """:class:`RanksDisagree` on every rank unless all ranks hold the same ``settings`` (a dict: name ->
        JSON value), naming each setting that differs and its value on each rank. ``what``: what they are ("command
        lines", ...). Compared right after the start, so a difference is an error at once, not a collective that
        never matches."""
        if self.size == 1:
            return
        blob = np.frombuffer(json.dumps(settings, sort_keys=True, default=str).encode(), np.uint8)
        step = f"the comparison of the ranks' {what}"
        sizes = [int(n) for n in self.gather(np.array([blob.size], np.int64), step)[:, 0]]
        displs = [int(d) for d in np.cumsum([0] + sizes[:-1])]
        table = np.empty(sum(sizes), np.uint8)
        self.wait(self.comm.Iallgatherv(blob, [table, sizes, displs, self.MPI.BYTE]), step)
        ranks = [json.loads(table[d:d + n].tobytes()) for d, n in zip(displs, sizes)]
        diffs = []
        for name in dict.fromkeys(k for r in ranks for k in r):
            values = {}
            for r, s in enumerate(ranks):
                values.setdefault(json.dumps(s.get(name), sort_keys=True), []).append(r)
            if len(values) > 1:
                diffs.append(f"{name}: " + ", ".join(f"{_shown(v)} on {_rank_list(rs)}" for v, rs in values.items()))
        if diffs:
            self.failed_together = True
            raise RanksDisagree(f"the ranks' {what} differ: {'; '.join(diffs)}; every rank must run the same command "
                                f"on the same model and data")


def _shown(value_json):
    v = json.loads(value_json)
    return "not given" if v is None else v if isinstance(v, str) else value_json


def _rank_list(ranks):
    shown = ", ".join(map(str, ranks[:8])) + (f", ... ({len(ranks)} ranks)" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


def digest(data) -> str:
    """A short fingerprint of bytes, a str or an array (its dtype, shape and contents) for :meth:`World.check_agree`."""
    h = hashlib.sha256()
    if isinstance(data, np.ndarray):
        h.update(f"{data.dtype.str}{data.shape}".encode())
        data = np.ascontiguousarray(data).tobytes()
    h.update(data.encode() if isinstance(data, str) else bytes(data))
    return "sha256:" + h.hexdigest()[:16]


def data_facts(dataset, mean):
    """What the ranks' data must agree on (:meth:`World.check_agree`): the dataset, its sizes, classes, labels and
    the mean image the inputs are centred with (a digest of every training image)."""
    return {"dataset": dataset.name, "image shape (C, H, W)": list(dataset.shape),
            "training images": len(dataset.train_y), "test images": len(dataset.test_y),
            "classes": digest("\n".join(map(str, dataset.classes))), "training labels": digest(dataset.train_y),
            "test labels": digest(dataset.test_y), "mean image": digest(np.asarray(mean))}


def rank_device(spec, world, get_device):
    """The device of this rank: ``cuda`` (or None when a GPU works) -> ``cuda:<local rank>``; a host kind (numpy,
    cpu, emu) as named. ConfigError for an explicit index on a job of several ranks (each rank picks its own), or a
    rank with no device of its own (more ranks on a node than GPUs)."""
    from .devices import Device, DeviceUnavailable, parse_device
    if spec is None:
        kind = get_device(None).kind
    else:
        try:
            dev = parse_device(spec)
        except ValueError as e:
            raise ConfigError(f"--device: {e}") from None
        kind = dev.kind
        if ":" in str(spec) and world.size > 1 and dev.always_indexed:
            raise ConfigError(f"--device {spec}: with --distributed every rank takes cuda:<its rank on the node>; "
                              f"give --device cuda (CUDA_VISIBLE_DEVICES chooses which GPUs a node offers)")
    if kind != "cuda":
        return get_device(kind)
    n = _cuda_device_count()
    if world.local_rank >= n:
        raise ConfigError(f"rank {world.rank} (rank {world.local_rank} on its node) has no GPU: the node has {n} and "
                          f"runs {world.local_size} ranks; start at most one rank per GPU (mpirun -n, or -ppn per node)")
    try:
        return get_device(Device("cuda", world.local_rank))
    except DeviceUnavailable as e:
        raise ConfigError(f"rank {world.rank}: {e}") from None


def _cuda_device_count():
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy, no driver: no GPU
        return 0


# --- parameter checksums --------------------------------------------------------------------------------------------
def param_checksums(net):
    """(names, int64 checksums): per parameter, the sum of its elements' bits as integers (any changed bit changes
    it, barring exact cancellation), computed on the parameter's device and read back together."""
    names, sums = [], []
    for key, layer, p in net.param_items():
        a = layer.params[p]
        xp = layer.device.xp
        bits = a.reshape(-1).view(np.int64 if a.dtype.itemsize == 8 else np.int32)
        with layer.device.activate():
            sums.append(xp.sum(bits, dtype=np.int64) + xp.sum(bits[::7], dtype=np.int64))  # position-sensitive too
        names.append(key)
    return names, [int(s) for s in sums]


# --- gradient buckets -----------------------------------------------------------------------------------------------
class Bucket:
    """Consecutive parameters in backward order: ``entries`` [(key, layer, pname, offset, size)], ``count`` elements,
    the layers still to finish their backward this step (``waiting``)."""

    def __init__(self, index, entries, dtype, device):
        self.index, self.entries, self.dtype, self.device = index, entries, dtype, device
        self.count = sum(e[4] for e in entries)
        self.layers = list(dict.fromkeys(e[1].name for e in entries))
        self.waiting = set()
        self.streams = []  # the streams its layers' gradients are issued on (None: the current stream)
        self.state = None  # the transport's per-step state
        self.t_start = self.t_done = None

    @property
    def nbytes(self):
        return self.count * self.dtype.itemsize


def make_buckets(net, bucket_bytes):
    """The net's parameters in backward order (the order ``Net.backward`` completes them) cut into buckets of about
    ``bucket_bytes`` (a bucket closes once it reaches that size; parameters of other devices start a new one)."""
    buckets, cur, size, dev = [], [], 0, None
    for l in reversed(net.order):
        for p in sorted(l.params):
            a = l.params[p]
            if cur and (size * net.dtype.itemsize >= bucket_bytes or l.device != dev):
                buckets.append(Bucket(len(buckets), cur, net.dtype, dev))
                cur, size = [], 0
            cur.append((f"{l.name}/{p}", l, p, size, int(a.size)))
            size += int(a.size)
            dev = l.device
    if cur:
        buckets.append(Bucket(len(buckets), cur, net.dtype, dev))
    return buckets


class GradReducer:
    """Averages ``net``'s gradients over the ranks of ``world`` after each backward, bucket by bucket as the backward
    completes them. Use: ``net.backward(on_grads=reducer.on_grads); reducer.finish(opt.step)`` (each bucket updated
    as soon as its own reduction is done), or ``reducer.finish(); opt.step()``.

    ``transport``: None picks :class:`NcclTransport` for cuda nets, :class:`HostTransport` otherwise. ``stats``
    (reset by :meth:`reset_stats`): steps, buckets reduced, seconds the host spent in :meth:`finish` (waiting for
    reductions the backward did not hide; on a GPU only the issue time), and on the host transport the seconds
    during which a reduction was in flight (``reduce_s``)."""

    def __init__(self, net, world, *, bucket_mb=BUCKET_MB, transport=None):
        self.net, self.world = net, world
        self.buckets = make_buckets(net, int(bucket_mb * 2**20))
        devices = {b.device for b in self.buckets}
        if len(devices) > 1:
            raise ConfigError(f"--distributed needs a net on one device per rank; this one is on "
                              f"{', '.join(map(str, devices))} (two-tower models with --devices are not supported)")
        self.device = next(iter(devices))
        self.of_layer = {}
        for b in self.buckets:
            for name in b.layers:
                self.of_layer.setdefault(name, []).append(b)
        if transport is None:
            transport = NcclTransport(world, self.device) if self.device.kind == "cuda" else HostTransport(world)
        self.transport = transport
        self.inflight = []
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"steps": 0, "buckets": 0, "bytes": 0, "finish_s": 0.0, "reduce_s": 0.0}

    def begin(self):
        """Called by :meth:`on_grads` at the first layer of a backward (a new step)."""
        for b in self.buckets:
            b.waiting = set(b.layers)
            b.state = b.t_start = b.t_done = None
        self.inflight = []
        self._started = True

    def on_grads(self, layer):
        """Net.backward's hook: ``layer``'s gradients are complete (issued). Starts every bucket that now has all
        its gradients, and moves the reductions in flight along (MPI progresses when called)."""
        if not getattr(self, "_started", False):
            self.begin()
        for b in self.of_layer.get(layer.name, ()):
            b.waiting.discard(layer.name)
            if not b.waiting and b.state is None:
                b.streams = list(dict.fromkeys(self.net.placements.stream_of(self.net.layers[n]) for n in b.layers))
                b.t_start = time.perf_counter()
                b.state = self.transport.start(b) or "started"
                self.inflight.append(b)
        self._progress()

    def _progress(self):
        for b in self.inflight:
            if b.t_done is None and self.transport.test(b):
                b.t_done = time.perf_counter()

    def finish(self, step=None):
        """After ``net.backward``: every bucket's reduction completes (host transport) or is waited for by the
        current stream (NCCL: no host wait), and its averaged gradients are back in ``layer.grads``. ``step``: the
        optimizer's ``step(items)``, called for each bucket right after its own reduction (the update of one bucket
        waits for that bucket only, while later ones may still be in flight)."""
        if not getattr(self, "_started", False):
            raise RuntimeError("GradReducer.finish() without a backward(on_grads=reducer.on_grads) before it")
        missing = [b for b in self.buckets if b.state is None]
        if missing:
            raise RuntimeError(f"the backward did not complete the gradients of {', '.join(missing[0].layers)}")
        waited = 0.0
        for b in self.buckets:
            t0 = time.perf_counter()
            self.transport.finish(b)
            waited += time.perf_counter() - t0
            if b.t_done is None:
                b.t_done = time.perf_counter()
            if step is not None:
                step([(key, layer, p) for key, layer, p, _, _ in b.entries])
        s = self.stats
        s["steps"] += 1
        s["buckets"] += len(self.buckets)
        s["bytes"] += sum(b.nbytes for b in self.buckets)
        s["finish_s"] += waited  # the host's wait for the reductions (not the updates)
        s["reduce_s"] += _union(sorted((b.t_start, b.t_done) for b in self.buckets))
        self._started = False


def backward_and_step(net, opt, reducer=None):
    """The rest of a training step after ``net.forward(x, labels, train=True)``: the backward, then the update; with
    a :class:`GradReducer`, each bucket's reduction starts from the backward's hook and each bucket is updated as soon
    as its own reduction is done."""
    if reducer is None:
        net.backward()
        opt.step()
    else:
        net.backward(on_grads=reducer.on_grads)
        reducer.finish(opt.step)


def _union(intervals):
    """Total length of the union of sorted (start, stop) intervals."""
    total, cur = 0.0, None
    for a, b in intervals:
        if cur is None or a > cur[1]:
            if cur is not None:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (cur[1] - cur[0] if cur else 0.0)


class HostTransport:
    """Buckets of host gradients (numpy, cpu, emu) averaged with MPI: non-blocking reduce-scatter (each rank sums
    one block and scales it by 1/N), then all-gather of the blocks, so every rank gets the same bits. One rank: the
    gradients are left untouched (bit-identical to a run without --distributed).

    MPI matches the collectives of a communicator by the order ranks issue them, so the reduce-scatters (issued as
    buckets complete, in bucket order) and the all-gathers (issued when a reduce-scatter is seen complete, which
    differs between ranks) run on two communicators of their own, each in bucket order on every rank."""

    name = "MPI"  # how reports name it

    def __init__(self, world):
        self.world, self.MPI = world, world.MPI
        self.n = world.size
        self.buffers = {}
        if self.n > 1:
            self.rs_comm, self.ag_comm = world.comm.Dup(), world.comm.Dup()
        self.next_gather = 0  # the bucket whose all-gather is issued next

    def _buffers(self, b):
        if b.index not in self.buffers:
            block = -(-b.count // self.n)
            flat = np.zeros(block * self.n, b.dtype)  # padded to a multiple of the ranks (the padding stays 0)
            self.buffers[b.index] = (flat, np.empty(block, b.dtype))
        return self.buffers[b.index]

    def start(self, b):
        if self.n == 1:
            return "done"
        if b.index == 0:
            self.next_gather = 0
        flat, mine = self._buffers(b)
        for key, layer, p, off, size in b.entries:
            flat[off:off + size] = layer.device.to_numpy(layer.grads[p]).reshape(-1)
        return ["scatter", self.rs_comm.Ireduce_scatter_block(flat, mine, op=self.MPI.SUM)]

    def test(self, b):
        """Move the bucket's reduction on (without blocking); True when it is complete."""
        st = b.state
        if st == "done" or st[0] == "done":
            return True
        if st[0] == "summed" or st[1].Test():
            if st[0] == "scatter":  # my block is summed: average it
                self._buffers(b)[1][...] *= b.dtype.type(1.0 / self.n)
                b.state = st = ["summed", None]
            if st[0] == "summed":  # then gather every rank's block, in bucket order
                if b.index != self.next_gather:
                    return False
                flat, mine = self._buffers(b)
                b.state = ["gather", self.ag_comm.Iallgather(mine, flat)]
                self.next_gather += 1
                return False
        else:
            return False
        b.state = ["done", None]
        return True

    def finish(self, b):
        if b.state == "done":
            return
        start, limit = time.monotonic(), self.world.timeout_s
        nap = 0.0
        while not self.test(b):
            if time.monotonic() - start > limit:
                raise DistributedError(f"rank {self.world.rank}: the gradient reduction of bucket {b.index} "
                                       f"({', '.join(b.layers)}) did not complete within {limit:g} s: another rank "
                                       f"stopped or hangs")
            time.sleep(nap)
            nap = min(0.001, nap + 0.00005)
        flat, _ = self._buffers(b)
        for key, layer, p, off, size in b.entries:  # the averages, in place (host arrays)
            g = layer.grads[p]
            np.copyto(g, flat[off:off + size].reshape(g.shape))


def _nccl():
    """CuPy's NCCL module (``cupy.cuda.nccl``), or a ConfigError."""
    try:
        import cupy
        nccl = getattr(cupy.cuda, "nccl", None)
        if nccl is None:
            import importlib
            nccl = importlib.import_module("cupy.cuda.nccl")
    except ImportError as e:
        raise ConfigError(f"--distributed on cuda needs NCCL through CuPy (cupy.cuda.nccl): {e}") from None
    if not getattr(nccl, "available", True):
        raise ConfigError("--distributed on cuda needs NCCL, and this CuPy was built without it (cupy.cuda.nccl."
                          "available is False): install a CuPy wheel from PyPI (they load the nvidia-nccl wheel)")
    return nccl


class NcclTransport:
    """Buckets of GPU gradients averaged by NCCL on a communication stream of its own (non-blocking, like every stream
    of the cuda device: ordered by events only; one communicator over the ranks, its id made by rank 0 and broadcast
    over MPI). Per bucket: the stream waits for an event recorded on each stream of the bucket's layers, copies the
    gradients into the bucket's flat buffer, ``allReduce`` (sum) in place, scales by 1/N, copies back, records an
    event; :meth:`finish` makes the current stream and the layers' streams (where the optimizer updates them) wait
    for it. One rank: nothing at all (no communicator, no stream; the gradients are their own average), as
    :class:`HostTransport`."""

    name = "NCCL"  # how reports name it

    def __init__(self, world, device):
        self.world, self.device, self.n = world, device, world.size
        self.buffers = {}
        if self.n == 1:
            return
        nccl = self.nccl = _nccl()
        uid = nccl.get_unique_id() if world.rank == 0 else None
        uid = world.bcast(uid)
        with device.activate():
            self.comm = nccl.NcclCommunicator(world.size, uid, world.rank)
        self.stream = device.new_stream()
        self.types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def start(self, b):
        if self.n == 1:
            return "done"
        dev = self.device
        for s in b.streams:  # the gradients issued so far on the streams of the bucket's layers
            dev.wait_event(dev.record_event(s), self.stream)
        with dev.on_stream(self.stream):
            flat = self.buffers.get(b.index)
            if flat is None:
                flat = self.buffers[b.index] = dev.empty((b.count,), b.dtype, stream=self.stream)
            for key, layer, p, off, size in b.entries:
                flat[off:off + size] = layer.grads[p].reshape(-1)
            ptr = flat.data.ptr
            self.comm.allReduce(ptr, ptr, b.count, self.types[b.dtype], self.nccl.NCCL_SUM,
                                dev.stream_handle(self.stream))
            flat *= b.dtype.type(1.0 / self.n)
            for key, layer, p, off, size in b.entries:
                layer.grads[p].reshape(-1)[...] = flat[off:off + size]
            return ["issued", dev.record_event(self.stream)]

    def test(self, b):
        return b.state == "done"  # else completion is the GPU's business: the compute streams wait on the event

    def finish(self, b):
        if b.state == "done":
            return
        for s in dict.fromkeys([None, *b.streams]):
            self.device.wait_event(b.state[1], s)
