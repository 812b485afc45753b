"""Fixtures (``kernel_device``, ``any_device``, ``cuda_device``), the ``cuda`` marker, and the accounting that lets
tools/gpu_check.sh tell "the GPU tests passed" from "the GPU tests did not run".

Markers (registered in pyproject.toml):

* ``cuda``: the test runs code on a GPU. Set automatically on every test that gets a cuda Device as a parameter
  (``kernel_device``/``compiled_device``/``any_device`` or a parametrize list from ``helpers``) or uses the ``cuda_device`` fixture;
  a test that reaches the GPU some other way says ``@pytest.mark.cuda`` itself. ``pytest -m cuda`` runs them.
* ``sanitize``: a small-shape kernel test of the subset that tools/gpu_check.sh runs under compute-sanitizer
  (``pytest -m "sanitize and cuda"``). Keep it small: each of the four tools must give its verdict in minutes.

``--require-cuda`` (gpu_check.sh): the run fails unless at least one cuda test ran and no cuda test was skipped for a
reason outside :data:`ALLOWED_CUDA_SKIPS`; ``--cuda-report FILE`` writes the counts as JSON.

Hangs: pyproject.toml gives every test pytest-timeout's limit; :func:`pytest_timeout_set_timer` adds faulthandler's
watchdog behind it.
"""
import faulthandler
import json
import os
import re
import sys
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any test folder

from helpers import ALL_DEVICES, COMPILED_DEVICES, CUDA_DEVICES, KERNEL_DEVICES  # noqa: E402

from convnet.devices import Device  # noqa: E402

# Skip reasons a cuda test may legitimately give on a working one-GPU machine (regular expressions, searched in the
# skip message). Anything else -- "no usable GPU", "CuPy is not installed", "convnet._cuda cannot be imported", a
# driver too old for the runtime -- means the GPU was not tested, and --require-cuda fails the run.
ALLOWED_CUDA_SKIPS = {
    r"only \d+ GPU\(s\) present": "the test needs more GPUs than the machine has (cuda:1 on a one-GPU machine)",
}


@pytest.fixture(params=KERNEL_DEVICES)
def kernel_device(request):
    """Each implementation checked against the NumPy reference: the compiled kernels on emu (always) and cuda:0 (when
    a GPU works, else skipped), and the fast CPU path (cpu)."""
    return request.param


@pytest.fixture(params=COMPILED_DEVICES)
def compiled_device(request):
    """Each device that runs the compiled kernels (emu; cuda:0 when a GPU works): tests of the kernels' internals
    (dispatch tables, split plans, workspaces)."""
    return request.param


@pytest.fixture(params=ALL_DEVICES)
def any_device(request):
    """numpy (the reference) and each kernel device."""
    return request.param


@pytest.fixture(params=CUDA_DEVICES)
def cuda_device(request):
    """cuda:0 when a GPU works, else the test is skipped with the reason (GPU-only tests, e.g. stream tests)."""
    return request.param


# ---------------------------------------------------------------------------------------------- cuda accounting
def pytest_addoption(parser):
    group = parser.getgroup("convnet", "convnet GPU checks")
    group.addoption("--require-cuda", action="store_true",
                    help="fail unless cuda tests ran and none was skipped for a reason outside the allow-list "
                         "(tests/conftest.py ALLOWED_CUDA_SKIPS)")
    group.addoption("--cuda-report", metavar="FILE", help="write the cuda tests' counts and skip reasons as JSON")


def is_cuda_test(item) -> bool:
    """Whether a collected test runs on a GPU: explicit ``cuda`` mark, a cuda Device parameter, or ``cuda_device``."""
    if item.get_closest_marker("cuda") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(isinstance(v, Device) and v.kind == "cuda" for v in callspec.params.values()):
        return True
    return "cuda_device" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)  # before `-m` selects, so that `-m cuda` sees the marks set here
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_cuda_test(item) and item.get_closest_marker("cuda") is None:
            item.add_marker(pytest.mark.cuda)


def allowed_skip(reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern in ALLOWED_CUDA_SKIPS)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


class CudaAccounting:
    """Counts the outcomes of the selected cuda tests; ``verdict()`` is the --require-cuda check."""

    def __init__(self):
        self.selected = set()
        self.outcome = {}      # nodeid -> passed | failed | error | skipped | xfailed | xpassed
        self.skips = Counter()  # reason -> count

    def logreport(self, report):
        if report.nodeid not in self.selected:
            return
        if report.skipped:
            if hasattr(report, "wasxfail"):
                self.outcome[report.nodeid] = "xfailed"
                return
            self.outcome[report.nodeid] = "skipped"
            self.skips[_skip_reason(report)] += 1
        elif report.failed:
            self.outcome[report.nodeid] = "failed" if report.when == "call" else "error"
        elif report.when == "call":
            self.outcome[report.nodeid] = "xpassed" if hasattr(report, "wasxfail") else "passed"

    def counts(self):
        c = Counter(self.outcome.values())
        ran = sum(c[k] for k in ("passed", "failed", "error", "xfailed", "xpassed"))
        bad = {r: n for r, n in self.skips.items() if not allowed_skip(r)}
        return {"selected": len(self.selected), "ran": ran, **{k: c[k] for k in
                ("passed", "failed", "error", "skipped", "xfailed", "xpassed")},
                "skip_reasons": dict(self.skips), "disallowed_skips": bad,
                "allowed_skip_patterns": ALLOWED_CUDA_SKIPS}

    def verdict(self) -> list[str]:
        """Why --require-cuda fails this run ([] = it does not)."""
        c = self.counts()
        problems = []
        if c["selected"] == 0:
            problems.append("no cuda test was selected (is the test selection right?)")
        elif c["ran"] == 0:
            problems.append(f"none of the {c['selected']} selected cuda tests ran")
        for reason, n in c["disallowed_skips"].items():
            problems.append(f"{n} cuda test(s) skipped: {reason}")
        return problems


_ACCOUNTING_KEY = pytest.StashKey[CudaAccounting]()
_STDERR_KEY = pytest.StashKey[int]()
_PROBLEMS_KEY = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[_ACCOUNTING_KEY] = CudaAccounting()
    config.stash[_STDERR_KEY] = os.dup(2)  # the terminal's: capturing is off while plugins configure


def pytest_unconfigure(config):
    os.close(config.stash[_STDERR_KEY])


def pytest_collection_finish(session):
    acc = session.config.stash[_ACCOUNTING_KEY]
    acc.selected = {item.nodeid for item in session.items if item.get_closest_marker("cuda") is not None}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    item.config.stash[_ACCOUNTING_KEY].logreport(outcome.get_result())


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    acc = config.stash.get(_ACCOUNTING_KEY, None)
    if acc is None:
        return
    if config.getoption("--require-cuda"):
        problems = acc.verdict()
        config.stash[_PROBLEMS_KEY] = problems
        if problems and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    path = config.getoption("--cuda-report")
    if path:
        with open(path, "w") as f:
            json.dump({**acc.counts(), "problems": config.stash.get(_PROBLEMS_KEY, []),
                       "exitstatus": int(session.exitstatus)}, f, indent=2)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    acc = config.stash.get(_ACCOUNTING_KEY, None)
    if acc is None or not (config.getoption("--require-cuda") or config.getoption("--cuda-report")):
        return
    c = acc.counts()
    terminalreporter.write_line(f"cuda tests: {c['selected']} selected, {c['ran']} ran ({c['passed']} passed, "
                                f"{c['failed']} failed, {c['error']} errors), {c['skipped']} skipped")
    for reason, n in c["skip_reasons"].items():
        terminalreporter.write_line(f"  skipped {n}: {reason}" + ("" if allowed_skip(reason) else "  <- NOT ALLOWED"))
    problems = config.stash.get(_PROBLEMS_KEY, [])
    if problems:
        terminalreporter.write_line("--require-cuda FAILED: " + "; ".join(problems), red=True, bold=True)


# ---------------------------------------------------------------------------------------------------------- hangs
@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item, settings):
    """At a test's limit, pytest-timeout ("thread", pyproject.toml) prints its output and every thread's stack, then
    ends the run. Its timer thread needs the GIL: a hang in compiled code that holds the GIL would outlive it.
    faulthandler's watchdog needs none: a little later it writes every thread's stack and ends the run (exit 1)."""
    from pytest_timeout import is_debugging
    if settings.timeout and settings.timeout > 0 and not is_debugging():
        faulthandler.dump_traceback_later(settings.timeout + min(settings.timeout, 60), exit=True,
                                          file=item.config.stash[_STDERR_KEY])


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item):
    faulthandler.cancel_dump_traceback_later()
