// CPU kernels of crh_kernels (C++17, OpenMP): the fused symmetric covariance update of docs/spec.md §2,
// its merge into a running state, and the cross moment. No torch here (see moments_cpu.h);
// bindings.cpp turns tensors into View and calls these.
//
// Owns: the row-statistics pass (pass 1, also run at staging time: stage_rows), the drivers of
// pass 2 over the upper triangle (thread layouts, the last-chunk help), the merge into a running
// state with the final exact mirror, the cross moment, and the op-facing API of moments_cpu.h
// (but matmul_rows: matmul_rows.cpp). The infrastructure is in cpu_common.h, the packing and the
// inner kernels in cpu_microkernels.h, the row status in row_status.h.
//
// Math (N rows, D features, n valid rows):
//   pass 1   s_i = 1/||x_i||  (fp32 squared norm, float64 where that one under/overflows;
//            skipped rows enter no sum; a row of norm below 2^-100 stores −2^-64/||x_i|| and is
//            scaled as (x_i·2^64)·|s_i|, see row_rule_rescue)  and
//            mu = (1/n) Σ_i s_i x_i, summed in float64;
//   pass 2   for each chunk of KC valid rows: Y = s·x − mu (fp32, written once into a small
//            packed buffer P that stays in L2) and C += YᵀY over the tiles of C that touch the
//            upper triangle (≈ N·D·(D+1) flops instead of 2·N·D²);
//   finally  scatter = Σ_threads C (upper triangle), mirrored exactly.
//
// Threads: with many rows each thread owns a share of them, its own P and its own copy of C
// (no synchronisation until the final sum) while the copies fit in ~L3; otherwise the threads
// share one C and split its micro-rows chunk by chunk. A thread done early computes bands of
// another's last chunk into a side buffer, added where the owner would have added them.
// Results depend on the thread count (the row split) but not on scheduling: each entry of each
// C is the same fp32 sum, in row order, whichever thread formed which part of it.
#include "moments_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef CRH_TEST_HOOKS
#include <chrono>
#include <thread>
#endif

#include "cpu_common.h"
#include "cpu_microkernels.h"
#include "row_status.h"

namespace crh {
namespace cpu {
namespace {

using namespace detail;  // the CPU infrastructure, packing and inner kernels of the headers

// ================================================================================ pass 1
// 1/sqrt(sq) rounded once (through float64), for a finite sq > 0.
CRH_INLINE float inv_sqrt(float sq) { return float(1.0 / std::sqrt(double(sq))); }

// fp32 squared norms below 2^-100 (2^26 above FLT_MIN) may have lost bits to subnormal squares:
// such rows are measured again (the bound SQ_TINY of crh_kernels/backends/torch.py and Triton).
constexpr float kSqTiny = 0x1p-100f;

// The row rule's second look (docs/spec.md §1) at a live row whose fp32 squared norm is zero, tiny or not
// finite, from its squared norm q summed again in float64 (where no square of an fp32 value
// under- or overflows): valid when every entry is finite and, normalizing, not all zero. A row
// of norm below 2^-100 (q < 2^-200), whose 1/||x|| may exceed fp32, is a *tiny* row: its scale is
// stored negative, -2^-64/||x||, and y = (x·2^64)·|s| wherever it is applied (tiny_scaled:
// add_tiny_row, repack_tiny): both factors exact, y is x/||x|| rounded once. The encoding of
// crh_kernels/backends/torch.py and the Triton kernels. Out of line: it runs for such rows only.
__attribute__((noinline, cold)) bool row_rule_rescue(double q, bool normalize, float& scale,
                                                     uint8_t& status) {
  const bool finite = q < HUGE_VAL;  // false for NaN too
  if (!finite || (normalize && !(q > 0.0))) {
    status = kRowSkipped;
    return false;
  }
  if (!normalize)
    scale = 1.0f;
  else if (q < 0x1p-200)
    scale = -float((1.0 / std::sqrt(q)) * 0x1p-64);  // at most 2^85: the norm is >= 2^-149
  else
    scale = float(1.0 / std::sqrt(q));  // at most 2^100
  status = kRowValid;
  return true;
}

// acc += (x·2^64)·|s| (float64) for a tiny row (s < 0): pass 1's mean sum, out of line.
template <DType T>
__attribute__((noinline, cold)) void add_tiny_row(const typename Elem<T>::type* row, int64_t d,
                                                  int64_t sc, float s, double* acc) {
  for (int64_t j = 0; j < d; ++j) acc[j] += double(tiny_scaled(Elem<T>::load(row + j * sc), s));
}

// The row rule (docs/spec.md §1, crh_kernels/backends/base.py) of a live row from its fp32 squared norm
// sq: its status and scale, one definition for every pass-1 path. sq decides alone when it is
// finite and, normalizing, at least kSqTiny; otherwise sq64() sums the row's squares again in
// float64 for row_rule_rescue. True when the row is valid.
template <class Sq64>
CRH_INLINE bool row_rule(float sq, bool normalize, Sq64&& sq64, float& scale, uint8_t& status) {
  if (__builtin_expect(sq < HUGE_VALF && (!normalize || sq >= kSqTiny), 1)) {
    scale = normalize ? inv_sqrt(sq) : 1.0f;
    status = kRowValid;
    return true;
  }
  return row_rule_rescue(sq64(), normalize, scale, status);
}

// Σ_j x_j² in float64 over a row of d entries with column stride sc (16 independent partial
// sums; unit stride gets its own loop, which the compiler vectorizes).
template <DType T>
__attribute__((noinline)) double sq_norm64(const typename Elem<T>::type* row, int64_t d, int64_t sc) {
  double lanes[16] = {};
  auto body = [&](auto stride) {
    int64_t j = 0;
    for (; j + 16 <= d; j += 16)
      for (int l = 0; l < 16; ++l) {
        const double v = double(Elem<T>::load(row + (j + l) * stride));
        lanes[l] += v * v;
      }
    for (int l = 0; j < d; ++j, ++l) {
      const double v = double(Elem<T>::load(row + j * stride));
      lanes[l] += v * v;
    }
  };
  if (sc == 1)
    body(std::integral_constant<int64_t, 1>{});
  else
    body(sc);
  for (int w = 8; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0];
}

// Squared norm (fp32) of row i, then status and scale; with acc != nullptr also
// acc += s·x_i in float64 (the row is still in L1 from the norm loop).
template <DType T>
void row_pass_range(const View& x, const bool* mask, bool normalize, int64_t r0, int64_t r1,
                    float* scale, uint8_t* status, double* acc) {
  using E = typename Elem<T>::type;
  const E* base = static_cast<const E*>(x.data);
  const int64_t d = x.cols, sc = x.stride_col;
  for (int64_t i = r0; i < r1; ++i) {
    scale[i] = 0.0f;
    if (mask != nullptr && !mask[i]) {
      status[i] = kRowMasked;
      continue;
    }
    const E* row = base + i * x.stride_row;
    // 32 independent fp32 partial sums, as the AVX-512 path keeps: short chains, small error
    float lanes[32] = {};
    int64_t j = 0;
    for (; j + 32 <= d; j += 32)
      for (int l = 0; l < 32; ++l) {
        const float v = Elem<T>::load(row + (j + l) * sc);
        lanes[l] += v * v;
      }
    for (int l = 0; j < d; ++j, ++l) {
      const float v = Elem<T>::load(row + j * sc);
      lanes[l] += v * v;
    }
    for (int w = 16; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
    if (!row_rule(lanes[0], normalize, [&] { return sq_norm64<T>(row, d, sc); }, scale[i],
                  status[i]))
      continue;
    const float s = scale[i];
    if (acc != nullptr && s < 0.0f) {
      add_tiny_row<T>(row, d, sc, s, acc);
    } else if (acc != nullptr) {
      if (sc == 1) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) acc[j] += double(Elem<T>::load(row + j) * s);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) acc[j] += double(Elem<T>::load(row + j * sc) * s);
      }
    }
  }
}

// acc += Σ_{r in [r0, r1)} s_r · x_{rows[r]} in float64 (cross moment: the mean over the rows
// valid in *both* inputs needs a second look at each).
template <DType T>
void mean_range(const View& x, const int64_t* rows, const float* rscale, int64_t r0, int64_t r1,
                double* acc) {
  using E = typename Elem<T>::type;
  const E* base = static_cast<const E*>(x.data);
  const int64_t d = x.cols, sc = x.stride_col;
  for (int64_t r = r0; r < r1; ++r) {
    const E* row = base + rows[r] * x.stride_row;
    const float s = rscale[r];
    if (s < 0.0f) {
      add_tiny_row<T>(row, d, sc, s, acc);
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) acc[j] += double(Elem<T>::load(row + j * sc) * s);
  }
}

#if CRH_HAVE_AVX512_PATH
// sq_norm64 of a unit-stride row with AVX-512: the rows row_rule looks at again.
template <DType T>
CRH_TARGET_AVX512 __attribute__((noinline)) double sq_norm64_avx512(const typename Elem<T>::type* row,
                                                                    int64_t d) {
  __m512d q0 = _mm512_setzero_pd(), q1 = _mm512_setzero_pd();
  for (int64_t j = 0; j < d; j += 16) {
    const __m512 a = load16<T>(row + j, d - j >= 16 ? __mmask16(0xffff)
                                                    : __mmask16((1u << (d - j)) - 1u));
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
    const __m512d hi =
        _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(a), 1)));
    q0 = _mm512_fmadd_pd(lo, lo, q0);
    q1 = _mm512_fmadd_pd(hi, hi, q1);
  }
  // (summed through memory: GCC 12 warns inside _mm512_reduce_add_pd)
  alignas(64) double t[8];
  _mm512_store_pd(t, _mm512_add_pd(q0, q1));
  return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}

// Pass 1 with AVX-512 (unit column stride): same rule as row_pass_range; the squared norm is
// summed in fp32 over 16 lanes, s·x in fp32, the mean sum in float64.
template <DType T>
CRH_TARGET_AVX512 void row_pass_avx512(const View& x, const bool* mask, bool normalize, int64_t r0,
                                       int64_t r1, float* scale, uint8_t* status, double* acc) {
  using E = typename Elem<T>::type;
  const E* base = static_cast<const E*>(x.data);
  const int64_t d = x.cols;
  const int64_t full = d / 16 * 16;
  const int rem = int(d - full);
  const __mmask16 mrem = __mmask16((1u << rem) - 1u);
  const __mmask8 mlo = __mmask8(rem >= 8 ? 0xff : (1u << rem) - 1u);
  const __mmask8 mhi = __mmask8(rem <= 8 ? 0 : (1u << (rem - 8)) - 1u);
  for (int64_t i = r0; i < r1; ++i) {
    scale[i] = 0.0f;
    if (mask != nullptr && !mask[i]) {
      status[i] = kRowMasked;
      continue;
    }
    const E* row = base + i * x.stride_row;
    __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= full; j += 32) {
      const __m512 a = load16<T>(row + j, 0xffff);
      const __m512 b = load16<T>(row + j + 16, 0xffff);
      q0 = _mm512_fmadd_ps(a, a, q0);
      q1 = _mm512_fmadd_ps(b, b, q1);
    }
    for (; j < full; j += 16) {
      const __m512 a = load16<T>(row + j, 0xffff);
      q0 = _mm512_fmadd_ps(a, a, q0);
    }
    if (rem) {
      const __m512 a = load16<T>(row + full, mrem);
      q1 = _mm512_fmadd_ps(a, a, q1);
    }
    const float sq = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1));
    if (!row_rule(sq, normalize, [&] { return sq_norm64_avx512<T>(row, d); }, scale[i],
                  status[i]) ||
        acc == nullptr)
      continue;
    if (scale[i] < 0.0f) {
      add_tiny_row<T>(row, d, 1, scale[i], acc);
      continue;
    }
    const __m512 s = _mm512_set1_ps(scale[i]);
    for (j = 0; j < full; j += 16) {
      const __m512 y = _mm512_mul_ps(load16<T>(row + j, 0xffff), s);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(y));
      const __m512d hi =
          _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(y), 1)));
      _mm512_storeu_pd(acc + j, _mm512_add_pd(_mm512_loadu_pd(acc + j), lo));
      _mm512_storeu_pd(acc + j + 8, _mm512_add_pd(_mm512_loadu_pd(acc + j + 8), hi));
    }
    if (rem) {
      const __m512 y = _mm512_mul_ps(load16<T>(row + full, mrem), s);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(y));
      const __m512d hi =
          _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(y), 1)));
      _mm512_mask_storeu_pd(acc + full, mlo,
                            _mm512_add_pd(_mm512_maskz_loadu_pd(mlo, acc + full), lo));
      _mm512_mask_storeu_pd(acc + full + 8, mhi,
                            _mm512_add_pd(_mm512_maskz_loadu_pd(mhi, acc + full + 8), hi));
    }
  }
}
#endif

struct RowSet {
  std::vector<int64_t> rows;  // valid row indices, ascending
  std::vector<float> rscale;  // their scales (< 0: a tiny row, see row_rule_rescue)
  int64_t n_skipped = 0;
  bool tiny = false;          // some scale is < 0: packing takes the rare path (repack_tiny)
};

// Pass 1 over x: status[i] and scale[i] of every row and, with mean_sum, mean_sum += Σ s_i x_i
// in float64 (per-thread partials added in thread order: depends on the thread count only).
// With dst, the rows are also copied to dst (row stride ld, unit column stride, x's dtype)
// block by block, while still in L1 from the norm loop: pass 1 at staging time.
template <DType T>
void pass1(Isa isa, const View& x, const bool* mask, bool normalize, int threads, float* scale,
           uint8_t* status, double* mean_sum, void* dst = nullptr, int64_t ld = 0) {
  using E = typename Elem<T>::type;
  const int64_t n = x.rows, d = x.cols;
  std::vector<Buf<double>> accs(threads);
  if (mean_sum != nullptr)
    for (int t = 0; t < threads; ++t) accs[t] = alloc<double>(d, true);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const Split s = split(n, threads, t);
    double* acc = mean_sum != nullptr ? accs[t].get() : nullptr;
    const int64_t block = dst != nullptr ? 16 : std::max<int64_t>(1, s.end - s.begin);
    for (int64_t r0 = s.begin; r0 < s.end; r0 += block) {
      const int64_t r1 = std::min(s.end, r0 + block);
#if CRH_HAVE_AVX512_PATH
      if (isa >= Isa::Avx512 && x.stride_col == 1)
        row_pass_avx512<T>(x, mask, normalize, r0, r1, scale, status, acc);
      else
        row_pass_range<T>(x, mask, normalize, r0, r1, scale, status, acc);
#else
      (void)isa;
      row_pass_range<T>(x, mask, normalize, r0, r1, scale, status, acc);
#endif
      for (int64_t i = r0; dst != nullptr && i < r1; ++i) {
        const E* row = static_cast<const E*>(x.data) + i * x.stride_row;
        E* o = static_cast<E*>(dst) + i * ld;
        if (x.stride_col == 1) {
          stream_copy(o, row, size_t(d) * sizeof(E));
        } else {
          for (int64_t j = 0; j < d; ++j) o[j] = row[j * x.stride_col];
        }
      }
    }
    if (dst != nullptr) store_fence();  // this thread's streamed rows are ordered before the rest
  }
  if (mean_sum != nullptr) {
    for (int64_t j = 0; j < d; ++j) {
      double v = mean_sum[j];
      for (int t = 0; t < threads; ++t) v += accs[t][j];
      mean_sum[j] = v;
    }
  }
}

// ================================================================================ pass 2
// Zero rows [a_begin, a_end) of C from the first column syrk_chunk writes (its micro-tile
// column): the copies' lower half, which nothing reads, costs no stores.
void zero_upper(const KernelChoice& k, float* C, int64_t a_begin, int64_t a_end, int64_t dp) {
  for (int64_t a = a_begin; a < a_end; ++a) {
    const int64_t b = (a / k.nr) * k.nr;
    std::memset(C + a * dp + b, 0, size_t(dp - b) * sizeof(float));
  }
}

// Rows per chunk of pass 2: the packed chunk (rows·Dp·4 bytes) should sit in L2 (~1 MiB) while
// the broadcast slices (rows × 64 bytes) sit in L1; more rows amortise the load/store of each C
// micro-tile. (The chunk size is flat over a wide range; NOTES.md.)
int64_t chunk_rows(int64_t dp) {
  if (dp <= 256) return 512;
  return 256;
}

// Threads worth waking for n rows of d features: each must get ≥ 2^22 multiply-adds of the
// product (~0.1 ms); below that, a fork/join costs more than it saves (on a busy machine a
// join can wait a whole scheduler tick).
int useful_threads(int threads, int64_t n, int64_t d) {
  const double work = double(n) * double(d) * (double(d) + 8.0) / 2.0;
  return int(std::max<double>(1.0, std::min<double>(threads, work / double(1 << 22))));
}

// Per-thread copies of C (no synchronisation) while all of them fit in about an L3's worth of
// memory; beyond that one shared C wins: the copies' first touch, their C-tile traffic from
// DRAM and the final sum cost more than two barriers per chunk (NOTES.md).
constexpr size_t kReplicaBudget = size_t(32) << 20;

// --------------------------------------------------------------- pass 2: merge and mirror
// One kB × kB block (i0 ≤ j0) of the final pass; its sums Σ_t C_t[i][j] (j ≥ i) arrive in a
// buffer of row stride kB. A finisher writes the upper entries and mirrors them exactly, both
// row-wise through a block in L1: writing the lower side column-wise (stride d, a multiple of
// 4 KiB at D = 1024) sends a block's 64 lines to one L1 set.
constexpr int64_t kB = 64;
struct Block {
  int64_t i0, i1, j0, j1;
};

// The running scatter S (float or double) takes the batch (Chan et al.):
//   S ← S + C_b + f·δδᵀ  (f = n1·n_b/(n1+n_b), δ = μ_b − μ_1),  or S ← C_b when fresh
// (an empty state, or batch_stats' own output; delta is not read then), each entry in
// float64 and rounded once; the lower triangle copies the upper.
template <class S>
struct MergeScatter {
  S* s;
  int64_t d;
  const double* delta;
  double f;
  bool fresh;
  void operator()(const Block& k, const float* v) const {
    alignas(64) S nb[kB * kB];
    for (int64_t i = k.i0; i < k.i1; ++i) {
      const float* b = v + (i - k.i0) * kB - k.j0;
      S* row = s + i * d;
      S* w = nb + (i - k.i0) * kB - k.j0;
      const int64_t jlo = std::max(i, k.j0);
      if (fresh) {
#pragma omp simd
        for (int64_t j = jlo; j < k.j1; ++j) row[j] = w[j] = S(b[j]);
      } else {
        const double fi = f * delta[i];
#pragma omp simd
        for (int64_t j = jlo; j < k.j1; ++j)
          row[j] = w[j] = S(double(row[j]) + double(b[j]) + fi * delta[j]);
      }
    }
    for (int64_t j = k.j0; j < k.j1; ++j) {
      S* o = s + j * d;
      for (int64_t i = k.i0; i < std::min(k.i1, j); ++i) o[i] = nb[(i - k.i0) * kB + (j - k.j0)];
    }
  }
};

// ------------------------------------------------------------------ pass 2: the symmetric product
// Pass 2 of one symmetric call: Σ over the valid rows of YᵀY (upper tiles only), summed over
// threads and mirrored into the exactly symmetric (d × d) result. Two layouts of C:
//   replicas  many rows: each thread owns a contiguous share of the rows, its own packed chunk
//             and its own copy of C (no synchronisation until the end);
//   shared    few rows, or no memory for copies: one C; per chunk the threads pack together,
//             then split C's micro-rows.
struct ScatterPlan {
  int64_t n, d, dp, kc;
  size_t cbytes;           // bytes of one C (dp × dp fp32)
  bool replicas;
  int nrep;                // copies of C: the thread count with replicas, else 1
  std::vector<float*> cs;  // the copies of C (contents undefined until zeroed in the region)
  std::vector<float*> ps;  // packed chunks: one per thread with replicas, else one shared
};

// C copies are zeroed inside the parallel region: first touch by the thread that uses them.
ScatterPlan plan_scatter(int64_t n, int64_t d, int threads, Scratch& scratch) {
  ScatterPlan p;
  p.n = n;
  p.d = d;
  p.dp = round_up(d, kPanel);
  p.kc = chunk_rows(p.dp);
  p.cbytes = size_t(p.dp) * size_t(p.dp) * sizeof(float);
  p.replicas = threads > 1 && n >= 2 * p.kc && size_t(threads) * p.cbytes <= kReplicaBudget;
  p.nrep = p.replicas ? threads : 1;
  p.cs.resize(p.nrep);
  p.ps.resize(p.replicas ? threads : 1);
  for (int t = 0; t < p.nrep; ++t) p.cs[t] = scratch.take(size_t(p.dp) * p.dp);
  for (float*& q : p.ps) q = scratch.take(size_t(p.kc) * p.dp);
  return p;
}

// First row of the last chunk of a thread's share s.
int64_t last_chunk(const Split& s, int64_t kc) {
  return s.begin + (s.end - s.begin - 1) / kc * kc;
}

// CRH_CPU_HELP=0 turns the last-chunk help off (A/B measurements, tests).
bool help_enabled() {
  const char* v = std::getenv("CRH_CPU_HELP");
  return v == nullptr || std::string(v) != "0";
}

// Help with the last chunk (replicas only): a thread done with its rows computes micro-row
// bands of another thread's last chunk, claimed from the bottom while the owner claims from the
// top, into the owner's side buffer H_t; the finisher adds H_t to C_t. The inner kernel adds
// its zero-started accumulators to C once, so C_t + H_t is the very sum the owner would have
// formed: results do not depend on who did which band (this absorbs up to one chunk of the
// threads' uneven finish times on a busy machine).
class LastChunkHelp {
 public:
  LastChunkHelp(const KernelChoice& k, const ScatterPlan& p, Scratch& scratch)
      : on_(p.replicas && help_enabled() && size_t(2 * p.nrep) * p.cbytes <= kReplicaBudget),
        nbands_(p.dp / k.mr),
        hs_(on_ ? p.nrep : 0),
        open_(new std::atomic<uint64_t>[p.nrep]),
        helped_(on_ ? size_t(p.nrep) * nbands_ : 0, 0) {
    for (float*& h : hs_) h = scratch.take(size_t(p.dp) * p.dp);
    for (int t = 0; t < p.nrep; ++t) open_[t].store(uint64_t(nbands_));  // bands [0, nbands) open
  }

  bool on() const { return on_; }
  // The next band of t's last chunk: its owner takes them from the top, helpers from the bottom
  // (the short rows of the triangle). -1: none left.
  int64_t claim_own(int t) { return claim(open_[t], true); }
  int64_t claim_other(int u) { return claim(open_[u], false); }
  bool bands_left(int u) const {
    const uint64_t v = open_[u].load(std::memory_order_relaxed);
    return (v >> 32) < (v & 0xffffffffu);
  }
  // u's side buffer (dp × dp, row stride dp); a helper marks each band it wrote there.
  float* side(int u) const { return hs_[u]; }
  void mark(int u, int64_t b) { helped_[size_t(u) * nbands_ + b] = 1; }
  // Row i of t's side buffer when a helper computed i's band (after the barrier), else nullptr.
  const float* helped_row(int t, int64_t i, int64_t mr, int64_t dp) const {
    return on_ && helped_[size_t(t) * nbands_ + i / mr] ? hs_[t] + i * dp : nullptr;
  }

 private:
  // Bands [lo, hi) still open, packed as lo << 32 | hi.
  static int64_t claim(std::atomic<uint64_t>& open, bool top) {
    uint64_t v = open.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = v >> 32, hi = v & 0xffffffffu;
      if (lo >= hi) return -1;
      const uint64_t next = top ? ((lo + 1) << 32) | hi : (lo << 32) | (hi - 1);
      if (open.compare_exchange_weak(v, next, std::memory_order_acq_rel,
                                     std::memory_order_relaxed))
        return int64_t(top ? lo : hi - 1);
    }
  }

  bool on_;
  int64_t nbands_;
  std::vector<float*> hs_;
  std::unique_ptr<std::atomic<uint64_t>[]> open_;
  std::vector<uint8_t> helped_;
};

#ifdef CRH_TEST_HOOKS
// Tests only (a build with -DCRH_TEST_HOOKS, tests/test_cpp.py): CRH_CPU_SLOW_THREAD=t makes
// thread t sleep 30 ms before its last chunk, so that the others certainly help with it.
void test_delay_before_last_chunk(int t) {
  const char* v = std::getenv("CRH_CPU_SLOW_THREAD");
  if (v != nullptr && std::atoi(v) == t) std::this_thread::sleep_for(std::chrono::milliseconds(30));
}
#endif

// Replicas, thread t: its share of the rows, chunk by chunk, into its own copy of C; with help
// on, its last chunk band by band, as long as helpers leave bands to take.
template <DType T>
void own_rows(const KernelChoice& k, const View& x, const RowSet& rs, const float* mu,
              const ScatterPlan& p, LastChunkHelp& help, int t) {
  const int64_t* rows = rs.rows.data();
  const float* sc = rs.rscale.data();
  const int64_t dp = p.dp, kc = p.kc;
  const Split s = split(p.n, p.nrep, t);
  zero_upper(k, p.cs[t], 0, dp, dp);
  float* P = p.ps[t];
  const int64_t last = last_chunk(s, kc);
  for (int64_t c0 = s.begin; c0 < s.end; c0 += kc) {
    const int64_t m = std::min(kc, s.end - c0), prow = panel_rows(k, m);
#ifdef CRH_TEST_HOOKS
    if (c0 == last) test_delay_before_last_chunk(t);
#endif
    pack_units<T>(k, x, rows + c0, sc + c0, 0, prow, m, mu, dp, P, rs.tiny);
    if (!help.on() || c0 != last) {
      syrk_chunk(k, P, prow, dp, p.cs[t], 0, dp);
      continue;
    }
    for (int64_t b; (b = help.claim_own(t)) >= 0;)
      syrk_chunk(k, P, prow, dp, p.cs[t], b * k.mr, (b + 1) * k.mr);
  }
}

// Replicas, thread t done with its own rows: the bands still open in the other threads' last
// chunks, each into its owner's side buffer (t's packed chunk is free again).
template <DType T>
void help_others(const KernelChoice& k, const View& x, const RowSet& rs, const float* mu,
                 const ScatterPlan& p, LastChunkHelp& help, int t) {
  const int64_t* rows = rs.rows.data();
  const float* sc = rs.rscale.data();
  const int64_t dp = p.dp;
  float* P = p.ps[t];
  for (int o = 1; o < p.nrep; ++o) {
    const int u = (t + o) % p.nrep;
    if (!help.bands_left(u)) continue;
    const Split su = split(p.n, p.nrep, u);
    const int64_t lu = last_chunk(su, p.kc);
    const int64_t m = su.end - lu, prow = panel_rows(k, m);
    pack_units<T>(k, x, rows + lu, sc + lu, 0, prow, m, mu, dp, P, rs.tiny);
    for (int64_t b; (b = help.claim_other(u)) >= 0;) {
      zero_upper(k, help.side(u), b * k.mr, (b + 1) * k.mr, dp);
      syrk_chunk(k, P, prow, dp, help.side(u), b * k.mr, (b + 1) * k.mr);
      help.mark(u, b);
    }
  }
}

// Shared C (every thread of the region calls this; the loops are work-shared): per chunk the
// threads pack together, then split C's micro-rows.
template <DType T>
void shared_rows(const KernelChoice& k, const View& x, const RowSet& rs, const float* mu,
                 const ScatterPlan& p) {
  const int64_t* rows = rs.rows.data();
  const float* sc = rs.rscale.data();
  const int64_t n = p.n, dp = p.dp, kc = p.kc;
  float* C = p.cs[0];
  float* P = p.ps[0];
#pragma omp for schedule(static)
  for (int64_t a = 0; a < dp; ++a) zero_upper(k, C, a, a + 1, dp);
  for (int64_t c0 = 0; c0 < n; c0 += kc) {
    const int64_t m = std::min(kc, n - c0), prow = panel_rows(k, m);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < prow; ++u)
      pack_units<T>(k, x, rows + c0, sc + c0, u, u + 1, m, mu, dp, P, rs.tiny);
    // the micro-rows near the top own more tiles: dynamic schedule
#pragma omp for schedule(dynamic, 1)
    for (int64_t a0 = 0; a0 < dp; a0 += k.mr) syrk_chunk(k, P, prow, dp, C, a0, a0 + k.mr);
  }
}

// v (row stride kB) = Σ_t C_t over the upper entries (j ≥ i) of block b, each C_t's row with a
// helper's band of t's last chunk added as the owner would have.
inline void sum_block(const KernelChoice& k, const ScatterPlan& p, const LastChunkHelp& help,
                      const Block& blk, float* v) {
  for (int64_t i = blk.i0; i < blk.i1; ++i) {
    const int64_t jlo = std::max(i, blk.j0), j1 = blk.j1;
    float* b = v + (i - blk.i0) * kB - blk.j0;
    for (int t = 0; t < p.nrep; ++t) {
      const float* ct = p.cs[t] + i * p.dp;
      const float* ht = help.helped_row(t, i, k.mr, p.dp);
      if (t == 0 && ht == nullptr) {
#pragma omp simd
        for (int64_t j = jlo; j < j1; ++j) b[j] = ct[j];
      } else if (t == 0) {
#pragma omp simd
        for (int64_t j = jlo; j < j1; ++j) b[j] = ct[j] + ht[j];
      } else if (ht == nullptr) {
#pragma omp simd
        for (int64_t j = jlo; j < j1; ++j) b[j] += ct[j];
      } else {
#pragma omp simd
        for (int64_t j = jlo; j < j1; ++j) b[j] += ct[j] + ht[j];
      }
    }
  }
}

// The final pass (every thread of the region calls this; blocks are work-shared):
// out[i][j] = Σ_t C_t[min(i,j)][max(i,j)] through finish, block by block of the upper
// triangle; the lower triangle copies the upper bit for bit.
template <class Finish>
void sum_and_finish(const KernelChoice& k, const ScatterPlan& p, const LastChunkHelp& help,
                    const Finish& finish) {
  const int64_t d = p.d, nb = (d + kB - 1) / kB;
#pragma omp for schedule(dynamic, 1)
  for (int64_t blk = 0; blk < nb * (nb + 1) / 2; ++blk) {
    int64_t ib = 0, rest = blk;  // blk -> block (ib, jb), ib <= jb, row by row
    while (rest >= nb - ib) rest -= nb - ib++;
    const int64_t jb = ib + rest;
    const int64_t i0 = ib * kB, i1 = std::min(d, i0 + kB), j0 = jb * kB, j1 = std::min(d, j0 + kB);
    alignas(64) float blk_v[kB * kB];
    sum_block(k, p, help, Block{i0, i1, j0, j1}, blk_v);
    finish(Block{i0, i1, j0, j1}, blk_v);
  }
}

// Pass 2 of a symmetric call, handed block by block to finish (MergeScatter). Results depend on
// the thread count (the row split) but not on scheduling.
template <DType T, class Finish>
void scatter_upper(const KernelChoice& k, const View& x, const RowSet& rs, const float* mu,
                   int threads, const Finish& finish) {
  Scratch scratch;
  const ScatterPlan p = plan_scatter(int64_t(rs.rows.size()), x.cols, threads, scratch);
  LastChunkHelp help(k, p, scratch);
  // One parallel region (every join is a wait for the slowest thread, and on a shared
  // machine for the scheduler): products, barrier, then the blocked sum + mirror.
#pragma omp parallel num_threads(threads)
  {
    if (p.replicas) {
      const int t = thread_id();
      own_rows<T>(k, x, rs, mu, p, help, t);
      if (help.on()) help_others<T>(k, x, rs, mu, p, help, t);
#pragma omp barrier
    } else {
      shared_rows<T>(k, x, rs, mu, p);
    }
    sum_and_finish(k, p, help, finish);
  }
}

// ================================================================================ drivers
// Valid rows in ascending order with their scales; counts the skipped ones.
RowSet compact(const uint8_t* status, const float* scale, int64_t n) {
  RowSet rs;
  rs.rows.reserve(n);
  rs.rscale.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (status[i] == kRowValid) {
      rs.rows.push_back(i);
      rs.rscale.push_back(scale[i]);
      rs.tiny |= scale[i] < 0.0f;
    } else if (status[i] == kRowSkipped) {
      ++rs.n_skipped;
    }
  }
  return rs;
}

// Pass 1, the mean and the kernel choice of a symmetric call; rs.rows empty: no valid row.
struct Prepared {
  RowSet rs;
  Buf<float> mu;  // fp32 shift, zero past D (64-byte aligned: the packers load it as vectors)
  KernelChoice k;
};

// From pass 1's results (row status and scale, Σ s_i x_i over the valid rows).
template <DType T>
Prepared prepared_from(const View& x, const uint8_t* status, const float* scale, const double* sum,
                       double* mean) {
  const int64_t d = x.cols;
  Prepared p{compact(status, scale, x.rows), alloc<float>(round_up(d, kPanel), true),
             pick_kernel(call_isa(), T == DType::BF16 && x.stride_col == 1)};
  const int64_t n = int64_t(p.rs.rows.size());
  for (int64_t j = 0; j < d; ++j) {
    mean[j] = n > 0 ? sum[j] / double(n) : 0.0;
    p.mu[j] = float(mean[j]);
  }
  return p;
}

template <DType T>
Prepared prepare(const View& x, const bool* mask, bool normalize, int threads, double* mean) {
  std::vector<float> scale(x.rows);
  std::vector<uint8_t> status(x.rows);
  std::vector<double> sum(x.cols, 0.0);
  pass1<T>(call_isa(), x, mask, normalize, threads, scale.data(), status.data(), sum.data());
  return prepared_from<T>(x, status.data(), scale.data(), sum.data(), mean);
}

// Pass 1 at staging time (pass1 with a copy destination), on as many threads as the rows are
// worth (the copy is memory-bound: ~2^18 elements a thread).
template <DType T>
void stage_t(const View& x, const bool* mask, bool normalize, int threads, void* dst, int64_t ld,
             float* scale, uint8_t* status, double* sum) {
  threads = int(std::max<double>(1.0, std::min<double>(threads, double(x.rows) * double(x.cols) /
                                                                    double(1 << 18))));
  pass1<T>(call_isa(), x, mask, normalize, threads, scale, status, sum, dst, ld);
}

template <DType T>
Counts batch_stats_t(const View& x, const bool* mask, bool normalize, int threads, double* mean,
                     float* scatter) {
  threads = useful_threads(threads, x.rows, x.cols);
  const int64_t d = x.cols;
  const Prepared p = prepare<T>(x, mask, normalize, threads, mean);
  const int64_t n = int64_t(p.rs.rows.size());
  if (n == 0) {
    std::fill(scatter, scatter + d * d, 0.0f);
    return {0, p.rs.n_skipped};
  }
  scatter_upper<T>(p.k, x, p.rs, p.mu.get(), threads, MergeScatter<float>{scatter, d, nullptr, 0.0, true});
  return {n, p.rs.n_skipped};
}

// The batch of p merged into st (see batch_update in moments_cpu.h): the scatter in
// scatter_upper's finisher, then the mean and the counts; nothing throws after the first write.
template <DType T, class S>
Counts merge_batch(const View& x, const Prepared& p, int threads, bool refuse_skipped,
                   const State& st, const double* mean) {
  const int64_t d = x.cols;
  const int64_t n2 = int64_t(p.rs.rows.size());
  const int64_t skipped = p.rs.n_skipped;
  if (refuse_skipped && skipped > 0) return {n2, skipped};
  const int64_t n1 = st.counts[0];
  if (n2 > 0) {
    S* m1 = static_cast<S*>(st.mean);
    std::vector<double> delta(d);
    for (int64_t j = 0; j < d; ++j) delta[j] = mean[j] - double(m1[j]);
    const double f = n1 > 0 ? double(n1) * double(n2) / double(n1 + n2) : 0.0;
    scatter_upper<T>(p.k, x, p.rs, p.mu.get(), threads,
                     MergeScatter<S>{static_cast<S*>(st.scatter), d, delta.data(), f, n1 == 0});
    // μ ← μ1 + (μ_b − μ1)·n_b/n, the formula of Moments' Python merge, in float64
    const double w = double(n2) / double(n1 + n2);
    for (int64_t j = 0; j < d; ++j) m1[j] = n1 == 0 ? S(mean[j]) : S(double(m1[j]) + delta[j] * w);
  }
  st.counts[0] = n1 + n2;
  st.counts[1] += skipped;
  return {n2, skipped};
}

template <DType T, class S>
Counts batch_update_t(const View& x, const bool* mask, bool normalize, int threads,
                      bool refuse_skipped, const State& st, double* mean) {
  threads = useful_threads(threads, x.rows, x.cols);
  const Prepared p = prepare<T>(x, mask, normalize, threads, mean);
  return merge_batch<T, S>(x, p, threads, refuse_skipped, st, mean);
}

// batch_update_t with pass 1 done at staging time.
template <DType T, class S>
Counts batch_update_staged_t(const View& x, const float* scale, const uint8_t* status,
                             const double* sum, int threads, bool refuse_skipped, const State& st,
                             double* mean) {
  threads = useful_threads(threads, x.rows, x.cols);
  const Prepared p = prepared_from<T>(x, status, scale, sum, mean);
  return merge_batch<T, S>(x, p, threads, refuse_skipped, st, mean);
}

template <DType TG, DType TH>
void cross_scatter(const KernelChoice& k, const View& g, const View& h, const RowSet& rs,
                   const std::vector<float>& sg, const std::vector<float>& sh, const float* mug,
                   const float* muh, int threads, float* out) {
  const int64_t n = int64_t(rs.rows.size());
  const int64_t dg = g.cols, dh = h.cols;
  const int64_t dgp = round_up(dg, kPanel), dhp = round_up(dh, kPanel);
  const int64_t kc = chunk_rows(std::max(dgp, dhp));
  const size_t cbytes = size_t(dgp) * size_t(dhp) * sizeof(float);
  const bool replicas = threads > 1 && n >= 2 * kc && size_t(threads) * cbytes <= kReplicaBudget;
  const int nrep = replicas ? threads : 1;
  Scratch scratch;
  const int np = replicas ? threads : 1;
  std::vector<float*> cs(nrep), pgs(np), phs(np);
  for (int t = 0; t < nrep; ++t) cs[t] = scratch.take(size_t(dgp) * dhp);
  for (int t = 0; t < np; ++t) {
    pgs[t] = scratch.take(size_t(kc) * dgp);
    phs[t] = scratch.take(size_t(kc) * dhp);
  }
  const int64_t* rows = rs.rows.data();
  const bool tiny_g = std::any_of(sg.begin(), sg.end(), [](float v) { return v < 0.0f; });
  const bool tiny_h = std::any_of(sh.begin(), sh.end(), [](float v) { return v < 0.0f; });
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int t = 0; t < nrep; ++t) std::memset(cs[t], 0, cbytes);
    if (replicas) {
      const int t = thread_id();
      const Split s = split(n, nrep, t);
      float* Pg = pgs[t];
      float* Ph = phs[t];
      for (int64_t c0 = s.begin; c0 < s.end; c0 += kc) {
        const int64_t m = std::min(kc, s.end - c0), prow = panel_rows(k, m);
        pack_units<TG>(k, g, rows + c0, sg.data() + c0, 0, prow, m, mug, dgp, Pg, tiny_g);
        pack_units<TH>(k, h, rows + c0, sh.data() + c0, 0, prow, m, muh, dhp, Ph, tiny_h);
        gemm_chunk(k, Pg, Ph, prow, dhp, cs[t], 0, dgp);
      }
#pragma omp barrier
    } else {
      float* Pg = pgs[0];
      float* Ph = phs[0];
      for (int64_t c0 = 0; c0 < n; c0 += kc) {
        const int64_t m = std::min(kc, n - c0), prow = panel_rows(k, m);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < prow; ++u) {
          pack_units<TG>(k, g, rows + c0, sg.data() + c0, u, u + 1, m, mug, dgp, Pg, tiny_g);
          pack_units<TH>(k, h, rows + c0, sh.data() + c0, u, u + 1, m, muh, dhp, Ph, tiny_h);
        }
#pragma omp for schedule(static)
        for (int64_t a0 = 0; a0 < dgp; a0 += k.mr) gemm_chunk(k, Pg, Ph, prow, dhp, cs[0], a0, a0 + k.mr);
      }
    }
#pragma omp for schedule(static)
    for (int64_t a = 0; a < dg; ++a) {
      for (int64_t b = 0; b < dh; ++b) {
        float v = cs[0][a * dhp + b];
        for (int t = 1; t < nrep; ++t) v += cs[t][a * dhp + b];
        out[a * dh + b] = v;
      }
    }
  }
}

template <DType TG, DType TH>
Counts cross_stats_t(const View& g, const View& h, const bool* mask, bool normalize, int threads,
                     double* mean_g, double* mean_h, float* out) {
  const Isa isa = call_isa();
  threads = useful_threads(threads, g.rows, std::max(g.cols, h.cols));
  const int64_t N = g.rows, dg = g.cols, dh = h.cols;
  std::vector<float> scg(N), sch(N);
  std::vector<uint8_t> stg(N), sth(N);
  pass1<TG>(isa, g, mask, normalize, threads, scg.data(), stg.data(), nullptr);
  pass1<TH>(isa, h, mask, normalize, threads, sch.data(), sth.data(), nullptr);
  RowSet rs;
  std::vector<float> rsg, rsh;
  for (int64_t i = 0; i < N; ++i) {
    if (stg[i] == kRowMasked) continue;  // the mask drops a row from both
    if (stg[i] == kRowValid && sth[i] == kRowValid) {
      rs.rows.push_back(i);
      rsg.push_back(scg[i]);
      rsh.push_back(sch[i]);
    } else {
      ++rs.n_skipped;
    }
  }
  const int64_t n = int64_t(rs.rows.size());
  if (n == 0) {
    std::fill(mean_g, mean_g + dg, 0.0);
    std::fill(mean_h, mean_h + dh, 0.0);
    std::fill(out, out + dg * dh, 0.0f);
    return {0, rs.n_skipped};
  }
  // float64 means over the jointly valid rows
  std::vector<Buf<double>> ag(threads), ah(threads);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const Split s = split(n, threads, t);
    ag[t] = alloc<double>(dg, true);
    ah[t] = alloc<double>(dh, true);
    mean_range<TG>(g, rs.rows.data(), rsg.data(), s.begin, s.end, ag[t].get());
    mean_range<TH>(h, rs.rows.data(), rsh.data(), s.begin, s.end, ah[t].get());
  }
  Buf<float> mug = alloc<float>(round_up(dg, kPanel), true);
  Buf<float> muh = alloc<float>(round_up(dh, kPanel), true);
  for (int64_t j = 0; j < dg; ++j) {
    double v = 0.0;
    for (int t = 0; t < threads; ++t) v += ag[t][j];
    mean_g[j] = v / double(n);
    mug[j] = float(mean_g[j]);
  }
  for (int64_t j = 0; j < dh; ++j) {
    double v = 0.0;
    for (int t = 0; t < threads; ++t) v += ah[t][j];
    mean_h[j] = v / double(n);
    muh[j] = float(mean_h[j]);
  }
  // the bf16 dot product only when both operands are bf16 rows (both packings must match)
  const bool bf16 = TG == DType::BF16 && TH == DType::BF16 && g.stride_col == 1 && h.stride_col == 1;
  const KernelChoice k = pick_kernel(isa, bf16);
  cross_scatter<TG, TH>(k, g, h, rs, rsg, rsh, mug.get(), muh.get(), threads, out);
  return {n, rs.n_skipped};
}

void check_state(const State& st) {
  if (st.counts == nullptr || st.mean == nullptr || st.scatter == nullptr)
    throw std::invalid_argument("crh: the state has no data");
  if (st.counts[0] < 0 || st.counts[1] < 0)
    throw std::invalid_argument("crh: the state's counts must be >= 0");
}

// f(Tag<T>{}, S{}) for x's dtype T and the state's element type S (double or float).
template <class F>
Counts dispatch_update(DType dtype, const State& st, F&& f) {
  Counts out{0, 0};
  dispatch(dtype, [&](auto tag) { out = st.f64 ? f(tag, double{}) : f(tag, float{}); });
  return out;
}

}  // namespace

// ==================================================================================== API
Counts batch_stats(const View& x, const bool* mask, bool normalize, int threads, double* mean,
                   float* scatter) {
  check_view(x, "x");
  threads = std::max(1, threads);
  Counts out{0, 0};
  dispatch(x.dtype, [&](auto tag) {
    out = batch_stats_t<decltype(tag)::value>(x, mask, normalize, threads, mean, scatter);
  });
  return out;
}

Counts batch_update(const View& x, const bool* mask, bool normalize, int threads,
                    bool refuse_skipped, const State& st, double* mean) {
  check_view(x, "x");
  check_state(st);
  threads = std::max(1, threads);
  return dispatch_update(x.dtype, st, [&](auto tag, auto s) {
    return batch_update_t<decltype(tag)::value, decltype(s)>(x, mask, normalize, threads,
                                                             refuse_skipped, st, mean);
  });
}

void stage_rows(const View& x, const bool* mask, bool normalize, int threads, void* dst,
                int64_t ld, float* scale, uint8_t* status, double* sum) {
  check_view(x, "x");
  if (x.rows == 0) return;
  if (dst == nullptr || scale == nullptr || status == nullptr || sum == nullptr)
    throw std::invalid_argument("crh: stage_rows has no buffer");
  dispatch(x.dtype, [&](auto tag) {
    stage_t<decltype(tag)::value>(x, mask, normalize, std::max(1, threads), dst, ld, scale, status,
                                  sum);
  });
}

Counts batch_update_staged(const View& x, const float* scale, const uint8_t* status,
                           const double* sum, int threads, bool refuse_skipped, const State& st,
                           double* mean) {
  check_view(x, "x");
  check_state(st);
  threads = std::max(1, threads);
  return dispatch_update(x.dtype, st, [&](auto tag, auto s) {
    return batch_update_staged_t<decltype(tag)::value, decltype(s)>(x, scale, status, sum, threads,
                                                                    refuse_skipped, st, mean);
  });
}

Counts cross_stats(const View& g, const View& h, const bool* mask, bool normalize, int threads,
                   double* mean_g, double* mean_h, float* scatter) {
  check_view(g, "g");
  check_view(h, "h");
  if (g.rows != h.rows) throw std::invalid_argument("crh: g and h must have the same rows");
  threads = std::max(1, threads);
  Counts out{0, 0};
  dispatch(g.dtype, [&](auto tg) {
    dispatch(h.dtype, [&](auto th) {
      out = cross_stats_t<decltype(tg)::value, decltype(th)::value>(g, h, mask, normalize, threads,
                                                                   mean_g, mean_h, scatter);
    });
  });
  return out;
}

const char* isa() {
  switch (call_isa()) {
    case Isa::Avx512Bf16: return "avx512+bf16";
    case Isa::Avx512: return "avx512";
    default: return "generic";
  }
}

}  // namespace cpu
}  // namespace crh
