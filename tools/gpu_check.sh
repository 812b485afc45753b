#!/usr/bin/env bash
# The GPU session's one script: build -> GPU tests -> compute-sanitizer -> benchmarks -> summary. It cannot pass
# without a GPU: no usable GPU, a convnet._cuda that was not built or cannot run, zero cuda tests run, or a cuda test
# skipped for a reason outside the allow-list (tests/conftest.py ALLOWED_CUDA_SKIPS) each fail it, loudly.
#
#   OUT=/some/dir bash tools/gpu_check.sh quick       # everything that matters, < 8 min on an H100 (budget below)
#   bash tools/gpu_check.sh [full]                    # quick + the whole suite (emu too) + the longer benchmarks
#   bash tools/gpu_check.sh STAGE...                  # stages on their own, e.g. `build test` then `sanitize`, `bench`
#
# Stages (a warm machine keeps the installed package between calls, so later calls can skip `build`):
#   preflight  a GPU is visible (CuPy's runtime sees a device of compute capability >= 8.0); picks the build's arch;
#              with `build`, the tools a build without isolation needs (scikit-build-core, pybind11, ninja,
#              CMake >= 3.24). Runs first in every mode and before every stage that needs the GPU; fails at once,
#              saying "no usable GPU: <why>" or which build tools are missing, before minutes are spent building.
#   build      pip install --no-build-isolation --no-deps . with CONVNET_CUDA=ON, nvcc found in PATH, $CUDACXX,
#              $CUDA_HOME/bin, /usr/local/cuda/bin or /usr/local/cuda-*/bin; only the card's architecture
#              (CONVNET_CUDA_ARCHITECTURES=<cc>-real, e.g. 90-real), nvcc --threads 0, CMAKE_BUILD_PARALLEL_LEVEL=nproc,
#              build tree build/gpu_check-<arch> (a warm rerun recompiles only what changed). Then `device`:
#              get_device("cuda") must work in the installed package, else the run stops there.
#   test       pytest -m cuda --require-cuda: pass 1 with CUDA_LAUNCH_BLOCKING=1 (a faulting kernel is named by the
#              test that launched it), pass 2 without it (asynchronous, as in training; in quick/full mode it runs
#              beside the sanitizers).
#   sanitize   compute-sanitizer memcheck, racecheck, synccheck and initcheck, the four at once (separate processes),
#              over pytest -m "sanitize and cuda" (the small-shape subset) with CONVNET_CUPY_POOL=0 (CuPy's memory
#              pool off: pooled sub-allocations hide out-of-bounds accesses from memcheck), each bounded by
#              SANITIZE_TIMEOUT seconds (a timeout is a FAIL: no verdict). racecheck, by far the slowest, checks
#              shared memory only: it runs over the families whose kernels use it (conv, softmax).
#   bench      conv_bench (batch 128, ours and cuDNN NCHW/CHWN FP32 + NCHW TF32, all in CUDA graphs), memory_bound_bench,
#              ops_bench (quick: elementwise, softmax, fc: the families without a benchmark of their own), train_bench
#              (AlexNet batch 128, ours and the same model in PyTorch, images/s), train_bench --towers (alexnet vs
#              alexnet-2gpu with both towers on the GPU, two streams; the copies). Full mode adds ops_bench's other
#              families and fmnist training.
#   extra      the rest of what the first GPU run owes (issues 10 and 15), most owed first: scaling_bench
#              --ranks 1 --baseline (data-parallel on one GPU, where one rank skips NCCL: its overhead, against no
#              reducer; under mpirun), one epoch of Fashion-MNIST training (python -m convnet.train --device cuda
#              --epochs 1: wall time and test accuracy), train_bench fmnist at batch 64 and 128, conv_bench
#              one-tower, Nsight Compute over our conv kernels at batch 128 (speed of light, occupancy, memory;
#              ncu_conv.csv: what makes a layer slower than cuDNN; skipped, with the reason, where the container
#              may not read the performance counters: ERR_NVGPUCTRPERM). The GPU image has neither the dataset nor
#              (known to work) MPI: `bash tools/gpu_carry.sh` fills .gpu_carry/ on the CPU machine (git-ignored:
#              name it in the device tool's carry) with
#              Fashion-MNIST and MPICH + mpi4py wheels for the image's Python, installed here under /tmp. In quick
#              mode it runs last, each item only if it fits the budget; a second call on the warm machine runs the
#              rest alone (no build: the package is installed): HARD_LIMIT=L BUDGET=L OUT=... bash
#              tools/gpu_check.sh extra, L = the device time left less 30 s
#   alltests   the whole suite, emu included (full mode only; the emulator needs no GPU, CI runs it anyway).
#
# Budget of `quick` on an H100 (16 cores), estimated from what can be measured without a GPU:
#   stage                 estimate  basis
#   preflight + device       10 s   CuPy import + device query; importing the installed package
#   build                    60 s   measured without a GPU (2 cores, nvcc 13.0, 90-real, --threads 0, 2026-11-27):
#                                   57 s wall for the whole pip install (both modules, 30 ninja steps); its critical
#                                   path is conv.cu under nvcc 16.5 s + link 5 s + configure 6 s: ~35 s on 16 cores.
#                                   (The default 5-target list costs conv.cu 25 s with --threads 0, 40 s without.)
#   test pass 1 (blocking)   60 s   151 cuda tests; their emu twins take 17 s here (NumPy references + emulated
#                                   kernels), so the GPU run is CuPy's first-use kernel compiles (NVRTC, cached for
#                                   later passes) + ~10 s of references
#   sanitize + test pass 2  150 s   four sanitizers and pass 2 side by side; 107 small tests each (their emu twins:
#                                   3.3 s here); each tool is cut at SANITIZE_TIMEOUT (quick: 150 s)
#   bench                   150 s   conv 45 s (15 timed shapes x 4 cuDNN variants incl. cudnnFind), memory-bound 25 s,
#                                   ops 15 s, train 60 s (ours + PyTorch; torch import and cuDNN autotune ~20 s),
#                                   towers 40 s (3 nets x 3 rounds of 10 steps; the last one skipped if late)
#   total                  ~470 s   (< 8 min); QUICK_BUDGET (default 470 s) skips benchmarks that would not fit.
#   extra                   250 s   scaling 40 s (MPI wheels 5 s, 2 runs of NCCL init + 35 fmnist steps), one epoch
#                                   45 s (469 steps + test pass + data), train_bench fmnist 2 x 30 s, one-tower conv
#                                   45 s, ncu 60 s (15 launches x ~25 replay passes, + conv_bench's start): in quick
#                                   mode only what the budget leaves; otherwise the second call.
#   Every step's time limit is also cut to what is left of QUICK_HARD_LIMIT (default 570 s; full mode: HARD_LIMIT,
#   unset = none), so that quick mode ends, with its summary, inside the device tool's 600 s per command.
#
# Results: everything goes to $LOGS (default ./gpu_check_out). With $OUT set (the device tool returns at most 8
# files), $OUT gets at most 7: gpu_check.tgz (all logs and benchmark results), summary.md, cuda_tests.json,
# conv.json, memory_bound.json, ops.json, train.json. They are refreshed after every step, so a run killed from
# outside still returns what it had done (summary.md then says "INCOMPLETE"). The summary table is printed last.
# Exit status 0 only if every stage that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
LOGS=${LOGS:-$ROOT/gpu_check_out}
TESTS=$ROOT/tests
mkdir -p "$LOGS" && LOGS=$(cd "$LOGS" && pwd)  # absolute: the test and sanitizer runs work from /tmp
export PYTHONUNBUFFERED=1
START=$SECONDS
declare -a SUMMARY=()
FAILED=0

# --------------------------------------------------------------------------------------------- arguments
ARGS=${*:-full}
MODE=stages
case " $ARGS " in
  *" quick "*) MODE=quick; STAGES="preflight build test sanitize bench extra" ;;
  *" full "*)  MODE=full;  STAGES="preflight build test sanitize alltests bench extra" ;;
  *) STAGES=$ARGS ;;
esac
for s in $STAGES; do
  case $s in preflight|build|test|sanitize|bench|extra|alltests) ;;
    *) echo "gpu_check: unknown stage '$s' (quick, full, or: preflight build test sanitize bench extra alltests)" >&2
       exit 2 ;;
  esac
done
want() { [[ " $STAGES " == *" $1 "* ]]; }
needs_gpu() { want test || want sanitize || want bench || want extra || want alltests; }
if [ "$MODE" = quick ]; then
  SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-150}; BUDGET=${QUICK_BUDGET:-470}; HARD_LIMIT=${QUICK_HARD_LIMIT:-570}
else
  SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-300}; BUDGET=${BUDGET:-100000}; HARD_LIMIT=${HARD_LIMIT:-}
fi
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
# GPU_CHECK_DRY_RUN=1: walk the stages, budgets and summary, running none of the steps' commands (each log says what
# it would run) and taking the device check as passed: tests/test_gpu_check.py checks the flow without a GPU.
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}

# --------------------------------------------------------------------------------------------- helpers
record() {  # record NAME STATUS SECONDS ESTIMATE NOTE
  SUMMARY+=("$(printf '| %-30s | %-7s | %5ss | %5s | %s |' "$1" "$2" "$3" "$4" "$5")")
  [ "$2" = ok ] || [ "$2" = skipped ] || FAILED=1
  write_summary partial  # $OUT always holds what is done so far (the device tool may kill the run at its limit)
}

capped() {  # capped LIMIT: LIMIT, cut to the seconds left before HARD_LIMIT (at least 1)
  local left
  if [ -z "${HARD_LIMIT:-}" ]; then echo "$1"; return; fi
  left=$((HARD_LIMIT - (SECONDS - START)))
  [ "$left" -lt 1 ] && left=1
  if [ "$1" -gt "$left" ]; then echo "$left"; else echo "$1"; fi
}

SKIP_RC=75  # a step that cannot run here (not a failure): its log's last line says why
status_of() {  # status_of RC -> ok | skipped | FAIL | TIMEOUT
  case $1 in 0) echo ok ;; "$SKIP_RC") echo skipped ;; 124|137) echo TIMEOUT ;; *) echo FAIL ;; esac
}

step() {  # step NAME LOG TIMEOUT ESTIMATE COMMAND... : run with a time limit, show the log's tail, record a row
  local name=$1 log=$2 limit est=$4; limit=$(capped "$3"); shift 4
  local t0=$SECONDS rc
  echo "== $name   (estimate ${est}, limit ${limit}s; log $log)"
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY RUN: $*" >"$LOGS/$log"; rc=0
  else
    timeout -k 15 "$limit" bash -c '"$@"' _ "$@" >"$LOGS/$log" 2>&1  # bash -c: COMMAND may be a function below
    rc=$?
  fi
  tail -n 20 "$LOGS/$log"
  local st note; st=$(status_of $rc)
  case $st in ok) note=$log ;; skipped) note="$log: $(tail -n 1 "$LOGS/$log")" ;; *) note="$log (rc $rc)" ;; esac
  record "$name" "$st" $((SECONDS - t0)) "$est" "$note"
  return $rc
}

cuda_counts() {  # one line per pytest run's cuda report (tests/conftest.py --cuda-report)
  local f
  for f in "$LOGS"/cuda_tests*.json "$LOGS"/sanitize_*.json; do
    [ -f "$f" ] || continue
    "$PY" - "$f" <<'PY' 2>/dev/null
import json, os, sys
r = json.load(open(sys.argv[1]))
bad = "; NOT ALLOWED: " + "; ".join(r["disallowed_skips"]) if r["disallowed_skips"] else ""
print(f"- {os.path.basename(sys.argv[1])}: {r['ran']} of {r['selected']} cuda tests ran, {r['passed']} passed, "
      f"{r['failed']} failed, {r['error']} errors, {r['skipped']} skipped{bad}")
PY
  done
}

write_summary() {  # write_summary [partial]: summary.md in $LOGS (and, with $OUT set, the files $OUT gets)
  {
    echo "# gpu_check $ARGS"
    echo
    echo "$GPU_LINE"
    echo
    echo "| step                           | result  |  time |   est | log / note |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    cuda_counts
    if [ "${1:-}" = partial ]; then
      echo "INCOMPLETE after $((SECONDS - START)) s (rewritten after each step: the run stopped here if nothing follows)"
    else
      echo "total $((SECONDS - START)) s; $([ $FAILED = 0 ] && echo 'ALL OK' || echo 'FAILED (see the rows above)')"
    fi
  } >"$LOGS/summary.md"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$LOGS/summary.md" "$OUT/summary.md"
    for f in cuda_tests conv memory_bound ops train; do
      if [ -f "$LOGS/$f.json" ]; then cp "$LOGS/$f.json" "$OUT/$f.json"; fi
    done
    tar czf "$OUT/gpu_check.tgz.tmp" -C "$LOGS" . 2>/dev/null && mv -f "$OUT/gpu_check.tgz.tmp" "$OUT/gpu_check.tgz"
  fi
}

summary() {
  write_summary
  echo
  cat "$LOGS/summary.md"
}

die() {  # die MESSAGE: the loud stop: the summary, then the reason as the last line
  echo "gpu_check: FAIL: $*" >"$LOGS/failure.txt"
  FAILED=1
  summary
  echo
  echo "gpu_check: FAIL: $*"
  exit 1
}

GPU_LINE="GPU: (not queried)"

# --------------------------------------------------------------------------------------------- preflight
# Is there a GPU this build could run on? Answered without convnet (not built yet): CuPy's runtime (CuPy is what
# the cuda device needs anyway) and nvidia-smi for the record.
preflight() {
  local t0=$SECONDS out rc
  echo "== preflight: is there a usable GPU?"
  if command -v nvidia-smi >/dev/null; then
    GPU_LINE="GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 \
               | head -1)"
  else
    GPU_LINE="GPU: nvidia-smi not found"
  fi
  echo "$GPU_LINE"
  out=$("$PY" - 2>&1 <<'PY'
import sys
try:
    import cupy
except Exception as exc:  # noqa: BLE001
    sys.exit(f"no usable GPU: CuPy cannot be imported ({exc}); the cuda device needs CuPy and a GPU")
try:
    n = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # noqa: BLE001
    sys.exit(f"no usable GPU: the CUDA runtime (through CuPy) says: {exc}")
if n == 0:
    sys.exit("no usable GPU: the CUDA runtime sees 0 devices")
major, minor = divmod(int(cupy.cuda.Device(0).compute_capability), 10)  # '90' -> 9, 0; '100' -> 10, 0
if major < 8:
    sys.exit(f"no usable GPU: GPU 0 is sm_{major}{minor}; convnet._cuda needs sm_80 or newer")
print(f"ARCH={major}{minor}")
print(f"{n} GPU(s); GPU 0: sm_{major}{minor}, CuPy {cupy.__version__}, "
      f"driver {cupy.cuda.runtime.driverGetVersion()}, runtime {cupy.cuda.runtime.runtimeGetVersion()}")
PY
)
  rc=$?
  echo "$out" | tee "$LOGS/preflight.log"
  if [ $rc != 0 ]; then
    record preflight FAIL $((SECONDS - t0)) 5s "$(echo "$out" | tail -1)"
    die "$(echo "$out" | tail -1)  [$GPU_LINE]"
  fi
  ARCH=$(echo "$out" | sed -n 's/^ARCH=//p')
  local missing; missing=$(want build && missing_build_tools)
  if [ -n "$missing" ]; then
    record preflight FAIL $((SECONDS - t0)) 5s "build tools missing: $missing"
    die "the build (pip install --no-build-isolation) needs: $missing"
  fi
  record preflight ok $((SECONDS - t0)) 5s "sm_$ARCH"
}

missing_build_tools() {  # what a build without isolation needs and does not find, as one line (empty: all there)
  local m v missing=()
  for m in scikit_build_core pybind11; do "$PY" -c "import $m" 2>/dev/null || missing+=("${m//_/-}"); done
  command -v ninja >/dev/null || "$PY" -c "import ninja" 2>/dev/null || missing+=(ninja)
  v=$(cmake --version 2>/dev/null | sed -n '1s/^cmake version \([0-9]*\.[0-9]*\).*/\1/p')
  if [ -z "$v" ]; then
    missing+=("CMake >= 3.24 (none on PATH)")
  elif [ "$(printf '%s\n3.24\n' "$v" | sort -V | head -n 1)" != 3.24 ]; then
    missing+=("CMake >= 3.24 (found $v)")
  fi
  local IFS=,; echo "${missing[*]}" | sed 's/,/, /g'
}

find_nvcc() {
  local c
  for c in "$(command -v nvcc 2>/dev/null)" "${CUDACXX:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" \
           /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

build() {
  local nvcc arch
  nvcc=$(find_nvcc) || die "nvcc not found (looked in PATH, \$CUDACXX, \$CUDA_HOME/bin, /usr/local/cuda/bin, \
/usr/local/cuda-*/bin): cannot build convnet._cuda"
  export CUDACXX=$nvcc PATH="$(dirname "$nvcc"):$PATH"
  arch=${CONVNET_CUDA_ARCHITECTURES:-${ARCH:+${ARCH}-real}}
  if [ -n "$arch" ]; then export CONVNET_CUDA_ARCHITECTURES=$arch; fi
  export CONVNET_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  export CUDAFLAGS="--threads 0 ${CUDAFLAGS:-}"
  echo "nvcc: $nvcc ($("$nvcc" --version | tail -1)); architectures: ${arch:-CMakeLists.txt default list}"
  echo "cmake: $(cmake --version 2>/dev/null | head -1 || echo 'not on PATH (scikit-build-core needs >= 3.24)');" \
       "ninja: $(ninja --version 2>/dev/null || echo 'not on PATH')"
  # PIP_BREAK_SYSTEM_PACKAGES: a system Python marked EXTERNALLY-MANAGED (PEP 668) refuses `pip install .`
  # otherwise; older pips ignore the variable.
  step "build (nvcc ${arch:-all archs})" build.log 900 60s \
    env PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-build-isolation --no-deps -v \
    --config-settings=build-dir="build/gpu_check-${arch:-all}" . \
    || die "the build failed (tail of $LOGS/build.log above)"
}

device_check() {  # the installed package (run from /tmp so that no source tree shadows it) can use the GPU
  local t0=$SECONDS out rc
  echo "== device: get_device(\"cuda\") in the installed package"
  if [ "$DRY_RUN" = 1 ]; then record device ok 0 5s "dry run"; return; fi
  out=$(cd /tmp && "$PY" - 2>&1 <<'PY'
import sys
import convnet
from convnet.devices import DeviceUnavailable, device_report, get_device
print("convnet from", convnet.__file__)
for e in device_report():
    print(f"  {e['device']:8s} usable={e['usable']!s:5s} {e['detail']}")
try:
    d = get_device("cuda")
except DeviceUnavailable as exc:
    sys.exit(f"no usable GPU: get_device('cuda') failed after the build: {exc}")
import numpy as np
from convnet import ops
y = ops.relu_forward(d, d.asarray(np.array([-1.0, 2.0], np.float32)))
assert d.to_numpy(y).tolist() == [0.0, 2.0], d.to_numpy(y)
print(f"get_device('cuda') = {d}; a ReLU ran on it")
PY
)
  rc=$?
  echo "$out" | tee "$LOGS/device.log"
  if [ $rc != 0 ]; then
    record device FAIL $((SECONDS - t0)) 5s "$(echo "$out" | tail -1)"
    die "$(echo "$out" | tail -1)"
  fi
  record device ok $((SECONDS - t0)) 5s "$(echo "$out" | grep -o "get_device('cuda') = [^;]*")"
}

# The functions that run under `timeout` (in a child bash) are exported with the variables they read.
export PY ROOT TESTS LOGS SKIP_RC
pytest_cuda() {  # pytest_cuda blocking|async REPORT: the cuda tests, from /tmp (the installed package is imported)
  [ "$1" = blocking ] && export CUDA_LAUNCH_BLOCKING=1
  cd /tmp && "$PY" -m pytest -q -rs -p no:cacheprovider "$TESTS" -m cuda --require-cuda --cuda-report "$LOGS/$2"
}
sanitizer() {  # sanitizer TOOL: compute-sanitizer over the sanitize subset, CuPy's pool off
  local tool=$1 extra=() rc log="$LOGS/sanitize_$1.log" tests=("$TESTS")  # (this function's output is that log)
  # racecheck checks shared memory only, and is the slowest by far: the families whose kernels use it
  case $tool in
    racecheck) extra=(--racecheck-report hazard); tests=("$TESTS/test_conv.py" "$TESTS/test_softmax.py") ;;
  esac
  # --launch-timeout: the tool attaches when the process first initialises CUDA, after Python, pytest and CuPy
  # have imported (beside three other sanitizers and a test run); its default, 10 s, could pass unattached.
  cd /tmp && CONVNET_CUPY_POOL=0 compute-sanitizer --tool "$tool" "${extra[@]}" --error-exitcode 9 \
    --launch-timeout 120 --show-backtrace device --target-processes all "$PY" -m pytest -q -rs -p no:cacheprovider \
    "${tests[@]}" -m "sanitize and cuda" --require-cuda --cuda-report "$LOGS/sanitize_$tool.json"
  rc=$?
  if [ $rc = 0 ] && { grep -q "No attachable process" "$log" || ! grep -Eq "^=+ [A-Z ]*SUMMARY" "$log"; }; then
    echo "gpu_check: compute-sanitizer $tool gave no verdict (it did not attach, or printed no summary)"
    return 8
  fi
  return $rc
}
pool_check() {  # CONVNET_CUPY_POOL=0 really switches CuPy's pool off (a pooled allocation shows in used_bytes)
  cd /tmp && CONVNET_CUPY_POOL=0 "$PY" - <<'PY'
from convnet.devices import get_device
d = get_device("cuda")
cp = d.xp
a = d.empty((1024,), "float32")
used = cp.get_default_memory_pool().used_bytes()
print("CONVNET_CUPY_POOL=0: CuPy pool bytes in use after an allocation:", used)
assert used == 0, "CONVNET_CUPY_POOL=0 did not switch CuPy's memory pool off"
PY
}
alltests() { cd /tmp && "$PY" -m pytest -q -rs -p no:cacheprovider "$TESTS"; }
export -f pytest_cuda sanitizer pool_check alltests

over_budget() {  # over_budget SECONDS: would a step of that estimate overrun the mode's budget?
  [ $((SECONDS - START + $1)) -gt "$BUDGET" ]
}

# --------------------------------------------------------------------------------------------- stages
: >"$LOGS/failure.txt"
ARCH=""
if [ "$MODE" != stages ] || needs_gpu || want preflight; then
  preflight
fi
if want build; then
  build
fi
if needs_gpu; then
  device_check
fi

declare -a JOBS=() JOB_NAMES=() JOB_LOGS=() JOB_EST=() JOB_T0=()
start_job() {  # start_job NAME LOG LIMIT ESTIMATE COMMAND...: in the background, bounded by LIMIT
  local name=$1 log=$2 limit est=$4; limit=$(capped "$3"); shift 4
  echo "== $name   (in parallel; estimate ${est}, limit ${limit}s; log $log)"
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY RUN: $*" >"$LOGS/$log" &
  else
    timeout -k 15 "$limit" bash -c '"$@"' _ "$@" >"$LOGS/$log" 2>&1 &
  fi
  JOBS+=($!); JOB_NAMES+=("$name"); JOB_LOGS+=("$log"); JOB_EST+=("$est"); JOB_T0+=($SECONDS)
}
wait_jobs() {
  local i rc st
  for i in "${!JOBS[@]}"; do
    wait "${JOBS[$i]}"; rc=$?
    st=$(status_of $rc)
    echo "== ${JOB_NAMES[$i]}: $st (rc $rc)"
    tail -n 12 "$LOGS/${JOB_LOGS[$i]}"
    record "${JOB_NAMES[$i]}" "$st" $((SECONDS - JOB_T0[i])) "${JOB_EST[$i]}" \
      "${JOB_LOGS[$i]}$([ $st = ok ] || echo " (rc $rc)")"
  done
  JOBS=(); JOB_NAMES=(); JOB_LOGS=(); JOB_EST=(); JOB_T0=()
}

if want test; then
  rm -f "$LOGS"/cuda_tests*.json
  step "cuda tests, CUDA_LAUNCH_BLOCKING=1" tests_cuda_blocking.log "$TEST_TIMEOUT" 90s \
    pytest_cuda blocking cuda_tests.json
  if [ "$MODE" = stages ] || ! want sanitize; then
    step "cuda tests, asynchronous" tests_cuda_async.log "$TEST_TIMEOUT" 60s pytest_cuda async cuda_tests_async.json
  else  # beside the sanitizers: both only check, nothing is timed
    start_job "cuda tests, asynchronous" tests_cuda_async.log "$TEST_TIMEOUT" 60s pytest_cuda async cuda_tests_async.json
  fi
fi

if want sanitize; then
  if ! command -v compute-sanitizer >/dev/null; then
    for p in /usr/local/cuda/bin /usr/local/cuda-*/bin ${CUDA_HOME:+$CUDA_HOME/bin}; do
      [ -x "$p/compute-sanitizer" ] && export PATH="$p:$PATH" && break
    done
  fi
  if [ "$DRY_RUN" != 1 ] && ! command -v compute-sanitizer >/dev/null; then
    record "compute-sanitizer" FAIL 0 - "compute-sanitizer not found: no sanitizer verdict"
  else
    rm -f "$LOGS"/sanitize_*.json
    step "CONVNET_CUPY_POOL=0 takes effect" sanitize_pool.log 60 5s pool_check
    for tool in memcheck racecheck synccheck initcheck; do
      start_job "compute-sanitizer $tool" "sanitize_$tool.log" "$SANITIZE_TIMEOUT" "$((SANITIZE_TIMEOUT * 2 / 3))s" \
        sanitizer $tool
    done
  fi
fi
wait_jobs  # pass 2 and the sanitizers: the GPU is idle again before anything is timed

if want alltests; then
  step "all tests (emu + cuda)" tests_all.log 1200 "5 min" alltests
fi

bench() {  # bench NAME ESTIMATE_S LIMIT JSON COMMAND...: a benchmark, skipped when it would overrun the budget
  local name=$1 est=$2 limit=$3 json=$4; shift 4
  if over_budget "$est"; then
    record "$name" skipped 0 "${est}s" "over the ${BUDGET}s budget ($((SECONDS - START)) s spent)"
    return
  fi
  local mark="$LOGS/.mark_$json"
  rm -f "$LOGS/$json.json"
  touch "$mark"
  step "$name" "$json.log" "$limit" "${est}s" "$@"
  # the newest JSON the benchmark wrote (benchmarks/results/<name>-<card>-<date>.json), under a fixed name
  local new
  new=$(find benchmarks/results -maxdepth 1 -name '*.json' -newer "$mark" 2>/dev/null | head -1)
  if [ -n "$new" ]; then cp "$new" "$LOGS/$json.json"; fi
}

if want bench; then
  mkdir -p "$LOGS/results"
  # --device cuda everywhere: a benchmark must not fall back to the emulator on the GPU machine
  bench "conv_bench (batch 128)" 45 240 conv "$PY" benchmarks/conv_bench.py --device cuda --batch 128
  bench "memory_bound_bench" 25 180 memory_bound "$PY" benchmarks/memory_bound_bench.py --device cuda
  if [ "$MODE" = full ]; then
    bench "ops_bench (all families)" 60 300 ops "$PY" benchmarks/ops_bench.py --device cuda
  else
    bench "ops_bench (elementwise,softmax,fc)" 15 120 ops "$PY" benchmarks/ops_bench.py --device cuda \
      --families elementwise,softmax,fc
  fi
  bench "train_bench (alexnet, batch 128)" 60 240 train "$PY" benchmarks/train_bench.py --device cuda \
    --model alexnet --batch-size 128
  # the two-tower split (issue 11): alexnet vs alexnet-2gpu with both towers on this GPU (two streams), the copies
  bench "train_bench --towers (batch 128)" 40 180 towers "$PY" benchmarks/train_bench.py --towers --device cuda \
    --batch-size 128 --steps 10 --repeats 3
  find benchmarks/results -maxdepth 1 -type f -newer "$LOGS/failure.txt" -exec cp {} "$LOGS/results/" \; 2>/dev/null
fi

# --------------------------------------------------------------------------------------------- extra
CARRY=$ROOT/.gpu_carry  # tools/gpu_carry.sh
carried_mpi() {  # MPICH + mpi4py from the carried wheels, under /tmp/convnet-mpi (their mpirun first on PATH)
  local prefix=/tmp/convnet-mpi site
  if [ "$DRY_RUN" = 1 ]; then echo "dry run: no install"; return 0; fi
  ls "$CARRY"/wheels/*.whl >/dev/null 2>&1 || { echo "no carried wheels: the image's own MPI, if any"; return 0; }
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-index --no-deps --no-compile --prefix "$prefix" \
    "$CARRY"/wheels/*.whl \
    || { echo "gpu_check: installing the carried MPI wheels failed"; return 1; }
  site=$(ls -d "$prefix"/lib/python3*/site-packages | head -1)
  export PATH="$prefix/bin:$PATH" PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "MPI from the carried wheels: $(command -v mpirun); mpi4py from $site"
}
fmnist_dir() {  # the Fashion-MNIST IDX files: FMNIST_DIR, the Debian package's folder, or the carried copy
  local d
  for d in "${FMNIST_DIR:-}" /usr/share/datasets/fashion-mnist "$CARRY/fashion-mnist"; do
    if [ -n "$d" ] && [ -f "$d/train-images-idx3-ubyte.gz" ]; then echo "$d"; return 0; fi
  done
  return 1
}
scaling_one_gpu() {  # one data-parallel rank (no NCCL: nothing to average) against no reducer, under mpirun
  "$PY" -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])" || {
    echo "gpu_check: mpi4py cannot load an MPI library (run tools/gpu_carry.sh and carry .gpu_carry)"; return 1; }
  "$PY" benchmarks/scaling_bench.py --device cuda --ranks 1 --baseline --timeout 120 --out "$LOGS/scaling.md"
}
ncu_conv() {  # Nsight Compute on our conv kernels at batch 128: speed of light, occupancy, memory (issue 10)
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /usr/local/cuda-*/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
        2>/dev/null | head -1) || true
  [ -n "$ncu" ] || { echo "gpu_check: ncu not found"; return 1; }
  "$ncu" --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --profile-from-start off --csv --page details --log-file "$LOGS/ncu_conv.csv" \
    "$PY" benchmarks/conv_bench.py --device cuda --batch 128 --profile
  local rc=$?
  if grep -qs ERR_NVGPUCTRPERM "$LOGS/ncu_conv.csv" "$LOGS/ncu_conv.log"; then  # the machine's setting, not ours
    echo "not permitted to read the GPU's performance counters (ERR_NVGPUCTRPERM: a container without" \
         "CAP_SYS_ADMIN, or the driver's NVreg_RestrictProfilingToAdminUsers=1)"
    return "$SKIP_RC"
  fi
  return $rc
}
train_one_epoch() {  # one epoch of the default model on Fashion-MNIST: wall time and test accuracy (issue 10)
  cd /tmp && "$PY" -m convnet.train --device cuda --epochs 1 --data "$1" --out "$LOGS/train_fmnist_1epoch" \
    --no-progress
}
export -f scaling_one_gpu train_one_epoch ncu_conv

if want extra; then
  mkdir -p "$LOGS/results"
  if carried_mpi >"$LOGS/mpi_setup.log" 2>&1; then
    bench "scaling_bench (NCCL, 1 rank)" 40 150 scaling scaling_one_gpu
  else
    record "scaling_bench (NCCL, 1 rank)" FAIL 0 40s "mpi_setup.log: $(tail -1 "$LOGS/mpi_setup.log")"
  fi
  if data=$(fmnist_dir); then
    bench "train fmnist, 1 epoch" 45 180 train_epoch train_one_epoch "$data"
  else
    record "train fmnist, 1 epoch" FAIL 0 45s "no Fashion-MNIST (FMNIST_DIR, /usr/share/datasets, .gpu_carry)"
  fi
  bench "train_bench (fmnist, batch 64)" 30 150 train_fmnist64 "$PY" benchmarks/train_bench.py --device cuda \
    --model fmnist --batch-size 64
  bench "train_bench (fmnist, batch 128)" 30 150 train_fmnist128 "$PY" benchmarks/train_bench.py --device cuda \
    --model fmnist --batch-size 128
  bench "conv_bench (one-tower)" 45 240 conv_one_tower "$PY" benchmarks/conv_bench.py --device cuda \
    --model one-tower
  bench "ncu: conv kernels, batch 128" 60 200 ncu_conv ncu_conv
  find benchmarks/results -maxdepth 1 -type f -newer "$LOGS/failure.txt" -exec cp {} "$LOGS/results/" \; 2>/dev/null
fi

summary
exit $FAILED
