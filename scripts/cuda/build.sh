#!/usr/bin/env bash
# Builds and lints the `cuda` feature without a GPU, so the CUDA code cannot rot unseen:
# nvcc and the CUDA headers come from PyPI wheels (scripts/cuda/requirements.txt, installed
# into .venv-cuda), candle's kernels are compiled for CUDA_COMPUTE_CAP (default 80, there is
# no GPU to ask), and build and clippy share target/cuda. The libraries are built (every CUDA
# kernel and every line of Rust compiled) and every target is linted, but nothing is linked:
# candle enables cudarc's `dynamic-linking`, so linking the server binary needs libcuda,
# libcudart, libnvrtc, libcublas(Lt) and libcurand, which a GPU machine has and this one does
# not (scripts/gpu_check.sh builds the binary there).
#
#   scripts/cuda/build.sh            # build (libraries) + clippy -D warnings (all targets)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/env.sh
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$PWD/target/cuda}
nvcc --version | tail -1
cargo build --locked -p models -p plugins -p server --lib --features cuda
cargo clippy --locked -p server -p models -p plugins --features cuda --all-targets -- -D warnings
echo "the cuda feature compiles and lints clean (compute capability $CUDA_COMPUTE_CAP; nothing linked)"
