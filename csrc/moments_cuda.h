// Plain C launchers of the CUDA kernels (moments_cuda.cu). CUDA runtime headers only: this
// header and its .cu compile with nvcc alone (no torch), which is what CI checks; the torch
// binding (bindings_cuda.cpp) allocates tensors, fetches the stream and calls these.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type codes (same values as crh::cpu::DType).
enum { CRH_CUDA_F32 = 0, CRH_CUDA_BF16 = 1, CRH_CUDA_F16 = 2 };

// A row-major view with unit column stride: element (i, j) at data + i*stride_row + j.
typedef struct {
  const void* data;
  int dtype;
  int64_t rows, cols, stride_row;
} crh_cuda_view;

// Bytes of scratch memory crh_cuda_batch_stats needs for x of shape (n, d) on the current device.
size_t crh_cuda_batch_workspace(int64_t n, int64_t d);

// Batch statistics (docs/spec.md §2) of the rows of x (n, d), fp32/bf16/fp16, on `stream`:
//   valid row i: finite entries (and not all zero when normalize: every finite nonzero row
//   counts, whatever its scale), mask[i] != 0 (mask may be NULL); s_i = 1/||x_i|| or 1;
//   mean (d,) float64 = (1/n) Σ s_i x_i;  counts (2,) int64 = [n valid, n skipped];
//   scatter (d, d) float32, exactly symmetric = Σ (s_i x_i − μ)(s_i x_i − μ)ᵀ, centered in fp32
//   before the product, upper-triangle tiles only (tensor cores for bf16/fp16: the centered
//   operand is rounded to the input type; fp32 FMA for fp32).
// All pointers are device pointers; workspace has workspace_bytes >= crh_cuda_batch_workspace.
// Returns the first CUDA error (launches are asynchronous; nothing is synchronised).
cudaError_t crh_cuda_batch_stats(crh_cuda_view x, const unsigned char* mask, int normalize,
                                 double* mean, float* scatter, int64_t* counts, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream);

size_t crh_cuda_cross_workspace(int64_t n, int64_t dg, int64_t dh);

// Cross moment of paired rows g (n, dg), h (n, dh) of one dtype: a row is valid when both rows
// are (and the mask keeps it). mean_g (dg,), mean_h (dh,) float64; scatter (dg, dh) float32 =
// Σ (ĝ − μ_g)(ĥ − μ_h)ᵀ (every tile); counts as above.
cudaError_t crh_cuda_cross_stats(crh_cuda_view g, crh_cuda_view h, const unsigned char* mask,
                                 int normalize, double* mean_g, double* mean_h, float* scatter,
                                 int64_t* counts, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream);

#ifdef __cplusplus
}
#endif
