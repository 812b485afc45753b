"""The layer graph: a DAG of layers in definition (topological) order.

* A layer may take several inputs; they are joined along the first axis (channels for images of the same
  size — the two-tower join — else flattened features), and the gradient is split back.
* An output used by several layers receives the sum of their gradients.
* Every layer has a device (default: the net's). When a producer and a consumer live on different devices the
  graph copies the activation (forward) and the gradient (backward) between them
  (:func:`convnet.devices.transfer`), so the two-tower split over ``cuda:0`` / ``cuda:1`` is a matter of setting
  ``layer.device``. Every array a layer's step allocates (its forward and backward, the joins, the gradient sums)
  is made with that layer's device active.
"""
from __future__ import annotations

import zlib

import numpy as np

from .devices import get_device, transfer
from .layers import Data, Layer, LayerError, SoftmaxCost
from .summary import format_summary


def _seed32(*parts):
    """A 31-bit seed derived from integers (stable across runs and platforms)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) & 0x7FFFFFFF


class Net:
    """A network: ``Net(layers, device=..., dtype=..., seed=...)``.

    ``forward(x, labels=None, train=False, step=0)`` returns the probabilities ``(classes, N)``;
    with labels it also keeps the summed loss (``net.loss``, a 0-d device array) for ``backward()``.
    ``init_params=False`` infers the shapes only (no parameters: for summaries of big models).
    """

    def __init__(self, layers, *, device=None, dtype=np.float32, seed=0, name="net", source=None,
                 init_params=True):
        self.device = get_device(device)
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
        for l in self.order:
            l.device = self.device if l.device is None else get_device(l.device)

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
        for k, l, p in self.param_items():
            if k not in state:
                raise KeyError(f"checkpoint has no parameter '{k}'")
            a = np.asarray(state[k])
            if a.shape != tuple(l.params[p].shape):
                raise ValueError(f"parameter '{k}': checkpoint shape {a.shape} != model shape "
                                 f"{tuple(l.params[p].shape)}")
            l.params[p] = l.device.asarray(a, self.dtype)

    # --- compute ---------------------------------------------------------------------------------------------
    def _gather(self, l, acts):
        """The input of layer ``l``: its inputs' activations on its device, joined along the first axis."""
        arrays = [transfer(acts[i], self.layers[i].device, l.device) for i in l.inputs]
        if len(arrays) == 1:
            return arrays[0]
        xp = l.device.xp
        n = arrays[0].shape[-1]
        if len(l.in_shape) == 3:
            return xp.concatenate(arrays, axis=0)
        return xp.concatenate([a.reshape(-1, n) for a in arrays], axis=0)

    def forward(self, x, labels=None, *, train=False, step=0):
        """Run the net on a batch ``x`` (data layout, on the data layer's device). Returns probabilities."""
        d = self.data_layer
        exp = (*d.out_shape,)
        if tuple(x.shape[:-1]) != exp:
            raise ValueError(f"input batch has shape {tuple(x.shape)}, the data layer expects {exp + ('N',)}")
        acts = {d.name: x}
        ctxs = {}
        for idx, l in enumerate(self.order):
            if l is d:
                continue
            ctx = {"train": train}
            if l is self.cost_layer and labels is not None:
                ctx["labels"] = transfer(labels, d.device, l.device)
            if train:
                ctx["seed"] = _seed32(self.seed, step, idx)
            with l.device.activate():
                acts[l.name] = l.forward(self._gather(l, acts), ctx)
            ctxs[l.name] = ctx
        self._ctxs = ctxs
        self.loss = ctxs[self.cost_layer.name].get("loss")
        return acts[self.cost_layer.name]

    def backward(self):
        """Gradients of (mean loss) for every parameter (``layer.grads``), from the last ``forward`` with labels."""
        if getattr(self, "_ctxs", None) is None or self.loss is None:
            raise RuntimeError("backward() needs a forward(x, labels) first")
        grads = {}
        for l in reversed(self.order):
            if isinstance(l, Data):
                continue
            dy = None if l is self.cost_layer else grads.pop(l.name)
            with l.device.activate():
                dx = l.backward(dy, self._ctxs[l.name])
                if dx is None or not l.needs_input_grad:
                    continue
                parts = self._split(l, dx)
            for i, part in zip(l.inputs, parts):
                src = self.layers[i]
                if not isinstance(src, Data):  # no gradient into the data
                    self._accumulate(grads, src, transfer(part, l.device, src.device))
        self._ctxs = None

    def _split(self, l, dx):
        """dx of layer ``l`` split back into one gradient per input, each shaped like that input's output."""
        if len(l.inputs) == 1:
            return [dx]
        parts = []
        off = 0
        for i in l.inputs:
            s = self.layers[i].out_shape
            size = s[0] if len(l.in_shape) == 3 else int(np.prod(s))
            parts.append(dx[off:off + size].reshape(*s, dx.shape[-1]))
            off += size
        return parts

    @staticmethod
    def _accumulate(grads, src, part):
        """Add ``part`` to the gradient of layer ``src``'s output (a layer read by several consumers gets the sum)."""
        with src.device.activate():
            part = part.reshape(*src.out_shape, part.shape[-1])
            grads[src.name] = grads[src.name] + part if src.name in grads else part

    # --- report ----------------------------------------------------------------------------------------------
    def summary(self):
        """The layer table: type, output shape, parameters and FLOPs per layer (:mod:`convnet.summary`)."""
        return format_summary(self)

    def flops(self):
        return sum(l.flops() for l in self.order)
