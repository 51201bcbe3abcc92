// CPU kernels of crh_kernels: the batch statistics of docs/spec.md §2 on plain memory (moments_cpu.cpp)
// and the row GEMM matmul_rows (matmul_rows.cpp).
//
// This header is free of torch: the kernels take raw pointers and element strides, so the
// same code serves the torch binding (bindings.cpp) and a bare C++ harness.
#pragma once

#include <cstdint>
#include <cstddef>

namespace crh {
namespace cpu {

// Element type of an input matrix (the values of at::ScalarType do not leak in here).
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// A 2-D strided view: element (i, j) lives at data + (i*stride_row + j*stride_col) elements.
struct View {
  const void* data;
  DType dtype;
  int64_t rows, cols;
  int64_t stride_row, stride_col;
};

struct Counts {
  int64_t n;          // valid rows (the ones that enter mean and scatter)
  int64_t n_skipped;  // skipped rows: live, but a non-finite fp32 squared norm, or a zero norm
                      // when normalizing (row_status.h)
};

// Batch statistics of the rows of x (N, D) (docs/spec.md §2, crh_kernels/backends/base.py):
//   y_i = s_i * x_i with s_i = 1/||x_i|| (normalize) or 1, for the valid rows i;
//   mean    (D,)   float64: mu = (1/n) Σ_i y_i (0 when n == 0);
//   scatter (D, D) float32, row-major, exactly symmetric: Σ_i (y_i − mu)(y_i − mu)ᵀ,
//           centered in fp32 *before* the product, only the upper-triangle tiles computed.
// mask (N,) may be null; rows with mask[i] == false count nowhere. threads >= 1.
Counts batch_stats(const View& x, const bool* mask, bool normalize, int threads,
                   double* mean, float* scatter);

// The running state a batch merges into: counts (2,) = [n rows so far, n_skipped], mean (D,)
// and scatter (D, D) row-major, exactly symmetric, both float64 (f64) or float32. An update
// writes all three (it is the state's one commit point).
struct State {
  bool f64;
  int64_t* counts;
  void* mean;
  void* scatter;
};

// batch_stats merged into st in its final pass (Chan et al.), without a (D, D) batch scatter:
//   scatter ← scatter + C_b + (n1·n/(n1+n))·δδᵀ with δ = mu − mean1 (scatter ← C_b when n1 == 0),
//   each entry in float64, rounded once to the state's type, mirrored exactly; then
//   mean1 ← mean1 + (mu − mean1)·n/(n1+n) (in float64, rounded once; mu when n1 == 0) and
//   counts ← counts + [n, n_skipped].
// mean (D,) float64 receives the batch mean mu. With refuse_skipped and a skipped row the state
// is left untouched (the returned counts say so); so it is when an argument is refused (thrown
// before anything is written).
Counts batch_update(const View& x, const bool* mask, bool normalize, int threads,
                    bool refuse_skipped, const State& st, double* mean);

// Pass 1 of batch_update done while staging rows for a later call: the rows of x are copied
// into dst (row stride ld elements, unit column stride, x's dtype); row i's status
// (row_status.h: 0 masked, 1 skipped, 2 valid) and scale go to status[i] and scale[i];
// sum (D,) float64 += Σ s_i x_i over the valid rows. Stagings of consecutive blocks of rows add
// up to pass 1 of their union.
void stage_rows(const View& x, const bool* mask, bool normalize, int threads, void* dst,
                int64_t ld, float* scale, uint8_t* status, double* sum);

// batch_update of staged rows x with the status, scale and sum that stage_rows gave them.
Counts batch_update_staged(const View& x, const float* scale, const uint8_t* status,
                           const double* sum, int threads, bool refuse_skipped, const State& st,
                           double* mean);

// Cross moment of paired rows g (N, Dg), h (N, Dh): a row is valid when both rows are valid
// (and the mask keeps it). mean_g (Dg,), mean_h (Dh,) float64; scatter (Dg, Dh) float32
// row-major: Σ_i (ĝ_i − mu_g)(ĥ_i − mu_h)ᵀ.
Counts cross_stats(const View& g, const View& h, const bool* mask, bool normalize, int threads,
                   double* mean_g, double* mean_h, float* scatter);

// out (N, M) float32 row-major = x (N, K) · w (K, M), both float32 (any strides), accumulated
// in fp32 by the inner kernels of the covariance (the collector's g_a = g_b·W on the CPU).
void matmul_rows(const View& x, const View& w, int threads, float* out);

// Which inner kernel this machine runs: "avx512" or "generic".
const char* isa();

}  // namespace cpu
}  // namespace crh
