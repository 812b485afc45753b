"""The layer graph (a DAG of layers in definition order): docs/architecture.md, "Towers" and "Streams and events"."""
from __future__ import annotations

import numbers
import warnings
import zlib

import numpy as np

from . import ops
from .layers import Data, Dropout, Layer, LayerError, ModelWarning, SoftmaxCost, stored
from .placement import Placements, check_on, resolve_devices
from .reference.precision import PRECISIONS
from .reference.storage import BFLOAT16
from .summary import format_summary

# what each precision still lacks (a precision listed here is refused with this reason, on every device)
MISSING = {}


def resolve_precision(precision, devices, check_devices=True) -> str:
    """The precision of a net's conv and fc multiplications: ``precision`` ("fp32", "tf32", "bf16") checked against
    every device of the net (``check_devices``), or None: its default, tf32 when every device is a GPU with tensor
    cores (``Device.default_precision``), else fp32. A ValueError names what is wrong."""
    if precision is None:
        if not check_devices:
            return "fp32"
        return "tf32" if devices and all(d.default_precision == "tf32" for d in devices) else "fp32"
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision in MISSING:
        raise ValueError(f"precision {precision} is not available: {MISSING[precision]}")
    if check_devices:
        for d in devices:
            if precision not in d.precisions:
                raise ValueError(f"precision {precision} is not supported on {d} (it runs "
                                 f"{', '.join(d.precisions)}): {precision} needs a GPU of compute capability 8.0 or "
                                 f"newer (tensor cores)")
    return precision


def _seed32(*parts):
    """A 31-bit seed derived from integers (stable across runs and platforms)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) & 0x7FFFFFFF


class Net:
    """A network: ``Net(layers, device=..., devices=..., dtype=..., seed=...)``.

    ``devices``: the devices of the towers (a list of devices or names, or ``"cuda:0,cuda:1"``): a layer with
    ``device=i`` (an int) runs on ``devices[i]``. Default: every tower on ``device``; when only ``devices`` is given,
    ``device`` (the net's device: layers without a device, and tower 0) is ``devices[0]``.

    ``forward(x, labels=None, train=False, step=0, batch=None)`` returns the probabilities ``(classes, N)``;
    with labels it also keeps the summed loss (``net.loss``, a 0-d device array) for ``backward()``.
    ``init_params=False`` infers the shapes only (no parameters: for summaries of big models).
    ``precision``: of the conv and fc layers' multiplications (forward and both backward passes), "fp32" (the
    default here), "tf32", or None: the devices' default (:func:`resolve_precision`; what ``convnet.train`` uses when
    no precision is asked for); parameters and activations stay in ``dtype`` (float32). "bf16" (``dtype`` float32
    only): every layer's output and its gradient are stored in bfloat16 (``Layer.bf16_output``: all but the data
    layer's images and the softmax layer's probabilities), the conv and fc layers multiply bfloat16 values with FP32
    sums, parameters, their gradients and the loss stay float32. A layer whose ops have no bfloat16 variant
    (``Layer.bf16_native`` False: rnorm, cnorm, local, neurons other than ReLU, eltsum, ...) runs in float32 between
    conversions at its boundary (:meth:`_storage`).
    """

    def __init__(self, layers, *, device=None, devices=None, dtype=np.float32, seed=0, name="net", source=None,
                 init_params=True, precision="fp32"):
        try:  # a shapes-only net (summaries) may name devices this machine cannot use
            self.device, towers = resolve_devices(device, devices, usable=init_params)
        except ValueError as e:
            raise LayerError(str(e)) from None
        self.dtype = np.dtype(dtype)
        self.seed = int(seed)
        self.name = name
        self.source = source  # model-file text, when built from one (stored in checkpoints)
        self.layers = {}
        for layer in layers:
            self._add(layer)
        self._build(towers, init_params)
        try:
            self.precision = resolve_precision(precision, sorted({l.device for l in self.order}, key=str),
                                               check_devices=init_params)
        except ValueError as e:
            raise LayerError(str(e)) from None
        if self.precision == "bf16" and self.dtype != np.float32:
            raise LayerError(f"precision bf16 needs dtype float32 (FP32 parameters and sums), got {self.dtype}")

    def _storage(self, layer, a, role="output", device=None):
        """In bf16, ``a`` (a layer's output, or the gradient of it: ``role`` "output") in the dtype the layer's
        outputs are stored in, bfloat16 unless ``bf16_output`` is False; ``role`` "input": an input (or the output
        gradient) of a layer that does not run on bfloat16, in float32. Converted on ``device`` (the one ``a`` is on:
        None, the layer's) and its current stream. Other precisions: ``a`` as it is."""
        if self.precision != "bf16" or a is None:
            return a
        device = device or layer.device
        if role == "input":
            return a if layer.bf16_native() else stored(device, a, self.dtype)
        return stored(device, a, BFLOAT16 if layer.bf16_output else self.dtype)

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

    def _build(self, towers, init_params):
        self.order = list(self.layers.values())
        self.data_layer, self.cost_layer = self._ends()
        self.consumers = self._consumer_map()
        self.placements = Placements(self, towers, usable=init_params)  # each layer's tower and device
        self.devices = self.placements.devices
        self.exchange = self.placements.exchange  # the bytes copied between placements in the last step
        self._infer_shapes()
        _check_mask_streams(self.order, self.layers)
        if init_params:
            self._init_params(np.random.default_rng(self.seed))
        self._check_reachable()
        self._fuse_relu_backward()
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

    def _infer_shapes(self):
        for l in self.order:
            if isinstance(l, Data):
                l.in_shape = None
                l.out_shape = l.output_shape()
                continue
            l.in_shape = _joined_shape([self.layers[i].out_shape for i in l.inputs])
            if hasattr(l, "input_shapes"):  # an element-wise join checks its inputs' own shapes
                l.input_shapes = [tuple(self.layers[i].out_shape) for i in l.inputs]
            l.out_shape = tuple(int(s) for s in l.output_shape(l.in_shape))
            # no gradient is needed into the data layer
            l.needs_input_grad = not all(isinstance(self.layers[i], Data) for i in l.inputs)

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

    def _fuse_relu_backward(self):
        """A ReLU's output read by one layer only, which can apply the ReLU's mask in its own backward (a max pool:
        its gradient kept where its input > 0): that layer does it (``relu_input``) and the producer skips its ReLU
        backward (``relu_grad_fused``), one pass over the activations less, the same bits (the mask is the one
        ``relu_backward`` applies, on the same values: the consumer's input is the ReLU's output)."""
        for l in self.order:
            l.relu_input = l.relu_grad_fused = False
        for l in self.order:
            if len(l.inputs) != 1 or not l.applies_relu_mask():
                continue
            src = self.layers[l.inputs[0]]
            if src.relu_output() and self.consumers[src.name] == [l.name]:
                l.relu_input = src.relu_grad_fused = True

    def exchange_plan(self, images=1, label_bytes=4):
        """{"src->dst": bytes} one training step of ``images`` images copies between placements, from the shapes
        alone (:meth:`convnet.placement.Placements.exchange_plan`)."""
        return self.placements.exchange_plan(images, label_bytes)

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
    def _gather(self, l, acts):
        """The input of layer ``l``: its inputs' activations on its device, joined along the first axis (images of
        one size channel-wise, else as flattened features) on its stream."""
        arrays = [self.placements.fetch(acts, i, l) for i in l.inputs]
        if len(arrays) == 1:
            return arrays[0]
        for i, a in zip(l.inputs, arrays):
            check_on(l, a, f"input '{i}'")
        if len(l.in_shape) != 3:
            n = arrays[0].shape[-1]
            arrays = [a.reshape(-1, n) for a in arrays]
        if self.precision == "bf16":  # joined in float32 (exact; the images may be among them)
            arrays = [stored(l.device, a, self.dtype) for a in arrays]
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
            batch = _batch_part(batch, x.shape[-1])
        acts = {d.name: x}
        ctxs = {}
        self.exchange.reset(x.shape[-1])
        self.placements.fork()
        for l in self.order:
            if l is d:
                continue
            ctx = {"train": train, "precision": self.precision}
            if l is self.cost_layer and labels is not None:
                ctx["labels"] = self.placements.copy(labels, d, l)
            if train:
                ctx["seed"] = _seed32(self.seed, step, zlib.crc32(l.random_stream.encode()))
                ctx["batch"] = batch
            with self.placements.on(l):
                inp = self._storage(l, self._gather(l, acts), "input")
                acts[l.name] = self._storage(l, l.forward(inp, ctx))
            if l is self.cost_layer:
                self.logits = inp  # evaluation ranks these: probabilities that underflowed to 0 tie
            ctxs[l.name] = ctx
        self.placements.join()
        self._ctxs = ctxs
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
        self.placements.fork()
        for l in reversed(self.order):
            if isinstance(l, Data):
                continue
            dy = None if l is self.cost_layer else grads.pop(l.name)
            with self.placements.on(l):
                dy = self._storage(l, self._storage(l, dy), "input")  # a sum of several consumers' is float32
                dx = l.backward(dy, self._ctxs[l.name])
                self.placements.give_back(l, lent.pop(l.name, {}))
                if on_grads is not None and l.params:
                    on_grads(l)
                if dx is None or not l.needs_input_grad:
                    continue
                # bf16: each part in its producer's storage dtype, converted on this layer's stream
                parts = [part if isinstance(self.layers[i], Data) else self._storage(self.layers[i], part,
                                                                                      device=l.device)
                         for i, part in zip(l.inputs, self._split(l, dx))]
            for i, part in zip(l.inputs, parts):
                src = self.layers[i]
                if not isinstance(src, Data):  # no gradient into the data; sums on the producer's device
                    part = self.placements.copy(part, l, src)
                    if self.placements.same_place(l, src) and not self.placements.same_stream(l, src):
                        lent.setdefault(src.name, {})[l.name] = l
                    self._accumulate(grads, src, part, l, lent)
        self.placements.join()
        self._ctxs = None

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
        check_on(src, part, f"the gradient of its output from '{consumer.name}'")
        part = part.reshape(*src.out_shape, part.shape[-1])
        if src.name in grads:
            with self.placements.on(src):  # bf16: the parts are summed in float32
                part = ops.add(src.device, *(stored(src.device, a, self.dtype) if self.precision == "bf16" else a
                                             for a in (grads[src.name], part)))
            self.placements.give_back(src, lent.pop(src.name, {}))
        grads[src.name] = part

    # --- report ----------------------------------------------------------------------------------------------
    def summary(self):
        """The layer table: type, output shape, parameters and FLOPs per layer (:mod:`convnet.summary`)."""
        return format_summary(self)

    def flops(self):
        return sum(l.flops() for l in self.order)


def _check_mask_streams(order, names):
    """Dropout layers sharing a mask stream (``maskOf``) must draw disjoint units of the same per-unit shape: an
    overlap would give two layers the same mask, a shape mismatch would pair units with the wrong elements."""
    streams = {}
    for l in order:
        if isinstance(l, Dropout):
            streams.setdefault(l.random_stream, []).append(l)
    for stream, sharing in streams.items():
        if len(sharing) == 1 and stream not in names:  # a typo, or a part of another net's layer
            l = sharing[0]
            first, stop = l.mask_units()
            warnings.warn(f"layer '{l.name}': maskOf = {stream} names no layer of this net and no other dropout "
                          f"layer shares it: it draws units {first}-{stop - 1} of another net's layer {stream} "
                          f"(check the name, or remove maskOf)", ModelWarning, stacklevel=2)
        sharing.sort(key=lambda l: l.mask_start)
        for a, b in zip(sharing, sharing[1:]):
            if a.out_shape[1:] != b.out_shape[1:]:
                raise LayerError(f"layers '{a.name}' and '{b.name}' share the dropout mask '{stream}' but their "
                                 f"units differ in shape ({a.out_shape[1:]} vs {b.out_shape[1:]})")
            if b.mask_start < a.mask_units()[1]:
                first, stop = a.mask_units()
                raise LayerError(f"layers '{a.name}' (units {first}-{stop - 1}) and '{b.name}' (from unit "
                                 f"{b.mask_start}) overlap in the dropout mask '{stream}': they would draw the "
                                 f"same mask (give maskStart = {stop} or more, or another maskOf)")


def _joined_shape(shapes):
    """The input shape of a layer reading outputs of ``shapes``: images of one size joined channel-wise, else flattened
    features."""
    if len(shapes) == 1:
        return tuple(shapes[0])
    if all(len(s) == 3 for s in shapes) and len({tuple(s[1:]) for s in shapes}) == 1:
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return (sum(int(np.prod(s)) for s in shapes),)


def _batch_part(batch, n):
    """``batch`` checked as (B, first): a pair of integers placing ``n`` images inside a batch of B."""
    if (not isinstance(batch, (tuple, list)) or len(batch) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in batch)):
        raise ValueError(f"batch must be a pair (B, first) of integers, got {batch!r}")
    B, first = (int(v) for v in batch)
    if not 0 <= first <= first + n <= B:
        raise ValueError(f"batch = (B, first) = ({B}, {first}) must hold the input's {n} images: "
                         f"0 <= first and first + {n} <= B")
    return B, first
