"""The fake CuPy (tests/fake_cupy.py) against a real CuPy, which imports without a GPU.

The cuda path's tests run on the fake, so every CuPy call they make binds to the fake's signatures; this holds the
fake to CuPy's: every public name it defines exists in CuPy, parameters in the same positions with the same names and
defaults (a call that binds to the fake binds to CuPy), the same constants, and the NumPy names it lets through exist
in CuPy. Where CuPy is missing the comparisons are skipped (CONVNET_REQUIRE_CUPY=1: failed); the checker's own test
runs everywhere.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import types

import numpy as np
import pytest

from fake_cupy import CUPYX, FakeCupy, FakeNccl

P = inspect.Parameter
_DOC = re.compile(r"\s*(?:[\w.]+\.)?(\w+)\((.*)\)")


def _literal(text):
    try:
        return ast.literal_eval(text.strip())  # a docstring's default: 1, 'C', None
    except (ValueError, SyntaxError):
        return text.strip()  # as written: float, numpy.float32


def _from_doc(params):
    """A Cython docstring's parameter list (``intptr_t dst, int n=1, *args``) as a Signature."""
    out, kind = [], P.POSITIONAL_OR_KEYWORD
    for part in filter(None, (s.strip() for s in re.split(r",(?![^()]*\))", params))):
        name = part.partition("=")[0].split()[-1].lstrip("*&")
        if part == "*" or part.startswith("*"):
            out += [] if part == "*" else [P(name, P.VAR_KEYWORD if part.startswith("**") else P.VAR_POSITIONAL)]
            kind = P.KEYWORD_ONLY
        else:
            out.append(P(name, kind, default=_literal(part.partition("=")[2]) if "=" in part else P.empty))
    return inspect.Signature(out)


def signature(obj):
    """The call signature without ``self``: inspect's, else the first line of a Cython docstring; None if unknown."""
    sig = None
    m = _DOC.match((getattr(obj, "__doc__", None) or "").split("\n", 1)[0])
    if isinstance(obj, type) and m and m.group(1) == obj.__name__:
        sig = _from_doc(m.group(2))
    else:
        try:
            sig = inspect.signature(obj)
            if sig.parameters and all(p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) for p in sig.parameters.values()) \
                    and not isinstance(obj, (types.FunctionType, types.MethodType)):
                sig = None  # a C slot's (*args, **kwargs) says nothing
        except (TypeError, ValueError):
            pass
        if sig is None and m:
            sig = _from_doc(m.group(2))
    if sig is not None and list(sig.parameters)[:1] == ["self"]:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


def _same(a, b):
    return a == b or (isinstance(b, str) and b in (repr(a), getattr(a, "__name__", None)))


def compare(label, fake, real):
    """Problems with the fake's parameters: each at the real one's position, or a keyword the real one takes, with
    the real one's default; what the real one requires, the fake requires."""
    f, r = signature(fake), signature(real)
    if r is None or f is None:
        return [] if r is None else [f"{label}: the fake's signature cannot be read"]
    rpos = [p for p in r.parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    rvar = {p.kind for p in r.parameters.values()}
    fparams = [p for p in f.parameters.values() if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    problems = []
    for i, p in enumerate(fparams):
        positional = p.kind != P.KEYWORD_ONLY
        real_p = rpos[i] if positional and i < len(rpos) else r.parameters.get(p.name)
        if positional and i >= len(rpos) and P.VAR_POSITIONAL not in rvar:
            problems.append(f"{label}: the fake takes {p.name!r} as positional parameter {i}, the real one {r}")
        elif positional and real_p is not None and real_p.name != p.name and P.POSITIONAL_ONLY not in (p.kind,
                                                                                                      real_p.kind):
            problems.append(f"{label}: the fake's positional parameter {i} is {p.name!r}, the real one's "
                            f"{real_p.name!r} {r}")
        elif not positional and real_p is None and P.VAR_KEYWORD not in rvar:
            problems.append(f"{label}: the fake's keyword {p.name!r} is not the real one's {r}")
        if real_p is not None and P.empty not in (p.default, real_p.default) and not _same(p.default, real_p.default):
            problems.append(f"{label}: the fake's default {p.name}={p.default!r}, the real one's {real_p.default!r}")
    for i, p in enumerate(rpos):
        if p.default is P.empty and (i >= len(fparams) or fparams[i].default is not P.empty):
            problems.append(f"{label}: the real one requires {p.name!r}, the fake does not")
    return problems


def _public(obj):
    owners = [c for c in (obj.__mro__ if isinstance(obj, type) else type(obj).__mro__)
              if c.__module__ not in ("builtins", "types")]
    names = {n for c in owners for n in vars(c)} | (set() if isinstance(obj, type) else set(vars(obj)))
    return sorted(n for n in names if not n.startswith("_") or (isinstance(obj, type) and n in
                                                                ("__init__", "__enter__", "__exit__")))


def check(label, fake, real, skip=frozenset()):
    """Problems with the stand-in ``fake`` (a class or a module-like object) for ``real``; ``skip``: dotted names
    that mirror nothing (the fakes' MACHINERY)."""
    problems = []
    for name in _public(fake):
        where = f"{label}.{name}"
        if where in skip:
            continue
        if name == "__init__":
            problems += compare(f"{label}()", fake, real)
        elif not hasattr(real, name):
            problems.append(f"{where}: the real one has no attribute {name!r}")
        elif isinstance(inspect.getattr_static(fake, name), property):
            continue
        elif isinstance(value := getattr(fake, name), type):
            problems += check(where, value, getattr(real, name), skip)
        elif callable(value):
            problems += compare(where, value, getattr(real, name))
        elif isinstance(value, (bool, int, float, str)):
            if value != getattr(real, name):
                problems.append(f"{where}: the fake's value is {value!r}, the real one's {getattr(real, name)!r}")
        elif hasattr(value, "__dict__"):  # a submodule (cupy.cuda, cupy.cuda.runtime)
            problems += check(where, value, getattr(real, name), skip)
    return problems


def _machinery(label, fake):
    return {f"{label}.{n}" for n in fake.MACHINERY} | {f"{label}.ndarray.__init__"}


def test_the_check_names_each_difference():
    class Real:
        """Real(null=False, non_blocking=False)"""
        SUM = 0

        def wait(self, event):
            pass

    real = types.SimpleNamespace(Stream=Real, copy=types.SimpleNamespace(__doc__="copy(intptr_t dst, size_t n, "
                                                                                 "int kind=3, *, bint sync=False)"))

    class Stream:  # a parameter renamed, a constant changed, a method the real one lacks
        SUM = 1

        def __init__(self, null=False, nonblocking=False):
            pass

        def wait(self, event):
            pass

        def wait_for(self, event):
            pass

    fake = types.SimpleNamespace(Stream=Stream, copy=lambda dst, n, kind=2, sync=False, more=0: None)
    assert check("cupy", fake, real) == [
        "cupy.Stream.SUM: the fake's value is 1, the real one's 0",
        "cupy.Stream(): the fake's positional parameter 1 is 'nonblocking', the real one's 'non_blocking' "
        "(null=False, non_blocking=False)",
        "cupy.Stream.wait_for: the real one has no attribute 'wait_for'",
        "cupy.copy: the fake's default kind=2, the real one's 3",
        "cupy.copy: the fake takes 'sync' as positional parameter 3, the real one (dst, n, kind=3, *, sync=False)",
        "cupy.copy: the fake takes 'more' as positional parameter 4, the real one (dst, n, kind=3, *, sync=False)"]
    fake.copy = lambda dst, n=0: None
    assert check("cupy", fake, real)[-1] == "cupy.copy: the real one requires 'n', the fake does not"
    fake.Stream, fake.copy = Real, lambda dst, n, kind=3, *, sync=False: None
    assert check("cupy", fake, real) == []


def _real(module):
    """The installed ``module``: skipped where it is missing, failed under CONVNET_REQUIRE_CUPY=1 (CI)."""
    try:
        m = importlib.import_module(module)
        assert getattr(m, "available", True), "CuPy cannot load NCCL (pip install nvidia-nccl-cu13)"
        return m
    except (ImportError, AssertionError) as e:
        (pytest.fail if os.environ.get("CONVNET_REQUIRE_CUPY") == "1" else pytest.skip)(f"{module}: {e}")


def test_the_fake_cupy_matches_the_installed_cupy():
    cupy, fake = _real("cupy"), FakeCupy()
    # cupy.cuda.cublas loads cuBLAS's library: held to CuPy's by the next test, which needs that library
    assert check("cupy", fake, cupy, _machinery("cupy", fake) | {"cupy.cuda.cublas"}) == []
    assert check("cupyx", CUPYX, _real("cupyx")) == []
    # the GEMM compute type (CudaDevice.matmul's TF32), a private module the public-name walk above skips
    assert check("cupy._core._routines_linalg", fake._core._routines_linalg,
                 _real("cupy._core._routines_linalg")) == []
    assert sorted(n for n in FakeCupy.SHARED_FUNCTIONS if not callable(getattr(cupy, n, None))) == []
    assert sorted(n for n in FakeCupy.SHARED_METHODS if not hasattr(cupy.ndarray, n)) == []


def test_the_fake_cublas_and_elementwise_kernels_match_the_installed_cupy():
    """What the fc ops' cuda path calls beyond the walk above, pinned where the walk would pass without a signature:
    cuBLAS's gemmEx (the fake computes the GEMM from these arguments), the cudaDataType_t and cuBLAS constants it is
    given, ElementwiseKernel's constructor, the C types the fake gives CuPy's parameter types, and the kernels
    themselves as CuPy parses them (it compiles them at their first call, which needs a GPU)."""
    cupy, fake = _real("cupy"), FakeCupy()
    from cupy._core import _scalar
    from convnet.ops.fc import BF16_KERNEL, TF32_KERNEL
    try:  # loads cuBLAS's library (its wheel: pip install nvidia-cublas)
        real_blas, fake_blas = cupy.cuda.cublas, fake.cuda.cublas
    except ImportError as e:
        (pytest.fail if os.environ.get("CONVNET_REQUIRE_CUPY") == "1" else pytest.skip)(f"cupy.cuda.cublas: {e}")
    assert check("cupy.cuda.cublas", fake_blas, real_blas) == []
    for label, f, r in (("cupy.cuda.cublas.gemmEx", fake_blas.gemmEx, real_blas.gemmEx),
                        ("cupy.cuda.get_cublas_handle", fake.cuda.get_cublas_handle, cupy.cuda.get_cublas_handle),
                        ("cupy.ElementwiseKernel()", fake.ElementwiseKernel, cupy.ElementwiseKernel)):
        assert signature(r) is not None, f"{label}: the real signature cannot be read"
        assert compare(label, f, r) == []
    for name in ("CUBLAS_OP_N", "CUBLAS_OP_T", "CUBLAS_COMPUTE_32F", "CUBLAS_GEMM_DEFAULT",
                 "CUBLAS_GEMM_DEFAULT_TENSOR_OP"):
        assert getattr(fake_blas, name) == getattr(real_blas, name), name
    for name in ("CUDA_R_32F", "CUDA_R_16BF"):
        assert getattr(fake.cuda.runtime, name) == getattr(cupy.cuda.runtime, name), name
    for type_name, (c_type, dtype) in fake.ElementwiseKernel._ELEMENT_TYPES.items():
        assert (type_name, _scalar.get_typename(np.dtype(dtype))) == (np.dtype(dtype).name, c_type)
    for in_params, out_params, operation, name in (TF32_KERNEL, BF16_KERNEL):
        kernel = cupy.ElementwiseKernel(in_params, out_params, operation, name)
        assert (kernel.nin, kernel.nout, kernel.name) == (1, 1, name)


def test_the_fake_nccl_matches_the_installed_nccl():
    nccl = _real("cupy.cuda.nccl")
    fake = FakeNccl().install(FakeCupy())
    assert check("nccl", fake, nccl, _machinery("nccl", fake)) == []
    assert (type(fake.get_unique_id()), len(fake.get_unique_id())) == (type(nccl.get_unique_id()),
                                                                       len(nccl.get_unique_id()))
