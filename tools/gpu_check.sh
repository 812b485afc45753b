#!/usr/bin/env bash
# The acceptance run on a machine with an NVIDIA GPU (sm_80 or newer): it builds convnet._cuda for the card, runs the
# cuda tests, compute-sanitizer and the benchmarks, and fails unless a GPU was usable, the cuda tests ran (none skipped
# for a reason outside tests/conftest.py's ALLOWED_CUDA_SKIPS) and every step passed.
#
#   bash tools/gpu_check.sh [quick|full]
#     quick (default)  build; `pytest -m cuda` with CUDA_LAUNCH_BLOCKING=1, then asynchronously beside compute-sanitizer
#                      memcheck, racecheck, synccheck and initcheck over the `sanitize` tests; the conv, memory-bound,
#                      ops, AlexNet and two-tower benchmarks, one data-parallel rank under mpirun (NCCL), one epoch of
#                      Fashion-MNIST, Nsight Compute on the conv kernels (skipped where profiling is not permitted)
#     full             also the whole suite, ops_bench's every family, fmnist train_bench, the one-tower conv_bench
#   OUT=dir    gets summary.md, cuda_tests.json and gpu_check.tgz (every log and result), refreshed after each step
#   BUDGET=s   an optional time budget in seconds: a step that would not fit is skipped, a running one cut off
#   DRY_RUN=1  query the GPU, then print each step's command instead of running it
#   LOGS=dir (default gpu_check_out), PYTHON=python3, FMNIST_DIR=the Fashion-MNIST IDX files. For a machine without
#   network access, tools/gpu_carry.sh gathers the dataset and MPI wheels into .gpu_carry/, where this script looks.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD PY=${PYTHON:-python3} DRY_RUN=${DRY_RUN:-0} BUDGET=${BUDGET:-} CARRY=$PWD/.gpu_carry
MODE=${1:-quick}
case $MODE in quick|full) ;; *) echo "usage: bash tools/gpu_check.sh [quick|full]" >&2; exit 2 ;; esac
LOGS=${LOGS:-$ROOT/gpu_check_out}
mkdir -p "$LOGS/results" && LOGS=$(cd "$LOGS" && pwd) && rm -f "$LOGS"/cuda_tests*.{json,log} "$LOGS"/summary.md
export PY ROOT LOGS PYTHONUNBUFFERED=1 PATH="$PATH:${CUDA_HOME:-/usr/local/cuda}/bin:/usr/local/cuda/bin"
START=$SECONDS FAILED=0 GPU="GPU: not queried" ROWS=()
touch "$LOGS/.start"

# ------------------------------------------------------------------------------------------------ the summary
summary() {  # summary [final]: summary.md (and $OUT), rewritten after each step so a run cut short keeps its rows
  {
    echo "# gpu_check $MODE"; echo; echo "$GPU"; echo
    echo "| step | result | time | log / note |"; echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"; echo
    grep -sh -e "^cuda tests:" -e "NOT ALLOWED" -e "FAILED: " "$LOGS"/cuda_tests*.log  # conftest's counts
    if [ "${1:-}" = final ]; then echo "total $((SECONDS - START)) s: $([ $FAILED = 0 ] && echo ALL OK || echo FAILED)"
    else echo "INCOMPLETE after $((SECONDS - START)) s"; fi
  } >"$LOGS/summary.md"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp "$LOGS/summary.md" "$OUT/"
    if [ -f "$LOGS/cuda_tests.json" ]; then cp "$LOGS/cuda_tests.json" "$OUT/"; fi
    tar czf "$OUT/gpu_check.tgz" -C "$LOGS" .
  fi
}
row() {  # row NAME STATUS SECONDS NOTE
  ROWS+=("| $1 | $2 | $3 s | $4 |")
  case $2 in ok|skipped) ;; *) FAILED=1 ;; esac
  summary
}
die() {  # the loud stop: the summary, then the reason as the last line
  FAILED=1; summary final; cat "$LOGS/summary.md"; echo; echo "gpu_check: FAIL: $*"; exit 1
}

# ------------------------------------------------------------------------------------------------ steps
SKIP=75  # a step's exit status for "cannot run here" (its log's last line says why): skipped, not failed
left() { echo $((BUDGET - (SECONDS - START))); }
fits() { [ -z "$BUDGET" ] || [ "$(left)" -ge "$1" ]; }
limit() { if [ -n "$BUDGET" ] && [ "$(left)" -lt "$1" ]; then echo $(($(left) > 1 ? $(left) : 1)); else echo "$1"; fi; }
status() {  # status NAME RC SECONDS: the row of a finished step
  local log="$LOGS/$1.log" st=FAIL note="$1.log (rc $2)"
  case $2 in 0) st=ok note="$1.log" ;; "$SKIP") st=skipped note="$(tail -n 1 "$log")" ;; 124|137) st=TIMEOUT ;; esac
  row "$1" "$st" "$3" "$note"
}
launch() {  # launch NAME LIMIT COMMAND...: COMMAND under a time limit, into NAME.log
  local name=$1 limit; limit=$(limit "$2"); shift 2
  echo "== $name (at most ${limit}s)"
  if [ "$DRY_RUN" = 1 ]; then echo "DRY RUN: $*" >"$LOGS/$name.log"; return 0; fi
  timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$LOGS/$name.log" 2>&1  # bash -c: COMMAND may be a function
}
over() {  # over NAME ESTIMATE: would the step overrun the budget? (then its row says it was skipped)
  fits "$2" && return 1
  row "$1" skipped 0 "would overrun the ${BUDGET}s budget"
}
step() {  # step NAME ESTIMATE LIMIT COMMAND...: run it unless it would overrun the budget; its row; its status
  local name=$1 t0=$SECONDS rc
  over "$1" "$2" && return $SKIP
  shift 2
  launch "$name" "$@"; rc=$?
  tail -n 15 "$LOGS/$name.log"
  status "$name" $rc $((SECONDS - t0))
  return $rc
}
JOBS=()
job() {  # job NAME ESTIMATE LIMIT COMMAND...: a step in the background, its row written by wait_jobs
  over "$1" "$2" && return
  local name=$1; shift 2
  launch "$name" "$@" & JOBS+=("$name:$!:$SECONDS")
}
wait_jobs() {
  local j name pid t0
  for j in "${JOBS[@]}"; do
    IFS=: read -r name pid t0 <<<"$j"
    wait "$pid"; status "$name" $? $((SECONDS - t0)); tail -n 8 "$LOGS/$name.log"
  done
}

# ------------------------------------------------------------------------------------------------ what runs
preflight() {  # the card, from CuPy (convnet is not built yet)
  "$PY" - <<'PY'
import sys
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # noqa: BLE001
    sys.exit(f"no usable GPU: CuPy cannot reach one ({exc})")
if n == 0:
    sys.exit("no usable GPU: the CUDA runtime sees 0 devices")
major, minor = divmod(int(cupy.cuda.Device(0).compute_capability), 10)  # '90' -> 9, 0; '100' -> 10, 0
if major < 8:
    sys.exit(f"no usable GPU: GPU 0 is sm_{major}{minor}; convnet._cuda needs sm_80 or newer")
print(f"{n} GPU(s), GPU 0 sm_{major}{minor}, CuPy {cupy.__version__}, runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
      f"driver {cupy.cuda.runtime.driverGetVersion()}\n{major}{minor}")
PY
}
build() {  # only the card's architecture, nvcc's own threads, a build folder kept for the next run
  local nvcc=${CUDACXX:-$(command -v nvcc)}
  [ -x "$nvcc" ] || { echo "nvcc not found (CUDACXX, PATH, CUDA_HOME/bin, /usr/local/cuda/bin)"; return 1; }
  echo "nvcc: $nvcc"
  CUDACXX=$nvcc PATH="$(dirname "$nvcc"):$PATH" CONVNET_CUDA=ON CONVNET_CUDA_ARCHITECTURES="$ARCH-real" \
    CUDAFLAGS="--threads 0" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PIP_BREAK_SYSTEM_PACKAGES=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -v --config-settings=build-dir="build/gpu_check-$ARCH" .
}
device() {  # the installed package (from /tmp: no source tree shadows it) computes on the GPU
  cd /tmp && "$PY" -c 'import numpy as np; from convnet import ops; from convnet.devices import get_device
d = get_device("cuda"); y = d.to_numpy(ops.relu_forward(d, d.asarray(np.array([-1.0, 2.0], np.float32))))
assert y.tolist() == [0.0, 2.0], y; print(f"a ReLU ran on {d}")'
}
cuda_tests() {  # cuda_tests blocking|async|all, from /tmp: the installed package, not the checkout's sources
  local only=(-m cuda --require-cuda --cuda-report "$LOGS/cuda_tests$([ "$1" = async ] && echo _async).json")
  [ "$1" = blocking ] && export CUDA_LAUNCH_BLOCKING=1
  [ "$1" = all ] && only=()
  cd /tmp && "$PY" -m pytest -q -rs -p no:cacheprovider "$ROOT/tests" "${only[@]}"
}
sanitizer() {  # compute-sanitizer TOOL over the `sanitize` tests, CuPy's pool off (it hides out-of-bounds accesses)
  local tests=("$ROOT/tests") extra=() log="$LOGS/sanitize_$1.log"
  if [ "$1" = racecheck ]; then  # shared memory only, and the slowest: the families whose kernels use it
    tests=("$ROOT/tests/test_conv.py" "$ROOT/tests/test_softmax.py") extra=(--racecheck-report hazard)
  fi
  # --launch-timeout: the tool attaches once Python, pytest and CuPy have started, beside three other runs
  cd /tmp && CONVNET_CUPY_POOL=0 compute-sanitizer --tool "$1" "${extra[@]}" --error-exitcode 9 --launch-timeout 120 \
    --target-processes all "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" -m "sanitize and cuda" --require-cuda \
    || return
  grep -Eq "^=+ [A-Z ]*SUMMARY" "$log" || { echo "compute-sanitizer $1 gave no verdict (did it attach?)"; return 8; }
}
mpi_rank() {  # one data-parallel rank against no reducer, under mpirun (MPI from .gpu_carry's wheels if there)
  if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-index --no-deps --prefix /tmp/convnet-mpi \
      "$CARRY"/wheels/*.whl || return
    PATH="/tmp/convnet-mpi/bin:$PATH" PYTHONPATH="$(ls -d /tmp/convnet-mpi/lib/python3*/site-packages):${PYTHONPATH:-}"
    export PATH PYTHONPATH
  fi
  "$PY" benchmarks/scaling_bench.py --device cuda --ranks 1 --baseline --timeout 120 --out "$LOGS/scaling.md"
}
fmnist_epoch() {
  local d
  for d in "${FMNIST_DIR:-}" /usr/share/datasets/fashion-mnist "$CARRY/fashion-mnist" ""; do
    [ -f "$d/train-images-idx3-ubyte.gz" ] && break
  done
  [ -n "$d" ] || { echo "no Fashion-MNIST (FMNIST_DIR, /usr/share/datasets/fashion-mnist, .gpu_carry)"; return 1; }
  cd /tmp && "$PY" -m convnet.train --device cuda --epochs 1 --data "$d" --out "$LOGS/fmnist_epoch" --no-progress
}
ncu_conv() {  # speed of light, occupancy and memory of our conv kernels at batch 128
  local ncu rc
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { echo "ncu not found"; return 1; }
  "$ncu" --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --profile-from-start off --csv --page details --log-file "$LOGS/ncu_conv.csv" \
    "$PY" benchmarks/conv_bench.py --device cuda --batch 128 --profile; rc=$?
  grep -qs ERR_NVGPUCTRPERM "$LOGS/ncu_conv.csv" || return $rc  # else the machine does not allow profiling:
  echo "not permitted to read the GPU's performance counters (ERR_NVGPUCTRPERM; a container needs CAP_SYS_ADMIN)"
  return $SKIP
}
export SKIP CARRY
export -f build device cuda_tests sanitizer mpi_rank fmnist_epoch ncu_conv

# ------------------------------------------------------------------------------------------------ the run
if ! out=$(preflight 2>&1); then
  row preflight FAIL $((SECONDS - START)) "$(tail -n 1 <<<"$out")"
  die "$(tail -n 1 <<<"$out")"
fi
GPU="GPU: $(head -n 1 <<<"$out")" ARCH=$(tail -n 1 <<<"$out")
export ARCH
row preflight ok $((SECONDS - START)) "sm_$ARCH"
step build 60 900 build || die "no build: it failed or did not fit the budget ($LOGS/build.log)"
step device 10 120 device || die "no usable GPU: get_device('cuda') failed in the installed package (device.log)"

step cuda_tests 90 600 cuda_tests blocking
if command -v compute-sanitizer >/dev/null || [ "$DRY_RUN" = 1 ]; then
  for tool in memcheck racecheck synccheck initcheck; do job "sanitize_$tool" 150 300 sanitizer $tool; done
else
  row compute-sanitizer FAIL 0 "compute-sanitizer not found: no verdict"
fi
job cuda_tests_async 60 300 cuda_tests async
wait_jobs
[ "$MODE" = full ] && step all_tests 300 1800 cuda_tests all

# benchmarks, most wanted first (each writes its JSON into benchmarks/results/; --device cuda: never the emulator)
step conv_bench 45 240 "$PY" benchmarks/conv_bench.py --device cuda --batch 128
step memory_bound_bench 25 180 "$PY" benchmarks/memory_bound_bench.py --device cuda
if [ "$MODE" = full ]; then step ops_bench 60 300 "$PY" benchmarks/ops_bench.py --device cuda
else step ops_bench 15 120 "$PY" benchmarks/ops_bench.py --device cuda --families elementwise,softmax,fc; fi
step train_alexnet 60 240 "$PY" benchmarks/train_bench.py --device cuda --model alexnet --batch-size 128
step train_towers 40 180 "$PY" benchmarks/train_bench.py --towers --device cuda --batch-size 128 --steps 10 --repeats 3
step nccl_one_rank 40 150 mpi_rank
step fmnist_epoch 45 180 fmnist_epoch
step ncu_conv 60 200 ncu_conv
if [ "$MODE" = full ]; then
  for b in 64 128; do step "train_fmnist_$b" 30 150 "$PY" benchmarks/train_bench.py --device cuda --model fmnist \
    --batch-size $b; done
  step conv_bench_one_tower 45 240 "$PY" benchmarks/conv_bench.py --device cuda --model one-tower
fi
find benchmarks/results -maxdepth 1 -type f -newer "$LOGS/.start" -exec cp {} "$LOGS/results/" \;
summary final
cat "$LOGS/summary.md"
exit $FAILED
