"""cuda-convnet's neurons: the one table of their names, parameters and formulas.

A neuron is written as in cuda-convnet's layer files: ``relu``, ``logistic``, ``tanh[a,b]``, ``brelu[a]``,
``linear[a,b]``, ... (:func:`parse`); ``linear`` / ``ident`` without parameters (or nothing) is no neuron. The
value :class:`Neuron` is what the ops (``convnet.ops.neuron_forward``), the reference and the layers (``type =
neuron``, and ``neuron =`` on conv and fc layers) take. The kernels (csrc/kernels/neuron.cu) know the neurons by
their ``code`` in this table.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    code: int  # NeuronKind in csrc/kernels/neuron.h
    params: tuple  # parameter names, in the order written
    formula: str
    uses: str  # what the backward reads: "x" (the input), "y" (the output) or "" (neither)


# name -> its definition (cuda-convnet's cudaconvnet/include/neuron.cuh)
NEURONS = {
    "relu": Kind(0, (), "max(x, 0)", "y"),
    "tanh": Kind(1, ("a", "b"), "a * tanh(b * x)", "y"),
    "logistic": Kind(2, (), "1 / (1 + e^-x)", "y"),
    "abs": Kind(3, (), "|x|", "x"),
    "square": Kind(4, (), "x^2", "x"),
    "sqrt": Kind(5, (), "sqrt(x)", "y"),
    "softrelu": Kind(6, (), "log(1 + e^x)", "y"),
    "brelu": Kind(7, ("a",), "min(max(x, 0), a)", "y"),
    "linear": Kind(8, ("a", "b"), "a * x + b", ""),
}
IDENTITY = (None, "", "linear", "ident")  # spellings of "no neuron"

_FORM = re.compile(r"^\s*([a-z]+)\s*(?:\[([^\]]*)\])?\s*$")


def forms() -> str:
    """Every neuron as it is written, for error messages: ``relu, tanh[a,b], ...``."""
    return ", ".join(n + (f"[{','.join(k.params)}]" if k.params else "") for n, k in NEURONS.items())


@dataclass(frozen=True)
class Neuron:
    """One neuron with its parameters (0.0 where it has none)."""

    name: str
    a: float = 0.0
    b: float = 0.0

    def __post_init__(self):
        kind = NEURONS.get(self.name)
        if kind is None:
            raise ValueError(f"unknown neuron {self.name!r} (known: {forms()}, or linear/ident for none)")
        for p in ("a", "b"):
            v = getattr(self, p)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"neuron {self.name}: {p} must be a finite number, got {v!r}")
            object.__setattr__(self, p, float(v))
        if self.name == "tanh" and self.a == 0.0:
            raise ValueError("neuron tanh[a,b] needs a != 0 (its gradient is b * (a - y^2 / a))")
        if self.name == "brelu" and self.a <= 0.0:
            raise ValueError(f"neuron brelu[a] needs a > 0, got a = {self.a:g}")

    @property
    def kind(self) -> Kind:
        return NEURONS[self.name]

    @property
    def code(self) -> int:
        return self.kind.code

    def __eq__(self, other):
        """Equal to another Neuron with the same values, or to its written form (``Neuron("relu") == "relu"``)."""
        if isinstance(other, str):
            return str(self) == other.strip().lower()
        if isinstance(other, Neuron):
            return (self.name, self.a, self.b) == (other.name, other.a, other.b)
        return NotImplemented

    def __hash__(self):
        return hash(str(self))

    def __str__(self):
        values = [getattr(self, p) for p in self.kind.params]
        return self.name + (f"[{','.join(f'{v:g}' for v in values)}]" if values else "")


def parse(text) -> Neuron | None:
    """``"tanh[1.7159,0.6667]"`` -> Neuron('tanh', 1.7159, 0.6667); None for no neuron. A :class:`Neuron` is
    returned as is. ValueError naming the accepted forms otherwise."""
    if isinstance(text, Neuron):
        return text
    if text is None or (isinstance(text, str) and text.strip().lower() in IDENTITY):
        return None
    if not isinstance(text, str):
        raise ValueError(f"a neuron must be text such as 'relu' or 'tanh[a,b]', got {text!r}")
    m = _FORM.match(text.strip().lower())
    if m is None or m.group(1) not in NEURONS:
        raise ValueError(f"unknown neuron {text!r} (known: {forms()}, or linear/ident for none)")
    name, args = m.group(1), m.group(2)
    want = NEURONS[name].params
    values = [] if args is None or not args.strip() else [v.strip() for v in args.split(",")]
    if len(values) != len(want):
        form = name + (f"[{','.join(want)}]" if want else "")
        raise ValueError(f"neuron {text!r}: {name} takes {len(want)} parameter{'s' if len(want) != 1 else ''} "
                         f"(written {form}), got {len(values)}")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"neuron {text!r}: parameters must be numbers") from None
    return Neuron(name, *numbers)
