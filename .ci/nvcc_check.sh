#!/usr/bin/env bash
# Compile-only check of the CUDA kernels for sm_80 (A100) and sm_90 (H100/H200).
# csrc/moments_cuda.cu includes CUDA headers only (no torch; its own headers moments_cuda.h and
# row_status.h are plain C/C++), so nvcc alone builds it on a machine without a GPU or a CUDA
# torch. Any error or warning fails the check.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; else
    echo "nvcc check: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 1; fi
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "nvcc check: $("$NVCC" --version | tail -n 1)"
# the half/bf16 switches torch's extension builds pass to nvcc: no implicit conversions
TORCH_FLAGS="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr"
for arch in 80 90; do
  # shellcheck disable=SC2086
  "$NVCC" -std=c++17 -O3 -lineinfo --Werror all-warnings -Xcompiler -Wall,-Wextra $TORCH_FLAGS \
    -gencode "arch=compute_${arch},code=sm_${arch}" \
    -c csrc/moments_cuda.cu -o "$tmp/moments_cuda_sm${arch}.o"
  echo "nvcc check: csrc/moments_cuda.cu -> sm_${arch} OK ($(stat -c %s "$tmp/moments_cuda_sm${arch}.o") bytes)"
done
