#!/bin/sh
# On a machine with an NVIDIA GPU: build the extension modules in place (the
# CUDA one needs nvcc) and check + time the CUDA paged-attention kernels.
# Results: bench/results/gpu_check_<card>.json and .md. Extra arguments go to
# bench/gpu_check.py (e.g. --iters 50).
set -eu
cd "$(dirname "$0")/.."
python setup.py build_ext --inplace
python -c "import kvmux._native_cuda" || { echo "gpu_check.sh: the CUDA module did not build (is nvcc on PATH or CUDA_HOME set?)"; exit 1; }
exec python bench/gpu_check.py --require-gpu "$@"
