"""The geometry of each op family, as one frozen value computed once per call.

Every shape rule of the project lives here: the op layer (``convnet.ops``) builds one of these values from the
arrays and the parameters, the NumPy references, the layers' shape inference and the tests use the same value,
and the bindings receive it as a named struct (``csrc/bindings/geometry.h`` reads its fields by name). The only
other copy of the output-size rule is the C++ launchers' re-check (``csrc/kernels/geometry.h``).

* :class:`ConvGeometry` -- x ``(C, H, W, N)``, w ``(C/groups, KH, KW, F)``, y ``(F, OH, OW, N)``.
* :class:`LocalGeometry` -- as ConvGeometry with unshared filters: w ``(OH*OW, C/groups, KH, KW, F)``.
* :class:`PoolGeometry` -- x ``(C, H, W, N)``, y ``(C, OH, OW, N)``; ``0 <= pad <= window // 2``.
* :class:`LrnGeometry`  -- x ``(C, H, W, N)``, a window of ``size`` channels within each of ``groups`` groups, and
  the normalisation constants (``a`` is alpha resolved by the convention).
* :class:`RnormGeometry` -- x ``(C, H, W, N)`` normalised over a ``size`` x ``size`` window within each map
  (same-map response and contrast normalisation; ``a = alpha / size**2``).

Constructing a value validates it: a ``TypeError`` or ``ValueError`` names the argument and what was expected.
Layers do shape inference per image: they build the value with ``N = 1``.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ConvGeometry", "LocalGeometry", "PoolGeometry", "LrnGeometry", "RnormGeometry", "pair", "output_size",
           "lrn_scale", "INT32_MAX", "LRN_CONVENTIONS"]

INT32_MAX = 2**31 - 1  # the kernels index with 32-bit ints: every tensor has fewer elements than this
LRN_CONVENTIONS = ("sum", "mean")


def output_size(size: int, window: int, stride: int, pad: int) -> int:
    """The floor rule shared by convolution and pooling: ``(size + 2*pad - window) // stride + 1``."""
    return (size + 2 * pad - window) // stride + 1


def lrn_scale(alpha: float, size: int, convention: str) -> float:
    """LRN's coefficient ``a`` in front of the sum of squares: ``alpha`` (``"sum"``, the 2012 paper as printed) or
    ``alpha / size`` (``"mean"``: Caffe, torch.nn.LocalResponseNorm, cuda-convnet's ``scale``)."""
    if convention == "sum":
        return float(alpha)
    if convention == "mean":
        return float(alpha) / size
    raise ValueError(f"convention must be 'sum' (a = alpha, the paper) or 'mean' (a = alpha/size, Caffe/torch/"
                     f"cuda-convnet), got {convention!r}")


def _plain(v) -> bool:
    """A Python int (not a bool) or a tuple of them: an argument a built geometry can be looked up by exactly."""
    t = type(v)
    if t is int:
        return True
    if t is not tuple:
        return False
    for e in v:  # a loop, not all() over a generator: this runs for every argument of every op call
        if type(e) is not int:
            return False
    return True


def _memoized(build):
    """A geometry constructor that returns the value it built before for the same arguments when every argument is
    plain (``_plain``: the shapes and ints a training step passes, the same few every step); any other argument (a
    list, a NumPy int, a bool, a float) is validated afresh, and an error is never remembered. Geometries are frozen
    values, so sharing one is safe; the checks cost about as much as a small kernel otherwise."""
    built = {}

    @functools.wraps(build)
    def of(cls, *args, **kwargs):
        for a in (*args, *kwargs.values()):
            if not _plain(a):
                return build(cls, *args, **kwargs)
        key = (cls, args, tuple(sorted(kwargs.items())))
        g = built.get(key)
        if g is None:
            if len(built) >= 4096:
                built.clear()
            g = built[key] = build(cls, *args, **kwargs)
        return g
    return of


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int32_arg(name: str, value: int) -> None:
    """The kernels take sizes, strides and paddings as 32-bit ints: a larger value is a ValueError here, not
    pybind11's "incompatible function arguments" at the launch."""
    if value > INT32_MAX:
        raise ValueError(f"{name} must be < 2**31 (the kernels take 32-bit integers), got {value}")


def pair(name: str, value, *, minimum: int = 0) -> tuple[int, int]:
    """An int or an (h, w) pair of ints, each >= minimum and < 2**31 -> (h, w) of Python ints."""
    if _is_int(value):
        h = w = int(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        h, w = int(value[0]), int(value[1])
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if h < minimum or w < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    _check_int32_arg(name, max(h, w))
    return h, w


def _count(name: str, value, *, minimum: int = 1) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    _check_int32_arg(name, int(value))
    return int(value)


def _shape4(name: str, shape) -> tuple[int, int, int, int]:
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must be 4-D, got shape {shape}")
    if any(not _is_int(s) or s < 1 for s in shape):
        raise ValueError(f"{name} must have no empty dimension, got shape {shape}")
    return tuple(int(s) for s in shape)


def _shape5(name: str, shape) -> tuple[int, int, int, int, int]:
    shape = tuple(shape)
    if len(shape) != 5:
        raise ValueError(f"{name} must be 5-D, got shape {shape}")
    if any(not _is_int(s) or s < 1 for s in shape):
        raise ValueError(f"{name} must have no empty dimension, got shape {shape}")
    return tuple(int(s) for s in shape)


def _check_int32(**sizes) -> None:
    for name, size in sizes.items():
        if size > INT32_MAX:
            raise ValueError(f"{name} would have {size} elements; the kernels support fewer than 2**31")


class _Window:
    """What a convolution and a pooling geometry share: an input (C, H, W, N) swept by a strided, padded window."""

    @property
    def stride(self) -> tuple[int, int]:
        return self.stride_h, self.stride_w

    @property
    def padding(self) -> tuple[int, int]:
        return self.pad_h, self.pad_w

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return self.C, self.H, self.W, self.N


@dataclass(frozen=True)
class ConvGeometry(_Window):
    """A (grouped, strided, padded) convolution. Group g uses input channels ``[g*Cg, (g+1)*Cg)`` and filters
    ``[g*Fg, (g+1)*Fg)``. Padding is implicit zeros."""

    C: int
    H: int
    W: int
    N: int
    F: int
    KH: int
    KW: int
    stride_h: int = 1
    stride_w: int = 1
    pad_h: int = 0
    pad_w: int = 0
    groups: int = 1
    OH: int = field(init=False)
    OW: int = field(init=False)

    def __post_init__(self):
        for name in ("C", "H", "W", "N", "F", "KH", "KW", "stride_h", "stride_w"):
            _count(name, getattr(self, name))
        for name in ("pad_h", "pad_w"):
            _count(name, getattr(self, name), minimum=0)
        g = _count("groups", self.groups)
        if self.C % g:
            raise ValueError(f"groups={g} must divide the number of input channels {self.C}")
        if self.F % g:
            raise ValueError(f"groups={g} must divide the number of filters {self.F}")
        if self.H + 2 * self.pad_h < self.KH or self.W + 2 * self.pad_w < self.KW:
            raise ValueError(f"filter {self.KH}x{self.KW} is larger than the padded input "
                             f"{self.H + 2 * self.pad_h}x{self.W + 2 * self.pad_w} (input {self.H}x{self.W}, "
                             f"padding {self.padding})")
        object.__setattr__(self, "OH", output_size(self.H, self.KH, self.stride_h, self.pad_h))
        object.__setattr__(self, "OW", output_size(self.W, self.KW, self.stride_w, self.pad_w))
        _check_int32(input=self.C * self.H * self.W * self.N, output=self.F * self.OH * self.OW * self.N,
                     w=self.Cg * self.KH * self.KW * self.F)

    @classmethod
    @_memoized
    def of(cls, x_shape, w_shape, *, stride=1, padding=0, groups=1) -> "ConvGeometry":
        """From x ``(C, H, W, N)`` and w ``(C/groups, KH, KW, F)`` shapes; checks that they agree."""
        c, h, w, n = _shape4("x", x_shape)
        cg, kh, kw, f = _shape4("w", w_shape)
        (sh, sw), (ph, pw) = pair("stride", stride, minimum=1), pair("padding", padding)
        g = cls(c, h, w, n, f, kh, kw, sh, sw, ph, pw, _count("groups", groups))
        if cg * g.groups != c:
            raise ValueError(f"w must have shape ({c // g.groups}, KH, KW, F) for {c} input channels and "
                             f"groups={g.groups}, got {tuple(w_shape)}")
        return g

    @classmethod
    @_memoized
    def of_backward_data(cls, dy_shape, w_shape, input_hw, *, stride=1, padding=0, groups=1) -> "ConvGeometry":
        """The forward geometry whose input gradient is computed from dy ``(F, OH, OW, N)``, w and the input's
        ``(H, W)`` (which the output size alone does not determine when stride > 1)."""
        f, oh, ow, n = _shape4("dy", dy_shape)
        cg, kh, kw, f2 = _shape4("w", w_shape)
        h, w = pair("input_hw", input_hw, minimum=1)
        if f2 != f:
            raise ValueError(f"w has {f2} filters but dy has {f} (dy must be (F, OH, OW, N), w (C/groups, KH, KW, F))")
        g = cls.of((cg * _count("groups", groups), h, w, n), (cg, kh, kw, f), stride=stride, padding=padding,
                   groups=groups)
        if (g.OH, g.OW) != (oh, ow):
            raise ValueError(f"dy has spatial size {(oh, ow)} but input_hw={(h, w)} with filter {kh}x{kw}, "
                             f"stride {g.stride} and padding {g.padding} gives {(g.OH, g.OW)}")
        return g

    @classmethod
    @_memoized
    def of_backward_filter(cls, x_shape, dy_shape, filter_hw, *, stride=1, padding=0, groups=1) -> "ConvGeometry":
        """The forward geometry whose filter gradient is computed from x, dy ``(F, OH, OW, N)`` and ``(KH, KW)``."""
        c, h, w, n = _shape4("x", x_shape)
        f, oh, ow, n2 = _shape4("dy", dy_shape)
        kh, kw = pair("filter_hw", filter_hw, minimum=1)
        if n2 != n:
            raise ValueError(f"dy has {n2} images but x has {n} (x is (C, H, W, N), dy (F, OH, OW, N))")
        (sh, sw), (ph, pw) = pair("stride", stride, minimum=1), pair("padding", padding)
        g = cls(c, h, w, n, f, kh, kw, sh, sw, ph, pw, _count("groups", groups))
        if (g.OH, g.OW) != (oh, ow):
            raise ValueError(f"dy has spatial size {(oh, ow)} but x {(h, w)} with filter {kh}x{kw}, stride "
                             f"{g.stride} and padding {g.padding} gives {(g.OH, g.OW)}")
        return g

    @property
    def Cg(self) -> int:
        return self.C // self.groups

    @property
    def Fg(self) -> int:
        return self.F // self.groups

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return self.Cg, self.KH, self.KW, self.F

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return self.F, self.OH, self.OW, self.N

    def flops(self) -> int:
        """Multiply-adds x 2 of the forward pass (the same count for each backward pass)."""
        return 2 * self.F * self.OH * self.OW * self.N * self.Cg * self.KH * self.KW


@dataclass(frozen=True)
class LocalGeometry(ConvGeometry):
    """A locally connected layer: a convolution whose filters are not shared across output positions, so w is
    ``(OH*OW, C/groups, KH, KW, F)`` (cuda-convnet's ``(numModules, numFilterColors, filterPixels, numFilters)``,
    positions row-major). The same fields and output rule as :class:`ConvGeometry`."""

    def __post_init__(self):
        super().__post_init__()
        _check_int32(w=self.OH * self.OW * self.Cg * self.KH * self.KW * self.F)

    @classmethod
    @_memoized
    def of(cls, x_shape, w_shape, *, stride=1, padding=0, groups=1) -> "LocalGeometry":
        """From x ``(C, H, W, N)`` and w ``(OH*OW, C/groups, KH, KW, F)`` shapes; checks that they agree."""
        c, h, w, n = _shape4("x", x_shape)
        _, _, kh, kw, f = _shape5("w", w_shape)
        (sh, sw), (ph, pw) = pair("stride", stride, minimum=1), pair("padding", padding)
        g = cls(c, h, w, n, f, kh, kw, sh, sw, ph, pw, _count("groups", groups))
        g._check_w(w_shape)
        return g

    @classmethod
    @_memoized
    def of_backward_data(cls, dy_shape, w_shape, input_hw, *, stride=1, padding=0, groups=1) -> "LocalGeometry":
        """The forward geometry whose input gradient is computed from dy ``(F, OH, OW, N)``, w and the input's
        ``(H, W)``."""
        f, oh, ow, n = _shape4("dy", dy_shape)
        _, cg, kh, kw, f2 = _shape5("w", w_shape)
        h, w = pair("input_hw", input_hw, minimum=1)
        if f2 != f:
            raise ValueError(f"w has {f2} filters but dy has {f} (dy must be (F, OH, OW, N), w (OH*OW, C/groups, "
                             f"KH, KW, F))")
        (sh, sw), (ph, pw) = pair("stride", stride, minimum=1), pair("padding", padding)
        g = cls(cg * _count("groups", groups), h, w, n, f, kh, kw, sh, sw, ph, pw, groups)
        if (g.OH, g.OW) != (oh, ow):
            raise ValueError(f"dy has spatial size {(oh, ow)} but input_hw={(h, w)} with filter {kh}x{kw}, "
                             f"stride {g.stride} and padding {g.padding} gives {(g.OH, g.OW)}")
        g._check_w(w_shape)
        return g

    # of_backward_filter: ConvGeometry's (the filter gradient's shape follows from x, dy and (KH, KW)).

    def _check_w(self, w_shape):
        if tuple(w_shape) != self.w_shape:
            raise ValueError(f"w must have shape (OH*OW, C/groups, KH, KW, F) = {self.w_shape} for input "
                             f"{self.x_shape[:3]}, groups={self.groups}, stride {self.stride} and padding "
                             f"{self.padding}, got {tuple(w_shape)}")

    @property
    def w_shape(self) -> tuple[int, int, int, int, int]:
        return self.OH * self.OW, self.Cg, self.KH, self.KW, self.F


@dataclass(frozen=True)
class PoolGeometry(_Window):
    """Max or average pooling, floor output rule; padding is never counted (avg divides by real inputs)."""

    C: int
    H: int
    W: int
    N: int
    window_h: int
    window_w: int
    stride_h: int
    stride_w: int
    pad_h: int = 0
    pad_w: int = 0
    OH: int = field(init=False)
    OW: int = field(init=False)

    def __post_init__(self):
        for name in ("C", "H", "W", "N", "window_h", "window_w", "stride_h", "stride_w"):
            _count(name, getattr(self, name))
        for name in ("pad_h", "pad_w"):
            _count(name, getattr(self, name), minimum=0)
        for axis, size, k, p in (("height", self.H, self.window_h, self.pad_h),
                                 ("width", self.W, self.window_w, self.pad_w)):
            if p > k // 2:
                raise ValueError(f"padding {p} along {axis} must be <= window // 2 = {k // 2} (window {k})")
            if size + 2 * p < k:
                raise ValueError(f"window {k} is larger than the padded input {axis} {size} + 2*{p}")
        object.__setattr__(self, "OH", output_size(self.H, self.window_h, self.stride_h, self.pad_h))
        object.__setattr__(self, "OW", output_size(self.W, self.window_w, self.stride_w, self.pad_w))
        _check_int32(input=self.C * self.H * self.W * self.N)

    @classmethod
    @_memoized
    def of(cls, x_shape, *, window=3, stride=2, padding=0) -> "PoolGeometry":
        shape = tuple(x_shape)
        if len(shape) != 4 or any(not _is_int(s) or s < 1 for s in shape):
            raise ValueError(f"x must have a non-empty shape (C, H, W, N), got {shape}")
        win = pair("window", window, minimum=1)
        st = pair("stride", stride, minimum=1)
        pad = pair("padding", padding)
        return cls(*(int(s) for s in shape), *win, *st, *pad)

    @property
    def window(self) -> tuple[int, int]:
        return self.window_h, self.window_w

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return self.C, self.OH, self.OW, self.N


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _real(name: str, value, *, low: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if value > FLOAT32_MAX:  # the kernels take float32: a larger value would become inf
        raise ValueError(f"{name} must be at most {FLOAT32_MAX:.4g} (the kernels take float32), got {value}")
    return value


@dataclass(frozen=True)
class LrnGeometry:
    """Cross-map LRN: ``denom_c = k + a * sum_{j in W(c)} x_j**2``, ``y_c = x_c * denom_c**(-beta)``, window
    ``W(c) = [c - size//2, c - size//2 + size - 1]`` clipped to the channels of c's group (``groups`` equal groups;
    the window never crosses a group boundary: the two-tower AlexNet's per-tower normalisation).

    ``a = alpha`` (``convention="sum"``, the paper as printed) or ``alpha / size`` (``"mean"``: Caffe, torch,
    cuda-convnet)."""

    C: int
    H: int
    W: int
    N: int
    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0
    convention: str = "sum"
    groups: int = 1

    def __post_init__(self):
        for name in ("C", "H", "W", "N"):
            _count(name, getattr(self, name))
        if not _is_int(self.size) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        _check_int32_arg("size", int(self.size))
        lrn_scale(1.0, self.size, self.convention)  # validates the convention
        object.__setattr__(self, "alpha", _real("alpha", self.alpha, low=0.0))
        object.__setattr__(self, "beta", _real("beta", self.beta, low=0.0))
        object.__setattr__(self, "k", _real("k", self.k, low=0.0, low_open=True))
        g = _count("groups", self.groups)
        if self.C % g:
            raise ValueError(f"groups={g} must divide the number of channels {self.C}")
        _check_int32(input=self.C * self.H * self.W * self.N)

    @classmethod
    def of(cls, x_shape, *, size=5, alpha=1e-4, beta=0.75, k=2.0, convention="sum", groups=1) -> "LrnGeometry":
        shape = tuple(x_shape)
        if len(shape) != 4 or any(not _is_int(s) or s < 1 for s in shape):
            raise ValueError(f"x must have a non-empty shape (C, H, W, N), got {shape}")
        return cls(*(int(s) for s in shape), size, alpha, beta, k, convention, groups)

    @property
    def a(self) -> float:
        """The coefficient of the sum of squares, with the convention resolved (what the kernels take)."""
        return lrn_scale(self.alpha, self.size, self.convention)

    @property
    def Cg(self) -> int:
        return self.C // self.groups

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return self.C, self.H, self.W, self.N

    def group(self) -> "LrnGeometry":
        """The geometry of one group (``Cg`` channels, ``groups == 1``): what one kernel launch normalises."""
        return dataclasses.replace(self, C=self.Cg, groups=1)


@dataclass(frozen=True)
class RnormGeometry:
    """Same-map response / contrast normalisation (cuda-convnet's ``rnorm``, ``cnorm``): ``denom_p = k + a *
    sum_{q in W(p)} s_q**2``, ``y_p = x_p * denom_p**(-beta)``, over the ``size`` x ``size`` window ``W(p)`` of rows
    ``[h - size//2, h - size//2 + size)`` and columns likewise, clipped to the image; ``a = alpha / size**2`` (the
    window's area, as cuda-convnet scales its ``scale``)."""

    C: int
    H: int
    W: int
    N: int
    size: int = 5
    alpha: float = 1e-3
    beta: float = 0.75
    k: float = 1.0

    def __post_init__(self):
        for name in ("C", "H", "W", "N"):
            _count(name, getattr(self, name))
        if not _is_int(self.size) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        _check_int32_arg("size", int(self.size))
        object.__setattr__(self, "alpha", _real("alpha", self.alpha, low=0.0))
        object.__setattr__(self, "beta", _real("beta", self.beta, low=0.0))
        object.__setattr__(self, "k", _real("k", self.k, low=0.0, low_open=True))
        _check_int32(input=self.C * self.H * self.W * self.N)

    @classmethod
    def of(cls, x_shape, *, size=5, alpha=1e-3, beta=0.75, k=1.0) -> "RnormGeometry":
        shape = tuple(x_shape)
        if len(shape) != 4 or any(not _is_int(s) or s < 1 for s in shape):
            raise ValueError(f"x must have a non-empty shape (C, H, W, N), got {shape}")
        return cls(*(int(s) for s in shape), size, alpha, beta, k)

    @property
    def a(self) -> float:
        """The coefficient of the sum of squares: alpha divided by the window's area (what the kernels take)."""
        return self.alpha / (self.size * self.size)

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return self.C, self.H, self.W, self.N
