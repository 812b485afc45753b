#!/usr/bin/env bash
# Runs the project's pytest suite against a convnet._emu (and convnet._cpu) built with AddressSanitizer + UBSan, so
# every kernel test also checks global/shared-memory bounds (each SHARED array is its own heap block; SHARED arrays are
# references to sized arrays, so row overruns are UBSan bounds errors).
#
#   csrc/emu/tests/run_sanitized_tests.sh                      # the kernel, op, graph and emulator tests
#   csrc/emu/tests/run_sanitized_tests.sh tests/test_pool.py -k max
#
# How: builds the emu module into build/emu-asan (a few minutes the first time, incremental after), puts it
# with the Python sources into build/emu-asan/pkg, and runs pytest from outside the source tree with libasan
# and libstdc++ preloaded (Python itself is not instrumented; libstdc++ must be loaded before ASan intercepts
# __cxa_throw). Sanitizer reports go to files (pytest captures stderr, and a halting error would hide it); they
# are printed at the end, and any report makes the script fail. pytest reads the repository's pyproject.toml (named,
# as it runs from the build folder): the same per-test time limit as the plain run.
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
build=${EMU_ASAN_BUILD_DIR:-$root/build/emu-asan}
pkg=$build/pkg
cxx=${CXX:-g++}
flags="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined"

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=None -DCONVNET_CUDA=OFF \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCONVNET_DEV_OUTPUT_DIR="$pkg/convnet" -DPython_EXECUTABLE="$(command -v python3)" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build" --target _emu _cpu -j"$(nproc)"

# The Python package next to the sanitized modules (the emulator's kernels and the cpu device's loops; _cuda is not
# built here).
(cd "$root/src" && find convnet -name '*.py' -o -name '*.cfg') | while read -r f; do
  mkdir -p "$pkg/$(dirname "$f")"
  cp "$root/src/$f" "$pkg/$f"
done

reports=$build/reports
rm -rf "$reports" && mkdir -p "$reports"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then  # the tests that run compiled code op by op: every kernel family, the emulator, the graph
  # (the nvcc checks of the tensor-core kernels' PTX run no compiled code of ours: not here either)
  args=("$root/tests/emu" "--ignore=$root/tests/emu/test_sanitizer.py" -k "not nvcc_keeps")
  for f in "$root"/tests/test_*.py; do
    case ${f##*/} in  # end-to-end runs (training, whole nets, data, export, tools) repeat these kernels at length
      test_benchmarks.py|test_checkpoint.py|test_cli.py|test_convert.py|test_cuda_convnet.py|test_cupy_api.py|\
      test_data.py|test_decode.py|test_dir_lock.py|test_distributed.py|test_export.py|test_gpu_check.py|\
      test_gpu_placement.py|test_imagenet.py|test_install.py|test_kernel_resources.py|test_memory.py|\
      test_models.py|test_predict.py|test_precision_training.py|test_timeouts.py|test_torchvision.py|\
      test_train.py|test_train_optim.py|test_two_towers.py) ;;
      *) args+=("$f") ;;
    esac
  done
else  # paths relative to the repository root
  for i in "${!args[@]}"; do
    if [ -e "$root/${args[$i]}" ]; then args[$i]="$root/${args[$i]}"; fi
  done
fi

status=0
(
  cd "$build"  # not the source tree: `import convnet` must find the sanitized package
  LD_PRELOAD="$($cxx -print-file-name=libasan.so) $($cxx -print-file-name=libstdc++.so.6)" \
  ASAN_OPTIONS="detect_leaks=0:log_path=$reports/asan" UBSAN_OPTIONS="print_stacktrace=1:log_path=$reports/ubsan" \
  PYTHONPATH="$pkg" python3 -m pytest -c "$root/pyproject.toml" -p no:cacheprovider -q "${args[@]}"
) || status=$?

if compgen -G "$reports/*" >/dev/null; then
  echo "== sanitizer reports ($reports)"
  cat "$reports"/*
  exit 1
fi
exit $status
