"""Layers of a convnet graph.

Every layer works on one device (``layer.device``, a :class:`convnet.devices.Device`) and calls only the public op
API (``convnet.ops``), so the same layer code runs on numpy, emu and cuda. Activations follow the layout contract
(docs/architecture.md): conv-side tensors are ``(C, H, W, N)``, fully-connected ones ``(features, N)``, logits
``(classes, N)``.

Shapes handled here are per-image shapes without the batch axis: ``(C, H, W)`` or ``(features,)``; shape inference
builds the op family's geometry value (:mod:`convnet.geometry`) with ``N = 1``.

A layer with several inputs sees their concatenation along the first (channel / feature) axis: inputs of the same
spatial size are joined channel-wise (the two-tower join), otherwise every input is flattened and the features are
joined. The graph (:mod:`convnet.graph`) does the joining, the splitting of the gradient and the copies between
devices; a layer only sees one ``x``.

Each layer class declares its keys once, in ``KEYS`` (:class:`Key`: the model-file spelling, the Python argument,
the type of value, the default or :data:`REQUIRED`, cuda-convnet's aliases). The constructor, the signature, the
checks and the model-file parser (:mod:`convnet.model_file`) all derive from that declaration.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import numpy as np

from . import ops
from . import neurons
from .ops.neuron import MAX_INPUTS as _MAX_JOIN_INPUTS
from .reference.storage import BFLOAT16
from .geometry import INT32_MAX, ConvGeometry, LocalGeometry, LrnGeometry, PoolGeometry, RnormGeometry, pair


class LayerError(ValueError):
    """A layer definition that cannot be built (bad parameter, shape mismatch, ...)."""


class ModelWarning(UserWarning):
    """A layer definition that builds but probably says something else than meant (the command logs it)."""


# --- keys ------------------------------------------------------------------------------------------------------
class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()  # the default of a key that must be given

KEY_TYPES = ("int", "float", "str", "name", "pair", "init", "neuron", "floats", "rate")
INIT_SCHEMES = ("he", "xavier")
_SIZE_ALIASES = ("filterSize", "sizeX")  # cuda-convnet's spellings of a window size


@dataclass(frozen=True)
class RateSchedule:
    """cuda-convnet2's parameter schedules over the run's progress p in [0, 1] (the fraction of the epochs done):
    ``const[base]``; ``linear[base;tgtFactor]`` from base to base/tgtFactor; ``exp[base;tgtFactor]``
    base * tgtFactor**-p; ``dexp[base;tgtFactor;numSteps]`` numSteps constant steps of the exp schedule, the last
    at base/tgtFactor (cuda-convnet2's lr.cu)."""

    kind: str
    base: float
    tgt_factor: float = 1.0
    num_steps: int = 1

    PARAMS = {"const": ("base",), "linear": ("base", "tgtFactor"), "exp": ("base", "tgtFactor"),
              "dexp": ("base", "tgtFactor", "numSteps")}

    def value(self, progress):
        if self.kind == "const":
            return self.base
        if self.kind == "linear":
            return self.base * (1 - progress) + self.base / self.tgt_factor * progress
        if self.kind == "exp":
            return self.base * (1.0 / self.tgt_factor) ** progress
        n = self.num_steps
        rates = [self.base * (1.0 / self.tgt_factor) ** (i / (n - 1)) for i in range(n - 1)]
        rates.append(self.base / self.tgt_factor)
        for i, r in enumerate(rates):
            if progress <= (i + 1) / n:
                return r
        return rates[-1]

    def __str__(self):
        args = {"base": self.base, "tgtFactor": self.tgt_factor, "numSteps": self.num_steps}
        return f"{self.kind}[{';'.join(f'{k}={args[k]:g}' for k in self.PARAMS[self.kind])}]"


def rate_schedule(name, value):
    """A rate: a number >= 0, or a cuda-convnet2 schedule ``dexp[base=0.01;tgtFactor=250;numSteps=4]``."""
    if isinstance(value, RateSchedule):
        return value
    if not isinstance(value, str) or "[" not in value:
        v = _number(name, value, float, "a number or a schedule such as dexp[base=0.01;tgtFactor=250;numSteps=4]")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v:g}")
        return v
    kind, _, rest = value.strip().partition("[")
    kind = kind.strip().lower()
    if kind not in RateSchedule.PARAMS or not rest.endswith("]"):
        raise ValueError(f"{name}: unknown schedule {value!r} (cuda-convnet2's: "
                         f"{', '.join(f'{k}[{chr(59).join(p)}]' for k, p in RateSchedule.PARAMS.items())})")
    want = RateSchedule.PARAMS[kind]
    got = {}
    for i, part in enumerate(p for p in rest[:-1].split(";") if p.strip()):
        k, eq, v = part.partition("=")
        k, v = (k.strip(), v.strip()) if eq else (want[i] if i < len(want) else "?", k.strip())
        if k not in want or k in got:
            raise ValueError(f"{name}: {kind}[...] takes {';'.join(want)}, got {value!r}")
        try:
            got[k] = int(v) if k == "numSteps" else float(v)
        except ValueError:
            raise ValueError(f"{name}: {k} in {value!r} must be a number") from None
    if set(got) != set(want):
        raise ValueError(f"{name}: {kind}[...] takes {';'.join(want)}, got {value!r}")
    if not (math.isfinite(got["base"]) and got["base"] >= 0) or got.get("tgtFactor", 1.0) <= 0 \
            or got.get("numSteps", 2) < 1:
        raise ValueError(f"{name}: base must be >= 0, tgtFactor > 0 and numSteps >= 1, got {value!r}")
    return RateSchedule(kind, got["base"], got.get("tgtFactor", 1.0), max(got.get("numSteps", 1), 1))


@dataclass(frozen=True)
class Key:
    """One key of a layer type, declared once.

    * ``name``: the model-file spelling (matched case-insensitively), also the name in error messages;
    * ``type``: ``int``, ``float``, ``str`` (one of ``choices``), ``name`` (a layer-style name: text without spaces
      or commas, or None when that is the default), ``pair`` (an int or an ``(h, w)`` pair),
      ``init`` (a Gaussian std >= 0, or ``he`` / ``xavier``), ``neuron`` (a :class:`convnet.neurons.Neuron`,
      written ``relu``, ``tanh[a,b]``, ...; ``linear`` / ``ident`` = None), ``floats`` (a list of finite numbers, or
      None when that is the default), ``rate`` (a number >= 0 or a :class:`RateSchedule` such as ``dexp[...]``);
    * ``default``, or :data:`REQUIRED`; a default of None makes an ``int``, ``float`` or ``rate`` key optional (None:
      not given);
    * ``arg``: the Python keyword argument and the layer's attribute (default: ``name``);
    * ``minimum``: the smallest allowed value (``int``, ``pair``, ``float``); ``exclusive``: the value must be larger
      than ``minimum`` (``float``). A ``float`` (and an ``init`` std) must be finite: a NaN or inf would be hidden
      by a ReLU and train at chance level forever;
    * ``aliases``: other model-file spellings (cuda-convnet's ``numFilters``, ``sizeX``, ...).
    """

    name: str
    type: str
    default: object = REQUIRED
    arg: str = ""
    minimum: float | None = None
    exclusive: bool = False
    choices: tuple = ()
    aliases: tuple = ()

    def __post_init__(self):
        if self.type not in KEY_TYPES:
            raise ValueError(f"key {self.name}: unknown type {self.type!r} (one of {', '.join(KEY_TYPES)})")
        if not self.arg:
            object.__setattr__(self, "arg", self.name)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def spellings(self):
        """Every accepted model-file spelling, lower case."""
        return (self.name.lower(), *(a.lower() for a in self.aliases))

    def check(self, value):
        """The value converted to its type; ValueError / TypeError (without the layer name) when it is not one."""
        name, t = self.name, self.type
        if t == "pair":
            return pair(name, value, minimum=self.minimum or 0)
        if t == "int":
            if value is None and self.default is None:
                return None
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            v = _number(name, value, int, "an integer")
            if self.minimum is not None and v < self.minimum:
                raise ValueError(f"{name} must be {'> 0' if self.minimum == 1 else f'>= {self.minimum}'}, got {v}")
            if v > INT32_MAX:
                raise ValueError(f"{name} must be < 2**31, got {v}")
            return v
        if value is None and self.default is None:  # an optional key left out
            return None
        if t == "rate":
            return rate_schedule(name, value)
        if t == "float":
            v = _number(name, value, float, "a number")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
            if self.minimum is not None and (v <= self.minimum if self.exclusive else v < self.minimum):
                raise ValueError(f"{name} must be {'>' if self.exclusive else '>='} {self.minimum:g}, got {v:g}")
            return v
        if t == "str":
            if value not in self.choices:
                raise ValueError(f"{name} must be {' or '.join(repr(c) for c in self.choices)}, got {value!r}")
            return value
        if t == "name":
            if value is None and self.default is None:
                return None
            if not isinstance(value, str) or not value or any(c.isspace() or c == "," for c in value):
                raise ValueError(f"{name} must be a name (text without spaces or commas), got {value!r}")
            return value
        if t == "neuron":
            return neurons.parse(value)  # its errors name the neuron key's value
        if t == "floats":
            if value is None and self.default is None:
                return None
            if isinstance(value, str):
                value = [v for v in value.split(",")]
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{name} must be a list of numbers, got {value!r}")
            values = [_number(name, v, float, "a list of numbers") for v in value]
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite numbers, got {values}")
            return tuple(values)
        # init: a Gaussian std, or the name of a fan-in based scheme
        if isinstance(value, str) and value in INIT_SCHEMES:
            return value
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number (the Gaussian std) or 'he' / 'xavier', got {value!r}") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        return v


def _number(name, value, convert, what):
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


@contextlib.contextmanager
def _layer_errors(layer_name):
    """Key and geometry checks raise ValueError / TypeError; re-raise them as a LayerError naming the layer."""
    try:
        yield
    except LayerError:
        raise
    except (ValueError, TypeError) as exc:
        raise LayerError(f"layer '{layer_name}': {exc}") from None


# --- layers ----------------------------------------------------------------------------------------------------
class Layer:
    """Base class. Subclasses set ``type`` and ``KEYS`` and implement ``output_shape``, ``forward``, ``backward``.

    ``Layer(name, inputs, *, device=None, **keys)``: ``inputs`` a list of layer names (or a comma-separated
    string); every declared key becomes an attribute (``layer.<arg>``), converted and checked. ``device``: None (the
    net's device), a tower index (an int: the net's ``devices[i]``) or a device (``"cuda:1"``).

    Learnable layers own ``params`` (name -> device array) and ``grads`` (same names), plus per-parameter
    learning-rate and weight-decay multipliers (``lr_mult``, ``wd_mult``) and an initialisation (``init_w``, ``init_b``).
    """

    type = "layer"
    type_aliases = ()  # other model-file spellings of the type (cuda-convnet's)
    takes_inputs = True
    learnable = False
    KEYS: tuple = ()  # the keys this class declares
    keys: tuple = ()  # all its keys: KEYS, then the inherited ones (set by __init_subclass__)
    bf16_output = True  # with precision bf16 its output is stored in bfloat16 (else in the net's float dtype)

    def bf16_native(self) -> bool:
        """With precision bf16, does the layer run on bfloat16 arrays (its ops' bfloat16 variants)? If not, the net
        converts at its boundary: it runs in float32 on its inputs converted to float32 (exact) and its output and
        input gradient are rounded to bfloat16 for storage (``Net.forward``/``backward``)."""
        return False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        own = cls.__dict__.get("KEYS", ())
        inherited = tuple(k for k in getattr(cls, "keys", ()) if k.arg not in {o.arg for o in own})
        cls.keys = (*own, *inherited)
        cls.__signature__ = _signature(cls)  # help(Conv) shows the keys and their defaults

    def __init__(self, name, inputs=(), *, device=None, **values):
        if not name or not isinstance(name, str):
            raise LayerError(f"layer name must be a non-empty string, got {name!r}")
        self.name = name
        if isinstance(inputs, str):
            inputs = [s.strip() for s in inputs.split(",") if s.strip()]
        self.inputs = list(inputs)
        if isinstance(device, (int, np.integer)) and not isinstance(device, bool) and device < 0:
            raise LayerError(f"layer '{name}': device must be a tower index >= 0 or a device name, got {device}")
        self.device = device  # None = the net's device (tower 0); an int = a tower (Net.devices[i]); else a device
        self.tower = None  # set by the net: the tower index, or None for a layer given a device
        self.params = {}
        self.grads = {}
        self.lr_mult = {}
        self.wd_mult = {}
        self.lr_abs, self.momentum, self.wd_abs = {}, {}, {}  # absolute settings per parameter (None: the run's)
        self.in_shape = None
        self.out_shape = None
        self.needs_input_grad = True
        # set by the net (Net._fuse_relu_backward), for a ReLU output read only by a max pool: the pool's backward
        # applies the ReLU's mask (relu_input) and the producer's backward skips its ReLU backward (relu_grad_fused)
        self.relu_input = False
        self.relu_grad_fused = False
        self._set_keys(values)

    def _set_keys(self, values):
        values = dict(values)
        with _layer_errors(self.name):
            for key in self.keys:
                value = values.pop(key.arg, key.default)
                if value is REQUIRED:
                    raise LayerError(f"layer '{self.name}': missing required key '{key.name}' for a {self.type} layer")
                setattr(self, key.arg, key.check(value))
        if values:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument '{next(iter(values))}' "
                            f"(keys of a {self.type} layer: {', '.join(k.arg for k in self.keys) or 'none'})")

    @property
    def random_stream(self) -> str:
        """The name the layer's random numbers are keyed on, with the net's seed and the step (the graph's
        ``ctx['seed']``): its own name, so that they do not depend on the layer's position in the model
        file."""
        return self.name

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

    def _image_input(self, in_shape):
        if len(in_shape) != 3:
            raise LayerError(f"layer '{self.name}': {self.type} needs an image input (C, H, W), got shape {in_shape}")
        return tuple(in_shape)

    # --- compute ---------------------------------------------------------------------------------------------
    def forward(self, x, ctx):
        """Return y. ``ctx`` is a dict the layer may keep state in for its backward (the graph passes it back)."""
        raise NotImplementedError

    def backward(self, dy, ctx):
        """Fill ``self.grads``; return dx (or None when ``needs_input_grad`` is False)."""
        raise NotImplementedError

    def relu_output(self) -> bool:
        """Is the output a ReLU's, whose backward (``relu_backward`` on the output) begins this layer's backward? Then
        a layer reading it that can apply the ReLU's mask in its own backward (``applies_relu_mask``) may do it
        instead (``relu_input``, ``relu_grad_fused``)."""
        return False

    def applies_relu_mask(self) -> bool:
        """Can the backward apply a ReLU's mask to its input gradient (dx where the input > 0, else +0) when told
        (``relu_input``) that its input is a ReLU's output, at no extra pass?"""
        return False

    def describe(self):
        return self.type

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} {self.describe()}>"


def _signature(cls):
    P = inspect.Parameter
    params = [P("name", P.POSITIONAL_OR_KEYWORD, default=P.empty if cls.takes_inputs else cls.type)]
    if cls.takes_inputs:
        params.append(P("inputs", P.POSITIONAL_OR_KEYWORD, default=()))
    params += [P(k.arg, P.KEYWORD_ONLY, default=P.empty if k.required else k.default) for k in cls.keys]
    params.append(P("device", P.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


def _precision(ctx) -> str:
    """The precision of a conv or fc layer's multiplications: the net's (``Net.precision``, passed in ``ctx``); fp32
    for a layer run on its own. Only conv and fc layers use it: the others (pooling, normalisation, neurons, dropout,
    softmax, local layers) compute in the activations' dtype."""
    return ctx.get("precision", "fp32")


def stored(device, a, dtype):
    """``a`` converted to the storage ``dtype`` (float32 <-> bfloat16: rounding to nearest even, or exact), on the
    current stream after the work that writes ``a``; ``a`` itself when it already has that dtype."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    out = device.empty(a.shape, dtype)

    def convert():
        with np.errstate(invalid="ignore"):  # NumPy warns on every NaN cast to bfloat16; NaN stays NaN
            out[...] = a.astype(dtype)

    device.submit(convert)
    return out


def _bf16_relu_only(neuron) -> bool:
    """A conv or fc layer runs natively in bf16 with no neuron or ReLU (the neuron ops have no bfloat16 variant)."""
    return neuron is None or neuron.name == "relu"


def _gaussian(rng, shape, std, dtype):
    dtype = np.dtype(dtype)
    g = rng.standard_normal(shape, dtype=dtype if dtype in (np.float32, np.float64) else np.float64)
    g *= g.dtype.type(std)
    return g.astype(dtype, copy=False)


class _Learnable(Layer):
    """Weights ``w`` and biases ``b``, an optional neuron (``neuron = tanh[a,b]``, ...), cuda-convnet's per-parameter
    multipliers."""

    learnable = True
    KEYS = (
        Key("initW", "init", 0.01, arg="init_w"),
        Key("initB", "float", 0.0, arg="init_b"),
        Key("lrW", "float", 1.0, arg="lr_w", minimum=0.0),
        Key("lrB", "float", 1.0, arg="lr_b", minimum=0.0),
        Key("wdW", "float", 1.0, arg="wd_w", minimum=0.0),
        Key("wdB", "float", 0.0, arg="wd_b", minimum=0.0),
        # cuda-convnet's absolute per-layer settings, instead of the run's lr, momentum and weight decay
        Key("epsW", "rate", None, arg="eps_w"),
        Key("epsB", "rate", None, arg="eps_b"),
        Key("momW", "float", None, arg="mom_w", minimum=0.0),
        Key("momB", "float", None, arg="mom_b", minimum=0.0),
        Key("wc", "float", None, arg="wc", minimum=0.0),
        Key("neuron", "neuron", None),
    )

    def __init__(self, name, inputs=(), **kw):
        super().__init__(name, inputs, **kw)
        for absolute, mult, default in (("eps_w", "lr_w", 1.0), ("eps_b", "lr_b", 1.0), ("wc", "wd_w", 1.0)):
            if getattr(self, absolute) is not None and getattr(self, mult) != default:
                a, m = (next(k.name for k in self.keys if k.arg == n) for n in (absolute, mult))
                raise LayerError(f"layer '{name}': give {a} (absolute) or {m} (a multiplier of the run's), not both")
        self.lr_mult = {"w": self.lr_w, "b": self.lr_b}
        self.wd_mult = {"w": self.wd_w, "b": self.wd_b}
        # absolute rates (a number or a RateSchedule), momenta and weight decays; None: the run's
        self.lr_abs = {"w": self.eps_w, "b": self.eps_b}
        self.momentum = {"w": self.mom_w, "b": self.mom_b}
        self.wd_abs = {"w": self.wc, "b": None if self.wc is None else 0.0}  # cuda-convnet decays weights only

    def _neuron_forward(self, y, ctx):
        return _neuron_forward(self.device, self.neuron, y, ctx, own=True)

    def _neuron_backward(self, dy, ctx):
        return _neuron_backward(self.device, self.neuron, dy, ctx, self.relu_grad_fused)

    def relu_output(self):
        return self.neuron is not None and self.neuron.name == "relu"

    def _neuron_flops(self):
        return int(np.prod(self.out_shape)) if self.neuron else 0

    def _std(self, fan_in, fan_out):
        if self.init_w == "he":
            return math.sqrt(2.0 / fan_in)
        if self.init_w == "xavier":
            return math.sqrt(2.0 / (fan_in + fan_out))
        return self.init_w


class Data(Layer):
    """The input images, ``(channels, size, size, N)``. ``scale`` multiplies the mean-subtracted pixels."""

    type = "data"
    bf16_output = False  # the loader's float32 images (the first conv rounds them as it reads them)
    type_aliases = ("input",)
    takes_inputs = False
    KEYS = (
        Key("channels", "int", minimum=1),
        Key("size", "pair", minimum=1, aliases=_SIZE_ALIASES),
        Key("scale", "float", 1.0, minimum=0.0, exclusive=True),
    )

    def __init__(self, name="data", **kw):
        super().__init__(name, (), **kw)

    def output_shape(self, in_shape=None):
        return (self.channels, *self.size)

    def describe(self):
        return f"data {self.channels}x{self.size[0]}x{self.size[1]}"


_ROUNDING = Key("rounding", "str", "down", choices=("down", "up"))  # the output-size rule (see Conv, Pool)
_CHANNELS = Key("channels", "int", None, arg="in_channels", minimum=1)  # the input's channels, checked when given


def _check_channels(layer, in_shape):
    if layer.in_channels is not None and in_shape and in_shape[0] != layer.in_channels:
        raise LayerError(f"layer '{layer.name}': channels = {layer.in_channels}, but its input has {in_shape[0]} "
                         f"channels (shape {tuple(in_shape)})")


class Conv(_Learnable):
    type = "conv"
    KEYS = (
        Key("filters", "int", minimum=1, aliases=("numFilters",)),
        Key("size", "pair", minimum=1, aliases=_SIZE_ALIASES),
        Key("stride", "pair", 1, minimum=1),
        Key("padding", "pair", 0, minimum=0, aliases=("pad",)),
        Key("groups", "int", 1, minimum=1),
        _ROUNDING,
        _CHANNELS,
    )

    def __init__(self, name, inputs=(), **kw):
        super().__init__(name, inputs, **kw)
        if self.filters % self.groups:
            raise LayerError(f"layer '{name}': filters={self.filters} is not divisible by groups={self.groups}")

    def extension(self, in_shape):
        """(e_h, e_w): the zero rows and columns past the bottom and right padding that ``rounding = up``
        (cuda-convnet's ``1 + ceil((H + 2*padding - size) / stride)`` outputs) lets the last window reach."""
        if self.rounding == "down":
            return 0, 0
        _, h, w = self._image_input(in_shape)
        ext = []
        for n, k, s, p in ((h, self.size[0], self.stride[0], self.padding[0]),
                           (w, self.size[1], self.stride[1], self.padding[1])):
            span = n + 2 * p
            if span < k:
                raise LayerError(f"layer '{self.name}': filter {k} is larger than the padded input {n} + 2*{p}")
            ext.append((-(-(span - k) // s)) * s + k - span)
        return tuple(ext)

    def geometry(self, in_shape):
        """The convolution of one image of shape ``in_shape`` (extended by ``extension``)."""
        c, h, w = self._image_input(in_shape)
        _check_channels(self, in_shape)
        eh, ew = self.extension(in_shape)
        with _layer_errors(self.name):
            return ConvGeometry(c, h + eh, w + ew, 1, self.filters, *self.size, *self.stride, *self.padding,
                                self.groups)

    def output_shape(self, in_shape):
        g = self.geometry(in_shape)
        return (g.F, g.OH, g.OW)

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
        return self.geometry(self.in_shape).flops() + f * oh * ow + self._neuron_flops()

    def _geom(self):
        return dict(stride=self.stride, padding=self.padding, groups=self.groups)

    def bf16_native(self):
        return _bf16_relu_only(self.neuron) and self.extension(self.in_shape) == (0, 0)

    def forward(self, x, ctx):
        eh, ew = self.extension(self.in_shape)
        if eh or ew:  # the overhanging last windows read zeros, as cuda-convnet's
            x = ops.window(self.device, x, (0, 0), (x.shape[1] + eh, x.shape[2] + ew), 0.0)
        ctx["x"] = x
        w, out, precision = self.params["w"], None, _precision(ctx)
        if precision == "bf16" and x.dtype == BFLOAT16:  # bf16: x and w of one dtype (float32 x: the images)
            w = ctx["w_bf16"] = stored(self.device, w, BFLOAT16)
        if precision == "bf16" and self.bf16_native():
            out = self.device.empty((*self.out_shape, x.shape[-1]), BFLOAT16)
        fused = self.neuron is not None and self.neuron.name == "relu"  # the ReLU in the kernel's epilogue
        y = ops.conv_forward(self.device, x, w, self.params["b"], precision=precision, out=out, relu=fused,
                             **self._geom())
        if fused:  # keep what the ReLU backward reads (y), as _neuron_forward does
            ctx["y"] = y
            return y
        return self._neuron_forward(y, ctx)

    def backward(self, dy, ctx):
        dy = self._neuron_backward(dy, ctx)
        x, w, precision = ctx["x"], self.params["w"], _precision(ctx)
        out = None
        if precision == "bf16":  # the ops' rule: both inputs of a pass of one dtype; bfloat16 (rounding the images
            # exactly as the kernels would on load), the weights' bfloat16 copy of the forward, a bfloat16 dx
            x, dy = stored(self.device, x, BFLOAT16), stored(self.device, dy, BFLOAT16)
            w = ctx.get("w_bf16")
            if w is None:
                w = stored(self.device, self.params["w"], BFLOAT16)
            if self.needs_input_grad and self.bf16_native():  # (else float32: the window and neuron ops need it)
                out = self.device.empty(x.shape, BFLOAT16)
        self.grads["w"] = ops.conv_backward_filter(self.device, x, dy, self.size, precision=precision,
                                                   **self._geom())
        self.grads["b"] = ops.conv_backward_bias(self.device, dy)
        if not self.needs_input_grad:
            return None
        dx = ops.conv_backward_data(self.device, dy, w, x.shape[1:3], precision=precision, out=out, **self._geom())
        if tuple(x.shape[1:3]) != tuple(self.in_shape[1:]):
            dx = ops.window(self.device, dx, (0, 0), tuple(self.in_shape[1:]), 0.0)
        return dx

    def describe(self):
        g = f" groups {self.groups}" if self.groups > 1 else ""
        n = f" {self.neuron}" if self.neuron else ""
        r = " round up" if self.rounding == "up" else ""
        return (f"conv {self.filters} {self.size[0]}x{self.size[1]}/{self.stride[0]} pad {self.padding[0]}{g}{n}{r}")


class Local(Conv):
    """A locally connected layer (cuda-convnet's ``local``): a convolution whose filters are not shared across output
    positions, so w is ``(OH*OW, C/groups, KH, KW, F)``. Biases: one per filter and position, ``(F, OH, OW)``
    (cuda-convnet's local layers), or one per filter with ``sharedBiases = 1``."""

    type = "local"
    KEYS = (Key("sharedBiases", "int", 0, arg="shared_biases", minimum=0),)

    def __init__(self, name, inputs=(), **kw):
        super().__init__(name, inputs, **kw)
        if self.shared_biases not in (0, 1):
            raise LayerError(f"layer '{name}': sharedBiases must be 0 (per position) or 1 (per filter), "
                             f"got {self.shared_biases}")

    def geometry(self, in_shape):
        c, h, w = self._image_input(in_shape)
        _check_channels(self, in_shape)
        eh, ew = self.extension(in_shape)
        with _layer_errors(self.name):
            return LocalGeometry(c, h + eh, w + ew, 1, self.filters, *self.size, *self.stride, *self.padding,
                                 self.groups)

    def param_shapes(self):
        g = self.geometry(self.in_shape)
        return {"w": g.w_shape, "b": (self.filters,) if self.shared_biases else (self.filters, g.OH, g.OW)}

    def init_params(self, rng, dtype):
        shapes = self.param_shapes()
        c = self.in_shape[0] // self.groups
        std = self._std(c * self.size[0] * self.size[1], self.filters // self.groups * self.size[0] * self.size[1])
        return {"w": _gaussian(rng, shapes["w"], std, dtype), "b": np.full(shapes["b"], self.init_b, dtype)}

    def bf16_native(self):
        return False  # the local ops have no bfloat16 variant

    def forward(self, x, ctx):
        eh, ew = self.extension(self.in_shape)
        if eh or ew:  # rounding = up: the overhanging last windows read zeros, as cuda-convnet's
            x = ops.window(self.device, x, (0, 0), (x.shape[1] + eh, x.shape[2] + ew), 0.0)
        ctx["x"] = x
        y = ops.local_forward(self.device, x, self.params["w"], self.params["b"], **self._geom())
        return self._neuron_forward(y, ctx)

    def backward(self, dy, ctx):
        dy = self._neuron_backward(dy, ctx)
        x = ctx["x"]
        self.grads["w"] = ops.local_backward_filter(self.device, x, dy, self.size, **self._geom())
        self.grads["b"] = ops.local_backward_bias(self.device, dy, shared=bool(self.shared_biases))
        if not self.needs_input_grad:
            return None
        dx = ops.local_backward_data(self.device, dy, self.params["w"], x.shape[1:3], **self._geom())
        if tuple(x.shape[1:3]) != tuple(self.in_shape[1:]):
            dx = ops.window(self.device, dx, (0, 0), tuple(self.in_shape[1:]), 0.0)
        return dx

    def describe(self):
        return "local" + super().describe()[len("conv"):] + (" shared biases" if self.shared_biases else "")


class FC(_Learnable):
    type = "fc"
    KEYS = (Key("outputs", "int", minimum=1, aliases=("neurons",)),)

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

    def bf16_native(self):
        return _bf16_relu_only(self.neuron)

    def _bf16_out(self, ctx, shape):
        """bf16: a bfloat16 output buffer (the ops' rule: the result is rounded into a bfloat16 ``out``)."""
        if _precision(ctx) == "bf16" and self.bf16_native():
            return self.device.empty(shape, BFLOAT16)
        return None

    def forward(self, x, ctx):
        x = x.reshape(-1, x.shape[-1])  # (C,H,W,N) -> (CHW, N): free for C-contiguous CHWN
        ctx["x"] = x
        y = ops.fc_forward(self.device, x, self.params["w"], self.params["b"], precision=_precision(ctx),
                           out=self._bf16_out(ctx, (self.outputs, x.shape[1])))
        return self._neuron_forward(y, ctx)

    def backward(self, dy, ctx):
        dy = self._neuron_backward(dy, ctx)
        x = ctx["x"]
        self.grads["w"] = ops.fc_backward_weights(self.device, x, dy, precision=_precision(ctx))
        self.grads["b"] = ops.fc_backward_bias(self.device, dy)
        if not self.needs_input_grad:
            return None
        return ops.fc_backward_data(self.device, dy, self.params["w"], precision=_precision(ctx),
                                    out=self._bf16_out(ctx, x.shape))

    def describe(self):
        return f"fc {self.outputs}" + (f" {self.neuron}" if self.neuron else "")


def _neuron_forward(device, neuron, x, ctx, own=False):
    """y = neuron(x) (None: x itself), keeping in ``ctx`` what the backward reads (the neuron's ``uses``). ``own``:
    x is the layer's own pre-activation, which a neuron whose backward does not read it overwrites."""
    if neuron is None:
        return x
    if neuron.name == "relu":  # the vectorised ReLU kernel
        y = ops.relu_forward(device, x)
    else:
        y = ops.neuron_forward(device, x, neuron, out=x if own and neuron.kind.uses != "x" else None)
    if neuron.kind.uses == "x":
        ctx["neuron_x"] = x
    elif neuron.kind.uses == "y":
        ctx["y"] = y
    return y


def _neuron_backward(device, neuron, dy, ctx, relu_grad_fused=False):
    """dx of the neuron; ``relu_grad_fused``: a ReLU's, already applied by the layer reading the output (dy itself)."""
    if neuron is None:
        return dy
    if neuron.name == "relu":
        return dy if relu_grad_fused else ops.relu_backward(device, ctx["y"], dy)
    return ops.neuron_backward(device, ctx.get("neuron_x"), ctx.get("y"), dy, neuron)


class NeuronLayer(Layer):
    """cuda-convnet's neuron layer: ``neuron = relu``, ``tanh[a,b]``, ``logistic``, ``abs``, ``square``, ``sqrt``,
    ``softrelu``, ``brelu[a]``, ``linear[a,b]`` (convnet.neurons; ``linear`` / ``ident`` alone: the identity)."""

    type = "neuron"
    KEYS = (Key("neuron", "neuron"),)

    def flops(self):
        return int(np.prod(self.out_shape)) if self.neuron is not None else 0

    def bf16_native(self):
        return self.neuron is not None and self.neuron.name == "relu"

    def forward(self, x, ctx):
        return _neuron_forward(self.device, self.neuron, x, ctx)

    def backward(self, dy, ctx):
        return _neuron_backward(self.device, self.neuron, dy, ctx, self.relu_grad_fused)

    def relu_output(self):
        return self.neuron is not None and self.neuron.name == "relu"

    def describe(self):
        return f"neuron {self.neuron or 'ident'}"


class ReLU(Layer):
    type = "relu"

    def flops(self):
        return int(np.prod(self.out_shape))

    def bf16_native(self):
        return True

    def forward(self, x, ctx):
        y = ops.relu_forward(self.device, x)
        ctx["y"] = y
        return y

    def backward(self, dy, ctx):
        return dy if self.relu_grad_fused else ops.relu_backward(self.device, ctx["y"], dy)

    def relu_output(self):
        return True


class Pool(Layer):
    """Max or average pooling. ``rounding = down`` (the default): ``(H + 2*padding - size) // stride + 1`` outputs.
    ``rounding = up`` is cuda-convnet's rule: the first window at ``start`` (negative: before the image), then
    ``outputsX`` windows, or (0) ``ceil((H - start - size) / stride) + 1``, the last allowed to hang over the edge;
    the part of a window outside the image is not counted (avg divides by its real inputs)."""

    type = "pool"
    KEYS = (
        Key("pool", "str", "max", choices=("max", "avg")),
        Key("size", "pair", 3, minimum=1, aliases=_SIZE_ALIASES),
        Key("stride", "pair", 2, minimum=1),
        Key("padding", "pair", 0, minimum=0, aliases=("pad",)),
        _ROUNDING,
        Key("start", "int", 0),
        Key("outputsX", "int", 0, arg="outputs_x", minimum=0),
        _CHANNELS,
    )

    def __init__(self, name, inputs=(), **kw):
        super().__init__(name, inputs, **kw)
        if self.rounding == "down" and (self.start or self.outputs_x):
            raise LayerError(f"layer '{name}': start and outputsX belong to cuda-convnet's output-size rule: "
                             f"give rounding = up")
        if self.rounding == "up" and any(self.padding):
            raise LayerError(f"layer '{name}': with rounding = up the windows begin at start (a negative start "
                             f"reaches before the image), not padding")

    def windows(self, in_shape):
        """rounding = up: per axis (first window's position, number of windows, the span they read)."""
        _, *hw = self._image_input(in_shape)
        axes = []
        for n, k, s in zip(hw, self.size, self.stride):
            count = self.outputs_x or -(-(n - self.start - k) // s) + 1
            last = self.start + (count - 1) * s
            if count < 1 or last >= n or self.start + k <= 0:
                raise LayerError(f"layer '{self.name}': windows of {k} from start {self.start} with stride {s} "
                                 f"({count} of them) do not each overlap the input's {n} pixels")
            axes.append((self.start, count, last + k - self.start))
        return axes

    def _direct(self, in_shape):
        """Whether the op computes the layer as it is: windows from 0 that the floor rule gives."""
        if self.rounding == "down":
            return True
        return all(first == 0 and span <= n and (n - k) // s + 1 == count
                   for (first, count, span), n, k, s in zip(self.windows(in_shape), in_shape[1:], self.size,
                                                            self.stride))

    def geometry(self, in_shape):
        """The pooling of one image of shape ``in_shape`` (for rounding = up: of the span its windows read)."""
        c, h, w = self._image_input(in_shape)
        _check_channels(self, in_shape)
        if not self._direct(in_shape):
            (_, _, h), (_, _, w) = self.windows(in_shape)
        with _layer_errors(self.name):
            return PoolGeometry.of((c, h, w, 1), window=self.size, stride=self.stride, padding=self.padding)

    def output_shape(self, in_shape):
        g = self.geometry(in_shape)
        return (g.C, g.OH, g.OW)

    def flops(self):
        return int(np.prod(self.out_shape)) * self.size[0] * self.size[1]

    def _geom(self):
        return dict(mode=self.pool, window=self.size, stride=self.stride, padding=self.padding)

    def _avg_factor(self, dtype):
        """(1, OH, OW, 1): window area / the real inputs in each window (the op divides by the area)."""
        f = getattr(self, "_factor", None)
        if f is None or f.dtype != dtype or not self.device.is_array(f):
            counts = []
            for (first, count, _), n, k, s in zip(self.windows(self.in_shape), self.in_shape[1:], self.size,
                                                  self.stride):
                lo = first + s * np.arange(count)
                counts.append(np.minimum(lo + k, n) - np.maximum(lo, 0))
            area = self.size[0] * self.size[1]
            host = (area / np.outer(*counts))[None, :, :, None].astype(dtype)
            f = self._factor = self.device.asarray(host, dtype)
        return f

    def bf16_native(self):
        return self.pool == "max" and self._direct(self.in_shape)

    def forward(self, x, ctx):
        direct = self._direct(self.in_shape)
        if not direct:
            (h0, _, eh), (w0, _, ew) = self.windows(self.in_shape)
            x = ops.window(self.device, x, (h0, w0), (eh, ew), -np.inf if self.pool == "max" else 0.0)
        y = ops.pool_forward(self.device, x, **self._geom())
        ctx["x"], ctx["y"], ctx["direct"] = x, y, direct
        if not direct and self.pool == "avg":
            y = ops.multiply(self.device, y, self._avg_factor(y.dtype))
        return y

    def applies_relu_mask(self):
        return self.pool == "max"  # (the window's -inf padding is masked too, then cut off)

    def backward(self, dy, ctx):
        if ctx["direct"]:
            return ops.pool_backward(self.device, ctx["x"], ctx["y"], dy, relu_input=self.relu_input,
                                     **self._geom())
        if self.pool == "avg":
            dy = ops.multiply(self.device, dy, self._avg_factor(dy.dtype))
        dx = ops.pool_backward(self.device, ctx["x"], ctx["y"], dy, relu_input=self.relu_input, **self._geom())
        (h0, _, _), (w0, _, _) = self.windows(self.in_shape)
        return ops.window(self.device, dx, (-h0, -w0), tuple(self.in_shape[1:]), 0.0)

    def describe(self):
        r = f" round up from {self.start}" if self.rounding == "up" else ""
        return f"{self.pool}pool {self.size[0]}x{self.size[1]}/{self.stride[0]}{r}"


class LRN(Layer):
    """Cross-map local response normalisation. With ``groups`` > 1 the channels are normalised per group (the
    window never crosses a tower boundary), as in the two-tower AlexNet."""

    type = "lrn"
    type_aliases = ("cmrnorm",)
    KEYS = (
        Key("size", "int", 5, minimum=1, aliases=_SIZE_ALIASES),
        Key("alpha", "float", 1e-4, minimum=0.0),
        Key("beta", "float", 0.75, minimum=0.0),
        Key("k", "float", 2.0, minimum=0.0, exclusive=True),
        Key("convention", "str", "sum", choices=("sum", "mean")),
        Key("groups", "int", 1, minimum=1),
        _CHANNELS,
    )

    def geometry(self, in_shape):
        c, h, w = self._image_input(in_shape)
        _check_channels(self, in_shape)
        with _layer_errors(self.name):
            return LrnGeometry.of((c, h, w, 1), **self._p())

    def output_shape(self, in_shape):
        self.geometry(in_shape)
        return tuple(in_shape)

    def flops(self):
        return int(np.prod(self.out_shape)) * (self.size + 6)

    def _p(self):
        return dict(size=self.size, alpha=self.alpha, beta=self.beta, k=self.k, convention=self.convention,
                    groups=self.groups)

    def bf16_native(self):
        return True

    def forward(self, x, ctx):
        y, denom = ops.lrn_forward(self.device, x, **self._p())
        ctx["x"], ctx["y"], ctx["denom"] = x, y, denom
        return y

    def backward(self, dy, ctx):
        return ops.lrn_backward(self.device, ctx["x"], ctx["y"], ctx["denom"], dy, **self._p())

    def describe(self):
        g = f" groups {self.groups}" if self.groups > 1 else ""
        return f"lrn {self.size} a={self.alpha:g} b={self.beta:g} k={self.k:g} ({self.convention}){g}"


class RNorm(Layer):
    """Same-map response normalisation (cuda-convnet's ``rnorm``): each activation divided by ``(minDiv + scale /
    size**2 * sum of squares over the size x size window around it in its map)**pow``; the window is clipped at the
    image's edges and ``scale`` is divided by the full window's area, as in cuda-convnet."""

    type = "rnorm"
    KEYS = (
        Key("size", "int", REQUIRED, minimum=1, aliases=_SIZE_ALIASES),
        Key("scale", "float", REQUIRED, minimum=0.0),
        Key("pow", "float", REQUIRED, minimum=0.0),
        Key("minDiv", "float", 1.0, arg="min_div", minimum=0.0, exclusive=True),
        _CHANNELS,
    )

    def output_shape(self, in_shape):
        c, h, w = self._image_input(in_shape)
        _check_channels(self, in_shape)
        with _layer_errors(self.name):
            RnormGeometry.of((c, h, w, 1), **self._p())
        return tuple(in_shape)

    def flops(self):
        return int(np.prod(self.out_shape)) * (2 * self.size * self.size + 6)

    def _p(self):
        return dict(size=self.size, alpha=self.scale, beta=self.pow, k=self.min_div)

    def forward(self, x, ctx):
        y, denom = ops.rnorm_forward(self.device, x, **self._p())
        ctx["x"], ctx["denom"] = x, denom
        return y

    def backward(self, dy, ctx):
        return ops.rnorm_backward(self.device, ctx["x"], ctx["denom"], dy, **self._p())

    def describe(self):
        return f"{self.type} {self.size}x{self.size} scale={self.scale:g} pow={self.pow:g} minDiv={self.min_div:g}"


class CNorm(RNorm):
    """Contrast normalisation (cuda-convnet's ``cnorm``): as ``rnorm``, with the window mean (over the clipped
    window's pixels) subtracted before squaring; the activation itself is divided, not its difference from the
    mean. The backward pass is exact (cuda-convnet's leaves out the gradient through the mean)."""

    type = "cnorm"

    def flops(self):
        return int(np.prod(self.out_shape)) * (3 * self.size * self.size + 8)

    def forward(self, x, ctx):
        y, mean_diff, denom = ops.cnorm_forward(self.device, x, **self._p())
        ctx["x"], ctx["mean_diff"], ctx["denom"] = x, mean_diff, denom
        return y

    def backward(self, dy, ctx):
        return ops.cnorm_backward(self.device, ctx["x"], ctx["mean_diff"], ctx["denom"], dy, **self._p())


class Dropout(Layer):
    """Inverted dropout (outputs scaled by 1/keep in training, identity at test time, which equals the paper's
    'multiply by 0.5 at test time'). The mask comes from the counter-based RNG keyed on (seed, offset, element), so
    the backward regenerates it and a resumed run draws the same masks.

    The mask is a *stream* named by the layer (``random_stream``: its own name, or ``maskOf``), seeded by the net's
    seed, the step and that name. ``maskOf = drop6`` with ``maskStart = 2048`` makes this layer the units from 2048
    on of a layer drop6 (the tower-b half of the one-device form): its unit u (all its pixels, all images) draws
    what unit 2048 + u of drop6 draws, so ``alexnet-2gpu`` trains with exactly ``alexnet``'s masks. With ``(C, H, W,
    N)`` or ``(features, N)`` activations, element (u, ..., n) of the whole layer is element ``u * H*W*N + ...``, so
    the op's ``start`` is ``maskStart * H*W * N``. The net checks that layers sharing a stream draw disjoint units
    of the same shape.

    A data-parallel rank's shard (``ctx['batch'] = (B, first)``, from ``Net.forward(..., batch=)``) draws its images'
    part of the whole batch's mask: N above is the whole batch's B, and the op's ``batch`` places the shard's images
    at [first, first + N_local) of it, so the ranks together draw the single-process masks."""

    type = "dropout"
    KEYS = (
        Key("keep", "float", 0.5),
        Key("maskOf", "name", None, arg="mask_of"),
        Key("maskStart", "int", 0, arg="mask_start", minimum=0),
        # train: inverted dropout (scaled by 1/keep in training; cuda-convnet2's dropout); test: the kept units
        # unscaled in training, every unit times keep at test time (cuda-convnet2's dropout2, the paper's form)
        Key("scaling", "str", "train", choices=("train", "test")),
    )

    def __init__(self, name, inputs=(), **kw):
        super().__init__(name, inputs, **kw)
        if not 0.0 < self.keep <= 1.0:
            raise LayerError(f"layer '{name}': keep must be in (0, 1], got {self.keep:g}")
        if self.mask_start and self.mask_of is None:
            raise LayerError(f"layer '{name}': maskStart = {self.mask_start} needs maskOf (the layer whose mask "
                             f"this one is a part of)")

    @property
    def random_stream(self) -> str:
        return self.mask_of or self.name

    def mask_units(self):
        """(first, stop) of this layer's units (channels or features) in its mask stream."""
        return self.mask_start, self.mask_start + self.out_shape[0]

    def _where(self, a, ctx):
        """The op's (start, batch) for ``a`` (this layer's output or its gradient): start is the index of this layer's
        first unit in the mask stream of the whole batch, whose B images are ``a``'s own or, for a shard
        (``ctx['batch']``), the whole batch's."""
        batch = ctx.get("batch")
        images = a.shape[-1] if batch is None else batch[0]
        return self.mask_start * math.prod(self.out_shape[1:]) * images, batch

    def bf16_native(self):
        return self.scaling != "test" or self.keep == 1.0

    def forward(self, x, ctx):
        test_scaled = self.scaling == "test" and self.keep != 1.0
        if not ctx.get("train") or self.keep == 1.0:
            ctx["active"] = False
            return ops.scale(self.device, x, self.keep) if test_scaled else x
        ctx["active"] = True
        start, batch = self._where(x, ctx)
        y = ops.dropout_forward(self.device, x, self.keep, ctx["seed"], 0, start, batch=batch)
        return ops.scale(self.device, y, self.keep, out=y) if test_scaled else y

    def backward(self, dy, ctx):
        if not ctx["active"]:
            return ops.scale(self.device, dy, self.keep) if self.scaling == "test" else dy
        start, batch = self._where(dy, ctx)
        dx = ops.dropout_backward(self.device, dy, self.keep, ctx["seed"], 0, start, batch=batch)
        return ops.scale(self.device, dx, self.keep, out=dx) if self.scaling == "test" else dx

    def describe(self):
        shared = f" (mask of {self.mask_of} from unit {self.mask_start})" if self.mask_of else ""
        t = " (scaled at test time)" if self.scaling == "test" else ""
        return f"dropout keep {self.keep:g}{shared}{t}"


class SoftmaxCost(Layer):
    """Softmax + multinomial logistic regression cost (cross-entropy) on ``(classes, N)`` logits.

    ``forward`` returns the probabilities and stores the summed loss in ``ctx['loss']`` (a 0-d device array) when
    labels are given. The gradient is the paper's: the average over the batch of d(-log p)/d logits, times
    ``coeff``.

    Labels in host memory are range-checked by the op; on a GPU the kernel counts out-of-range labels into a device
    counter instead (checking on the host would cost a synchronisation per step), which the training loop reads
    with :meth:`take_bad_labels` where it synchronises anyway."""

    bf16_output = False  # the probabilities (and the loss) stay float32
    type = "softmax"
    type_aliases = ("softmax_ce",)
    KEYS = (Key("coeff", "float", 1.0, minimum=0.0, exclusive=True),)

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise LayerError(f"layer '{self.name}': softmax needs (classes,) logits from an fc layer, "
                             f"got shape {in_shape}")
        if in_shape[0] < 2:  # its one probability is always 1: loss 0, zero gradients, nothing learned
            raise LayerError(f"layer '{self.name}': a softmax over {in_shape[0]} class learns nothing (its probability "
                             f"is always 1); its input needs at least 2 outputs, one per class")
        return tuple(in_shape)

    def flops(self):
        return 4 * int(np.prod(self.out_shape))

    def forward(self, x, ctx):
        labels = ctx.get("labels")
        if labels is None:
            return ops.softmax_forward(self.device, x)
        counter = getattr(self, "_bad_labels", None)
        if counter is None or not self.device.is_array(counter):
            counter = self._bad_labels = self.device.zeros((1,), np.int32)
        loss, probs, dlogits = ops.softmax_cross_entropy(self.device, x, labels, bad_labels=counter)
        ctx["loss"], ctx["dlogits"] = loss, dlogits
        return probs

    def take_bad_labels(self) -> int:
        """The number of out-of-range labels seen since the last call (reads the device counter: a sync on a GPU)."""
        counter = getattr(self, "_bad_labels", None)
        if counter is None:
            return 0
        bad = int(self.device.to_numpy(counter)[0])
        if bad:
            with self.device.activate():  # the trainer reads it from the net's device, maybe another GPU
                counter[...] = 0
        return bad

    def backward(self, dy, ctx):
        d = ctx["dlogits"]
        n = d.shape[-1]
        return ops.scale(self.device, d, self.coeff / n)


class _Join(Layer):
    """An element-wise join of inputs of one shape (cuda-convnet's eltsum / eltmax). The graph hands the layer its
    inputs joined along the first axis (one copy); the layer works on the k equal parts of that array."""

    least_inputs = 1

    def __init__(self, name, inputs=(), **kw):
        super().__init__(name, inputs, **kw)
        if len(self.inputs) < self.least_inputs:
            raise LayerError(f"layer '{name}': an {self.type} layer joins at least {self.least_inputs} inputs, got "
                             f"{len(self.inputs)}")
        if len(self.inputs) > _MAX_JOIN_INPUTS:
            raise LayerError(f"layer '{name}': an {self.type} layer joins at most {_MAX_JOIN_INPUTS} inputs, "
                             f"got {len(self.inputs)}")
        self.input_shapes = None  # the inputs' own shapes (set by the net before output_shape)

    def output_shape(self, in_shape):
        shapes = self.input_shapes or [tuple(in_shape)]
        if len({tuple(s) for s in shapes}) != 1:
            raise LayerError(f"layer '{self.name}': the inputs of an {self.type} layer must have one shape, got "
                             + ", ".join(f"{i} {tuple(s)}" for i, s in zip(self.inputs, shapes)))
        return tuple(shapes[0])

    def flops(self):
        return int(np.prod(self.out_shape)) * len(self.inputs)

    def _parts(self, x):
        m = x.shape[0] // len(self.inputs)
        return [x[i * m:(i + 1) * m] for i in range(len(self.inputs))]

    def _grads(self, dy, one):
        """The joined input gradient: ``one(i, out)`` writes input i's part."""
        if not self.needs_input_grad:
            return None
        k = len(self.inputs)
        dx = self.device.empty((k * dy.shape[0], *dy.shape[1:]), dy.dtype)
        for i, part in enumerate(self._parts(dx)):
            one(i, part)
        return dx


class EltSum(_Join):
    """y = sum_i coeffs[i] * input_i (``coeffs = a,b,...``, one per input; default all 1)."""

    type = "eltsum"
    KEYS = (Key("coeffs", "floats", None),)

    def __init__(self, name, inputs=(), **kw):
        super().__init__(name, inputs, **kw)
        if self.coeffs is None:
            self.coeffs = (1.0,) * len(self.inputs)
        if len(self.coeffs) != len(self.inputs):
            raise LayerError(f"layer '{name}': coeffs has {len(self.coeffs)} numbers for {len(self.inputs)} inputs "
                             f"(one per input)")

    def forward(self, x, ctx):
        return ops.eltsum_forward(self.device, self._parts(x), list(self.coeffs))

    def backward(self, dy, ctx):
        return self._grads(dy, lambda i, out: ops.eltsum_backward(self.device, dy, self.coeffs[i], out=out))

    def describe(self):
        return "eltsum " + ",".join(f"{c:g}" for c in self.coeffs)


class EltMax(_Join):
    """y = the element-wise maximum of the inputs; the gradient goes to the input that gave it (ties: the first
    input in ``inputs`` order; see ops.eltmax_forward)."""

    type = "eltmax"
    least_inputs = 2

    def forward(self, x, ctx):
        y, ctx["which"] = ops.eltmax_forward(self.device, self._parts(x))
        return y

    def backward(self, dy, ctx):
        return self._grads(dy, lambda i, out: ops.eltmax_backward(self.device, ctx["which"], dy, i, out=out))

    def describe(self):
        return f"eltmax of {len(self.inputs)}"


LAYER_TYPES = {cls.type: cls for cls in (Data, Conv, Local, FC, ReLU, NeuronLayer, Pool, LRN, RNorm, CNorm, Dropout,
                                         SoftmaxCost, EltSum, EltMax)}
