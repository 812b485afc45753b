"""The project's CuPy calls, and the test suite's fake CuPy, checked against a real CuPy -- which imports and
describes itself without a GPU.

No CI machine has a GPU, so the cuda device's Python path runs in tests on :class:`helpers.FakeCupy` and
:class:`helpers.FakeNccl`. That proves the code agrees with the fakes; this module proves the rest of the chain:

* :func:`scan_sources` finds every use of a CuPy attribute in the sources (``cp.cuda.Stream(non_blocking=True)``,
  ``rt = cp.cuda.runtime; rt.memcpyAsync(...)``, ``cupy().cuda.Device(i).synchronize()``, the Python inside
  ``tools/gpu_check.sh``) and :func:`check_uses` resolves each one in the real module: the attribute must exist and
  each call's arguments must bind to the real signature;
* :func:`check_fake` compares a fake with the real object it stands for: every public name the fake defines exists
  in the real one, a method's parameters agree (the same names at the same positions, the same defaults), and
  constants have the real values.

Signatures come from ``inspect.signature`` or, for CuPy's Cython functions, from the first line of their docstring
(``memcpyPeerAsync(intptr_t dst, int dstDevice, ...)``). ``tests/test_cupy_api.py`` runs both against the installed
CuPy (``.ci/run`` installs one in a venv of its own) and tests the checker itself on small stand-ins.
"""
from __future__ import annotations

import ast
import inspect
import re
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

# What the sources call to get the cupy module (backend_cuda.cupy(), GpuCopier's self._cp()) or one of its modules.
CUPY_FACTORIES = {"cupy": "cupy", "_import_cupy": "cupy", "_cp": "cupy", "_nccl": "cupy.cuda.nccl"}
# Names that hold "numpy or cupy": their attributes must exist in cupy too (the numpy side runs in every test).
ARRAY_MODULE_NAMES = {"xp"}
# A call's result whose attributes are checked further: CuPy functions that return an object of a known class.
RETURNS = {"cupy.get_default_memory_pool": "cupy.cuda.MemoryPool()",
           "cupy.cuda.get_current_stream": "cupy.cuda.Stream()",
           "cupy.cuda.alloc_pinned_memory": "cupy.cuda.PinnedMemoryPointer()",
           "cupy.cuda.get_current_stream().end_capture": "cupy.cuda.graph.Graph()",
           **{f"cupy.{f}": "cupy.ndarray()" for f in ("empty", "empty_like", "zeros", "ones", "asarray",
                                                       "ascontiguousarray", "random.rand", "matmul")}}
# Instances whose attributes are set in __init__ (not visible on the class), made without a GPU.
SAMPLES = {"cupy.cuda.Stream": lambda cupy: cupy.cuda.ExternalStream(1, 0)}


@dataclass(frozen=True)
class Use:
    """One use of a CuPy attribute: ``path`` (``cupy.cuda.Stream``), and for a call its positional argument count and
    keyword names (None: not a call; ``star``: it passes ``*args``/``**kwargs``, so only the name is checked)."""
    where: str
    path: str
    args: int | None = None
    keywords: tuple = ()
    star: bool = False

    def __str__(self):
        if self.args is None:
            return f"{self.where}: {self.path}"
        call = ", ".join(["_"] * self.args + [f"{k}=_" for k in self.keywords] + (["*..."] if self.star else []))
        return f"{self.where}: {self.path}({call})"


# ------------------------------------------------------------------------------------------------ the sources
def python_sources(root: Path):
    """(name, text) of every Python source that can touch CuPy: the package, the benchmarks, the tools, and the
    Python heredocs (``<<'PY' ... PY``) inside the tools' shell scripts."""
    package = root / "src" / "convnet"
    numpy_only = (package / "reference", package / "cpu")  # their xp is a padded array, never an array module
    files = [*sorted(p for p in package.rglob("*.py") if not p.parent.is_relative_to(numpy_only[0])
                     and not p.parent.is_relative_to(numpy_only[1])),
             *sorted((root / "benchmarks").glob("*.py")), *sorted((root / "tools").glob("*.py"))]
    for path in files:
        yield str(path.relative_to(root)), path.read_text()
    for path in sorted((root / "tools").glob("*.sh")):
        text = path.read_text()
        for m in re.finditer(r"<<'PY'[^\n]*\n(.*?)\nPY\n", text, re.S):
            line = text.count("\n", 0, m.start(1)) + 1
            yield f"{path.relative_to(root)}:{line}+", m.group(1)


def _dotted(node):
    """'a.b.c' for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


class _Scanner:
    """Two passes over one module: first what each name is bound to (cupy, one of its modules or attributes), then
    every attribute chain rooted at such a name. Scopes are ignored: a name bound only to CuPy things in a file is
    followed throughout it (the sources use ``cp``, ``rt``, ``nccl`` consistently); a name that the file also binds to
    something else (``self.comm``: MPI's communicator in one class, NCCL's in another) is not followed at all."""

    def __init__(self, name: str, tree: ast.AST):
        self.name, self.tree = name, tree
        self.bound: dict[str, str] = {}
        self.uses: list[Use] = []

    # -- pass 1 ----------------------------------------------------------------------------------------------------
    def bind(self):
        other = set()  # names also bound to something else (self.comm: MPI's in one class, NCCL's in another)
        for _ in range(3):  # aliases of aliases (rt = cp.cuda.runtime after cp = cupy())
            for node in ast.walk(self.tree):
                if isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] in ("cupy", "cupyx"):
                            self.bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("cupy", "cupyx"):
                    for a in node.names:
                        self.bound[a.asname or a.name] = f"{node.module}.{a.name}"
                elif isinstance(node, (ast.FunctionDef, ast.Lambda)):
                    for arg in node.args.args:
                        if arg.arg == "cp":  # record_event(cp, ...): the cupy module, passed in
                            self.bound["cp"] = "cupy"
                elif isinstance(node, ast.Assign):
                    path = self.resolve(node.value)
                    for target in node.targets:
                        for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                            key = _dotted(t)
                            if key is None:
                                continue
                            if path is not None:
                                self.bound[key] = path
                            else:
                                other.add(key)
        for key in other:
            self.bound.pop(key, None)
        return self

    def resolve(self, node):
        """The CuPy path an expression stands for, or None."""
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in CUPY_FACTORIES and not node.args:
                return CUPY_FACTORIES[name]
            if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).startswith("cupy"):
                return node.args[0].value
            if name == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                base = self.resolve(node.args[0])
                return f"{base}.{node.args[1].value}" if base else None
            base = self.resolve(func)
            if base == "cupy":  # device.xp() / backend.xp(): the array module itself
                return base
            return f"{base}()" if base else None  # an instance of a class, or a known function's result
        key = _dotted(node)
        if key in self.bound:  # a name or attribute bound to CuPy (cp, rt, self.nccl)
            return self.bound[key]
        if isinstance(node, ast.Attribute):
            if node.attr == "xp" and not isinstance(node.value, ast.Call):
                return "cupy"  # a cuda Device's xp (tools/gpu_check.sh: cp = d.xp)
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        return "cupy" if key in ARRAY_MODULE_NAMES else None

    # -- pass 2 ----------------------------------------------------------------------------------------------------
    def scan(self):
        calls = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                calls[id(node.func)] = node
        seen_inner = set()
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Attribute) or id(node) in seen_inner:
                continue
            path = self.resolve(node)
            if path is None or path == "cupy":  # the module itself (device.xp, backend.xp()): nothing to check
                continue
            # only the outermost attribute of a chain is a use (cp.cuda.runtime.x covers cp.cuda and cp.cuda.runtime)
            inner = node.value
            while isinstance(inner, (ast.Attribute, ast.Call)):
                seen_inner.add(id(inner))
                inner = inner.value if isinstance(inner, ast.Attribute) else inner.func
            where = f"{self.name}:{node.lineno}"
            call = calls.get(id(node))
            if call is None:
                self.uses.append(Use(where, path))
            else:
                star = any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords)
                self.uses.append(Use(where, path, sum(not isinstance(a, ast.Starred) for a in call.args),
                                     tuple(k.arg for k in call.keywords if k.arg is not None), star))
        return self.uses


def scan_source(name: str, text: str) -> list[Use]:
    """Every CuPy use in one Python source."""
    return _Scanner(name, ast.parse(text)).bind().scan()


def scan_sources(root: Path) -> list[Use]:
    return [use for name, text in python_sources(root) for use in scan_source(name, text)]


# ------------------------------------------------------------------------------------------------ signatures
_DOC_SIGNATURE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+)\((.*)\)")


def _doc_signature(doc: str | None):
    """The signature in the first line of a Cython docstring: ``f(intptr_t dst, int n=1, *args)``."""
    m = _DOC_SIGNATURE.match((doc or "").split("\n", 1)[0])
    if not m:
        return None
    params, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for part in filter(None, (p.strip() for p in _split_top(m.group(2)))):
        if part == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        if part == "/":  # the parameters so far are positional-only
            params = [p.replace(kind=p.POSITIONAL_ONLY) for p in params]
            continue
        if part.startswith("**"):
            params.append(inspect.Parameter(part[2:].split()[-1], inspect.Parameter.VAR_KEYWORD))
            continue
        if part.startswith("*"):
            params.append(inspect.Parameter(part[1:].split()[-1], inspect.Parameter.VAR_POSITIONAL))
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        decl, _, default = part.partition("=")
        name = decl.split()[-1].lstrip("*&")
        try:
            params.append(inspect.Parameter(name, kind,
                                            default=_doc_default(default) if default else inspect.Parameter.empty))
        except ValueError:  # not a signature after all
            return None
    if params and params[0].name == "self":
        params = params[1:]
    try:
        return inspect.Signature(params)
    except ValueError:
        return None


class Written(str):
    """A docstring's default that is not a Python literal (``dtype=float32``): compared as written."""


def _doc_default(text: str):
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return Written(text)


def _split_top(text):
    depth, start = 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


_UFUNC_KEYWORDS = ("out", "dtype", "casting")


def signature(obj):
    """The call signature of a function, method, ufunc or class (its constructor's), without ``self``; None if
    unknown."""
    if hasattr(obj, "nin") and hasattr(obj, "nout"):  # a ufunc: nin inputs, then optional outputs, and keywords
        P = inspect.Parameter
        return inspect.Signature([P(f"x{i}", P.POSITIONAL_ONLY) for i in range(obj.nin)]
                                 + [P(f"out{i}", P.POSITIONAL_ONLY, default=None) for i in range(obj.nout)]
                                 + [P(k, P.KEYWORD_ONLY, default=None) for k in _UFUNC_KEYWORDS])
    target = obj
    if isinstance(obj, type):
        from_doc = _doc_signature(obj.__doc__)  # Cython classes: "Device(device=None)" heads the class's docstring
        if from_doc is not None and _DOC_SIGNATURE.match(obj.__doc__).group(1) == obj.__name__:
            return from_doc
        init = obj.__dict__.get("__init__") or next((c.__dict__["__init__"] for c in obj.__mro__
                                                     if "__init__" in c.__dict__), None)
        if init is None or init is object.__init__:
            return inspect.Signature([])
        target = init
    try:
        sig = inspect.signature(target)
        params = list(sig.parameters.values())
        if params and params[0].name == "self":
            sig = sig.replace(parameters=params[1:])
        # a C slot wrapper's (*args, **kwargs) says nothing: try the docstring (a Python function means it)
        if isinstance(target, types.FunctionType) or \
                not all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            return sig
    except (TypeError, ValueError):
        pass
    return _doc_signature(getattr(target, "__doc__", None))


# ------------------------------------------------------------------------------------------------ checks
UNKNOWN = object()  # a call's result of a type not in RETURNS: nothing after it can be checked


def _make(sample, module):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # CuPy 14 deprecates ExternalStream; a sample is all
            return None if sample is None else sample(module)
    except AttributeError:  # a module without the class the sample is made of
        return None


def lookup(module, path: str):
    """Resolve ``cupy.cuda.runtime.memcpyAsync`` starting from ``module`` (named by the path's first part); a part
    ending in ``()`` is a call: a class's instance is looked up on the class, a function's result through RETURNS.
    Raises AttributeError naming the first missing part; UNKNOWN where a result's type is not known."""
    parts = path.split(".")
    obj, sample = module, None
    for i, part in enumerate(parts[1:], 1):
        called = part.endswith("()")
        name = part[:-2] if called else part
        try:
            obj = getattr(obj, name)
        except AttributeError:
            instance = _make(sample, module)
            if instance is None or not hasattr(instance, name):
                raise AttributeError(f"{'.'.join(parts[:i])} has no attribute {name!r}") from None
            obj = getattr(instance, name)
        sample = None
        if not called:
            continue
        here = ".".join(parts[:i] + [name])
        if isinstance(obj, type):
            sample = SAMPLES.get(here)  # an instance attribute is looked up on a sample if the class lacks it
        elif here in RETURNS or hasattr(obj, "nout"):  # a ufunc returns an array
            returned = RETURNS.get(here, "cupy.ndarray()")[:-2]
            obj, sample = lookup(module, returned), SAMPLES.get(returned)
        else:
            return UNKNOWN
    return obj


def check_uses(uses, modules: dict) -> list[str]:
    """Problems (strings) with ``uses`` against ``modules`` ({'cupy': cupy, 'cupyx': cupyx}): a missing attribute,
    or a call whose arguments do not bind to the real signature."""
    problems = []
    for use in uses:
        module = modules.get(use.path.split(".")[0])
        if module is None:
            problems.append(f"{use}: no module {use.path.split('.')[0]} to check against")
            continue
        try:
            obj = lookup(module, use.path)
        except AttributeError as e:
            problems.append(f"{use}: {e}")
            continue
        if use.args is None or use.star or obj is UNKNOWN:
            continue
        if not callable(obj):
            problems.append(f"{use}: {use.path} is not callable")
            continue
        sig = signature(obj)
        if sig is None:
            continue  # nothing to bind against (reported by unchecked_calls)
        try:
            sig.bind(*[None] * use.args, **{k: None for k in use.keywords})
        except TypeError as e:
            problems.append(f"{use}: does not match {use.path}{sig}: {e}")
    return problems


def unchecked_calls(uses, modules: dict) -> list[str]:
    """The calls :func:`check_uses` could check by name only: the real signature cannot be read, or the call is
    made on the result of a call whose type is not in RETURNS."""
    out = []
    for use in uses:
        if use.args is None or use.star:
            continue
        try:
            obj = lookup(modules[use.path.split(".")[0]], use.path)
        except (AttributeError, KeyError):
            continue  # reported by check_uses
        if obj is UNKNOWN or (callable(obj) and signature(obj) is None):
            out.append(str(use))
    return out


_INTERNAL_DUNDERS = {"__init__", "__enter__", "__exit__"}


def _public(namespace: dict, skip=()):
    for name, value in namespace.items():
        if name in skip or (name.startswith("_") and name not in _INTERNAL_DUNDERS):
            continue
        yield name, value


def _compare_signatures(label, fake, real) -> list[str]:
    """The fake's parameters must be the real one's: every fake parameter exists in the real signature; those the
    fake takes positionally sit at the same position; defaults agree; a parameter the real function requires is
    required by the fake too."""
    fsig, rsig = signature(fake), signature(real)
    if fsig is None or rsig is None:
        return [] if rsig is None else [f"{label}: the fake's signature cannot be read"]
    problems = []
    rparams = list(rsig.parameters.values())
    rnames = {p.name: p for p in rparams}
    rpos = [p.name for p in rparams if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rvar = any(p.kind == p.VAR_POSITIONAL for p in rparams)
    fpos_index = 0
    for p in fsig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if fpos_index < len(rpos):
                if rpos[fpos_index] != p.name and p.kind != p.POSITIONAL_ONLY:
                    problems.append(f"{label}: the fake's positional parameter {fpos_index} is {p.name!r}, "
                                    f"the real one's is {rpos[fpos_index]!r} (real: {rsig})")
            elif not rvar:
                problems.append(f"{label}: the fake takes {p.name!r} as positional parameter {fpos_index}, "
                                f"the real one takes {len(rpos)} (real: {rsig})")
            fpos_index += 1
        elif p.name not in rnames and not any(r.kind == r.VAR_KEYWORD for r in rparams):
            problems.append(f"{label}: the fake's keyword {p.name!r} is not a parameter of the real one ({rsig})")
        r = rnames.get(p.name)
        if r is None or p.default is p.empty or r.default is r.empty:
            continue
        if not _same_default(p.default, r.default):
            problems.append(f"{label}: the fake's default {p.name}={p.default!r}, the real one's {r.default!r}")
    for i, name in enumerate(rpos):
        r = rnames[name]
        if r.default is r.empty and r.kind != r.POSITIONAL_ONLY and i < fpos_index:
            f = list(fsig.parameters.values())[i] if i < len(fsig.parameters) else None
            if f is not None and f.default is not f.empty:
                problems.append(f"{label}: the real one requires {name!r}, the fake gives it a default")
    return problems


def _same_default(fake, real) -> bool:
    if isinstance(real, Written):
        return str(real) in (repr(fake), str(fake), getattr(fake, "__name__", None))
    if isinstance(fake, type) or isinstance(real, type):  # dtype defaults: float is numpy's float64
        import numpy as np
        try:
            return np.dtype(fake) == np.dtype(real)
        except TypeError:
            return fake is real
    try:
        return bool(fake == real)
    except Exception:  # noqa: BLE001
        return fake is real


def check_fake(label: str, fake, real, skip=()) -> list[str]:
    """Problems with the stand-in ``fake`` (a class, module-like object or instance) for ``real``: every public name
    it defines exists in ``real``; functions and classes are compared (classes recursively); numbers and strings are
    equal. ``skip``: the fake's own test machinery, which mirrors nothing."""
    problems = []
    if isinstance(fake, type):
        namespace = {k: v for c in reversed(fake.__mro__[:-1]) for k, v in vars(c).items()}
    else:
        namespace = {**{k: v for c in reversed(type(fake).__mro__[:-1]) for k, v in vars(c).items()
                        if not k.startswith("__")}, **vars(fake)}
    for name, value in _public(namespace, skip):
        where = f"{label}.{name}"
        if name in _INTERNAL_DUNDERS:
            if name == "__init__" and isinstance(fake, type):
                problems += _compare_signatures(f"{label}()", fake, real)
            elif not hasattr(real, name):
                problems.append(f"{where}: the real {label} has no {name} (not a context manager)")
            continue
        if not hasattr(real, name):
            problems.append(f"{where}: the real object has no attribute {name!r}")
            continue
        real_value = getattr(real, name)
        if isinstance(value, staticmethod):
            value = value.__func__
        if isinstance(value, type):
            problems += check_fake(where, value, real_value)
        elif isinstance(value, (types.FunctionType, types.MethodType)):
            if not callable(real_value):
                problems.append(f"{where}: callable in the fake, not in the real one")
            else:
                problems += _compare_signatures(where, value, real_value)
        elif isinstance(value, (bool, int, float, str)):
            if isinstance(real_value, (bool, int, float, str)) and real_value != value:
                problems.append(f"{where}: the fake's value is {value!r}, the real one's {real_value!r}")
        elif not callable(value) and hasattr(value, "__dict__") and not isinstance(value, property):
            problems += check_fake(where, value, real_value)  # a submodule-like object (cupy.random, a namespace)
    return problems
