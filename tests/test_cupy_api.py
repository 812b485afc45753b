"""The cuda path's CuPy calls and the fake CuPy the tests run it on, against a real CuPy (``tests/cupy_api.py``).

A real CuPy imports without a GPU, so this needs no GPU: ``.ci/run`` installs one (the version the GPU machines
have) in a venv of its own and runs this file there with CONVNET_REQUIRE_CUPY=1, under which a missing CuPy or NCCL
fails instead of skipping. The checker's own tests (stand-in modules with planted mistakes) run everywhere.
"""
from __future__ import annotations

import importlib
import inspect
import os
import textwrap
import types

import pytest

import cupy_api
from cupy_api import Use, check_fake, check_uses, scan_source, scan_sources, signature
from helpers import ROOT, FakeCupy, FakeCupyx, FakeNccl

REQUIRE = os.environ.get("CONVNET_REQUIRE_CUPY") == "1"


def _real(module: str):
    """The installed ``module`` (cupy, cupy.cuda.nccl); skipped where it is missing, failed under REQUIRE."""
    try:
        m = importlib.import_module(module)
    except ImportError as e:
        if REQUIRE:
            pytest.fail(f"CONVNET_REQUIRE_CUPY=1, but {module} cannot be imported: {e}")
        pytest.skip(f"{module} is not installed ({e}); .ci/run checks against a real one")
    if module.endswith("nccl") and not getattr(m, "available", False):
        if REQUIRE:
            pytest.fail("CONVNET_REQUIRE_CUPY=1, but CuPy cannot load NCCL (pip install nvidia-nccl-cu13)")
        pytest.skip("CuPy cannot load NCCL (the nvidia-nccl wheel is not installed)")
    return m


# ------------------------------------------------------------------------------------------------ the scanner
def _paths(source: str, name="m.py"):
    return [(u.path, u.args, u.keywords) for u in scan_source(name, textwrap.dedent(source))]


def test_scan_follows_aliases_calls_and_factories():
    uses = _paths("""
        import cupy as cp
        import cupyx
        rt = cp.cuda.runtime
        rt.memcpyAsync(1, 2, 3, rt.memcpyDeviceToDevice, 0)
        def f(cp, i):
            cp.cuda.Device(i).synchronize()
        cupy().cuda.get_current_stream().wait_event(e)
        self._cp().cuda.Stream(non_blocking=True)
        nccl = self.nccl = _nccl()
        self.nccl.NcclCommunicator(2, uid, rank)
        cupyx.empty_pinned((4,), "f")
        xp.add(a, b, out=o)
        """)
    assert ("cupy.cuda.runtime.memcpyAsync", 5, ()) in uses
    assert ("cupy.cuda.runtime.memcpyDeviceToDevice", None, ()) in uses
    assert ("cupy.cuda.Device().synchronize", 0, ()) in uses
    assert ("cupy.cuda.get_current_stream().wait_event", 1, ()) in uses
    assert ("cupy.cuda.Stream", 0, ("non_blocking",)) in uses
    assert ("cupy.cuda.nccl.NcclCommunicator", 3, ()) in uses
    assert ("cupyx.empty_pinned", 2, ()) in uses
    assert ("cupy.add", 2, ("out",)) in uses
    # the outermost attribute of a chain is the use: cupy.cuda is never one, cupy.cuda.runtime only where assigned
    assert [p for p, _, _ in uses if p in ("cupy.cuda", "cupy.cuda.runtime")] == ["cupy.cuda.runtime"]


def test_scan_ignores_names_not_bound_to_cupy():
    assert _paths("""
        import configparser
        cp = configparser.ConfigParser()
        cp.read_string(text)
        np.add(a, b)
        """) == []


def test_scan_reads_python_heredocs_in_tool_scripts(tmp_path):
    (tmp_path / "tools").mkdir()
    (tmp_path / "src" / "convnet").mkdir(parents=True)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "tools" / "check.sh").write_text("echo\nout=$(python3 - <<'PY'\nimport cupy\n\n"
                                                  "cupy.cuda.runtime.getDeviceCount()\nPY\n)\n")
    uses = scan_sources(tmp_path)
    assert [(u.where, u.path) for u in uses] == [("tools/check.sh:3+:3", "cupy.cuda.runtime.getDeviceCount")]


def test_scan_of_this_project_sees_the_cuda_path():
    """The scan must keep finding the calls that only a GPU would otherwise check (a scanner that silently finds
    nothing would pass every check)."""
    paths = {u.path for u in scan_sources(ROOT)}
    for expected in ("cupy.cuda.runtime.memcpyPeerAsync", "cupy.cuda.runtime.memcpyAsync",
                     "cupy.cuda.runtime.deviceEnablePeerAccess", "cupy.cuda.Event", "cupy.cuda.Stream",
                     "cupy.cuda.Event().record", "cupy.cuda.get_current_stream().record", "cupy.empty().set",
                     "cupy.cuda.nccl.NcclCommunicator", "cupy.cuda.nccl.get_unique_id", "cupy.cuda.alloc_pinned_memory",
                     "cupy.cuda.Device().synchronize", "cupy.concatenate", "cupy.add", "cupy.matmul",
                     "cupy.cuda.get_elapsed_time", "cupy.cuda.Device().compute_capability"):
        assert expected in paths, expected


# ------------------------------------------------------------------------------------------------ the checks
class _CythonLike:
    """A callable whose signature, as with CuPy's Cython functions, is only in its docstring."""

    def __init__(self, doc):
        self.__doc__ = doc

    def __call__(self, *args, **kwargs):
        pass


def _standin():
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.ModuleType("cupy.cuda")
    cupy.cuda.runtime = types.ModuleType("cupy.cuda.runtime")
    cupy.cuda.runtime.memcpyAsync = _CythonLike("memcpyAsync(intptr_t dst, intptr_t src, size_t size, int kind, "
                                                "intptr_t stream)\n\nCopies.")
    cupy.cuda.runtime.memcpyDeviceToDevice = 3

    class Stream:
        """Stream(null=False, non_blocking=False)"""

        def __init__(self, null=False, non_blocking=False):
            pass

        def wait_event(self, event):
            pass

    cupy.cuda.Stream = Stream
    cupy.empty = lambda shape, dtype=float, order="C": None
    return cupy


def test_check_uses_accepts_calls_that_bind():
    cupy = _standin()
    uses = [Use("a:1", "cupy.cuda.runtime.memcpyAsync", 5), Use("a:2", "cupy.cuda.runtime.memcpyAsync", 3,
                                                                ("kind", "stream")),
            Use("a:3", "cupy.cuda.Stream", 0, ("non_blocking",)), Use("a:4", "cupy.cuda.Stream().wait_event", 1),
            Use("a:5", "cupy.cuda.runtime.memcpyDeviceToDevice"), Use("a:6", "cupy.empty", 1, ("dtype",))]
    assert check_uses(uses, {"cupy": cupy}) == []


@pytest.mark.parametrize("use, says", [
    (Use("a:1", "cupy.cuda.runtime.memcpyPeer", 6), "has no attribute 'memcpyPeer'"),
    (Use("a:1", "cupy.cuda.runtime.memcpyAsync", 6), "does not match"),  # one argument too many
    (Use("a:1", "cupy.cuda.runtime.memcpyAsync", 4), "does not match"),  # the stream forgotten
    (Use("a:1", "cupy.cuda.Stream", 0, ("nonblocking",)), "does not match"),
    (Use("a:1", "cupy.cuda.Stream().wait", 1), "has no attribute 'wait'"),
    (Use("a:1", "cupy.cuda.runtime.memcpyDeviceToDevice", 0), "not callable"),
    (Use("a:1", "cupy.empty", 1, ("dtyp",)), "does not match"),
])
def test_check_uses_names_each_mistake(use, says):
    problems = check_uses([use], {"cupy": _standin()})
    assert len(problems) == 1 and says in problems[0] and problems[0].startswith("a:1: ")


def test_unchecked_calls_are_reported():
    """A call on a result of unknown type, or on a callable without a readable signature, is checked by name only:
    :func:`cupy_api.unchecked_calls` lists it (the real-CuPy test requires that list to be empty)."""
    cupy = _standin()
    cupy.make = lambda: None
    cupy.opaque = _CythonLike("no signature here")
    uses = [Use("a:1", "cupy.make().anything", 0), Use("a:2", "cupy.opaque", 1), Use("a:3", "cupy.empty", 1)]
    assert check_uses(uses, {"cupy": cupy}) == []
    assert cupy_api.unchecked_calls(uses, {"cupy": cupy}) == ["a:1: cupy.make().anything()", "a:2: cupy.opaque(_)"]


def test_doc_signatures_are_read_like_cythons():
    sig = signature(_CythonLike("f(self, intptr_t dst, int n=4, str mode='K', *args, bint flag=True)"))
    assert list(sig.parameters) == ["dst", "n", "mode", "args", "flag"]
    assert sig.parameters["n"].default == 4 and sig.parameters["mode"].default == "K"
    assert sig.parameters["flag"].kind is inspect.Parameter.KEYWORD_ONLY
    assert signature(_CythonLike("Not a signature at all.")) is None


def test_check_fake_names_each_difference():
    real = _standin()

    class Stream:  # the fake: a parameter renamed, a default changed, a method CuPy does not have
        def __init__(self, null=False, nonblocking=False):
            pass

        def wait_event(self, event):
            pass

        def wait_for(self, event):
            pass

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Stream=Stream, runtime=types.SimpleNamespace(memcpyAsync=lambda dst, src, n, kind, stream: None,
                                                     memcpyDeviceToDevice=2)),
        empty=lambda shape, dtype="float32": None, helper=None)
    problems = check_fake("cupy", fake, real, skip={"helper"})
    text = "\n".join(problems)
    assert "cupy.cuda.Stream(): the fake's positional parameter 1 is 'nonblocking'" in text
    assert "cupy.cuda.Stream.wait_for: the real object has no attribute 'wait_for'" in text
    assert "cupy.cuda.runtime.memcpyAsync: the fake's positional parameter 2 is 'n'" in text
    assert "cupy.cuda.runtime.memcpyDeviceToDevice: the fake's value is 2, the real one's 3" in text
    assert "cupy.empty: the fake's default dtype='float32'" in text
    assert len(problems) == 5, text


def test_check_fake_accepts_a_faithful_fake():
    real = _standin()
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Stream=real.cuda.Stream, runtime=types.SimpleNamespace(memcpyAsync=lambda dst, src, size, kind, stream: None,
                                                               memcpyDeviceToDevice=3)),
        empty=lambda shape, dtype=float: None)
    assert check_fake("cupy", fake, real) == []


# ------------------------------------------------------------------------------------------------ against CuPy
def test_sources_match_installed_cupy():
    """Every CuPy attribute the package, benchmarks and tools use exists in the installed CuPy, and every call binds
    to its signature; no call goes unchecked for want of a readable signature or a known result type."""
    cupy = _real("cupy")
    _real("cupy.cuda.nccl")  # distributed.py imports it the same way
    modules = {"cupy": cupy, "cupyx": importlib.import_module("cupyx")}
    uses = scan_sources(ROOT)
    assert check_uses(uses, modules) == []
    assert cupy_api.unchecked_calls(uses, modules) == []


def test_fake_cupy_matches_installed_cupy():
    cupy = _real("cupy")
    assert check_fake("cupy", FakeCupy(), cupy, skip=FakeCupy.MACHINERY) == []


def test_fake_cupyx_matches_installed_cupyx():
    cupyx = _real("cupyx")
    assert check_fake("cupyx", FakeCupyx(FakeCupy()), cupyx, skip=FakeCupyx.MACHINERY) == []


def test_fake_nccl_matches_installed_nccl():
    nccl = _real("cupy.cuda.nccl")
    fake = FakeNccl().install(FakeCupy())
    assert check_fake("cupy.cuda.nccl", fake, nccl, skip=FakeNccl.MACHINERY) == []
    # the unique id is made without a GPU: the fake's must have the real one's type and length (bytes in CuPy 14)
    real_id, fake_id = nccl.get_unique_id(), fake.get_unique_id()
    assert (type(fake_id), len(fake_id)) == (type(real_id), len(real_id))
