#!/usr/bin/env bash
# The default job's numbers (docs/results.md), reproduced: a fresh virtual environment with convnet installed from this
# checkout (one wheel, built once), then the main command `python -m convnet.train` once per seed, each run alone on
# the machine, timed wall-clock from the command's start to its exit (data loading and evaluation included).
#
#   bash tools/default_job_runs.sh OUT_DIR [SEED ...]          # default seeds: 0 1 2
#
# OUT_DIR/seed<S>/ gets the run's directory (log.jsonl, plots, checkpoint removed: 15 MB), its console log
# (console.txt) and time.txt; OUT_DIR/summary.md the table (accuracy, wall time, the machine). Needs Fashion-MNIST
# (apt-get install dataset-fashion-mnist). Takes the runs' time plus a few minutes for the build.
set -euo pipefail
out=$(realpath -m "${1:?usage: tools/default_job_runs.sh OUT_DIR [SEED ...]}")
shift
if [ $# -gt 0 ]; then seeds=("$@"); else seeds=(0 1 2); fi
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

echo "== building one wheel of $repo (CONVNET_CUDA=OFF: the main job on the CPU)"
CONVNET_CUDA=OFF python3 -m pip wheel -q --no-deps -w "$work/wheel" "$repo"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work"/wheel/*.whl
"$work/venv/bin/python" -c "import convnet; print(convnet.install_report())"

cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
  echo "# The default job, \`python -m convnet.train\`, on a fresh install ($(date -u +%Y-%m-%d))"
  echo
  echo "Machine: $cpu, $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GB; $("$work/venv/bin/python" -c 'import numpy; print("NumPy", numpy.__version__)'); one run at a time."
  echo
  echo "| seed | test accuracy | wall time (command start to exit) | training images/s (last epoch) |"
  echo "|---|---|---|---|"
} > "$out/summary.md"

for seed in "${seeds[@]}"; do
  run="$out/seed$seed"
  rm -rf "$run" && mkdir -p "$run"
  echo "== seed $seed"
  start=$(date +%s.%N)
  (cd "$work" && "$work/venv/bin/python" -m convnet.train --seed "$seed" --out "$run/run" --no-progress) \
    > "$run/console.txt" 2>&1
  end=$(date +%s.%N)
  wall=$(python3 -c "print(f'{$end - $start:.1f}')")
  echo "$wall s" > "$run/time.txt"
  rm -f "$run/run/checkpoint.npz"
  line=$(python3 - "$run/run/log.jsonl" "$wall" <<'PY'
import json, sys
last = json.loads(open(sys.argv[1]).read().splitlines()[-1])
wall = float(sys.argv[2])
print(f"{100 * (1 - last['test_error']):.2f}% | {int(wall // 60)} min {wall % 60:.0f} s | {last['images_per_s']:,.0f}")
PY
)
  echo "| $seed | $line |" >> "$out/summary.md"
  tail -n 1 "$run/console.txt"
done
cat "$out/summary.md"
