#!/usr/bin/env bash
# Development build: compiles the extension modules into the work tree's src/convnet/ (no pip install), so
#   tools/dev_build.sh && PYTHONPATH=src python -m pytest tests/test_elementwise.py
# runs against the sources in this tree. CONVNET_CUDA=OFF (the default here) skips the slow nvcc build;
# CONVNET_CUDA=ON builds convnet._cuda too.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build/dev}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} \
  -DCONVNET_CUDA="${CONVNET_CUDA:-OFF}" \
  -DCONVNET_DEV_OUTPUT_DIR="$PWD/src/convnet" \
  -DPython_EXECUTABLE="$(command -v python3)" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build_dir" -j"$(nproc)"
