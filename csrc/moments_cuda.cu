// CUDA kernels of crh_kernels: the fused covariance update of docs/spec.md §2 on the GPU.
//
// Owns: the row-statistics pass, the float64 column means, the tiled upper-triangle product
// (tensor-core MMA through WMMA for bf16/fp16, fp32 FMA for fp32) with the scale and shift
// fused into the tile loads, the split-N reduction and the exact mirror. CUDA headers only;
// the plain launchers at the bottom are declared in moments_cuda.h.
//
// Pipeline of one batch (x: n rows, d features, all on one stream), kernel by kernel:
//   row_stats_kernel          one warp per row: fp32 squared norm -> row status (row_status.h:
//                             masked / skipped / valid) and scale s_i; a tiny row (norm below
//                             2^-100, where 1/||x|| may exceed fp32) stores s_i = −2^-64/||x|| and
//                             sets the batch's flag `tiny`: y = (x·2^64)·|s_i| (scale_x), both
//                             factors exact; the kernels below read the flag once and take a
//                             second, rare copy of their loops only when it is set
//   status_count_kernel       final status (cross: valid in both) and [n, n_skipped] (block
//                             reductions)
//   scaled_col_sum_kernel     Σ_i s_i x_i in float64, per column and row split
//   mean_kernel               μ (float64) and its fp32 copy, the shift used in the product
//   partial_scatter_{fma,mma}_kernel
//                             for each tile pair (bi <= bj for the symmetric case) and row
//                             split: Σ_k y_k[a]·y_k[b] with y = s·x − μ computed in fp32 while
//                             loading x into shared memory (never stored in global memory), fp32
//                             accumulators (FMA for fp32, tensor cores for bf16/fp16)
//   sum_mirror_kernel         Σ over splits in a fixed order (deterministic), written to both
//                             triangles (cross moment: sum_splits_kernel, every entry)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "moments_cuda.h"
#include "row_status.h"

namespace {

using crh::kRowMasked;
using crh::kRowSkipped;
using crh::kRowValid;

// Tile of the product: BM x BN outputs per block, BK rows of x per step, 256 threads.
constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256;
// Each thread loads one column of a BK x 128 tile: rows tid/128 + 2*i, i < 16.
constexpr int LOADS = BK * BM / THREADS;

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The scaled entry s·v of a row; a tiny row's scale is negative: (v·2^64)·|s| (the rare loops).
constexpr float kTinyPre = 0x1p64f;
__device__ __forceinline__ float scale_tiny(float v, float s) {
  return s < 0.0f ? (v * kTinyPre) * -s : v * s;
}

// ------------------------------------------------------------------------------- pass 1
template <typename T>
__global__ void row_stats_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t sr,
                                 const unsigned char* __restrict__ mask, int normalize,
                                 float* __restrict__ scale, unsigned char* __restrict__ status,
                                 int* __restrict__ tiny) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t i = warp; i < n; i += nwarps) {  // i is warp-uniform
    if (mask != nullptr && mask[i] == 0) {
      if (lane == 0) {
        status[i] = kRowMasked;
        scale[i] = 0.0f;
      }
      continue;
    }
    const T* row = x + i * sr;
    float sq = 0.0f;
    for (int64_t j = lane; j < d; j += 32) {
      const float v = to_f32(row[j]);
      sq = fmaf(v, v, sq);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    // The row rule (docs/spec.md §1). Every lane holds the same sq (a butterfly of commutative adds), so
    // the branch is warp-uniform. sq decides alone when it is finite and, normalizing, at least
    // kSqTiny (2^-100: 2^26 above FLT_MIN, below which subnormal squares lose bits; the bound of
    // the CPU and Triton passes). Otherwise (zero, tiny or not finite) the row is measured again
    // in float64, where no square of an fp32 value under- or overflows: valid when every entry is
    // finite and, normalizing, not all zero; below 2^-200 (norm < 2^-100) the row is tiny.
    constexpr float kSqTiny = 0x1p-100f;
    bool ok = sq < HUGE_VALF && (!normalize || sq >= kSqTiny);
    float s = ok && normalize ? 1.0f / sqrtf(sq) : 1.0f;
    if (!ok) {
      double q = 0.0;
      for (int64_t j = lane; j < d; j += 32) {
        const double v = double(to_f32(row[j]));
        q = fma(v, v, q);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) q += __shfl_xor_sync(0xffffffffu, q, off);
      ok = q < HUGE_VAL;  // false for NaN too
      if (normalize) {
        ok = ok && q > 0.0;
        const bool is_tiny = ok && q < 0x1p-200;
        // 1/||x|| at most 2^100; a tiny row's −2^-64/||x|| at most 2^85 (the norm is >= 2^-149)
        s = ok ? float(is_tiny ? -(1.0 / sqrt(q)) * 0x1p-64 : 1.0 / sqrt(q)) : 0.0f;
        if (is_tiny && lane == 0) atomicOr(tiny, 1);
      }
    }
    if (lane == 0) {
      status[i] = ok ? kRowValid : kRowSkipped;
      scale[i] = ok ? s : 0.0f;
    }
  }
}

// Final status (with sb: valid only when valid in both) and counts [n valid, n skipped].
__global__ void status_count_kernel(const unsigned char* sa, const unsigned char* sb, int64_t n,
                                    unsigned char* out, unsigned long long* counts) {
  __shared__ unsigned long long s_valid, s_skipped;
  if (threadIdx.x == 0) {
    s_valid = 0;
    s_skipped = 0;
  }
  __syncthreads();
  unsigned long long v = 0, k = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    unsigned char st = sa[i];
    // the same mask in both: a row valid in one and not the other is skipped
    if (sb != nullptr && st == kRowValid && sb[i] != kRowValid) st = kRowSkipped;
    out[i] = st;
    v += st == kRowValid;
    k += st == kRowSkipped;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, off);
    k += __shfl_xor_sync(0xffffffffu, k, off);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(&s_valid, v);
    atomicAdd(&s_skipped, k);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(&counts[0], s_valid);
    atomicAdd(&counts[1], s_skipped);
  }
}

// partial[split][c] = Σ_{valid i in split} s_i x[i, c], float64. Block (32 columns, 8 rows).
template <typename T>
__global__ void scaled_col_sum_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t sr,
                                      const float* __restrict__ scale,
                                      const unsigned char* __restrict__ status,
                                      const int* __restrict__ tiny,
                                      int64_t rows_per_split, double* __restrict__ partial) {
  __shared__ double sh[8][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r1 = min(n, r0 + rows_per_split);
  double acc = 0.0;
  if (c < d && *tiny != 0) {  // rare: the batch holds a tiny row
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8)
      if (status[r] == kRowValid) acc += double(scale_tiny(to_f32(x[r * sr + c]), scale[r]));
  } else if (c < d) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8)
      if (status[r] == kRowValid) acc += double(to_f32(x[r * sr + c]) * scale[r]);
  }
  sh[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < 8; ++k) s += sh[k][threadIdx.x];
    partial[int64_t(blockIdx.y) * d + c] = s;
  }
}

__global__ void mean_kernel(const double* __restrict__ partial, int splits, int64_t d,
                            const unsigned long long* __restrict__ counts,
                            double* __restrict__ mean, float* __restrict__ mu) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  double s = 0.0;
  for (int k = 0; k < splits; ++k) s += partial[int64_t(k) * d + c];  // fixed order
  const unsigned long long n = counts[0];
  const double m = n ? s / double(n) : 0.0;
  mean[c] = m;
  mu[c] = float(m);
}

// ----------------------------------------------------------------------- pass 2: product
struct Side {
  const void* x;
  int64_t sr, d;
  const float* scale;  // per row
  const float* mu;     // fp32 shift (d,)
};

// y[i] = s_r·x[r, col] − μ[col] for rows r = k0 + tid/128 + 2i, or 0 outside [.., r_end), past
// the last column, or for rows that are not valid (never 0·inf). tiny (block-uniform: the
// batch's flag, read once per block): the rare copy, with tiny rows' pre-factor (scale_tiny).
template <typename T>
__device__ __forceinline__ void load_tile(float (&y)[LOADS], const Side& s,
                                          const unsigned char* __restrict__ status, int64_t col,
                                          float mu, int64_t k0, int64_t r_end, bool tiny) {
  const T* x = static_cast<const T*>(s.x);
  const int kk0 = threadIdx.x / BM;
  if (tiny) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int64_t r = k0 + kk0 + 2 * i;
      float v = 0.0f;
      if (r < r_end && col < s.d && status[r] == kRowValid)
        v = scale_tiny(to_f32(x[r * s.sr + col]), s.scale[r]) - mu;
      y[i] = v;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < LOADS; ++i) {
    const int64_t r = k0 + kk0 + 2 * i;
    float v = 0.0f;
    if (r < r_end && col < s.d && status[r] == kRowValid)
      v = to_f32(x[r * s.sr + col]) * s.scale[r] - mu;
    y[i] = v;
  }
}

template <typename Tc, int LD>
__device__ __forceinline__ void store_tile(Tc (*sm)[LD], const float (&y)[LOADS]) {
  const int cc = threadIdx.x % BM, kk0 = threadIdx.x / BM;
#pragma unroll
  for (int i = 0; i < LOADS; ++i) sm[kk0 + 2 * i][cc] = from_f32<Tc>(y[i]);
}

// Which tile pair this block computes: symmetric -> the blockIdx.x-th pair (bi <= bj) in row
// order; cross -> row-major over (tiles of A) x (tiles of B).
template <bool SYM>
__device__ __forceinline__ void tile_of_block(int tiles_b, int& bi, int& bj) {
  int t = blockIdx.x;
  if (SYM) {
    bi = 0;
    while (t >= tiles_b - bi) {
      t -= tiles_b - bi;
      ++bi;
    }
    bj = bi + t;
  } else {
    bi = t / tiles_b;
    bj = t % tiles_b;
  }
}

// fp32 operands: each thread owns an 8x8 block of the 128x128 tile (rows ty*4+{0..3} and
// 64+ty*4+{0..3}, columns likewise with tx), read as float4 from shared memory without bank
// conflicts. Output: the split's partial, ws[split][a][b], ld = db.
template <typename T, bool SYM>
__global__ void __launch_bounds__(THREADS)
    partial_scatter_fma_kernel(Side A, Side B, const unsigned char* __restrict__ status,
                               const int* __restrict__ tiny_flag, int64_t n,
                               int64_t rows_per_split, int tiles_b, float* __restrict__ ws) {
  __shared__ __align__(16) float As[BK][BM + 4];
  __shared__ __align__(16) float Bs[BK][BN + 4];
  int bi, bj;
  tile_of_block<SYM>(tiles_b, bi, bj);
  const bool diag = SYM && bi == bj;  // block-uniform: B is A
  const int64_t a0 = int64_t(bi) * BM, b0 = int64_t(bj) * BN;
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r_end = min(n, r_begin + rows_per_split);
  const int cc = threadIdx.x % BM;
  const float mu_a = a0 + cc < A.d ? A.mu[a0 + cc] : 0.0f;
  const float mu_b = b0 + cc < B.d ? B.mu[b0 + cc] : 0.0f;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const bool tiny = *tiny_flag != 0;

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  float ya[LOADS], yb[LOADS];
  load_tile<T>(ya, A, status, a0 + cc, mu_a, r_begin, r_end, tiny);
  if (!diag) load_tile<T>(yb, B, status, b0 + cc, mu_b, r_begin, r_end, tiny);
  for (int64_t k0 = r_begin; k0 < r_end; k0 += BK) {
    store_tile<float, BM + 4>(As, ya);
    if (!diag) store_tile<float, BN + 4>(Bs, yb);
    __syncthreads();
    if (k0 + BK < r_end) {  // next tile's global loads overlap this tile's arithmetic
      load_tile<T>(ya, A, status, a0 + cc, mu_a, k0 + BK, r_end, tiny);
      if (!diag) load_tile<T>(yb, B, status, b0 + cc, mu_b, k0 + BK, r_end, tiny);
    }
    float (*Bp)[BN + 4] = diag ? As : Bs;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      const float4 p0 = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 p1 = *reinterpret_cast<const float4*>(&As[kk][64 + ty * 4]);
      const float4 q0 = *reinterpret_cast<const float4*>(&Bp[kk][tx * 4]);
      const float4 q1 = *reinterpret_cast<const float4*>(&Bp[kk][64 + tx * 4]);
      const float a[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
      const float b[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  float* out = ws + int64_t(blockIdx.y) * A.d * B.d;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t r = a0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
    if (r >= A.d) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t c = b0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
      if (c < B.d) out[r * B.d + c] = acc[i][j];
    }
  }
}

// Whether this compilation pass has tensor-core fragments for T (bf16 needs sm_80, fp16 sm_70).
template <typename T>
struct MmaOk : std::integral_constant<bool, !std::is_same<T, float>::value> {};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <>
struct MmaOk<__nv_bfloat16> : std::false_type {};
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
template <>
struct MmaOk<__half> : std::false_type {};
#endif

// bf16/fp16 operands: WMMA 16x16x16 tensor-core tiles, fp32 accumulators. 8 warps as 2 x 4,
// each warp owns 64 x 32 outputs (4 x 2 fragments). The centered fp32 value is rounded to the
// input type only when stored to shared memory (docs/spec.md §2: center first, then cast).
template <typename T, bool SYM>
__global__ void __launch_bounds__(THREADS)
    partial_scatter_mma_kernel(Side A, Side B, const unsigned char* __restrict__ status,
                               const int* __restrict__ tiny_flag, int64_t n,
                               int64_t rows_per_split, int tiles_b, float* __restrict__ ws) {
  if constexpr (!MmaOk<T>::value) {
    __trap();  // the launcher sends these (dtype, arch) pairs to partial_scatter_fma_kernel
  } else {
  using namespace nvcuda;
  constexpr int LDS = BM + 8;  // 16-bit elements; rows stay 32-byte aligned for WMMA
  __shared__ __align__(32) T As[BK][LDS];
  __shared__ __align__(32) T Bs[BK][LDS];
  __shared__ __align__(32) float stage[THREADS / 32][16 * 16];
  int bi, bj;
  tile_of_block<SYM>(tiles_b, bi, bj);
  const bool diag = SYM && bi == bj;
  const int64_t a0 = int64_t(bi) * BM, b0 = int64_t(bj) * BN;
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r_end = min(n, r_begin + rows_per_split);
  const int cc = threadIdx.x % BM;
  const float mu_a = a0 + cc < A.d ? A.mu[a0 + cc] : 0.0f;
  const float mu_b = b0 + cc < B.d ? B.mu[b0 + cc] : 0.0f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // warp's rows [wm*64, +64), columns [wn*32, +32)
  const bool tiny = *tiny_flag != 0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  float ya[LOADS], yb[LOADS];
  load_tile<T>(ya, A, status, a0 + cc, mu_a, r_begin, r_end, tiny);
  if (!diag) load_tile<T>(yb, B, status, b0 + cc, mu_b, r_begin, r_end, tiny);
  for (int64_t k0 = r_begin; k0 < r_end; k0 += BK) {
    store_tile<T, LDS>(As, ya);
    if (!diag) store_tile<T, LDS>(Bs, yb);
    __syncthreads();
    if (k0 + BK < r_end) {
      load_tile<T>(ya, A, status, a0 + cc, mu_a, k0 + BK, r_end, tiny);
      if (!diag) load_tile<T>(yb, B, status, b0 + cc, mu_b, k0 + BK, r_end, tiny);
    }
    T (*Bp)[LDS] = diag ? As : Bs;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      // A(m, k) = y_k[a0 + m] lies at As[k][m]: column-major with ld LDS; B(k, n) at Bs[k][n].
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &As[ks][wm * 64 + i * 16], LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bp[ks][wn * 32 + j * 16], LDS);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Through a per-warp 16x16 staging buffer: edge tiles and any ld need bounds checks.
  float* out = ws + int64_t(blockIdx.y) * A.d * B.d;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(stage[warp], acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t r0 = a0 + wm * 64 + i * 16, c0 = b0 + wn * 32 + j * 16;
      for (int e = lane; e < 256; e += 32) {
        const int64_t r = r0 + e / 16, c = c0 + e % 16;
        if (r < A.d && c < B.d) out[r * B.d + c] = stage[warp][e];
      }
      __syncwarp();
    }
  }
  }
}

// out (d x d) = Σ_splits ws[s] over the upper triangle, mirrored: out[j][i] = out[i][j] exactly.
// Block (32, 8) per 32x32 tile (ti <= tj); the transposed copy goes through shared memory.
__global__ void sum_mirror_kernel(const float* __restrict__ ws, int splits, int64_t d,
                                  float* __restrict__ out) {
  __shared__ float tile[32][33];
  const int ti = blockIdx.y, tj = blockIdx.x;
  if (ti > tj) return;
  const int tx = threadIdx.x;
  for (int r = threadIdx.y; r < 32; r += 8) {
    const int64_t i = int64_t(ti) * 32 + r, j = int64_t(tj) * 32 + tx;
    float v = 0.0f;
    if (i < d && j < d && i <= j)
      for (int s = 0; s < splits; ++s) v += ws[int64_t(s) * d * d + i * d + j];
    tile[r][tx] = v;
  }
  __syncthreads();
  for (int r = threadIdx.y; r < 32; r += 8) {
    const int64_t i = int64_t(ti) * 32 + r, j = int64_t(tj) * 32 + tx;
    // in a diagonal tile the entries below the diagonal take their mirror image
    if (i < d && j < d) out[i * d + j] = i <= j ? tile[r][tx] : tile[tx][r];
  }
  if (ti != tj) {
    for (int r = threadIdx.y; r < 32; r += 8) {
      const int64_t i = int64_t(tj) * 32 + r, j = int64_t(ti) * 32 + tx;
      if (i < d && j < d) out[i * d + j] = tile[tx][r];
    }
  }
}

// out (dg x dh) = Σ_splits ws[s], fixed order.
__global__ void sum_splits_kernel(const float* __restrict__ ws, int splits, int64_t m,
                                  float* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < m;
       e += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += ws[int64_t(s) * m + e];
    out[e] = v;
  }
}

// -------------------------------------------------------------------------------- host
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align256(size_t v) { return (v + 255) / 256 * 256; }

struct Device {
  int sms = 108, major = 8;
};
Device device_info() {
  Device dev;
  int id = 0;
  if (cudaGetDevice(&id) == cudaSuccess) {
    cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, id);
    cudaDeviceGetAttribute(&dev.major, cudaDevAttrComputeCapabilityMajor, id);
  }
  return dev;
}

// Work split of one product: enough blocks for every SM (tile pairs x row splits), at least
// four BK steps per split, and at most 1 GiB of fp32 partials.
struct Plan {
  int64_t pairs, tiles_b, splits, rows_per_split;  // product
  int64_t msplits, mrows;                           // column means
};
Plan make_plan(int64_t n, int64_t da, int64_t db, bool sym, int sms) {
  Plan p;
  const int64_t ta = cdiv(da, BM);
  p.tiles_b = cdiv(db, BN);
  p.pairs = sym ? ta * (ta + 1) / 2 : ta * p.tiles_b;
  int64_t splits = cdiv(2 * int64_t(sms), p.pairs);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, n / (4 * BK)));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (int64_t(1) << 30) / (4 * da * db)));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  p.rows_per_split = cdiv(cdiv(std::max<int64_t>(n, 1), splits), BK) * BK;
  p.splits = cdiv(std::max<int64_t>(n, 1), p.rows_per_split);
  p.msplits = std::max<int64_t>(1, std::min<int64_t>(cdiv(n, 256), 4096));
  p.mrows = cdiv(std::max<int64_t>(n, 1), p.msplits);
  p.msplits = cdiv(std::max<int64_t>(n, 1), p.mrows);
  return p;
}

// Scratch layout, carved from one allocation.
struct Scratch {
  float* scale_a;
  float* scale_b;
  unsigned char* status_a;
  unsigned char* status_b;
  double* partial_a;
  double* partial_b;
  float* mu_a;
  float* mu_b;
  float* ws;
  int* tiny;  // the batch's tiny-row flag (zeroed before pass 1)
  size_t bytes;
};
Scratch carve(char* base, int64_t n, int64_t da, int64_t db, bool two, const Plan& p) {
  Scratch s{};
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* ptr = base ? base + off : nullptr;
    off += align256(bytes);
    return ptr;
  };
  s.scale_a = reinterpret_cast<float*>(take(sizeof(float) * n));
  s.status_a = reinterpret_cast<unsigned char*>(take(n));
  s.partial_a = reinterpret_cast<double*>(take(sizeof(double) * p.msplits * da));
  s.mu_a = reinterpret_cast<float*>(take(sizeof(float) * da));
  if (two) {
    s.scale_b = reinterpret_cast<float*>(take(sizeof(float) * n));
    s.status_b = reinterpret_cast<unsigned char*>(take(n));
    s.partial_b = reinterpret_cast<double*>(take(sizeof(double) * p.msplits * db));
    s.mu_b = reinterpret_cast<float*>(take(sizeof(float) * db));
  } else {
    s.scale_b = s.scale_a;
    s.status_b = s.status_a;
    s.partial_b = s.partial_a;
    s.mu_b = s.mu_a;
  }
  s.ws = reinterpret_cast<float*>(take(sizeof(float) * p.splits * da * db));
  s.tiny = reinterpret_cast<int*>(take(sizeof(int)));
  s.bytes = off;
  return s;
}

template <typename T>
void launch_row_stats(const crh_cuda_view& x, const unsigned char* mask, int normalize,
                      float* scale, unsigned char* status, int* tiny, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(cdiv(x.rows, THREADS / 32), 8192);
  row_stats_kernel<T><<<unsigned(blocks), THREADS, 0, stream>>>(
      static_cast<const T*>(x.data), x.rows, x.cols, x.stride_row, mask, normalize, scale, status,
      tiny);
}

template <typename T>
void launch_mean(const crh_cuda_view& x, const float* scale, const unsigned char* status,
                 const int* tiny, const Plan& p, double* partial,
                 const unsigned long long* counts, double* mean, float* mu, cudaStream_t stream) {
  const dim3 grid(unsigned(cdiv(x.cols, 32)), unsigned(p.msplits));
  scaled_col_sum_kernel<T><<<grid, dim3(32, 8), 0, stream>>>(
      static_cast<const T*>(x.data), x.rows, x.cols, x.stride_row, scale, status, tiny, p.mrows,
      partial);
  mean_kernel<<<unsigned(cdiv(x.cols, 256)), 256, 0, stream>>>(
      partial, int(p.msplits), x.cols, counts, mean, mu);
}

template <typename T, bool SYM>
void launch_partial_scatter(const Side& A, const Side& B, const unsigned char* status,
                            const int* tiny, int64_t n, const Plan& p, float* ws,
                            bool tensor_cores, cudaStream_t stream) {
  const dim3 grid(unsigned(p.pairs), unsigned(p.splits));
  if constexpr (!std::is_same<T, float>::value) {
    if (tensor_cores) {
      partial_scatter_mma_kernel<T, SYM><<<grid, THREADS, 0, stream>>>(
          A, B, status, tiny, n, p.rows_per_split, int(p.tiles_b), ws);
      return;
    }
  }
  (void)tensor_cores;
  partial_scatter_fma_kernel<T, SYM><<<grid, THREADS, 0, stream>>>(
      A, B, status, tiny, n, p.rows_per_split, int(p.tiles_b), ws);
}

bool tensor_cores_for(int dtype, const Device& dev) {
  if (dtype == CRH_CUDA_F16) return dev.major >= 7;
  if (dtype == CRH_CUDA_BF16) return dev.major >= 8;
  return false;  // fp32: IEEE FMA path
}

bool view_ok(const crh_cuda_view& v) {
  return v.rows >= 0 && v.cols >= 1 && (v.data != nullptr || v.rows == 0) &&
         (v.dtype == CRH_CUDA_F32 || v.dtype == CRH_CUDA_BF16 || v.dtype == CRH_CUDA_F16);
}

template <class F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case CRH_CUDA_F32: f(float{}); break;
    case CRH_CUDA_BF16: f(__nv_bfloat16{}); break;
    default: f(__half{}); break;
  }
}

}  // namespace

// ============================================================================ launchers
extern "C" size_t crh_cuda_batch_workspace(int64_t n, int64_t d) {
  const Plan p = make_plan(n, d, d, true, device_info().sms);
  return carve(nullptr, n, d, d, false, p).bytes;
}

extern "C" cudaError_t crh_cuda_batch_stats(crh_cuda_view x, const unsigned char* mask,
                                            int normalize, double* mean, float* scatter,
                                            int64_t* counts, void* workspace,
                                            size_t workspace_bytes, cudaStream_t stream) {
  if (!view_ok(x)) return cudaErrorInvalidValue;
  const int64_t n = x.rows, d = x.cols;
  cudaError_t err = cudaMemsetAsync(counts, 0, 2 * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  if (n == 0) {
    if ((err = cudaMemsetAsync(mean, 0, sizeof(double) * d, stream)) != cudaSuccess) return err;
    return cudaMemsetAsync(scatter, 0, sizeof(float) * d * d, stream);
  }
  const Device dev = device_info();
  const Plan p = make_plan(n, d, d, true, dev.sms);
  const Scratch s = carve(static_cast<char*>(workspace), n, d, d, false, p);
  if (workspace == nullptr || workspace_bytes < s.bytes) return cudaErrorInvalidValue;
  auto* cnt = reinterpret_cast<unsigned long long*>(counts);
  const bool tc = tensor_cores_for(x.dtype, dev);
  if ((err = cudaMemsetAsync(s.tiny, 0, sizeof(int), stream)) != cudaSuccess) return err;
  dispatch(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_row_stats<T>(x, mask, normalize, s.scale_a, s.status_a, s.tiny, stream);
    status_count_kernel<<<unsigned(std::min<int64_t>(cdiv(n, THREADS), 1024)), THREADS, 0,
                           stream>>>(s.status_a, nullptr, n, s.status_a, cnt);
    launch_mean<T>(x, s.scale_a, s.status_a, s.tiny, p, s.partial_a, cnt, mean, s.mu_a, stream);
    const Side side{x.data, x.stride_row, d, s.scale_a, s.mu_a};
    launch_partial_scatter<T, true>(side, side, s.status_a, s.tiny, n, p, s.ws, tc, stream);
  });
  const dim3 tiles(unsigned(cdiv(d, 32)), unsigned(cdiv(d, 32)));
  sum_mirror_kernel<<<tiles, dim3(32, 8), 0, stream>>>(s.ws, int(p.splits), d, scatter);
  return cudaGetLastError();
}

extern "C" size_t crh_cuda_cross_workspace(int64_t n, int64_t dg, int64_t dh) {
  const Plan p = make_plan(n, dg, dh, false, device_info().sms);
  return carve(nullptr, n, dg, dh, true, p).bytes;
}

extern "C" cudaError_t crh_cuda_cross_stats(crh_cuda_view g, crh_cuda_view h,
                                            const unsigned char* mask, int normalize,
                                            double* mean_g, double* mean_h, float* scatter,
                                            int64_t* counts, void* workspace,
                                            size_t workspace_bytes, cudaStream_t stream) {
  if (!view_ok(g) || !view_ok(h) || g.rows != h.rows || g.dtype != h.dtype)
    return cudaErrorInvalidValue;
  const int64_t n = g.rows, dg = g.cols, dh = h.cols;
  cudaError_t err = cudaMemsetAsync(counts, 0, 2 * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  if (n == 0) {
    if ((err = cudaMemsetAsync(mean_g, 0, sizeof(double) * dg, stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(mean_h, 0, sizeof(double) * dh, stream)) != cudaSuccess) return err;
    return cudaMemsetAsync(scatter, 0, sizeof(float) * dg * dh, stream);
  }
  const Device dev = device_info();
  const Plan p = make_plan(n, dg, dh, false, dev.sms);
  const Scratch s = carve(static_cast<char*>(workspace), n, dg, dh, true, p);
  if (workspace == nullptr || workspace_bytes < s.bytes) return cudaErrorInvalidValue;
  auto* cnt = reinterpret_cast<unsigned long long*>(counts);
  const bool tc = tensor_cores_for(g.dtype, dev);
  if ((err = cudaMemsetAsync(s.tiny, 0, sizeof(int), stream)) != cudaSuccess) return err;
  dispatch(g.dtype, [&](auto tag) {
    using T = decltype(tag);
    // one flag for both sides: a tiny g or h row takes the rare loops
    launch_row_stats<T>(g, mask, normalize, s.scale_a, s.status_a, s.tiny, stream);
    launch_row_stats<T>(h, mask, normalize, s.scale_b, s.status_b, s.tiny, stream);
    status_count_kernel<<<unsigned(std::min<int64_t>(cdiv(n, THREADS), 1024)), THREADS, 0,
                           stream>>>(s.status_a, s.status_b, n, s.status_a, cnt);
    launch_mean<T>(g, s.scale_a, s.status_a, s.tiny, p, s.partial_a, cnt, mean_g, s.mu_a, stream);
    launch_mean<T>(h, s.scale_b, s.status_a, s.tiny, p, s.partial_b, cnt, mean_h, s.mu_b, stream);
    const Side a{g.data, g.stride_row, dg, s.scale_a, s.mu_a};
    const Side b{h.data, h.stride_row, dh, s.scale_b, s.mu_b};
    launch_partial_scatter<T, false>(a, b, s.status_a, s.tiny, n, p, s.ws, tc, stream);
  });
  sum_splits_kernel<<<unsigned(std::min<int64_t>(cdiv(dg * dh, 256), 4096)), 256, 0, stream>>>(
      s.ws, int(p.splits), dg * dh, scatter);
  return cudaGetLastError();
}
