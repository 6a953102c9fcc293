#!/usr/bin/env bash
# Standalone CUDA microbenchmarks behind docs/PERF.md's decode notes; run on the GPU machine (it
# has nvcc) from the repo root: bash scripts/gpu/microbench/run.sh [gemv_read|gemv_staged_pdl]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nvcc=${NVCC:-/usr/local/cuda/bin/nvcc}
tmp=$(mktemp -d)
for b in ${1:-gemv_read gemv_staged_pdl}; do
    "$nvcc" -arch=sm_90a -O3 -std=c++17 --extended-lambda -o "$tmp/$b" "$here/$b.cu"
    echo "### $b"
    "$tmp/$b"
done
