"""Layers of a convnet graph.

Every layer works on one device (``layer.device``, a :class:`convnet.devices.Device`) and calls only the public op
API (``convnet.ops``), so the same layer code runs on numpy, emu and cuda. Activations follow the layout contract
(docs/architecture.md): conv-side tensors are ``(C, H, W, N)``, fully-connected ones ``(features, N)``, logits
``(classes, N)``.

Shapes handled here are per-image shapes without the batch axis: ``(C, H, W)`` or ``(features,)``.

A layer with several inputs sees their concatenation along the first (channel / feature) axis: inputs of the same
spatial size are joined channel-wise (the two-tower join), otherwise every input is flattened and the features are
joined. The graph (:mod:`convnet.graph`) does the joining, the splitting of the gradient and the copies between
devices; a layer only sees one ``x``.
"""
from __future__ import annotations

import math

import numpy as np

from . import ops


class LayerError(ValueError):
    """A layer definition that cannot be built (bad parameter, shape mismatch, ...)."""


def _pair(v):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise LayerError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _positive(layer, what, v, allow_zero=False):
    for x in (v if isinstance(v, tuple) else (v,)):
        if x < 0 or (x == 0 and not allow_zero):
            raise LayerError(f"layer '{layer}': {what} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


class Layer:
    """Base class. Subclasses set ``type`` and implement ``output_shape``, ``forward``, ``backward``.

    Learnable layers own ``params`` (name -> device array) and ``grads`` (same names), plus per-parameter
    learning-rate and weight-decay multipliers (``lr_mult``, ``wd_mult``) and an initialisation (``init``).
    """

    type = "layer"
    learnable = False

    def __init__(self, name, inputs=(), *, device=None):
        if not name or not isinstance(name, str):
            raise LayerError(f"layer name must be a non-empty string, got {name!r}")
        self.name = name
        if isinstance(inputs, str):
            inputs = [s.strip() for s in inputs.split(",") if s.strip()]
        self.inputs = list(inputs)
        self.device = device  # None = the net's device
        self.params = {}
        self.grads = {}
        self.lr_mult = {}
        self.wd_mult = {}
        self.in_shape = None
        self.out_shape = None
        self.needs_input_grad = True

    # --- shape inference -----------------------------------------------------------------------------------
    def output_shape(self, in_shape):
        return tuple(in_shape)

    def init_params(self, rng, dtype):
        """Allocate and initialise parameters (on the host); the net moves them to the device."""
        return {}

    def flops(self):
        """Forward floating-point operations per image (a multiply-add counts 2)."""
        return 0

    def param_count(self):
        return int(sum(np.prod(s) for s in self.param_shapes().values()))

    def param_shapes(self):
        return {}

    # --- compute ---------------------------------------------------------------------------------------------
    def forward(self, x, ctx):
        """Return y. ``ctx`` is a dict the layer may keep state in for its backward (the graph passes it back)."""
        raise NotImplementedError

    def backward(self, dy, ctx):
        """Fill ``self.grads``; return dx (or None when ``needs_input_grad`` is False)."""
        raise NotImplementedError

    def describe(self):
        return self.type

    def config(self):
        """The layer's definition as model-file keys (strings)."""
        d = {"type": self.type}
        if self.inputs:
            d["inputs"] = ",".join(self.inputs)
        return d

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} {self.describe()}>"


def _gaussian(rng, shape, std, dtype):
    dtype = np.dtype(dtype)
    g = rng.standard_normal(shape, dtype=dtype if dtype in (np.float32, np.float64) else np.float64)
    g *= g.dtype.type(std)
    return g.astype(dtype, copy=False)


def _conv_out(h, k, s, p):
    return (h + 2 * p - k) // s + 1


class _Learnable(Layer):
    learnable = True

    def __init__(self, name, inputs, *, init_w=0.01, init_b=0.0, lr_w=1.0, lr_b=1.0, wd_w=1.0, wd_b=0.0,
                 neuron=None, device=None):
        super().__init__(name, inputs, device=device)
        if neuron in (None, "", "linear", "ident"):
            neuron = None
        elif neuron != "relu":
            raise LayerError(f"layer '{name}': neuron must be 'relu' or 'linear', got {neuron!r}")
        self.neuron = neuron
        if not (isinstance(init_w, str) and init_w in ("he", "xavier")):
            try:
                init_w = float(init_w)
            except (TypeError, ValueError):
                raise LayerError(f"layer '{name}': initW must be a number (the Gaussian std) or 'he' / 'xavier', "
                                 f"got {init_w!r}") from None
            if init_w < 0:
                raise LayerError(f"layer '{name}': initW must be >= 0, got {init_w}")
        self.init_w = init_w
        self.init_b = float(init_b)
        self.lr_mult = {"w": float(lr_w), "b": float(lr_b)}
        self.wd_mult = {"w": float(wd_w), "b": float(wd_b)}

    def _neuron_forward(self, y, ctx):
        if self.neuron == "relu":
            y = ops.relu_forward(self.device, y)
            ctx["y"] = y
        return y

    def _neuron_backward(self, dy, ctx):
        if self.neuron == "relu":
            return ops.relu_backward(self.device, ctx["y"], dy)
        return dy

    def _neuron_flops(self):
        return int(np.prod(self.out_shape)) if self.neuron else 0

    def _std(self, fan_in, fan_out):
        if self.init_w == "he":
            return math.sqrt(2.0 / fan_in)
        if self.init_w == "xavier":
            return math.sqrt(2.0 / (fan_in + fan_out))
        return self.init_w

    def config(self):
        d = super().config()
        d.update(initW=str(self.init_w), initB=str(self.init_b), lrW=str(self.lr_mult["w"]),
                 lrB=str(self.lr_mult["b"]), wdW=str(self.wd_mult["w"]), wdB=str(self.wd_mult["b"]))
        if self.neuron:
            d["neuron"] = self.neuron
        return d


class Data(Layer):
    """The input images, ``(channels, size, size, N)``. ``scale`` multiplies the mean-subtracted pixels."""

    type = "data"

    def __init__(self, name="data", *, channels, size, scale=1.0, device=None):
        super().__init__(name, (), device=device)
        self.channels = int(channels)
        self.size = _pair(size)
        self.scale = float(scale)
        _positive(name, "channels", self.channels)
        _positive(name, "size", self.size)

    def output_shape(self, in_shape=None):
        return (self.channels, *self.size)

    def describe(self):
        return f"data {self.channels}x{self.size[0]}x{self.size[1]}"

    def config(self):
        d = super().config()
        d.update(channels=str(self.channels), size=str(self.size[0]) if self.size[0] == self.size[1]
                 else f"{self.size[0]},{self.size[1]}", scale=repr(self.scale))
        return d


class Conv(_Learnable):
    type = "conv"

    def __init__(self, name, inputs, *, filters, size, stride=1, padding=0, groups=1, **kw):
        super().__init__(name, inputs, **kw)
        self.filters = int(filters)
        self.size = _pair(size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.groups = int(groups)
        _positive(name, "filters", self.filters)
        _positive(name, "size", self.size)
        _positive(name, "stride", self.stride)
        _positive(name, "padding", self.padding, allow_zero=True)
        _positive(name, "groups", self.groups)
        if self.filters % self.groups:
            raise LayerError(f"layer '{name}': filters={self.filters} is not divisible by groups={self.groups}")

    def output_shape(self, in_shape):
        if len(in_shape) != 3:
            raise LayerError(f"layer '{self.name}': conv needs an image input (C, H, W), got shape {in_shape}")
        c, h, w = in_shape
        if c % self.groups:
            raise LayerError(f"layer '{self.name}': {c} input channels are not divisible by groups={self.groups}")
        oh = _conv_out(h, self.size[0], self.stride[0], self.padding[0])
        ow = _conv_out(w, self.size[1], self.stride[1], self.padding[1])
        if oh <= 0 or ow <= 0:
            raise LayerError(f"layer '{self.name}': a {self.size[0]}x{self.size[1]} filter with padding "
                             f"{self.padding} does not fit a {h}x{w} input")
        return (self.filters, oh, ow)

    def param_shapes(self):
        c = self.in_shape[0] // self.groups
        return {"w": (c, *self.size, self.filters), "b": (self.filters,)}

    def init_params(self, rng, dtype):
        c = self.in_shape[0] // self.groups
        fan_in = c * self.size[0] * self.size[1]
        std = self._std(fan_in, self.filters // self.groups * self.size[0] * self.size[1])
        w = _gaussian(rng, self.param_shapes()["w"], std, dtype)
        b = np.full((self.filters,), self.init_b, dtype)
        return {"w": w, "b": b}

    def flops(self):
        f, oh, ow = self.out_shape
        c = self.in_shape[0] // self.groups
        return 2 * f * oh * ow * c * self.size[0] * self.size[1] + f * oh * ow + self._neuron_flops()

    def _geom(self):
        return dict(stride=self.stride, padding=self.padding, groups=self.groups)

    def forward(self, x, ctx):
        ctx["x"] = x
        y = ops.conv_forward(self.device, x, self.params["w"], self.params["b"], **self._geom())
        return self._neuron_forward(y, ctx)

    def backward(self, dy, ctx):
        dy = self._neuron_backward(dy, ctx)
        x = ctx["x"]
        self.grads["w"] = ops.conv_backward_filter(self.device, x, dy, self.size, **self._geom())
        self.grads["b"] = ops.conv_backward_bias(self.device, dy)
        if not self.needs_input_grad:
            return None
        return ops.conv_backward_data(self.device, dy, self.params["w"], x.shape[1:3], **self._geom())

    def describe(self):
        g = f" groups {self.groups}" if self.groups > 1 else ""
        n = f" {self.neuron}" if self.neuron else ""
        return (f"conv {self.filters} {self.size[0]}x{self.size[1]}/{self.stride[0]} pad {self.padding[0]}{g}{n}")

    def config(self):
        d = super().config()
        d.update(filters=str(self.filters), size=str(self.size[0]), stride=str(self.stride[0]),
                 padding=str(self.padding[0]), groups=str(self.groups))
        return d


class FC(_Learnable):
    type = "fc"

    def __init__(self, name, inputs, *, outputs, **kw):
        super().__init__(name, inputs, **kw)
        self.outputs = int(outputs)
        _positive(name, "outputs", self.outputs)

    def output_shape(self, in_shape):
        return (self.outputs,)

    def param_shapes(self):
        return {"w": (self.outputs, int(np.prod(self.in_shape))), "b": (self.outputs,)}

    def init_params(self, rng, dtype):
        fan_in = int(np.prod(self.in_shape))
        std = self._std(fan_in, self.outputs)
        w = _gaussian(rng, (self.outputs, fan_in), std, dtype)
        return {"w": w, "b": np.full((self.outputs,), self.init_b, dtype)}

    def flops(self):
        return 2 * self.outputs * int(np.prod(self.in_shape)) + self.outputs + self._neuron_flops()

    def forward(self, x, ctx):
        x = x.reshape(-1, x.shape[-1])  # (C,H,W,N) -> (CHW, N): free for C-contiguous CHWN
        ctx["x"] = x
        y = ops.fc_forward(self.device, x, self.params["w"], self.params["b"])
        return self._neuron_forward(y, ctx)

    def backward(self, dy, ctx):
        dy = self._neuron_backward(dy, ctx)
        x = ctx["x"]
        self.grads["w"] = ops.fc_backward_weights(self.device, x, dy)
        self.grads["b"] = ops.fc_backward_bias(self.device, dy)
        if not self.needs_input_grad:
            return None
        return ops.fc_backward_data(self.device, dy, self.params["w"])

    def describe(self):
        return f"fc {self.outputs}" + (f" {self.neuron}" if self.neuron else "")

    def config(self):
        d = super().config()
        d["outputs"] = str(self.outputs)
        return d


class ReLU(Layer):
    type = "relu"

    def flops(self):
        return int(np.prod(self.out_shape))

    def forward(self, x, ctx):
        y = ops.relu_forward(self.device, x)
        ctx["y"] = y
        return y

    def backward(self, dy, ctx):
        return ops.relu_backward(self.device, ctx["y"], dy)


class Pool(Layer):
    type = "pool"

    def __init__(self, name, inputs, *, pool="max", size=3, stride=2, padding=0, device=None):
        super().__init__(name, inputs, device=device)
        if pool not in ("max", "avg"):
            raise LayerError(f"layer '{name}': pool must be 'max' or 'avg', got {pool!r}")
        self.mode = pool
        self.size = _pair(size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        _positive(name, "size", self.size)
        _positive(name, "stride", self.stride)
        _positive(name, "padding", self.padding, allow_zero=True)

    def output_shape(self, in_shape):
        if len(in_shape) != 3:
            raise LayerError(f"layer '{self.name}': pool needs an image input (C, H, W), got shape {in_shape}")
        c, h, w = in_shape
        if any(p > k // 2 for p, k in zip(self.padding, self.size)):
            raise LayerError(f"layer '{self.name}': pool padding {self.padding} must be at most half the window "
                             f"{self.size}")
        oh = _conv_out(h, self.size[0], self.stride[0], self.padding[0])
        ow = _conv_out(w, self.size[1], self.stride[1], self.padding[1])
        if oh <= 0 or ow <= 0:
            raise LayerError(f"layer '{self.name}': a {self.size[0]}x{self.size[1]} pool does not fit a "
                             f"{h}x{w} input")
        return (c, oh, ow)

    def flops(self):
        return int(np.prod(self.out_shape)) * self.size[0] * self.size[1]

    def _geom(self):
        return dict(mode=self.mode, window=self.size, stride=self.stride, padding=self.padding)

    def forward(self, x, ctx):
        y = ops.pool_forward(self.device, x, **self._geom())
        ctx["x"], ctx["y"] = x, y
        return y

    def backward(self, dy, ctx):
        return ops.pool_backward(self.device, ctx["x"], ctx["y"], dy, **self._geom())

    def describe(self):
        return f"{self.mode}pool {self.size[0]}x{self.size[1]}/{self.stride[0]}"

    def config(self):
        d = super().config()
        d.update(pool=self.mode, size=str(self.size[0]), stride=str(self.stride[0]), padding=str(self.padding[0]))
        return d


class LRN(Layer):
    """Cross-map local response normalisation. With ``groups`` > 1 the channels are normalised per group (the
    window never crosses a tower boundary), as in the two-tower AlexNet."""

    type = "lrn"

    def __init__(self, name, inputs, *, size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum", groups=1,
                 device=None):
        super().__init__(name, inputs, device=device)
        if convention not in ("sum", "mean"):
            raise LayerError(f"layer '{name}': convention must be 'sum' or 'mean', got {convention!r}")
        self.size = int(size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)
        self.convention = convention
        self.groups = int(groups)
        _positive(name, "size", self.size)
        _positive(name, "groups", self.groups)

    def output_shape(self, in_shape):
        if len(in_shape) != 3:
            raise LayerError(f"layer '{self.name}': lrn needs an image input (C, H, W), got shape {in_shape}")
        if in_shape[0] % self.groups:
            raise LayerError(f"layer '{self.name}': {in_shape[0]} channels not divisible by groups={self.groups}")
        return tuple(in_shape)

    def flops(self):
        return int(np.prod(self.out_shape)) * (self.size + 6)

    def _p(self):
        return dict(size=self.size, alpha=self.alpha, beta=self.beta, k=self.k, convention=self.convention)

    def forward(self, x, ctx):
        ctx["x"] = x
        if self.groups == 1:
            y, denom = ops.lrn_forward(self.device, x, **self._p())
            ctx["y"], ctx["denom"] = y, denom
            return y
        cg = x.shape[0] // self.groups
        xp = self.device.xp
        y = xp.empty_like(x)
        denom = xp.empty_like(x)
        for g in range(self.groups):
            s = slice(g * cg, (g + 1) * cg)  # a slice along the first axis of a C-contiguous array is contiguous
            yg, dg = ops.lrn_forward(self.device, x[s], **self._p())
            y[s], denom[s] = yg, dg
        ctx["y"], ctx["denom"] = y, denom
        return y

    def backward(self, dy, ctx):
        x, y, denom = ctx["x"], ctx["y"], ctx["denom"]
        if self.groups == 1:
            return ops.lrn_backward(self.device, x, y, denom, dy, **self._p())
        cg = x.shape[0] // self.groups
        dx = self.device.xp.empty_like(x)
        for g in range(self.groups):
            s = slice(g * cg, (g + 1) * cg)
            dx[s] = ops.lrn_backward(self.device, x[s], y[s], denom[s], dy[s], **self._p())
        return dx

    def describe(self):
        g = f" groups {self.groups}" if self.groups > 1 else ""
        return f"lrn {self.size} a={self.alpha:g} b={self.beta:g} k={self.k:g} ({self.convention}){g}"

    def config(self):
        d = super().config()
        d.update(size=str(self.size), alpha=repr(self.alpha), beta=repr(self.beta), k=repr(self.k),
                 convention=self.convention, groups=str(self.groups))
        return d


class Dropout(Layer):
    """Inverted dropout (outputs scaled by 1/keep in training, identity at test time, which equals the paper's
    'multiply by 0.5 at test time'). The mask comes from the counter-based RNG keyed on (seed, offset), so the
    backward regenerates it and a resumed run draws the same masks."""

    type = "dropout"

    def __init__(self, name, inputs, *, keep=0.5, device=None):
        super().__init__(name, inputs, device=device)
        self.keep = float(keep)
        if not 0.0 < self.keep <= 1.0:
            raise LayerError(f"layer '{name}': keep must be in (0, 1], got {keep}")

    def forward(self, x, ctx):
        if not ctx.get("train") or self.keep == 1.0:
            ctx["active"] = False
            return x
        ctx["active"] = True
        return ops.dropout_forward(self.device, x, self.keep, ctx["seed"], 0)

    def backward(self, dy, ctx):
        if not ctx["active"]:
            return dy
        return ops.dropout_backward(self.device, dy, self.keep, ctx["seed"], 0)

    def describe(self):
        return f"dropout keep {self.keep:g}"

    def config(self):
        d = super().config()
        d["keep"] = repr(self.keep)
        return d


class SoftmaxCost(Layer):
    """Softmax + multinomial logistic regression cost (cross-entropy) on ``(classes, N)`` logits.

    ``forward`` returns the probabilities and stores the summed loss in ``ctx['loss']`` (a 0-d device array) when
    labels are given. The gradient is the paper's: the average over the batch of d(-log p)/d logits, times
    ``coeff``."""

    type = "softmax"

    def __init__(self, name, inputs, *, coeff=1.0, device=None):
        super().__init__(name, inputs, device=device)
        self.coeff = float(coeff)

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise LayerError(f"layer '{self.name}': softmax needs (classes,) logits from an fc layer, "
                             f"got shape {in_shape}")
        return tuple(in_shape)

    def flops(self):
        return 4 * int(np.prod(self.out_shape))

    def forward(self, x, ctx):
        labels = ctx.get("labels")
        if labels is None:
            xp = self.device.xp
            z = x - x.max(axis=0, keepdims=True)
            e = xp.exp(z)
            return e / e.sum(axis=0, keepdims=True)
        loss, probs, dlogits = ops.softmax_cross_entropy(self.device, x, labels)
        ctx["loss"], ctx["dlogits"] = loss, dlogits
        return probs

    def backward(self, dy, ctx):
        d = ctx["dlogits"]
        n = d.shape[-1]
        return d * d.dtype.type(self.coeff / n)

    def config(self):
        d = super().config()
        if self.coeff != 1.0:
            d["coeff"] = repr(self.coeff)
        return d


LAYER_TYPES = {cls.type: cls for cls in (Data, Conv, FC, ReLU, Pool, LRN, Dropout, SoftmaxCost)}
