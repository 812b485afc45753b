#!/usr/bin/env bash
# What the GPU machine lacks for tools/gpu_check.sh's `extra` stage, gathered here (on the CPU machine, which has the
# network and the dataset) into .gpu_carry/ (git-ignored), for the device tool's `carry: [".gpu_carry"]`:
#   fashion-mnist/  the four IDX files (30 MB) for one epoch of training (the image has no /usr/share/datasets)
#   wheels/         MPICH and mpi4py for the image's Python (3.12, x86-64; 15 MB) for scaling_bench's mpirun
#                   (the image has mpi4py but no MPI library known to work with it)
# About 45 MB in all: with the tracked tree (about 15 MB) inside the tool's 64 MiB.
#
#   bash tools/gpu_carry.sh            # then run(command="OUT=... bash tools/gpu_check.sh quick", carry=[".gpu_carry"])
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
