"""The layer graph: a DAG of layers in definition (topological) order.

* A layer may take several inputs; they are joined along the first axis (channels for images of the same
  size — the two-tower join — else flattened features), and the gradient is split back.
* An output used by several layers receives the sum of their gradients.
* Every layer has a device (default: the net's). When a producer and a consumer live on different devices the
  graph copies the activation (forward) and the gradient (backward) between them (``_transfer``), so the
  two-tower split over ``cuda:0`` / ``cuda:1`` is a matter of setting ``layer.device``.
"""
from __future__ import annotations

import zlib

import numpy as np

from .devices import get_device
from .layers import Data, Layer, LayerError, SoftmaxCost


def _transfer(a, src, dst):
    """Copy array ``a`` from device ``src`` to ``dst`` (staged through the host; peer copies can come later)."""
    if src == dst:
        return a
    return dst.asarray(src.to_numpy(a))


def _seed32(*parts):
    """A 31-bit seed derived from integers (stable across runs and platforms)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) & 0x7FFFFFFF


class Net:
    """A network: ``Net(layers, device=..., dtype=..., seed=...)``.

    ``forward(x, labels=None, train=False, step=0)`` returns the probabilities ``(classes, N)``;
    with labels it also keeps the summed loss (``net.loss``, a 0-d device array) for ``backward()``.
    """

    def __init__(self, layers, *, device=None, dtype=np.float32, seed=0, name="net", source=None,
                 init_params=True):
        self.device = get_device(device)
        self.dtype = np.dtype(dtype)
        self.seed = int(seed)
        self.name = name
        self.source = source  # model-file text, when built from one (stored in checkpoints)
        self.layers = {}
        self._init_params = init_params
        for layer in layers:
            self._add(layer)
        self._build()

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

    def _build(self):
        datas = [l for l in self.layers.values() if isinstance(l, Data)]
        costs = [l for l in self.layers.values() if isinstance(l, SoftmaxCost)]
        if len(datas) != 1:
            raise LayerError(f"a net needs exactly one data layer, found {len(datas)}")
        if len(costs) != 1:
            raise LayerError(f"a net needs exactly one softmax (cost) layer, found {len(costs)}")
        self.data_layer, self.cost_layer = datas[0], costs[0]
        self.consumers = {n: [] for n in self.layers}
        for l in self.layers.values():
            for inp in l.inputs:
                self.consumers[inp].append(l.name)
        rng = np.random.default_rng(self.seed)
        for l in self.layers.values():
            if l.device is None:
                l.device = self.device
            else:
                l.device = get_device(l.device)
            if isinstance(l, Data):
                l.in_shape = None
                l.out_shape = l.output_shape()
                continue
            shapes = [self.layers[i].out_shape for i in l.inputs]
            l.in_shape = self._joined_shape(l, shapes)
            l.out_shape = tuple(int(s) for s in l.output_shape(l.in_shape))
            # no gradient is needed into the data layer
            l.needs_input_grad = not all(isinstance(self.layers[i], Data) for i in l.inputs)
            if l.learnable and self._init_params:
                host = l.init_params(rng, self.dtype)
                l.params = {k: l.device.asarray(v, self.dtype) for k, v in host.items()}
                l.grads = {}
        for name, cons in self.consumers.items():
            l = self.layers[name]
            if not cons and l is not self.cost_layer:
                raise LayerError(f"layer '{name}' feeds nothing (every layer must lead to the softmax layer)")
        self.num_classes = self.cost_layer.out_shape[0]
        self.order = list(self.layers.values())

    def _joined_shape(self, l, shapes):
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
        arrays = [_transfer(acts[i], self.layers[i].device, l.device) for i in l.inputs]
        if len(arrays) == 1:
            return arrays[0]
        xp = l.device.xp
        n = arrays[0].shape[-1]
        if len(l.in_shape) == 3:
            return xp.concatenate(arrays, axis=0)
        return xp.concatenate([a.reshape(-1, n) for a in arrays], axis=0)

    def forward(self, x, labels=None, *, train=False, step=0, keep=False):
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
                ctx["labels"] = _transfer(labels, d.device, l.device)
            if train:
                ctx["seed"] = _seed32(self.seed, step, idx)
            acts[l.name] = l.forward(self._gather(l, acts), ctx)
            ctxs[l.name] = ctx
            if not keep:
                # forget activations nobody needs any more (backward keeps its own references in ctx)
                pass
        self._ctxs = ctxs
        self._acts = acts if keep else None
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
            ctx = self._ctxs[l.name]
            if l is self.cost_layer:
                dy = None
            else:
                dy = grads.pop(l.name)
            dx = l.backward(dy, ctx)
            if dx is None or not l.needs_input_grad:
                continue
            self._scatter(l, dx, grads)
        self._ctxs = None

    def _scatter(self, l, dx, grads):
        parts = []
        if len(l.inputs) == 1:
            parts = [dx]
        else:
            off = 0
            for i in l.inputs:
                s = self.layers[i].out_shape
                size = s[0] if len(l.in_shape) == 3 else int(np.prod(s))
                part = dx[off:off + size]
                off += size
                parts.append(part.reshape(*s, dx.shape[-1]))
        for i, part in zip(l.inputs, parts):
            src = self.layers[i]
            if isinstance(src, Data):
                continue
            part = _transfer(part, l.device, src.device)
            part = part.reshape(*src.out_shape, part.shape[-1])
            if i in grads:
                grads[i] = grads[i] + part
            else:
                grads[i] = part

    # --- report ----------------------------------------------------------------------------------------------
    def summary(self):
        rows = [("layer", "type", "output (per image)", "params", "FLOPs/image")]
        tp = tf = 0
        for l in self.order:
            p, f = l.param_count(), l.flops()
            tp += p
            tf += f
            rows.append((l.name, l.describe(), "x".join(str(s) for s in l.out_shape), f"{p:,}", f"{f:,}"))
        rows.append(("total", "", "", f"{tp:,}", f"{tf:,}"))
        w = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(r)))
            if j == 0 or j == len(rows) - 2:
                lines.append("-" * len(lines[-1]))
        lines.append(f"{tp:,} parameters, {tf / 1e9:.3f} GFLOP per image forward "
                     f"(a multiply-add counts 2), device {self.device}")
        return "\n".join(lines)

    def flops(self):
        return sum(l.flops() for l in self.order)
