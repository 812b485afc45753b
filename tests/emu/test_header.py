"""The emulator header accepts ordinary CUDA C++ (csrc/emu/tests/compile_probe.cu) without warnings."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CXX = os.environ.get("CXX", "g++")


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"{CXX} not found")
def test_cuda_api_surface_compiles_cleanly():
    probe = ROOT / "csrc" / "emu" / "tests" / "compile_probe.cu"
    r = subprocess.run([CXX, "-std=c++20", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror", f"-I{ROOT / 'csrc'}",
                        "-fsyntax-only", "-x", "c++", str(probe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"{CXX} not found")
def test_plain___shared___is_a_compile_error_that_says_what_to_use(tmp_path):
    src = tmp_path / "bad.cu"
    src.write_text('#include "cuda_compat.h"\n__global__ void k() { __shared__ float tile[32]; tile[0] = 1; }\n')
    r = subprocess.run([CXX, "-std=c++20", f"-I{ROOT / 'csrc'}", "-fsyntax-only", "-x", "c++", str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "use_the_SHARED_or_DYNAMIC_SHARED_macro" in r.stderr
