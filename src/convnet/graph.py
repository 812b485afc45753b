"""The layer graph (a DAG of layers in definition order): docs/architecture.md, "Towers" and "Streams and events"."""
from __future__ import annotations

import numbers
import warnings
import zlib

import numpy as np

from . import ops
from .devices import get_device, parse_device, parse_device_list
from .layers import Data, Dropout, Layer, LayerError, ModelWarning, SoftmaxCost
from .summary import format_summary


def _seed32(*parts):
    """A 31-bit seed derived from integers (stable across runs and platforms)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) & 0x7FFFFFFF


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


class Net:
    """A network: ``Net(layers, device=..., devices=..., dtype=..., seed=...)``.

    ``devices``: the devices of the towers (a list of devices or names, or ``"cuda:0,cuda:1"``): a layer with
    ``device=i`` (an int) runs on ``devices[i]``. Default: every tower on ``device``; when only ``devices`` is given,
    ``device`` (the net's device: layers without a device, and tower 0) is ``devices[0]``.

    ``forward(x, labels=None, train=False, step=0, batch=None)`` returns the probabilities ``(classes, N)``;
    with labels it also keeps the summed loss (``net.loss``, a 0-d device array) for ``backward()``.
    ``init_params=False`` infers the shapes only (no parameters: for summaries of big models).
    """

    def __init__(self, layers, *, device=None, devices=None, dtype=np.float32, seed=0, name="net", source=None,
                 init_params=True):
        # a shapes-only net (summaries) may name devices this machine cannot use
        resolve = get_device if init_params else (lambda d: get_device(d) if d is None else parse_device(d))
        self._resolve = resolve
        self.devices = None if devices is None else tuple(resolve(d) for d in parse_device_list(devices))
        if self.devices is not None and device is not None and resolve(device) != self.devices[0]:
            raise LayerError(f"device {resolve(device)} is not the first of the devices "
                             f"{', '.join(map(str, self.devices))} (tower 0 is the net's device)")
        self.device = self.devices[0] if self.devices is not None else resolve(device)
        self.exchange = Exchange()
        self._streams = None  # placement key -> stream, made on the first pass (``_placement_streams``)
        self.dtype = np.dtype(dtype)
        self.seed = int(seed)
        self.name = name
        self.source = source  # model-file text, when built from one (stored in checkpoints)
        self.layers = {}
        for layer in layers:
            self._add(layer)
        self._build(init_params)

    # --- construction ----------------------------------------------------------------------------------------
    def _add(self, layer):
        if not isinstance(layer, Layer):
            raise LayerError(f"not a layer: {layer!r}")
        if layer.name in self.layers:
            raise LayerError(f"duplicate layer name '{layer.name}'")
        for inp in layer.inputs:
            if inp not in self.layers:
                raise LayerError(f"layer '{layer.name}': input '{inp}' is not defined before it "
                                 f"(known: {', '.join(self.layers) or 'none'})")
        if isinstance(layer, Data):
            if layer.inputs:
                raise LayerError(f"data layer '{layer.name}' takes no inputs")
        elif not layer.inputs:
            raise LayerError(f"layer '{layer.name}' ({layer.type}) needs inputs=")
        self.layers[layer.name] = layer

    def _build(self, init_params):
        self.order = list(self.layers.values())
        self.data_layer, self.cost_layer = self._ends()
        self.consumers = self._consumer_map()
        self._assign_devices()
        self._infer_shapes()
        self._check_mask_streams()
        if init_params:
            self._init_params(np.random.default_rng(self.seed))
        self._check_reachable()
        self.num_classes = self.cost_layer.out_shape[0]

    def _ends(self):
        """The data layer and the cost layer: exactly one of each."""
        datas = [l for l in self.order if isinstance(l, Data)]
        costs = [l for l in self.order if isinstance(l, SoftmaxCost)]
        if len(datas) != 1:
            raise LayerError(f"a net needs exactly one data layer, found {len(datas)}")
        if len(costs) != 1:
            raise LayerError(f"a net needs exactly one softmax (cost) layer, found {len(costs)}")
        return datas[0], costs[0]

    def _consumer_map(self):
        """layer name -> names of the layers reading its output, in definition order."""
        consumers = {n: [] for n in self.layers}
        for l in self.order:
            for inp in l.inputs:
                consumers[inp].append(l.name)
        return consumers

    def _assign_devices(self):
        """Each layer's tower (``l.tower``: an int, or None for an explicit device) and device (``l.device``)."""
        towers = [l.device for l in self.order if _is_tower(l.device)]
        n = max(towers, default=0) + 1
        if self.devices is None:
            self.devices = (self.device,) * n
        elif n > len(self.devices):
            bad = next(l for l in self.order if _is_tower(l.device) and l.device >= len(self.devices))
            raise LayerError(f"layer '{bad.name}' is on device {bad.device} (a tower index), but the net has "
                             f"{len(self.devices)} device(s) ({', '.join(map(str, self.devices))}): give one per "
                             f"tower, e.g. --devices " + ",".join(f"{self.device.kind}:{i}" for i in range(n)))
        for l in self.order:
            if l.device is None or _is_tower(l.device):
                l.tower = int(l.device or 0)
                l.device = self.devices[l.tower]
            else:
                l.tower, l.device = None, self._resolve(l.device)

    def _infer_shapes(self):
        for l in self.order:
            if isinstance(l, Data):
                l.in_shape = None
                l.out_shape = l.output_shape()
                continue
            l.in_shape = self._joined_shape([self.layers[i].out_shape for i in l.inputs])
            l.out_shape = tuple(int(s) for s in l.output_shape(l.in_shape))
            # no gradient is needed into the data layer
            l.needs_input_grad = not all(isinstance(self.layers[i], Data) for i in l.inputs)

    def _check_mask_streams(self):
        """Dropout layers sharing a mask stream (``maskOf``) must draw disjoint units of the same per-unit shape: an
        overlap would give two layers the same mask, a shape mismatch would pair units with the wrong elements."""
        streams = {}
        for l in self.order:
            if isinstance(l, Dropout):
                streams.setdefault(l.random_stream, []).append(l)
        for stream, layers in streams.items():
            if len(layers) == 1 and stream not in self.layers:  # a typo, or a part of another net's layer
                l = layers[0]
                first, stop = l.mask_units()
                warnings.warn(f"layer '{l.name}': maskOf = {stream} names no layer of this net and no other dropout "
                              f"layer shares it: it draws units {first}-{stop - 1} of another net's layer {stream} "
                              f"(check the name, or remove maskOf)", ModelWarning, stacklevel=2)
            layers.sort(key=lambda l: l.mask_start)
            for a, b in zip(layers, layers[1:]):
                if a.out_shape[1:] != b.out_shape[1:]:
                    raise LayerError(f"layers '{a.name}' and '{b.name}' share the dropout mask '{stream}' but their "
                                     f"units differ in shape ({a.out_shape[1:]} vs {b.out_shape[1:]})")
                if b.mask_start < a.mask_units()[1]:
                    first, stop = a.mask_units()
                    raise LayerError(f"layers '{a.name}' (units {first}-{stop - 1}) and '{b.name}' (from unit "
                                     f"{b.mask_start}) overlap in the dropout mask '{stream}': they would draw the "
                                     f"same mask (give maskStart = {stop} or more, or another maskOf)")

    def _init_params(self, rng):
        """Initialise on the host in definition order (one RNG stream: the draws depend on the order), then move
        each layer's parameters to its device."""
        for l in self.order:
            if l.learnable:
                host = l.init_params(rng, self.dtype)
                l.params = {k: l.device.asarray(v, self.dtype) for k, v in host.items()}
                l.grads = {}

    def _check_reachable(self):
        for name, cons in self.consumers.items():
            if not cons and self.layers[name] is not self.cost_layer:
                raise LayerError(f"layer '{name}' feeds nothing (every layer must lead to the softmax layer)")

    # --- placements and copies -------------------------------------------------------------------------------
    @staticmethod
    def same_place(a, b) -> bool:
        """Whether layers ``a`` and ``b`` share their memory: the same device and, when both are in towers, the same
        tower (two towers on one GPU still copy, as they would between two GPUs)."""
        ta, tb = getattr(a, "tower", None), getattr(b, "tower", None)
        return a.device == b.device and (ta is None or tb is None or ta == tb)

    def place_label(self, l) -> str:
        """How reports name a layer's placement: its device, and its tower when two towers share that device."""
        tower = getattr(l, "tower", None)
        if tower is None or sum(d == l.device for d in self.devices) < 2:
            return str(l.device)
        return f"{l.device}[{tower}]"

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
            keys = list(dict.fromkeys(self._stream_key(l) for l in self.order))
            own = len(keys) > 1 or not keys[0][0].synchronous
            self._streams = {k: k[0].new_stream() for k in keys} if own else {}
        return self._streams

    def stream_of(self, l):
        """The stream layer ``l``'s work is issued on (None: the current stream)."""
        return self._placement_streams().get(self._stream_key(l))

    def on_placement(self, l):
        """Context: layer ``l``'s device current and its placement's stream current (ops issued inside run there)."""
        return l.device.on_stream(self.stream_of(l))

    def _order(self, src, dst) -> bool:
        """Work issued next on ``dst``'s stream waits for the work issued so far on ``src``'s (same memory, two
        streams: a layer given a device by name read by a tower on that device); whether the two streams differ."""
        s_src, s_dst = self.stream_of(src), self.stream_of(dst)
        if s_src is not s_dst:
            dst.device.wait_event(src.device.record_event(s_src), s_dst)
        return s_src is not s_dst

    def _fork(self):
        for (device, _), stream in self._placement_streams().items():
            device.fork(stream)

    def join(self):
        """The current stream waits for the work issued so far on every placement's stream (on a GPU without
        blocking the host; on emu the host waits). ``forward`` and ``backward`` end with it, and so does work issued
        on the placements from outside (the optimizer's updates)."""
        for (device, _), stream in self._placement_streams().items():
            device.join(stream)

    def _copy(self, a, src, dst):
        """``a`` (on layer ``src``'s placement) on layer ``dst``'s placement: the same array (ordered after ``src``'s
        stream), or a counted copy on ``dst``'s stream."""
        if self.same_place(src, dst):
            self._order(src, dst)
            return a
        with dst.device.activate():
            b = ops.copy(dst.device, a, src.device, stream=self.stream_of(dst), src_stream=self.stream_of(src))
        self.exchange.add(self.place_label(src), self.place_label(dst), a.nbytes)
        return b

    def exchange_plan(self, images=1, label_bytes=4):
        """{"src->dst": bytes} one training step (forward + backward) of ``images`` images copies between placements,
        from the shapes alone: each activation once per consumer placement, each gradient once per consumer that
        sends one back, the labels when the softmax layer is not with the data."""
        plan = {}

        def add(src, dst, nbytes):
            key = f"{self.place_label(src)}->{self.place_label(dst)}"
            plan[key] = plan.get(key, 0) + int(nbytes) * images

        item = self.dtype.itemsize
        sent = set()
        for l in self.order:
            for i in dict.fromkeys(l.inputs):
                src = self.layers[i]
                if self.same_place(src, l):
                    continue
                size = int(np.prod(src.out_shape)) * item
                if (i, l.tower, l.device) not in sent:
                    sent.add((i, l.tower, l.device))
                    add(src, l, size)
                if l.needs_input_grad and not isinstance(src, Data):
                    add(l, src, size * l.inputs.count(i))
        if not self.same_place(self.data_layer, self.cost_layer):
            add(self.data_layer, self.cost_layer, label_bytes)
        return plan

    @staticmethod
    def _joined_shape(shapes):
        if len(shapes) == 1:
            return tuple(shapes[0])
        if all(len(s) == 3 for s in shapes) and len({tuple(s[1:]) for s in shapes}) == 1:
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return (sum(int(np.prod(s)) for s in shapes),)

    # --- parameters ------------------------------------------------------------------------------------------
    def param_items(self):
        """[(key, layer, pname)] for every parameter, in a fixed order; key is 'layer/pname'."""
        return [(f"{l.name}/{p}", l, p) for l in self.order for p in sorted(l.params)]

    def num_params(self):
        return sum(l.param_count() for l in self.order)

    def state_dict(self):
        """Parameters as host NumPy arrays, keyed 'layer/param'."""
        return {k: l.device.to_numpy(l.params[p]).copy() for k, l, p in self.param_items()}

    def load_state_dict(self, state):
        """Set every parameter from ``state`` (key -> array): all of them must be there, with the model's shapes and
        finite values (NaN weights would train at chance level forever behind a ReLU). KeyError / ValueError."""
        arrays = {}
        for k, l, p in self.param_items():
            if k not in state:
                raise KeyError(f"checkpoint has no parameter '{k}'")
            a = np.asarray(state[k])
            if a.shape != tuple(l.params[p].shape):
                raise ValueError(f"parameter '{k}': checkpoint shape {a.shape} != model shape "
                                 f"{tuple(l.params[p].shape)}")
            if a.dtype.kind not in "fiu" or not np.isfinite(a).all():
                raise ValueError(f"parameter '{k}' has non-finite values (NaN or inf)" if a.dtype.kind in "fiu"
                                 else f"parameter '{k}' is not numeric (dtype {a.dtype})")
            arrays[k] = a
        for k, l, p in self.param_items():  # all checked: nothing is half loaded
            l.params[p] = l.device.asarray(arrays[k], self.dtype)

    # --- compute ---------------------------------------------------------------------------------------------
    def _fetch(self, acts, i, l):
        """Layer ``i``'s output on layer ``l``'s placement (copied once per placement and step)."""
        src = self.layers[i]
        if self.same_place(src, l):
            self._order(src, l)
            return acts[i]
        key = (i, l.tower, l.device)
        if key not in self._copies:
            self._copies[key] = self._copy(acts[i], src, l)
        return self._copies[key]

    def _gather(self, l, acts):
        """The input of layer ``l``: its inputs' activations on its device, joined along the first axis (images of
        one size channel-wise, else as flattened features) on its stream."""
        arrays = [self._fetch(acts, i, l) for i in l.inputs]
        if len(arrays) == 1:
            return arrays[0]
        for i, a in zip(l.inputs, arrays):
            _check_on(l, a, f"input '{i}'")
        if len(l.in_shape) != 3:
            n = arrays[0].shape[-1]
            arrays = [a.reshape(-1, n) for a in arrays]
        return ops.concat(l.device, arrays)

    def forward(self, x, labels=None, *, train=False, step=0, batch=None):
        """Run the net on a batch ``x`` (data layout, on the data layer's device). Returns probabilities; the logits
        they come from stay in ``net.logits``.

        ``batch=(B, first)``: ``x`` is images [first, first + N) of a training batch of B images (a data-parallel
        rank's shard): the dropout layers draw those images' part of the whole batch's masks, so the ranks together
        train with exactly the single-process masks. None: ``x`` is the whole batch."""
        d = self.data_layer
        exp = (*d.out_shape,)
        if tuple(x.shape[:-1]) != exp:
            raise ValueError(f"input batch has shape {tuple(x.shape)}, the data layer expects {exp + ('N',)}")
        if batch is not None:
            if (not isinstance(batch, (tuple, list)) or len(batch) != 2
                    or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in batch)):
                raise ValueError(f"batch must be a pair (B, first) of integers, got {batch!r}")
            B, first = (int(v) for v in batch)
            if not 0 <= first <= first + x.shape[-1] <= B:
                raise ValueError(f"batch = (B, first) = ({B}, {first}) must hold the input's {x.shape[-1]} images: "
                                 f"0 <= first and first + {x.shape[-1]} <= B")
            batch = (B, first)
        acts = {d.name: x}
        ctxs = {}
        self.exchange.reset(x.shape[-1])
        self._copies = {}
        self._fork()
        for l in self.order:
            if l is d:
                continue
            ctx = {"train": train}
            if l is self.cost_layer and labels is not None:
                ctx["labels"] = self._copy(labels, d, l)
            if train:
                ctx["seed"] = _seed32(self.seed, step, zlib.crc32(l.random_stream.encode()))
                ctx["batch"] = batch
            with self.on_placement(l):
                inp = self._gather(l, acts)
                acts[l.name] = l.forward(inp, ctx)
            if l is self.cost_layer:
                self.logits = inp  # evaluation ranks these: probabilities that underflowed to 0 tie
            ctxs[l.name] = ctx
        self.join()
        self._ctxs = ctxs
        self._copies = None
        self.loss = ctxs[self.cost_layer.name].get("loss")
        return acts[self.cost_layer.name]

    def backward(self, on_grads=None):
        """Gradients of (mean loss) for every parameter (``layer.grads``), from the last ``forward`` with labels.

        ``on_grads(layer)``: called for each layer with parameters as soon as its ``grads`` are complete (issued: on a
        GPU, on the layer's placement stream, which is current during the call), in backward order, while the rest of
        the backward is still to come (a data-parallel reducer starts reducing them there: convnet.distributed)."""
        if getattr(self, "_ctxs", None) is None or self.loss is None:
            raise RuntimeError("backward() needs a forward(x, labels) first")
        grads = {}
        # layer name -> {name: layer} whose stream's memory pool holds (part of) that layer's output gradient, read
        # on its own stream without a copy: that memory goes back to the lender's pool when freed, so the lender's
        # stream waits for the reads before its next allocation can reuse it (as GpuCopier does after a copy)
        lent = {}
        self._fork()
        for l in reversed(self.order):
            if isinstance(l, Data):
                continue
            dy = None if l is self.cost_layer else grads.pop(l.name)
            with self.on_placement(l):
                dx = l.backward(dy, self._ctxs[l.name])
                self._give_back(l, lent.pop(l.name, {}))
                if on_grads is not None and l.params:
                    on_grads(l)
                if dx is None or not l.needs_input_grad:
                    continue
                parts = self._split(l, dx)
            for i, part in zip(l.inputs, parts):
                src = self.layers[i]
                if not isinstance(src, Data):  # no gradient into the data; sums on the producer's device
                    part = self._copy(part, l, src)
                    if self.same_place(l, src) and self.stream_of(l) is not self.stream_of(src):
                        lent.setdefault(src.name, {})[l.name] = l
                    self._accumulate(grads, src, part, l, lent)
        self.join()
        self._ctxs = None

    def _give_back(self, reader, lenders):
        """The streams of ``lenders`` wait for the work issued so far on ``reader``'s (which read their memory)."""
        for lender in lenders.values():
            self._order(reader, lender)

    def _split(self, l, dx):
        """dx of layer ``l`` split back into one gradient per input, each shaped like that input's output."""
        if len(l.inputs) == 1:
            return [dx]
        if len(l.in_shape) == 3:  # images joined channel-wise; an fc layer's dx is (C*H*W, N)
            dx = dx.reshape(*l.in_shape, dx.shape[-1])
        parts = []
        off = 0
        for i in l.inputs:
            s = self.layers[i].out_shape
            size = s[0] if len(l.in_shape) == 3 else int(np.prod(s))
            parts.append(dx[off:off + size].reshape(*s, dx.shape[-1]))
            off += size
        return parts

    def _accumulate(self, grads, src, part, consumer, lent):
        """Add ``part`` (from layer ``consumer``, already on ``src``'s placement) to the gradient of layer ``src``'s
        output (a layer read by several consumers gets the sum, on its device and stream; the sum is ``src``'s own
        memory, so the streams that lent the addends get them back)."""
        _check_on(src, part, f"the gradient of its output from '{consumer.name}'")
        part = part.reshape(*src.out_shape, part.shape[-1])
        if src.name in grads:
            with self.on_placement(src):
                part = ops.add(src.device, grads[src.name], part)
            self._give_back(src, lent.pop(src.name, {}))
        grads[src.name] = part

    # --- report ----------------------------------------------------------------------------------------------
    def summary(self):
        """The layer table: type, output shape, parameters and FLOPs per layer (:mod:`convnet.summary`)."""
        return format_summary(self)

    def flops(self):
        return sum(l.flops() for l in self.order)


def _check_on(layer, a, what):
    """TypeError unless ``a`` is an array of ``layer``'s device (else a copy between placements is missing)."""
    if not layer.device.is_array(a):
        raise TypeError(f"layer '{layer.name}' on {layer.device}: {what} is a {layer.device.describe_array(a)}, "
                        f"not an array of {layer.device} (a copy between devices is missing)")


def _is_tower(device) -> bool:
    """A layer's device given as a tower index (an int), not as a device."""
    return isinstance(device, (int, np.integer)) and not isinstance(device, bool)
