"""Where a net's layers run: the device specification read once, each layer's tower and device, one stream per
placement, and the copies between placements (docs/architecture.md, "Towers" and "Streams and events")."""
from __future__ import annotations

import numpy as np

from . import ops
from .devices import get_device, parse_device, parse_device_list
from .layers import Data, LayerError


def resolve_devices(device=None, devices=None, *, usable=True, names=("device", "the devices")):
    """(the net's device, the towers' devices or None) from a device specification: ``device`` a name, a Device or
    None (the best usable device); ``devices`` the towers' devices ("cuda:0,cuda:1", or a sequence of names or
    Devices) or None (every tower on ``device``). Given both, ``device`` must be the first tower's. ``usable=False``
    reads names without asking whether this machine can use them (shape-only nets, summaries). ValueError naming the
    setting (``names``: how the caller's user calls the two), DeviceUnavailable for a device that is not usable."""
    resolve = _resolver(usable)

    def read(what, fn):
        try:
            return fn()
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None

    towers = None if devices is None else read(names[1], lambda: tuple(resolve(d) for d in parse_device_list(devices)))
    if towers is None:
        return read(names[0], lambda: resolve(device)), None
    if device is not None:
        first = read(names[0], lambda: resolve(device))
        if first != towers[0]:
            listed = devices if isinstance(devices, str) else ",".join(map(str, towers))
            raise ValueError(f"{names[0]} {first} is not the first of {names[1]} {listed}: tower 0 runs on the net's "
                             f"device (leave {names[0]} out)")
    return towers[0], towers


class Exchange:
    """Bytes copied between placements during the last step (reset by each ``forward``): ``bytes`` maps (source label,
    destination label) to a count; ``images`` is the batch it was counted on."""

    def __init__(self):
        self.bytes = {}
        self.images = 0

    def reset(self, images=0):
        self.bytes = {}
        self.images = int(images)

    def add(self, src, dst, nbytes):
        key = (src, dst)
        self.bytes[key] = self.bytes.get(key, 0) + int(nbytes)

    def per_image(self):
        """{"src->dst": bytes per image} of the last step (empty when nothing crossed)."""
        return {f"{s}->{d}": n / self.images for (s, d), n in self.bytes.items()} if self.images else {}


class Placements:
    """The placements of ``net``'s layers. Sets each layer's ``tower`` (an int, or None for a layer given a device
    by name) and ``device``, and ``net.devices`` (the towers' devices; ``towers`` None: every tower on
    ``net.device``). A placement is (device, tower); its work runs on its own stream when the net has several
    placements or an asynchronous device, and activations and gradients cross between placements as counted copies
    (``exchange``)."""

    def __init__(self, net, towers, *, usable=True):
        self.net = net
        self.exchange = Exchange()
        self._streams = None  # placement key -> stream, made on the first pass (``_placement_streams``)
        self._copies = {}  # the activations copied in this forward, per (producer, consumer placement)
        self.devices = self._assign(towers, _resolver(usable))

    def _assign(self, devices, resolve):
        order = self.net.order
        n = max((l.device for l in order if _is_tower(l.device)), default=0) + 1
        if devices is None:
            devices = (self.net.device,) * n
        elif n > len(devices):
            bad = next(l for l in order if _is_tower(l.device) and l.device >= len(devices))
            raise LayerError(f"layer '{bad.name}' is on device {bad.device} (a tower index), but the net has "
                             f"{len(devices)} device(s) ({', '.join(map(str, devices))}): give one per "
                             f"tower, e.g. --devices " + ",".join(f"{self.net.device.kind}:{i}" for i in range(n)))
        for l in order:
            if l.device is None or _is_tower(l.device):
                l.tower = int(l.device or 0)
                l.device = devices[l.tower]
            else:
                l.tower, l.device = None, resolve(l.device)
        return devices

    @staticmethod
    def same_place(a, b) -> bool:
        """Whether layers ``a`` and ``b`` share their memory: the same device and, when both are in towers, the same
        tower (two towers on one GPU still copy, as they would between two GPUs)."""
        ta, tb = getattr(a, "tower", None), getattr(b, "tower", None)
        return a.device == b.device and (ta is None or tb is None or ta == tb)

    def label(self, l) -> str:
        """How reports name a layer's placement: its device, and its tower when two towers share that device."""
        tower = getattr(l, "tower", None)
        if tower is None or sum(d == l.device for d in self.devices) < 2:
            return str(l.device)
        return f"{l.device}[{tower}]"

    # --- streams ---------------------------------------------------------------------------------------------
    def _stream_key(self, l):
        """A layer's placement as streams see it: (device, tower); a layer given a device by name shares the stream
        of the lowest tower on that device (it shares that tower's memory, ``same_place``)."""
        tower = getattr(l, "tower", None)
        if tower is None:
            tower = next((t for t, d in enumerate(self.devices) if d == l.device), None)
        return l.device, tower

    def _placement_streams(self) -> dict:
        """{placement key: stream}, one new stream per placement when the net has several, or when its one device
        is asynchronous (a GPU: the net's compute on a stream of its own, not the legacy null stream where the loop
        works); else empty: every layer on the current stream."""
        if self._streams is None:
            keys = list(dict.fromkeys(self._stream_key(l) for l in self.net.order))
            own = len(keys) > 1 or not keys[0][0].synchronous
            self._streams = {k: k[0].new_stream() for k in keys} if own else {}
        return self._streams

    def stream_of(self, l):
        """The stream layer ``l``'s work is issued on (None: the current stream)."""
        streams = self._placement_streams()
        return streams.get(self._stream_key(l)) if streams else None  # one host device: no key to look up

    def same_stream(self, a, b) -> bool:
        """Whether layers ``a`` and ``b`` issue their work on one stream (ordered without an event)."""
        return self.stream_of(a) is self.stream_of(b)

    def on(self, l):
        """Context: layer ``l``'s device current and its placement's stream current (ops issued inside run there)."""
        return l.device.on_stream(self.stream_of(l))

    def order(self, src, dst) -> bool:
        """Work issued next on ``dst``'s stream waits for the work issued so far on ``src``'s (same memory, two
        streams: a layer given a device by name read by a tower on that device); whether the two streams differ."""
        s_src, s_dst = self.stream_of(src), self.stream_of(dst)
        if s_src is not s_dst:
            dst.device.wait_event(src.device.record_event(s_src), s_dst)
        return s_src is not s_dst

    def give_back(self, reader, lenders):
        """The streams of ``lenders`` wait for the work issued so far on ``reader``'s (which read their memory)."""
        for lender in lenders.values():
            self.order(reader, lender)

    def fork(self):
        """The start of a pass: every placement's stream waits for the current stream (which waited for the
        batch)."""
        self._copies = {}
        for (device, _), stream in self._placement_streams().items():
            device.fork(stream)

    def join(self):
        """The current stream waits for the work issued so far on every placement's stream (on a GPU without
        blocking the host; on emu the host waits). ``forward`` and ``backward`` end with it, and so does work issued
        on the placements from outside (the optimizer's updates). The activations copied in the pass are released."""
        self._copies = {}
        for (device, _), stream in self._placement_streams().items():
            device.join(stream)

    # --- copies ----------------------------------------------------------------------------------------------
    def copy(self, a, src, dst):
        """``a`` (on layer ``src``'s placement) on layer ``dst``'s placement: the same array (ordered after ``src``'s
        stream), or a counted copy on ``dst``'s stream."""
        if self.same_place(src, dst):
            self.order(src, dst)
            return a
        with dst.device.activate():
            b = ops.copy(dst.device, a, src.device, stream=self.stream_of(dst), src_stream=self.stream_of(src))
        self.exchange.add(self.label(src), self.label(dst), a.nbytes)
        return b

    def fetch(self, acts, i, l):
        """Layer ``i``'s output (in ``acts``) on layer ``l``'s placement: copied once per placement and pass."""
        src = self.net.layers[i]
        if self.same_place(src, l):
            self.order(src, l)
            return acts[i]
        key = (i, l.tower, l.device)
        if key not in self._copies:
            self._copies[key] = self.copy(acts[i], src, l)
        return self._copies[key]

    def exchange_plan(self, images=1, label_bytes=4):
        """{"src->dst": bytes} one training step (forward + backward) of ``images`` images copies between placements,
        from the shapes alone: each activation once per consumer placement, each gradient once per consumer that
        sends one back, the labels when the softmax layer is not with the data."""
        net = self.net
        plan = {}

        def add(src, dst, nbytes):
            key = f"{self.label(src)}->{self.label(dst)}"
            plan[key] = plan.get(key, 0) + int(nbytes) * images

        item = net.dtype.itemsize
        sent = set()
        for l in net.order:
            for i in dict.fromkeys(l.inputs):
                src = net.layers[i]
                if self.same_place(src, l):
                    continue
                size = int(np.prod(src.out_shape)) * item
                if (i, l.tower, l.device) not in sent:
                    sent.add((i, l.tower, l.device))
                    add(src, l, size)
                if l.needs_input_grad and not isinstance(src, Data):
                    add(l, src, size * l.inputs.count(i))
        if not self.same_place(net.data_layer, net.cost_layer):
            add(net.data_layer, net.cost_layer, label_bytes)
        return plan


def check_on(layer, a, what):
    """TypeError unless ``a`` is an array of ``layer``'s device (else a copy between placements is missing)."""
    if not layer.device.is_array(a):
        raise TypeError(f"layer '{layer.name}' on {layer.device}: {what} is a {layer.device.describe_array(a)}, "
                        f"not an array of {layer.device} (a copy between devices is missing)")


def _resolver(usable):
    """A device name to a Device: checked usable here, or (``usable=False``) only read."""
    return get_device if usable else (lambda d: get_device(d) if d is None else parse_device(d))


def _is_tower(device) -> bool:
    """A layer's device given as a tower index (an int), not as a device."""
    return isinstance(device, (int, np.integer)) and not isinstance(device, bool)
