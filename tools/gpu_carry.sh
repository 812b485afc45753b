#!/usr/bin/env bash
# Prepares an offline GPU machine for tools/gpu_check.sh: gathers into .gpu_carry/ (git-ignored, about 45 MB) what its
# Fashion-MNIST epoch and its data-parallel run under mpirun need: the four IDX files (from FMNIST_DIR, default the
# Debian package dataset-fashion-mnist's folder) and MPICH + mpi4py wheels for the GPU machine's Python
# (GPU_PYTHON_VERSION, default 3.12, x86-64). Copy the checkout with .gpu_carry/ to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu_carry fmnist=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
rm -rf "$dest" && mkdir -p "$dest/wheels" "$dest/fashion-mnist"
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  cp "$fmnist/$f" "$dest/fashion-mnist/" || { echo "gpu_carry: no $fmnist/$f (set FMNIST_DIR)" >&2; exit 1; }
done
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
  --implementation cp "${platforms[@]}" -d "$dest/wheels" "mpich>=4" "mpi4py>=4"
du -sh "$dest"/*
