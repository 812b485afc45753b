"""Export a trained net to ONNX, to run it elsewhere (onnxruntime, TensorRT, a browser).

    python -m convnet.export onnx RUN_DIR_OR_CHECKPOINT OUT.onnx [--layout chwn]

or ``convnet.export.to_onnx(net, path, mean=...)``. Needs the optional extra ``convnet[onnx]`` (onnx; onnxruntime to
run the result).

The graph is NCHW: input ``images`` ``(N, C, H, W)`` float32 raw pixels (``--layout chwn``: our ``(C, H, W, N)``,
turned into NCHW by a first ``Transpose``), output ``probs`` ``(N, classes)``. The data layer's preprocessing is part
of the graph (``Sub`` the mean image, ``Mul`` the data layer's scale), so the exported model takes the pixels our
evaluation takes: a mean image larger than the input (a prepared ImageNet's 256x256) is cropped at its centre, as
the centre test view is. Each layer becomes:

* conv: ``Conv`` (weights ``(C/g, KH, KW, F)`` transposed to ``(F, C/g, KH, KW)``, ``group``; ``rounding = up``:
  more end padding, the zeros the last windows reach), then its neuron;
* local: the input's patches by a ``Conv`` with a one-hot kernel of C*KH*KW output channels (conv's pads), then
  each output position's filter bank by ``Einsum`` (per group), ``Add`` the biases (per filter, or per filter and
  position), then its neuron;
* pool: ``MaxPool`` / ``AveragePool`` (``count_include_pad = 0``: padding is never counted; floor output sizes;
  ``rounding = up``: a ``Slice`` to the rows and columns its windows read, pads where they hang over the edge);
* lrn: ``LRN`` where ONNX's window is ours (odd sizes, one group), with ``alpha`` as ONNX means it (ONNX divides
  alpha by size: ``alpha * size`` for our "sum" convention, ``alpha`` for "mean"); otherwise (even sizes, groups)
  built from ``Mul``, a 1x1 ``Conv`` that sums each channel's window within its group, ``Add``, ``Pow``, ``Div``;
* rnorm / cnorm (same-map): the window sums of squares by a depthwise ``Conv`` of ones (zero padding: the window is
  clipped at the edges as ours), ``Mul`` by scale / size², ``Add`` minDiv, ``Pow``, ``Div``; cnorm first subtracts
  each pixel's window mean (the window sum divided by the constant count of its clipped window's pixels);
* fc: ``Flatten`` (our CHW flattening order is NCHW's) and ``Gemm``; relu: ``Relu``; neurons (fused on conv and
  fc, or a neuron layer): ``Relu``, ``Sigmoid``, ``Abs``, ``Sqrt``, ``Softplus``, ``Clip`` (brelu), ``Tanh`` and
  ``Mul`` / ``Add`` for the parameters; dropout: removed (the identity at test time; ``scaling = test``: ``Mul``
  by keep); softmax: ``Softmax``;
* eltsum: ``Sum`` of its inputs times their ``coeffs`` (``Mul``); eltmax: ``Max``;
* another layer with several inputs: ``Concat`` of its inputs along the channels (images of one size) or of their
  flattened features, as the graph joins them; towers need nothing else.

A layer type or setting this module does not know is refused with an :class:`ExportError` naming the layer.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from .layers import (FC, LRN, CNorm, Conv, Data, Dropout, EltMax, EltSum, Local, NeuronLayer, Pool, ReLU, RNorm,
                     SoftmaxCost)

OPSET = 17  # the ONNX operator set the graph is written in
IR_VERSION = 8  # the file format version: read by onnxruntime 1.10 and later
LAYOUTS = ("nchw", "chwn")


class ExportError(ValueError):
    """A net, or a checkpoint, that cannot be exported; the message names the layer or the file."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'convnet[onnx]' (or pip install onnx)") \
            from None
    return onnx


def _input_mean(mean, shape):
    """The mean image (H, W, C) as the (1, C, H, W) float32 array subtracted from an input of ``shape`` (C, H, W):
    its centre crop where the mean is larger (the centre test view's crop)."""
    c, h, w = shape
    m = np.asarray(mean)
    if m.ndim != 3 or m.shape[2] != c or m.shape[0] < h or m.shape[1] < w:
        raise ExportError(f"the mean image must be (H, W, {c}) with H >= {h} and W >= {w} (the data layer's "
                          f"input), got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ExportError("the mean image holds NaN or infinite values")
    oy, ox = (m.shape[0] - h) // 2, (m.shape[1] - w) // 2
    m = m[oy:oy + h, ox:ox + w].astype(np.float32)
    return np.ascontiguousarray(m.transpose(2, 0, 1)[None])


class _Builder:
    """The ONNX nodes and initializers of one graph, with unique tensor names."""

    def __init__(self, onnx):
        self.onnx, self.h = onnx, onnx.helper
        self.nodes, self.inits, self.names = [], [], set()

    def name(self, base):
        n, i = base, 1
        while n in self.names:
            n, i = f"{base}_{i}", i + 1
        self.names.add(n)
        return n

    def const(self, base, array):
        name = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, base, **attrs):
        out = self.name(base)
        self.nodes.append(self.h.make_node(op, list(inputs), [out], name=out, **attrs))
        return out


def _image_rule(layer, in_shape, window, stride, padding, what, extension=(0, 0)):
    """Our output size (floor, over the input extended by ``extension`` past the end padding) must be the layer's: a
    layer with another rule has no export here."""
    oh = (in_shape[1] + 2 * padding[0] + extension[0] - window[0]) // stride[0] + 1
    ow = (in_shape[2] + 2 * padding[1] + extension[1] - window[1]) // stride[1] + 1
    if (oh, ow) != tuple(layer.out_shape[1:]):
        raise ExportError(f"layer '{layer.name}': its {what} output size {layer.out_shape[1]}x{layer.out_shape[2]} "
                          f"follows another rule than ONNX's floor ({oh}x{ow}); not exportable")


def _local_nodes(b, layer, x, state):
    """A locally connected layer: its input patches by a ``Conv`` whose one-hot kernel copies pixel (c, a, b) of each
    window to channel (c*KH + a)*KW + b (conv's pads, so the same windows), then per output position p the patch
    times that position's filter bank, group by group (``Einsum`` ngdp,gpdf->ngfp), the bias and the neuron."""
    n = layer.name
    c, _, _ = layer.in_shape
    kh, kw = layer.size
    f, oh, ow = layer.out_shape
    g = layer.groups
    eh, ew = layer.extension(layer.in_shape)
    _image_rule(layer, layer.in_shape, layer.size, layer.stride, layer.padding, "locally connected", (eh, ew))
    d = c * kh * kw
    onehot = np.eye(d, dtype=np.float32).reshape(d, c, kh, kw)
    ph, pw = layer.padding
    patches = b.node("Conv", [x, b.const(f"{n}.patch", onehot)], f"{n}.patches", kernel_shape=[kh, kw],
                     strides=list(layer.stride), pads=[ph, pw, ph + eh, pw + ew])
    grouped = b.node("Reshape", [patches, b.const(f"{n}.groups_shape", np.array([0, g, d // g, oh * ow], np.int64))],
                     f"{n}.grouped")
    w = np.asarray(state[f"{n}/w"], np.float32)  # (P, C/g, KH, KW, F): filter fo of group gi is F index gi*F/g + fo
    w = w.reshape(oh * ow, d // g, g, f // g).transpose(2, 0, 1, 3)  # (g, P, D/g, F/g)
    prod = b.node("Einsum", [grouped, b.const(f"{n}.weight", np.ascontiguousarray(w))], f"{n}.matmul",
                  equation="ngdp,gpdf->ngfp")
    y = b.node("Reshape", [prod, b.const(f"{n}.out_shape", np.array([0, f, oh, ow], np.int64))], f"{n}.linear")
    bias = np.asarray(state[f"{n}/b"], np.float32)
    bias = bias.reshape(1, f, 1, 1) if layer.shared_biases else bias.reshape(1, f, oh, ow)
    y = b.node("Add", [y, b.const(f"{n}.bias", bias)], n)
    return _neuron_nodes(b, layer.neuron, y, n)


def _lrn_band(layer, channels):
    """(C, C, 1, 1) ones where input channel j is in output channel c's window (within c's group): a 1x1 Conv with
    it sums each window of squares, clipped at the group's edges as ours."""
    per = channels // layer.groups
    band = np.zeros((channels, channels, 1, 1), np.float32)
    for c in range(channels):
        g0 = c // per * per
        lo, hi = max(g0, c - layer.size // 2), min(g0 + per, c - layer.size // 2 + layer.size)
        band[c, lo:hi] = 1.0
    return band


# training settings and the checked input channels: they do not change what the layer computes
_LEARNABLE = ("init_w", "init_b", "lr_w", "lr_b", "wd_w", "wd_b", "eps_w", "eps_b", "mom_w", "mom_b", "wc", "neuron",
              "in_channels")
# the keys each exported layer type is written with: any other key (a rule added later) must keep its default
EXPORTED_KEYS = {
    Data: ("channels", "size", "scale"),
    Conv: (*_LEARNABLE, "filters", "size", "stride", "padding", "groups"),
    Local: (*_LEARNABLE, "filters", "size", "stride", "padding", "groups", "shared_biases"),
    FC: (*_LEARNABLE, "outputs"),
    Pool: ("pool", "size", "stride", "padding", "in_channels"),
    LRN: ("size", "alpha", "beta", "k", "convention", "groups", "in_channels"),
    RNorm: ("size", "scale", "pow", "min_div", "in_channels"),
    CNorm: ("size", "scale", "pow", "min_div", "in_channels"),
    ReLU: (),
    NeuronLayer: ("neuron",),
    EltSum: ("coeffs",),
    EltMax: (),
    Dropout: ("keep", "mask_of", "mask_start", "scaling"),
    SoftmaxCost: ("coeff",),
}


def _check_keys(layer):
    known = EXPORTED_KEYS.get(type(layer))
    if known is None:
        raise ExportError(f"layer '{layer.name}': type '{layer.type}' has no ONNX export here (exported: data, conv, "
                          f"local, pool, lrn, rnorm, cnorm, fc, relu, neuron, eltsum, eltmax, dropout, softmax)")
    rule = ()
    if isinstance(layer, Conv):
        rule = ("rounding",)  # rounding = up: zeros past the end padding, as the Conv's end pads (_layer_nodes)
    elif isinstance(layer, Pool):
        rule = ("rounding", "start", "outputs_x")  # cuda-convnet's windows: a crop and pads (_overhanging_windows)
    for key in type(layer).keys:
        if key.arg in known or key.arg in rule:
            continue
        value = getattr(layer, key.arg)
        if key.required or value != key.check(key.default):
            raise ExportError(f"layer '{layer.name}': {key.name} = {value!r} has no ONNX export here")


def _layer_nodes(b, layer, x, state):
    """The nodes of ``layer`` on input tensor ``x`` (NCHW, or (N, F) for a flat input); returns its output tensor."""
    t, n = type(layer), layer.name
    _check_keys(layer)
    if t is Conv:
        eh, ew = layer.extension(layer.in_shape)  # rounding = up: the last windows reach zeros past the padding
        _image_rule(layer, layer.in_shape, layer.size, layer.stride, layer.padding, "convolution", (eh, ew))
        w = np.asarray(state[f"{n}/w"], np.float32).transpose(3, 0, 1, 2)
        ph, pw = layer.padding
        y = b.node("Conv", [x, b.const(f"{n}.weight", np.ascontiguousarray(w)),
                            b.const(f"{n}.bias", np.asarray(state[f"{n}/b"], np.float32))], n,
                   kernel_shape=list(layer.size), strides=list(layer.stride), pads=[ph, pw, ph + eh, pw + ew],
                   group=layer.groups)
        return _neuron_nodes(b, layer.neuron, y, n)
    if t is Local:
        return _local_nodes(b, layer, x, state)
    if t is FC:
        w = np.asarray(state[f"{n}/w"], np.float32)
        y = b.node("Gemm", [x, b.const(f"{n}.weight", w), b.const(f"{n}.bias", np.asarray(state[f"{n}/b"],
                                                                                       np.float32))],
                   n, transB=1)
        return _neuron_nodes(b, layer.neuron, y, n)
    if t is Pool:
        if layer.rounding == "up":
            x, pads = _overhanging_windows(b, layer, x)
        else:
            _image_rule(layer, layer.in_shape, layer.size, layer.stride, layer.padding, "pooling")
            ph, pw = layer.padding
            pads = [ph, pw, ph, pw]
        attrs = dict(kernel_shape=list(layer.size), strides=list(layer.stride), pads=pads, ceil_mode=0)
        if layer.pool == "max":
            return b.node("MaxPool", [x], n, **attrs)
        return b.node("AveragePool", [x], n, count_include_pad=0, **attrs)
    if t is LRN:
        # the multiplier of each square of the window: alpha ("sum", the paper as printed), alpha / size ("mean")
        alpha = layer.alpha if layer.convention == "sum" else layer.alpha / layer.size
        if layer.size % 2 and layer.groups == 1:  # ONNX's window [c - (s-1)/2, c + (s-1)/2] is ours
            return b.node("LRN", [x], n, size=layer.size, alpha=alpha * layer.size, beta=layer.beta, bias=layer.k)
        sq = b.node("Mul", [x, x], f"{n}.square")
        sums = b.node("Conv", [sq, b.const(f"{n}.window", _lrn_band(layer, layer.in_shape[0]))], f"{n}.sum",
                      kernel_shape=[1, 1])
        scaled = b.node("Mul", [sums, b.const(f"{n}.alpha", np.float32(alpha))], f"{n}.scaled")
        base = b.node("Add", [scaled, b.const(f"{n}.k", np.float32(layer.k))], f"{n}.base")
        denom = b.node("Pow", [base, b.const(f"{n}.beta", np.float32(layer.beta))], f"{n}.denom")
        return b.node("Div", [x, denom], n)
    if t in (RNorm, CNorm):
        return _rnorm_nodes(b, layer, x)
    if t is ReLU:
        return b.node("Relu", [x], n)
    if t is NeuronLayer:
        return _neuron_nodes(b, layer.neuron, x, n)
    if t is Dropout:  # the identity at test time; scaling = test (cuda-convnet2's dropout2): times keep
        if layer.scaling == "test" and layer.keep != 1.0:
            return b.node("Mul", [x, b.const(f"{n}.keep", np.float32(layer.keep))], n)
        return x
    return b.node("Softmax", [x], n, axis=1)  # SoftmaxCost: the only type left (_check_keys)


def _overhanging_windows(b, layer, x):
    """cuda-convnet's pool windows (rounding = up): the input cropped to the rows and columns they read (a ``Slice``
    where they start inside the image or end before its edge), and the pads where they hang over it (MaxPool never
    takes a pad, AveragePool with count_include_pad = 0 never counts one: the windows' real inputs, as ours).
    Returns (x, pads)."""
    n = layer.name
    starts, ends, begin, end = [], [], [], []
    for (first, count, span), size in zip(layer.windows(layer.in_shape), layer.in_shape[1:]):
        starts.append(max(first, 0))
        ends.append(min(first + span, size))
        begin.append(max(-first, 0))
        end.append(max(first + span - size, 0))
    if starts != [0, 0] or ends != list(layer.in_shape[1:]):
        x = b.node("Slice", [x, b.const(f"{n}.starts", np.array(starts, np.int64)),
                             b.const(f"{n}.ends", np.array(ends, np.int64)),
                             b.const(f"{n}.axes", np.array([2, 3], np.int64))], f"{n}.windows")
    return x, [*begin, *end]


def _join_nodes(b, layer, parts):
    """eltsum: ``Sum`` of the inputs, each times its coefficient (``Mul`` where it is not 1); eltmax: ``Max``."""
    n = layer.name
    if isinstance(layer, EltMax):
        return b.node("Max", parts, n)
    terms = [p if c == 1.0 else b.node("Mul", [p, b.const(f"{n}.coeff{i}", np.float32(c))], f"{n}.term{i}")
             for i, (p, c) in enumerate(zip(parts, layer.coeffs))]
    return b.node("Sum", terms, n)


def _neuron_nodes(b, neuron, x, n):
    """cuda-convnet's neuron (convnet.neurons) on ``x``: ONNX's own op where it has one, else Mul / Add."""
    if neuron is None:
        return x
    name, a, c = neuron.name, neuron.a, neuron.b
    base = f"{n}.{name}"
    if name in ("relu", "abs", "sqrt"):
        return b.node(name.capitalize(), [x], base)
    if name == "logistic":
        return b.node("Sigmoid", [x], base)
    if name == "softrelu":
        return b.node("Softplus", [x], base)
    if name == "square":
        return b.node("Mul", [x, x], base)
    if name == "brelu":
        return b.node("Clip", [x, b.const(f"{base}.min", np.float32(0)), b.const(f"{base}.max", np.float32(a))],
                      base)
    if name == "tanh":  # a * tanh(b * x)
        inner = b.node("Mul", [x, b.const(f"{base}.b", np.float32(c))], f"{base}.bx")
        return b.node("Mul", [b.node("Tanh", [inner], f"{base}.tanh"), b.const(f"{base}.a", np.float32(a))], base)
    if name == "linear":  # a * x + b
        ax = b.node("Mul", [x, b.const(f"{base}.a", np.float32(a))], f"{base}.ax")
        return b.node("Add", [ax, b.const(f"{base}.b", np.float32(c))], base)
    raise ExportError(f"layer '{n}': neuron '{neuron}' has no ONNX export here")


def _rnorm_nodes(b, layer, x):
    """rnorm / cnorm: x / (minDiv + scale / size**2 * window sum of s**2)**pow, s = x or x minus its window mean; the
    window is rows [h - size//2, h + (size-1)//2] (and columns), clipped at the edges."""
    n, (c, h, w), size = layer.name, layer.in_shape, layer.size
    before, after = size // 2, (size - 1) // 2
    ones = b.const(f"{n}.window", np.ones((c, 1, size, size), np.float32))

    def window_sum(v, base):  # a depthwise Conv of ones; the zero padding adds nothing: the window is clipped
        return b.node("Conv", [v, ones], base, kernel_shape=[size, size], group=c,
                      pads=[before, before, after, after])

    s = x
    if isinstance(layer, CNorm):
        rows = [min(i + after, h - 1) - max(i - before, 0) + 1 for i in range(h)]
        cols = [min(j + after, w - 1) - max(j - before, 0) + 1 for j in range(w)]
        counts = np.outer(rows, cols).astype(np.float32)[None, None]
        mean = b.node("Div", [window_sum(x, f"{n}.sum"), b.const(f"{n}.count", counts)], f"{n}.mean")
        s = b.node("Sub", [x, mean], f"{n}.mean_diff")
    sums = window_sum(b.node("Mul", [s, s], f"{n}.square"), f"{n}.sum_squares")
    scaled = b.node("Mul", [sums, b.const(f"{n}.scale", np.float32(layer.scale / (size * size)))], f"{n}.scaled")
    base = b.node("Add", [scaled, b.const(f"{n}.min_div", np.float32(layer.min_div))], f"{n}.base")
    denom = b.node("Pow", [base, b.const(f"{n}.pow", np.float32(layer.pow))], f"{n}.denom")
    return b.node("Div", [x, denom], n)


def _flat(b, name, rank, base):
    """``name`` as (N, features)."""
    return name if rank == 1 else b.node("Flatten", [name], base, axis=1)


def build_model(net, *, mean=None, layout="nchw"):
    """The ONNX ModelProto of ``net`` (its parameters as they are now) with the data layer's preprocessing:
    ``mean`` (H, W, C) subtracted (None: nothing), then the data layer's ``scale``. ExportError when a layer cannot
    be exported."""
    onnx = _onnx()
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be {' or '.join(map(repr, LAYOUTS))}, got {layout!r}")
    try:
        state = net.state_dict()
    except AttributeError as e:
        raise ExportError(f"not a convnet Net: {e}") from None
    if not state and any(l.learnable for l in net.order):
        raise ExportError("the net has no parameters (built with init_params=False): nothing to export")
    b = _Builder(onnx)
    h = onnx.helper
    d = net.data_layer
    c, hh, ww = d.out_shape
    x = b.name("images")
    if layout == "nchw":
        inp = h.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", c, hh, ww])
    else:
        inp = h.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [c, hh, ww, "N"])
        x = b.node("Transpose", [x], "images.nchw", perm=[3, 0, 1, 2])
    if mean is not None:
        x = b.node("Sub", [x, b.const("mean", _input_mean(mean, d.out_shape))], "centred")
    if d.scale != 1.0:
        x = b.node("Mul", [x, b.const("scale", np.float32(d.scale))], "scaled")
    _check_keys(d)
    outs = {d.name: x}
    for l in net.order:
        if l is d:
            continue
        if type(l) is Data:
            raise ExportError(f"layer '{l.name}': a second data layer has no ONNX export here")
        ranks = [len(net.layers[i].out_shape) for i in l.inputs]
        if isinstance(l, (EltSum, EltMax)):  # the inputs themselves, of one shape (not their join)
            _check_keys(l)
            outs[l.name] = _join_nodes(b, l, [outs[i] for i in l.inputs])
            continue
        if len(l.inputs) == 1:
            xin = outs[l.inputs[0]]
        elif len(l.in_shape) == 3:  # images of one size: joined channel-wise
            xin = b.node("Concat", [outs[i] for i in l.inputs], f"{l.name}.join", axis=1)
        else:  # anything else: flattened, then joined
            parts = [_flat(b, outs[i], r, f"{l.name}.{i}.flat") for i, r in zip(l.inputs, ranks)]
            xin = b.node("Concat", parts, f"{l.name}.join", axis=1)
        if type(l) in (FC, SoftmaxCost):  # (C, H, W) features, flattened in our order
            xin = _flat(b, xin, len(l.in_shape), f"{l.name}.flat")
        outs[l.name] = _layer_nodes(b, l, xin, state)
    probs = outs[net.cost_layer.name]
    out = h.make_tensor_value_info(probs, onnx.TensorProto.FLOAT, ["N", net.num_classes])
    graph = h.make_graph(b.nodes, net.name or "convnet", [inp], [out], initializer=b.inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="convnet",
                         doc_string=f"convnet net '{net.name}': input raw pixels "
                                    f"({'N, C, H, W' if layout == 'nchw' else 'C, H, W, N'}), output probabilities")
    model.ir_version = IR_VERSION
    return model


def to_onnx(net, path, *, mean=None, layout="nchw"):
    """Write ``net`` as an ONNX file (:func:`build_model`), checked by ``onnx.checker``; returns the path."""
    onnx = _onnx()
    model = build_model(net, mean=mean, layout=layout)
    path = Path(path)
    if model.ByteSize() >= 2 ** 31 - 1:  # protobuf's limit; AlexNet is about 250 MB
        raise ExportError(f"the net is too large for one ONNX file ({model.ByteSize()} bytes)")
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def load_checkpoint_net(src):
    """(net on numpy with the checkpoint's parameters, its mean image) of a run directory or checkpoint file."""
    from . import checkpoint as ckpt
    from .model_file import ModelFileError, build_net
    state = ckpt.load(src)
    config = dict(state["meta"].get("config") or {})
    text = config.get("model_text")
    if not isinstance(text, str):
        raise ExportError(f"checkpoint '{state['path']}' has no model-file text: its net is unknown")
    source = config.get("model_source") or config.get("model") or "<checkpoint>"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            net, _ = build_net(text, source, device="numpy", dtype="float32")
        except ModelFileError as e:
            raise ExportError(f"checkpoint '{state['path']}': its model does not build: {e}") from None
    try:
        net.load_state_dict(state["params"])
    except (KeyError, ValueError) as e:
        raise ExportError(f"checkpoint '{state['path']}' does not fit its own model: {e}") from None
    return net, state["mean"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m convnet.export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="format", required=True)
    o = sub.add_parser("onnx", help="write an ONNX file (NCHW graph, raw pixels in, probabilities out)")
    o.add_argument("src", help="a run directory or a checkpoint file")
    o.add_argument("out", help="the .onnx file to write")
    o.add_argument("--layout", choices=LAYOUTS, default="nchw",
                   help="the input's layout: nchw (default) or chwn (ours; a first Transpose)")
    o.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError
    try:
        if Path(args.out).exists() and not args.overwrite:
            raise ExportError(f"'{args.out}' exists: give another output file, or --overwrite to replace it")
        net, mean = load_checkpoint_net(args.src)
        path = to_onnx(net, args.out, mean=mean, layout=args.layout)
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({net.name}: {net.num_params():,} parameters, input "
          f"{'N, ' if args.layout == 'nchw' else ''}{', '.join(map(str, net.data_layer.out_shape))}"
          f"{', N' if args.layout == 'chwn' else ''} raw pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
