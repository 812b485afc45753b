"""Every test has a time limit: a hung test ends the run within minutes, with every thread's stack, instead of
eating CI's budget (pyproject.toml: pytest-timeout; tests/conftest.py: faulthandler behind it)."""
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]

HELPER = '''
import threading

def helper_waits(ev):
    ev.wait()

def start_helper():
    ev = threading.Event()
    threading.Thread(target=helper_waits, args=(ev,), name="helper", daemon=True).start()
'''


def _pytest(tmp_path, body, limit):
    """pytest with this suite's configuration (pyproject.toml, tests/conftest.py) and a ``limit`` s time limit on a
    test file of ``body``: (exit status, output, seconds)."""
    assert importlib.util.find_spec("pytest_timeout"), "pytest-timeout is not installed: pip install '.[test]'"
    f = tmp_path / "test_stuck.py"
    f.write_text(HELPER + body)
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                        "-p", "conftest", "-p", "no:cacheprovider", "-o", f"timeout={limit}", "-v", str(f)],
                       cwd=tmp_path, env=subprocess_env(Path(__file__).parent), capture_output=True, text=True,
                       timeout=90)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t


def test_every_test_has_a_time_limit(request):
    assert request.config.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed: pip install '.[test]'"
    assert 0 < float(request.config.getini("timeout")) <= 900
    assert request.config.getini("timeout_method") == "thread"


def test_a_hung_test_ends_the_run_with_every_threads_stack(tmp_path):
    rc, out, seconds = _pytest(tmp_path, '''
import time

def test_stuck():
    start_helper()
    time.sleep(600)

def test_after():
    pass
''', limit=2)
    assert rc == 1 and seconds < 60, out
    assert "Timeout" in out and "Stack of helper" in out and "in helper_waits" in out, out
    assert "time.sleep(600)" in out, out  # the main thread's stack: where the test hangs
    assert "test_after" not in out, out  # nothing runs after a hang: what it left behind could hang the next test


def test_a_hang_that_holds_the_gil_ends_the_run_with_every_threads_stack(tmp_path):
    """A deadlock in compiled code that holds the GIL: pytest-timeout's timer thread never runs again, and no signal
    reaches Python; faulthandler's watchdog needs neither."""
    rc, out, seconds = _pytest(tmp_path, '''
import ctypes

def test_stuck_holding_the_gil():
    start_helper()
    libc = ctypes.PyDLL(None)  # a PyDLL call keeps the GIL
    mutex = ctypes.create_string_buffer(64)  # zeros: an unlocked default mutex
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)  # this thread's already: waits forever, and no signal interrupts it
''', limit=2)
    assert rc == 1 and seconds < 60, out
    assert "Timeout (0:00:04)!" in out, out  # faulthandler's, at the limit + min(limit, 60 s)
    assert "in helper_waits" in out and "in test_stuck_holding_the_gil" in out, out
