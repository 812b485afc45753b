#!/usr/bin/env bash
# Prepares an offline GPU machine: gathers what tools/gpu_check.sh needs beyond the checkout into .gpu_carry/
# (git-ignored), on a machine with network access and the dataset:
#   fashion-mnist/  the four IDX files (30 MB), for one epoch of training
#   wheels/         MPICH and mpi4py for the GPU machine's Python (3.12 unless GPU_PYTHON_VERSION says otherwise,
#                   x86-64; 15 MB), for the data-parallel benchmark under mpirun
# About 45 MB in all. Copy the checkout with .gpu_carry/ to the GPU machine and run tools/gpu_check.sh there.
#
#   bash tools/gpu_carry.sh            # FMNIST_DIR=... where Fashion-MNIST is not in /usr/share/datasets
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu_carry
py=${GPU_PYTHON_VERSION:-3.12}
fmnist=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
rm -rf "$dest" && mkdir -p "$dest/wheels" "$dest/fashion-mnist"
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  cp "$fmnist/$f" "$dest/fashion-mnist/" || { echo "gpu_carry: no $fmnist/$f (apt-get install dataset-fashion-mnist \
or set FMNIST_DIR)" >&2; exit 1; }
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" -d "$dest/wheels" "mpich>=4" "mpi4py>=4"
ls -l "$dest"/wheels "$dest"/fashion-mnist
du -sh "$dest"
