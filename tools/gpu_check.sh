#!/usr/bin/env bash
# Everything a GPU session should do, in one call (see DEVELOPERS.md / the device tool):
#   build -> GPU tests -> compute-sanitizer memcheck + racecheck over the GPU kernel tests -> benchmarks -> summary.
# Usage (on the GPU machine, repo root):  OUT=/some/dir bash tools/gpu_check.sh [STAGE...]
#   STAGE: build, test, sanitize, bench (default: all four). The device tool allows 10 minutes per command, so on
#   a warm machine run e.g. `build test` in one call and `sanitize` / `bench` in the next ones (the installed
#   package stays while the machine is warm). SANITIZE_TIMEOUT (default 240 s) bounds each compute-sanitizer run.
# Logs and benchmark results are written to $LOGS; when $OUT is set (the device tool) they are also packed into
# $OUT/gpu_check.tgz (that tool returns few files). The summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-$PWD/gpu_check_out}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
declare -a SUMMARY=()
step() {  # step NAME LOGFILE COMMAND...
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  echo "== $name"
  "$@" >"$LOGS/$log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$log"
  SUMMARY+=("$(printf '| %-34s | %-4s | %5ss | %s |' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) "$log")")
  return $rc
}

STAGES=${*:-build test sanitize bench}
want() { [[ " $STAGES " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/gpu.txt"
if want build; then
  step "build (pip, no isolation)" build.log python3 -m pip install --no-build-isolation --no-deps -v . || {
    printf '%s\n' "${SUMMARY[@]}"; exit 1; }
fi
# Run from outside the source tree so the installed package (with convnet._cuda) is the one imported.
TESTS=$PWD/tests
cd /tmp
step "device report" devices.log python3 -c "import convnet; [print(e) for e in convnet.device_report()]"
if want test; then
  step "GPU tests (pytest -k cuda)" tests_cuda.log python3 -m pytest -q -rs "$TESTS" -k "cuda" -p no:cacheprovider
  step "all tests (emu + cuda)" tests_all.log python3 -m pytest -q -x "$TESTS" -p no:cacheprovider
fi
if want sanitize; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" $tool.log timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool $tool \
      --error-exitcode 9 --target-processes all python3 -m pytest -q -x "$TESTS" -k "cuda and not bench" \
      -p no:cacheprovider
  done
fi
cd "$OLDPWD"
if want bench; then
  for bench in benchmarks/*_bench.py; do
    step "benchmark $(basename "$bench" .py)" "$(basename "$bench" .py).log" python3 "$bench"
  done
fi
cp -r benchmarks/results "$LOGS/results" 2>/dev/null || true
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu_check.tgz" -C "$LOGS" .

echo
echo "| step                               | ok?  |  time | log |"
echo "|---|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
