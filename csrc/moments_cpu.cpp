// CPU kernels of crh_kernels (C++17, OpenMP): the fused symmetric covariance update of SPEC §2.
//
// Owns: the row-statistics pass (also run at staging time, stage_rows), the packing prologue
// (scale + center + fp32, in cache), the register-blocked inner kernels (AVX-512 and a portable
// one), the upper-triangle drivers, the merge into a running state, the cross moment, the final
// exact mirror, and matmul_rows (the collector's g_a = g_b·W on the same inner kernels). No
// torch here (see moments_cpu.h); bindings.cpp turns tensors into View and calls these.
//
// Math (N rows, D features, n valid rows):
//   pass 1   s_i = 1/||x_i||  (fp32 squared norm; invalid rows are dropped)  and
//            mu = (1/n) Σ_i s_i x_i, summed in float64;
//   pass 2   for each chunk of KC valid rows: Y = s·x − mu (fp32, written once into a small
//            packed buffer P that stays in L2) and C += YᵀY over the tiles of C that touch the
//            upper triangle (≈ N·D·(D+1) flops instead of 2·N·D²);
//   finally  scatter = Σ_threads C (upper triangle), mirrored exactly.
//
// Layout of P (one chunk of kc rows): column panels of kPanel = 32 lanes, panel p holds columns
// [32p, 32p+32) of all kc rows, row after row (128 bytes a row; for the BF16 dot product, row
// *pairs* interleaved per lane). The inner kernel reads its "vector" operand as a 32-wide (or
// 16-wide) slice of a panel and its "broadcast" operand as an MR-wide slice of another, so one
// packing feeds both sides of YᵀY; columns past D are zero.
//
// Threads: with many rows each thread owns a share of them, its own P and its own copy of C
// (no synchronisation until the final sum) while the copies fit in ~L3; otherwise the threads
// share one C and split its micro-rows chunk by chunk. A thread done early computes bands of
// another's last chunk into a side buffer, added where the owner would have added them.
// Results depend on the thread count (the row split) but not on scheduling: each entry of each
// C is the same fp32 sum, in row order, whichever thread formed which part of it.
#include "moments_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>
#define CRH_HAVE_AVX512_PATH 1
// GCC's own _mm512_undefined_* (used by the conversions) trip -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CRH_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define CRH_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CRH_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,fma,avx512bf16")))
#else
#define CRH_HAVE_AVX512_PATH 0
#endif

#if defined(__GNUC__)
#define CRH_INLINE inline __attribute__((always_inline))
#else
#define CRH_INLINE inline
#endif

namespace crh {
namespace cpu {
namespace {

constexpr int64_t kPanel = 32;  // packed panel width (fp32 columns): one 128-byte row per k

// ------------------------------------------------------------------------------------ memory
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using Buf = std::unique_ptr<T[], FreeDeleter>;

template <class T>
Buf<T> alloc(size_t n, bool zero) {
  size_t bytes = ((std::max<size_t>(n, 1) * sizeof(T) + 63) / 64) * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  if (p == nullptr) throw std::bad_alloc();
  if (zero) std::memset(p, 0, bytes);
  return Buf<T>(p);
}

// Scratch of one call (the copies of C, the packed chunks), kept for the next call from the same
// thread: a fresh multi-MiB block from malloc is a fresh mmap, paid again in page faults on first
// touch (measured at D = 1024, 2 threads: 2.2 ms of a 24 ms call at N = 4096, 2.3 of 8.9 ms at
// N = 1024). Slots are taken in a fixed order per call, so calls of one shape reuse the same
// blocks; a call whose slots exceed kScratchKeep bytes in all frees them when it ends.
constexpr size_t kScratchKeep = size_t(64) << 20;

struct ScratchSlot {
  Buf<float> buf;
  size_t n = 0;
};

class Scratch {
 public:
  Scratch() : slots_(arena()) {}
  ~Scratch() {
    size_t bytes = 0;
    for (const ScratchSlot& s : slots_) bytes += s.n * sizeof(float);
    if (bytes > kScratchKeep) slots_.clear();
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  // The next slot, at least n floats (contents undefined).
  float* take(size_t n) {
    if (next_ == slots_.size()) slots_.emplace_back();
    ScratchSlot& s = slots_[next_++];
    if (s.n < n) {
      s.buf.reset();  // free first: the old and the new block are not both needed
      s.n = 0;
      s.buf = alloc<float>(n, false);
      s.n = n;
    }
    return s.buf.get();
  }

 private:
  static std::vector<ScratchSlot>& arena() {
    thread_local std::vector<ScratchSlot> slots;
    return slots;
  }
  std::vector<ScratchSlot>& slots_;
  size_t next_ = 0;
};

// ------------------------------------------------------------------------------ conversions
CRH_INLINE float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

CRH_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    // zero or subnormal: mant · 2^-24, exact in fp32
    const float f = float(mant) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <DType T>
struct Elem;
template <>
struct Elem<DType::F32> {
  using type = float;
  static CRH_INLINE float load(const float* p) { return *p; }
};
template <>
struct Elem<DType::BF16> {
  using type = uint16_t;
  static CRH_INLINE float load(const uint16_t* p) { return bf16_to_f32(*p); }
};
template <>
struct Elem<DType::F16> {
  using type = uint16_t;
  static CRH_INLINE float load(const uint16_t* p) { return f16_to_f32(*p); }
};

// Call f.template operator()<T>() for the runtime dtype (C++17: a tag object instead).
template <DType T>
struct Tag {
  static constexpr DType value = T;
};
template <class F>
void dispatch(DType d, F&& f) {
  switch (d) {
    case DType::F32: f(Tag<DType::F32>{}); break;
    case DType::BF16: f(Tag<DType::BF16>{}); break;
    case DType::F16: f(Tag<DType::F16>{}); break;
    default: throw std::invalid_argument("crh: unsupported dtype code");
  }
}

// --------------------------------------------------------------------------------- CPU ISA
// What the inner loops may use: the portable C++ kernels, AVX-512 (fp32 FMA), or AVX-512 with
// the BF16 dot product (bf16 inputs only). Detected once; CRH_CPU_ISA=generic|avx512 caps the
// level for one call (the tests run every path the machine has).
enum class Isa : int { Generic = 0, Avx512 = 1, Avx512Bf16 = 2 };

Isa machine_isa() {
#if CRH_HAVE_AVX512_PATH
  static const Isa level = [] {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
    if (!avx512) return Isa::Generic;
    return __builtin_cpu_supports("avx512bf16") ? Isa::Avx512Bf16 : Isa::Avx512;
  }();
  return level;
#else
  return Isa::Generic;
#endif
}

Isa call_isa() {
  Isa level = machine_isa();
  if (const char* cap = std::getenv("CRH_CPU_ISA")) {
    const std::string v(cap);
    if (v == "generic") level = Isa::Generic;
    else if (v == "avx512" && level > Isa::Avx512) level = Isa::Avx512;
  }
  return level;
}

bool cpu_has_avx2() {
#if CRH_HAVE_AVX512_PATH
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------ streaming stores
// Non-temporal stores for data read again only much later (staged rows): no read-for-ownership
// of the old lines, no eviction of the caller's working set. (Tried for the mirrored half of a
// state too: its 256-byte row pieces made the merge slower, 22.3 → 23.7 ms a call.)
#if CRH_HAVE_AVX512_PATH
CRH_TARGET_AVX512 void stream_copy_avx512(void* dst, const void* src, size_t bytes) {
  char* o = static_cast<char*>(dst);
  const char* i = static_cast<const char*>(src);
  size_t k = 0;
  for (; k + 64 <= bytes; k += 64)
    _mm512_stream_ps(reinterpret_cast<float*>(o + k),
                     _mm512_loadu_ps(reinterpret_cast<const float*>(i + k)));
  if (k < bytes) std::memcpy(o + k, i + k, bytes - k);
}
#endif

// (not capped by CRH_CPU_ISA: the stored values are the same either way)
bool can_stream() { return machine_isa() >= Isa::Avx512; }

// dst 64-byte aligned (else a plain copy); an sfence must follow before others read dst.
void stream_copy(void* dst, const void* src, size_t bytes) {
#if CRH_HAVE_AVX512_PATH
  if (can_stream() && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    stream_copy_avx512(dst, src, bytes);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

void store_fence() {
#if CRH_HAVE_AVX512_PATH
  _mm_sfence();
#endif
}

// ================================================================================ pass 1
// Row status: 0 masked (counts nowhere), 1 skipped (counted), 2 valid.
enum : uint8_t { kMasked = 0, kSkipped = 1, kValid = 2 };

// 1/sqrt(sq) rounded once (through float64), for a finite sq > 0.
CRH_INLINE float inv_sqrt(float sq) { return float(1.0 / std::sqrt(double(sq))); }

// The row rule (crh_kernels/backends/base.py) from a live row's fp32 squared norm: its status
// and scale, one definition for every pass-1 path. True when the row is valid.
CRH_INLINE bool row_rule(float sq, bool normalize, float& scale, uint8_t& status) {
  if (!std::isfinite(sq) || (normalize && !(sq > 0.0f))) {
    status = kSkipped;
    return false;
  }
  scale = normalize ? inv_sqrt(sq) : 1.0f;
  status = kValid;
  return true;
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
      status[i] = kMasked;
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
    if (!row_rule(lanes[0], normalize, scale[i], status[i])) continue;
    const float s = scale[i];
    if (acc != nullptr) {
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
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) acc[j] += double(Elem<T>::load(row + j * sc) * s);
  }
}

struct Split {
  int64_t begin, end;
};
inline Split split(int64_t n, int parts, int k) {
  return {n * k / parts, n * (k + 1) / parts};
}

#if CRH_HAVE_AVX512_PATH
template <DType T>
CRH_TARGET_AVX512 CRH_INLINE __m512 load16(const void* p, __mmask16 m) {
  if constexpr (T == DType::F32) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (T == DType::BF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
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
      status[i] = kMasked;
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
    if (!row_rule(sq, normalize, scale[i], status[i]) || acc == nullptr) continue;
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

// ============================================================================ pass 2: pack
// A chunk of m valid rows is packed once into P, column panels of kPanel = 32 lanes:
//   fp32 layout: panel p holds m rows of 32 fp32, P[(p·m + r)·32 + c] = y_r[32p + c];
//   bf16 layout: panel p holds ⌈m/2⌉ row *pairs*; lane c of pair q is a 32-bit word with
//                bf16(y_2q[32p + c]) in its low half and bf16(y_2q+1[32p + c]) in its high half
//                (the operand order of the AVX-512 BF16 dot product; a missing 2nd row is 0).
// Either way a panel row is 128 bytes and "prow" (m or ⌈m/2⌉) rows make a panel.
// y_r = s_r · x[rows[r]] − mu, in fp32 (SPEC §2: center first, then round to the unit's type);
// columns ≥ D are 0 (mu is 0 there too).
template <DType T>
void pack_generic(const View& x, const int64_t* rows, const float* rscale, int64_t r0, int64_t r1,
                  int64_t m, const float* mu, int64_t dp, float* P) {
  using E = typename Elem<T>::type;
  const E* base = static_cast<const E*>(x.data);
  const int64_t d = x.cols, sc = x.stride_col;
  for (int64_t r = r0; r < r1; ++r) {
    const E* row = base + rows[r] * x.stride_row;
    const float s = rscale[r];
    for (int64_t p = 0; p < dp / kPanel; ++p) {
      float* dst = P + (p * m + r) * kPanel;
      const int64_t j0 = p * kPanel;
      const int64_t w = std::min<int64_t>(kPanel, d - j0);
      for (int64_t c = 0; c < w; ++c) dst[c] = Elem<T>::load(row + (j0 + c) * sc) * s - mu[j0 + c];
      for (int64_t c = w; c < kPanel; ++c) dst[c] = 0.0f;
    }
  }
}

#if CRH_HAVE_AVX512_PATH
// Masks of the last, partial panel (w = D − 32p columns left, 0 < w < 32).
struct TailMasks {
  __mmask16 lo, hi;
};
CRH_INLINE TailMasks tail_masks(int64_t w) {
  return {w >= 16 ? __mmask16(0xffff) : __mmask16((1u << w) - 1u),
          w <= 16 ? __mmask16(0) : __mmask16((1u << (w - 16)) - 1u)};
}

// fp32 layout, unit column stride: one multiply and one subtraction per element, as in
// pack_generic (each rounded once in fp32).
template <DType T>
CRH_TARGET_AVX512 void pack_avx512(const View& x, const int64_t* rows, const float* rscale,
                                   int64_t r0, int64_t r1, int64_t m, const float* mu, int64_t dp,
                                   float* P) {
  using E = typename Elem<T>::type;
  const E* base = static_cast<const E*>(x.data);
  const int64_t d = x.cols, panels = dp / kPanel;
  const TailMasks tail = tail_masks(d - (panels - 1) * kPanel);
  for (int64_t r = r0; r < r1; ++r) {
    const E* row = base + rows[r] * x.stride_row;
    const __m512 s = _mm512_set1_ps(rscale[r]);
    if (r + 1 < r1) {  // valid rows are a gather: start on the next one
      const char* nxt = reinterpret_cast<const char*>(base + rows[r + 1] * x.stride_row);
      _mm_prefetch(nxt, _MM_HINT_T0);
      _mm_prefetch(nxt + 64, _MM_HINT_T0);
    }
    for (int64_t p = 0; p < panels; ++p) {
      const bool last = p + 1 == panels;
      const __mmask16 m0 = last ? tail.lo : __mmask16(0xffff);
      const __mmask16 m1 = last ? tail.hi : __mmask16(0xffff);
      const E* src = row + p * kPanel;
      float* dst = P + (p * m + r) * kPanel;
      const __m512 a = load16<T>(src, m0), b = load16<T>(src + 16, m1);
      _mm512_store_ps(dst, _mm512_sub_ps(_mm512_mul_ps(a, s), _mm512_load_ps(mu + p * kPanel)));
      _mm512_store_ps(dst + 16,
                      _mm512_sub_ps(_mm512_mul_ps(b, s), _mm512_load_ps(mu + p * kPanel + 16)));
    }
  }
}

// fp32 -> bf16 bits, round to nearest even (y is finite here), in the low 16 bits of each lane.
CRH_TARGET_AVX512 CRH_INLINE __m512i bf16_bits(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))),
                           16);
}

// bf16-pair layout, unit column stride; pairs q in [q0, q1) of a chunk of m rows.
template <DType T>
CRH_TARGET_AVX512 void pack_pairs_avx512(const View& x, const int64_t* rows, const float* rscale,
                                         int64_t q0, int64_t q1, int64_t m, const float* mu,
                                         int64_t dp, float* P) {
  using E = typename Elem<T>::type;
  const E* base = static_cast<const E*>(x.data);
  const int64_t d = x.cols, panels = dp / kPanel, prow = (m + 1) / 2;
  const TailMasks tail = tail_masks(d - (panels - 1) * kPanel);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t r = 2 * q;
    const bool second = r + 1 < m;
    const E* row0 = base + rows[r] * x.stride_row;
    const E* row1 = second ? base + rows[r + 1] * x.stride_row : row0;
    const __m512 s0 = _mm512_set1_ps(rscale[r]);
    const __m512 s1 = _mm512_set1_ps(second ? rscale[r + 1] : 0.0f);
    const __mmask16 keep1 = second ? __mmask16(0xffff) : __mmask16(0);
    for (int64_t p = 0; p < panels; ++p) {
      const bool last = p + 1 == panels;
      uint32_t* dst = reinterpret_cast<uint32_t*>(P) + (p * prow + q) * kPanel;
      for (int h = 0; h < 2; ++h) {
        const __mmask16 mk = last ? (h ? tail.hi : tail.lo) : __mmask16(0xffff);
        const int64_t off = p * kPanel + 16 * h;
        const __m512 mu16 = _mm512_load_ps(mu + off);
        const __m512 y0 = _mm512_sub_ps(_mm512_mul_ps(load16<T>(row0 + off, mk), s0), mu16);
        // a missing second row packs zeros (not −mu): it must add nothing
        const __m512 y1 = _mm512_maskz_sub_ps(
            keep1, _mm512_mul_ps(load16<T>(row1 + off, mk & keep1), s1), mu16);
        const __m512i w = _mm512_or_si512(bf16_bits(y0), _mm512_slli_epi32(bf16_bits(y1), 16));
        _mm512_store_si512(dst + 16 * h, w);
      }
    }
  }
}
#endif

// ===================================================================== pass 2: inner kernels
// C[0:MR, 0:NR] += Σ_k A[k·32 + 0:MR]ᵀ ⊗ B[k·32 + 0:NR] over the prow rows of a packed panel:
// A and B are slices of panels (row stride kPanel lanes), C row-major with leading dim ldc.
using Kernel = void (*)(int64_t prow, const float* A, const float* B, float* C, int64_t ldc);

// Portable kernel: 4×16 keeps its accumulators in 8 AVX2 / 16 SSE registers; the compiler
// vectorizes the NR loop. Built twice (baseline ISA and AVX2+FMA).
template <int MR, int NR, int AS = kPanel>
CRH_INLINE void ukr_generic_body(int64_t kc, const float* __restrict A, const float* __restrict B,
                                 float* __restrict C, int64_t ldc) {
  float acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = 0.0f;
  for (int64_t k = 0; k < kc; ++k) {
    const float* a = A + k * AS;
    const float* b = B + k * kPanel;
    for (int r = 0; r < MR; ++r) {
      const float ar = a[r];
#pragma omp simd
      for (int c = 0; c < NR; ++c) acc[r][c] += ar * b[c];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) C[r * ldc + c] += acc[r][c];
}

constexpr int kGenericMR = 4, kGenericNR = 16;
void ukr_generic(int64_t kc, const float* A, const float* B, float* C, int64_t ldc) {
  ukr_generic_body<kGenericMR, kGenericNR>(kc, A, B, C, ldc);
}
// The broadcast operand as a compact strip (row stride MR lanes, not kPanel): matmul_rows.
void ukr_generic_strip(int64_t kc, const float* A, const float* B, float* C, int64_t ldc) {
  ukr_generic_body<kGenericMR, kGenericNR, kGenericMR>(kc, A, B, C, ldc);
}

#if CRH_HAVE_AVX512_PATH
CRH_TARGET_AVX2 void ukr_generic_avx2(int64_t kc, const float* A, const float* B, float* C,
                                      int64_t ldc) {
  ukr_generic_body<kGenericMR, kGenericNR>(kc, A, B, C, ldc);
}
CRH_TARGET_AVX2 void ukr_generic_avx2_strip(int64_t kc, const float* A, const float* B, float* C,
                                            int64_t ldc) {
  ukr_generic_body<kGenericMR, kGenericNR, kGenericMR>(kc, A, B, C, ldc);
}

// AVX-512 kernels, 8×(16·NV): 8·NV zmm accumulators; per panel row, NV 64-byte loads of B and
// 8 broadcasts of A feed 8·NV FMAs (fp32) or BF16 dot products (two rows each). A is read 32
// bytes out of each 128-byte panel row (one cache line a row). NV = 2 is the main kernel;
// NV = 1 serves the right half of a diagonal panel, whose left half lies wholly below the
// diagonal for rows a0 ≥ b0 + 16.
constexpr int kAvxMR = 8, kAvxNR = 32;

// One body, two instruction sets (a target attribute cannot depend on a template argument).
#define CRH_UKR_BODY(NAME, TARGET, UPDATE)                                                   \
  template <int NV, int AS = kPanel>                                                         \
  TARGET CRH_INLINE void NAME(int64_t prow, const float* __restrict A,                       \
                              const float* __restrict B, float* __restrict C, int64_t ldc) { \
    __m512 c[8][NV];                                                                         \
    _Pragma("GCC unroll 8") for (int r = 0; r < 8; ++r)                                      \
      _Pragma("GCC unroll 2") for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();    \
    for (int64_t k = 0; k < prow; ++k) {                                                     \
      __m512 b[NV];                                                                          \
      _Pragma("GCC unroll 2") for (int v = 0; v < NV; ++v) b[v] = _mm512_load_ps(B + 16 * v); \
      _Pragma("GCC unroll 8") for (int r = 0; r < 8; ++r) {                                  \
        const __m512 a = _mm512_set1_ps(A[r]); /* fp32, or a bf16 pair as 32 bits */         \
        _Pragma("GCC unroll 2") for (int v = 0; v < NV; ++v) UPDATE;                         \
      }                                                                                      \
      A += AS;                                                                               \
      B += kPanel;                                                                           \
    }                                                                                        \
    _Pragma("GCC unroll 8") for (int r = 0; r < 8; ++r)                                      \
      _Pragma("GCC unroll 2") for (int v = 0; v < NV; ++v) {                                 \
        float* p = C + r * ldc + 16 * v;                                                     \
        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), c[r][v]));                     \
      }                                                                                      \
  }
CRH_UKR_BODY(ukr_f32_body, CRH_TARGET_AVX512, c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]))
CRH_UKR_BODY(ukr_bf16_body, CRH_TARGET_AVX512_BF16,
             c[r][v] = _mm512_dpbf16_ps(c[r][v], (__m512bh)a, (__m512bh)b[v]))
#undef CRH_UKR_BODY

CRH_TARGET_AVX512 void ukr_avx512(int64_t prow, const float* A, const float* B, float* C,
                                  int64_t ldc) {
  ukr_f32_body<2>(prow, A, B, C, ldc);
}
CRH_TARGET_AVX512 void ukr_avx512_strip(int64_t prow, const float* A, const float* B, float* C,
                                        int64_t ldc) {
  ukr_f32_body<2, kAvxMR>(prow, A, B, C, ldc);
}
CRH_TARGET_AVX512 void ukr_avx512_half(int64_t prow, const float* A, const float* B, float* C,
                                       int64_t ldc) {
  ukr_f32_body<1>(prow, A, B, C, ldc);
}
CRH_TARGET_AVX512_BF16 void ukr_bf16(int64_t prow, const float* A, const float* B, float* C,
                                     int64_t ldc) {
  ukr_bf16_body<2>(prow, A, B, C, ldc);
}
CRH_TARGET_AVX512_BF16 void ukr_bf16_half(int64_t prow, const float* A, const float* B, float* C,
                                          int64_t ldc) {
  ukr_bf16_body<1>(prow, A, B, C, ldc);
}
#endif

// The path of one call: inner kernel, packing layout, and their shapes.
struct KernelChoice {
  Kernel fn;
  Kernel half;   // mr × nr/2 variant for diagonal panels (nullptr: none)
  Kernel strip;  // fn with A a compact strip of row stride mr (fp32 layout only, else nullptr)
  int64_t mr, nr;
  Isa isa;
  bool pairs;  // bf16-pair packing (two rows per panel row)
};

KernelChoice pick_kernel(Isa isa, bool bf16_input) {
#if CRH_HAVE_AVX512_PATH
  if (isa == Isa::Avx512Bf16 && bf16_input)
    return {ukr_bf16, ukr_bf16_half, nullptr, kAvxMR, kAvxNR, Isa::Avx512Bf16, true};
  if (isa >= Isa::Avx512)
    return {ukr_avx512, ukr_avx512_half, ukr_avx512_strip, kAvxMR, kAvxNR, Isa::Avx512, false};
  if (cpu_has_avx2())
    return {ukr_generic_avx2, nullptr, ukr_generic_avx2_strip, kGenericMR, kGenericNR, Isa::Generic,
            false};
#else
  (void)bf16_input;
#endif
  return {ukr_generic, nullptr, ukr_generic_strip, kGenericMR, kGenericNR, Isa::Generic, false};
}

CRH_INLINE int64_t panel_rows(const KernelChoice& k, int64_t m) { return k.pairs ? (m + 1) / 2 : m; }

// Pack pack-units [u0, u1) of a chunk of m rows (rows, or row pairs for the bf16 layout).
template <DType T>
void pack_units(const KernelChoice& k, const View& x, const int64_t* rows, const float* rscale,
                int64_t u0, int64_t u1, int64_t m, const float* mu, int64_t dp, float* P) {
#if CRH_HAVE_AVX512_PATH
  if (k.pairs) {
    pack_pairs_avx512<T>(x, rows, rscale, u0, u1, m, mu, dp, P);
    return;
  }
  if (k.isa >= Isa::Avx512 && x.stride_col == 1) {
    pack_avx512<T>(x, rows, rscale, u0, u1, m, mu, dp, P);
    return;
  }
#endif
  pack_generic<T>(x, rows, rscale, u0, u1, m, mu, dp, P);
}

CRH_INLINE const float* slice(const float* P, int64_t prow, int64_t col) {
  return P + (col / kPanel) * prow * kPanel + (col % kPanel);
}

// C (dp × dp, ld dp) += YᵀY of one packed chunk, over the micro-tiles [a0, a0+MR) × [b0, b0+NR)
// that hold at least one entry with a ≤ b, for micro-rows a0 in [a_begin, a_end). For a fixed
// a0 the broadcast slice (prow × one cache line) stays in L1 while the vector slices stream
// from L2.
void syrk_chunk(const KernelChoice& k, const float* P, int64_t prow, int64_t dp, float* C,
                int64_t a_begin, int64_t a_end) {
  const int64_t h = k.nr / 2;
  for (int64_t a0 = a_begin; a0 < a_end; a0 += k.mr) {
    const float* A = slice(P, prow, a0);
    int64_t b0 = (a0 / k.nr) * k.nr;
    if (k.half != nullptr && a0 >= b0 + h) {  // columns [b0, b0+h) all lie below the diagonal
      k.half(prow, A, slice(P, prow, b0 + h), C + a0 * dp + b0 + h, dp);
      b0 += k.nr;
    }
    for (; b0 < dp; b0 += k.nr) k.fn(prow, A, slice(P, prow, b0), C + a0 * dp + b0, dp);
  }
}

// C (dgp × dhp) += YgᵀYh of one chunk, micro-rows a0 in [a_begin, a_end), every column tile.
void gemm_chunk(const KernelChoice& k, const float* Pg, const float* Ph, int64_t prow,
                int64_t dhp, float* C, int64_t a_begin, int64_t a_end) {
  for (int64_t a0 = a_begin; a0 < a_end; a0 += k.mr) {
    const float* A = slice(Pg, prow, a0);
    for (int64_t b0 = 0; b0 < dhp; b0 += k.nr) k.fn(prow, A, slice(Ph, prow, b0), C + a0 * dhp + b0, dhp);
  }
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

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
// micro-tile. (Measured on a 2-core Zen 4: 128 to 384 rows all within 1% at D = 1024.)
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
// DRAM and the final sum cost more than two barriers per chunk. Measured on 2 cores: copies
// 5–10% faster at D = 128–1024, the shared C 8% faster at D = 4096 (2 × 64 MiB copies).
constexpr size_t kReplicaBudget = size_t(32) << 20;

// ================================================================================ drivers
struct RowSet {
  std::vector<int64_t> rows;  // valid row indices, ascending
  std::vector<float> rscale;  // their scales
  int64_t n_skipped = 0;
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

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// One kB × kB block (i0 ≤ j0) of the final pass; its sums Σ_t C_t[i][j] (j ≥ i) arrive in a
// buffer of row stride kB. A finisher writes the upper entries and mirrors them exactly, both
// row-wise through a block in L1: writing the lower side column-wise (stride d, a multiple of
// 4 KiB at D = 1024) sends a block's 64 lines to one L1 set; that made the mirror 1.1 ms of a
// 22 ms call at N = 4096, D = 1024.
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

// Bands of a last chunk: [lo, hi) still open, packed as lo << 32 | hi. The owner claims from
// the top (lo), helpers from the bottom (hi, the short rows of the triangle). -1: none left.
int64_t claim(std::atomic<uint64_t>& open, bool top) {
  uint64_t v = open.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t lo = v >> 32, hi = v & 0xffffffffu;
    if (lo >= hi) return -1;
    const uint64_t next = top ? ((lo + 1) << 32) | hi : (lo << 32) | (hi - 1);
    if (open.compare_exchange_weak(v, next, std::memory_order_acq_rel, std::memory_order_relaxed))
      return int64_t(top ? lo : hi - 1);
  }
}
bool bands_left(const std::atomic<uint64_t>& open) {
  const uint64_t v = open.load(std::memory_order_relaxed);
  return (v >> 32) < (v & 0xffffffffu);
}

// CRH_CPU_HELP=0 turns the last-chunk help off (A/B measurements, tests).
bool help_enabled() {
  const char* v = std::getenv("CRH_CPU_HELP");
  return v == nullptr || std::string(v) != "0";
}

// Tests only: CRH_CPU_SLOW_THREAD=t makes thread t sleep 30 ms before its last chunk, so that
// the others certainly help with it (-1: unset).
int slow_thread_for_tests() {
  const char* v = std::getenv("CRH_CPU_SLOW_THREAD");
  return v == nullptr ? -1 : std::atoi(v);
}

// Pass 2: Σ over the valid rows of YᵀY (upper tiles only), summed over threads and mirrored
// into the exactly symmetric (d × d) out.
//   Many rows: each thread owns a contiguous share of the rows, its own packed chunk and its
//   own copy of C (no synchronisation until the end).
//   Few rows, or no memory for copies: one C; per chunk the threads pack together, then split
//   C's micro-rows (dynamic schedule: the rows near the top own more tiles).
template <DType T, class Finish>
void scatter_upper(const KernelChoice& k, const View& x, const RowSet& rs, const float* mu,
                   int threads, const Finish& finish) {
  const int64_t n = int64_t(rs.rows.size());
  const int64_t d = x.cols, dp = round_up(d, kPanel);
  const int64_t kc = chunk_rows(dp);
  const size_t cbytes = size_t(dp) * size_t(dp) * sizeof(float);
  const bool replicas = threads > 1 && n >= 2 * kc && size_t(threads) * cbytes <= kReplicaBudget;
  const int nrep = replicas ? threads : 1;
  // C copies are zeroed inside the parallel region: first touch by the thread that uses them
  // (a serial memset of 2 × 64 MiB at D = 4096 cost ~10% of the whole call)
  Scratch scratch;
  std::vector<float*> cs(nrep), ps(replicas ? threads : 1);
  for (int t = 0; t < nrep; ++t) cs[t] = scratch.take(size_t(dp) * dp);
  for (float*& p : ps) p = scratch.take(size_t(kc) * dp);
  const int64_t* rows = rs.rows.data();
  const float* sc = rs.rscale.data();
  // Help with the last chunk: a thread done with its rows computes micro-row bands of another
  // thread's last chunk, claimed from the bottom while the owner claims from the top, into the
  // owner's temporary H_t; the finisher adds H_t to C_t. The inner kernel adds its zero-started
  // accumulators to C once, so C_t + H_t is the very sum the owner would have formed: results
  // do not depend on who did which band (the threads' finish times differ by ~1 ms a call on
  // a busy machine; this absorbs up to one chunk of it).
  const int64_t nbands = dp / k.mr;
  const bool help = replicas && help_enabled() && size_t(2 * nrep) * cbytes <= kReplicaBudget;
  std::vector<float*> hs(help ? nrep : 0);
  for (float*& h : hs) h = scratch.take(size_t(dp) * dp);
  std::unique_ptr<std::atomic<uint64_t>[]> open(new std::atomic<uint64_t>[nrep]);
  for (int t = 0; t < nrep; ++t) open[t].store(uint64_t(nbands));  // bands [0, nbands) open
  std::vector<uint8_t> helped(help ? size_t(nrep) * nbands : 0, 0);
  const int slow = slow_thread_for_tests();

  // One parallel region (every join is a wait for the slowest thread, and on a shared
  // machine for the scheduler): products, barrier, then the blocked sum + mirror.
  const int64_t nb = (d + kB - 1) / kB;
#pragma omp parallel num_threads(threads)
  {
    if (replicas) {
      const int t = thread_id();
      const Split s = split(n, nrep, t);
      zero_upper(k, cs[t], 0, dp, dp);
      float* P = ps[t];
      const int64_t last = s.begin + (s.end - s.begin - 1) / kc * kc;
      for (int64_t c0 = s.begin; c0 < s.end; c0 += kc) {
        const int64_t m = std::min(kc, s.end - c0), prow = panel_rows(k, m);
        if (c0 == last && t == slow) std::this_thread::sleep_for(std::chrono::milliseconds(30));
        pack_units<T>(k, x, rows + c0, sc + c0, 0, prow, m, mu, dp, P);
        if (!help || c0 != last) {
          syrk_chunk(k, P, prow, dp, cs[t], 0, dp);
          continue;
        }
        for (int64_t b; (b = claim(open[t], true)) >= 0;)
          syrk_chunk(k, P, prow, dp, cs[t], b * k.mr, (b + 1) * k.mr);
      }
      for (int o = 1; help && o < nrep; ++o) {
        const int u = (t + o) % nrep;
        if (!bands_left(open[u])) continue;
        const Split su = split(n, nrep, u);
        const int64_t lu = su.begin + (su.end - su.begin - 1) / kc * kc;
        const int64_t m = su.end - lu, prow = panel_rows(k, m);
        pack_units<T>(k, x, rows + lu, sc + lu, 0, prow, m, mu, dp, P);
        for (int64_t b; (b = claim(open[u], false)) >= 0;) {
          zero_upper(k, hs[u], b * k.mr, (b + 1) * k.mr, dp);
          syrk_chunk(k, P, prow, dp, hs[u], b * k.mr, (b + 1) * k.mr);
          helped[size_t(u) * nbands + b] = 1;
        }
      }
#pragma omp barrier
    } else {
      float* P = ps[0];
#pragma omp for schedule(static)
      for (int64_t a = 0; a < dp; ++a) zero_upper(k, cs[0], a, a + 1, dp);
      for (int64_t c0 = 0; c0 < n; c0 += kc) {
        const int64_t m = std::min(kc, n - c0), prow = panel_rows(k, m);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < prow; ++u) pack_units<T>(k, x, rows + c0, sc + c0, u, u + 1, m, mu, dp, P);
        // the micro-rows near the top own more tiles: dynamic schedule
#pragma omp for schedule(dynamic, 1)
        for (int64_t a0 = 0; a0 < dp; a0 += k.mr) syrk_chunk(k, P, prow, dp, cs[0], a0, a0 + k.mr);
      }
    }
    // out[i][j] = Σ_t C_t[min(i,j)][max(i,j)]: the lower triangle copies the upper bit for bit
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nb * (nb + 1) / 2; ++blk) {
      int64_t ib = 0, rest = blk;  // blk -> block (ib, jb), ib <= jb, row by row
      while (rest >= nb - ib) rest -= nb - ib++;
      const int64_t jb = ib + rest;
      const int64_t i0 = ib * kB, i1 = std::min(d, i0 + kB), j0 = jb * kB, j1 = std::min(d, j0 + kB);
      alignas(64) float blk_v[kB * kB];
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t jlo = std::max(i, j0);
        float* b = blk_v + (i - i0) * kB - j0;
        for (int t = 0; t < nrep; ++t) {
          const float* ct = cs[t] + i * dp;
          // C_t's row, with a helper's band of t's last chunk added as the owner would have
          const float* ht = help && helped[size_t(t) * nbands + i / k.mr] ? hs[t] + i * dp : nullptr;
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
      finish(Block{i0, i1, j0, j1}, blk_v);
    }
  }
}

// Valid rows in ascending order with their scales; counts the skipped ones.
RowSet compact(const uint8_t* status, const float* scale, int64_t n) {
  RowSet rs;
  rs.rows.reserve(n);
  rs.rscale.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (status[i] == kValid) {
      rs.rows.push_back(i);
      rs.rscale.push_back(scale[i]);
    } else if (status[i] == kSkipped) {
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

// The batch of p merged into st (see batch_update in moments_cpu.h).
template <DType T, class S>
Counts merge_batch(const View& x, const Prepared& p, int threads, bool refuse_skipped,
                   const State& st, const double* mean) {
  const int64_t d = x.cols;
  const int64_t n2 = int64_t(p.rs.rows.size());
  if (n2 == 0 || (refuse_skipped && p.rs.n_skipped > 0)) return {n2, p.rs.n_skipped};
  const S* m1 = static_cast<const S*>(st.mean);
  std::vector<double> delta(d);
  for (int64_t j = 0; j < d; ++j) delta[j] = mean[j] - double(m1[j]);
  const double f = st.n1 > 0 ? double(st.n1) * double(n2) / double(st.n1 + n2) : 0.0;
  scatter_upper<T>(p.k, x, p.rs, p.mu.get(), threads,
                   MergeScatter<S>{static_cast<S*>(st.scatter), d, delta.data(), f, st.n1 == 0});
  return {n2, p.rs.n_skipped};
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
        pack_units<TG>(k, g, rows + c0, sg.data() + c0, 0, prow, m, mug, dgp, Pg);
        pack_units<TH>(k, h, rows + c0, sh.data() + c0, 0, prow, m, muh, dhp, Ph);
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
          pack_units<TG>(k, g, rows + c0, sg.data() + c0, u, u + 1, m, mug, dgp, Pg);
          pack_units<TH>(k, h, rows + c0, sh.data() + c0, u, u + 1, m, muh, dhp, Ph);
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
    if (stg[i] == kMasked) continue;  // the mask drops a row from both
    if (stg[i] == kValid && sth[i] == kValid) {
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

// ============================================================== rows times a matrix (g_a = g_b·W)
// out (N, M) = x (N, K) · w (K, M) in fp32 with the inner kernels of pass 2: w is packed once
// into column panels (the "vector" operand), and for each micro-row strip of x and each
// K-chunk the strip is transposed into a small panel (the "broadcast" operand, in L1) while
// w's chunk (kc × M) stays in L2. Threads own strips of rows (no synchronisation after w's
// packing). Each out entry is Σ_k in fp32, chunk after chunk.

// A[p·mr + r] = x[i0 + r][k0 + p] for r < mr (rows past N as zeros), p < kcur.
void pack_strip(const View& x, int64_t i0, int64_t mr, int64_t k0, int64_t kcur, float* A) {
  const float* base = static_cast<const float*>(x.data);
  for (int64_t r = 0; r < mr; ++r) {
    float* dst = A + r;
    if (i0 + r >= x.rows) {
      for (int64_t p = 0; p < kcur; ++p) dst[p * mr] = 0.0f;
      continue;
    }
    const float* src = base + (i0 + r) * x.stride_row + k0 * x.stride_col;
    if (x.stride_col == 1) {
      for (int64_t p = 0; p < kcur; ++p) dst[p * mr] = src[p];
    } else {
      for (int64_t p = 0; p < kcur; ++p) dst[p * mr] = src[p * x.stride_col];
    }
  }
}

void matmul_rows_t(const View& x, const View& w, int threads, float* out) {
  const int64_t n = x.rows, kd = x.cols, md = w.cols, mp = round_up(md, kPanel);
  const KernelChoice k = pick_kernel(call_isa(), false);
  // w's chunk of kc × nc (256 KiB) stays in L2 while the thread's strips pass over it
  // (measured at 1024³ on 2 cores: kc, nc in 128–1024 all within the machine's noise, 190–216
  // GFLOP/s against 180–197 for torch's sgemm)
  const int64_t kc = 256, nc = 256;
  const int64_t strips = (n + k.mr - 1) / k.mr;
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, strips)));
  if (double(n) * double(kd) * double(md) < double(1 << 22)) threads = 1;
  Scratch scratch;
  float* pw = scratch.take(size_t(kd) * mp);
  std::vector<float*> pa(threads);
  const int64_t per = (strips + threads - 1) / threads;
  for (float*& a : pa) a = scratch.take(size_t(per) * kc * k.mr);
  std::vector<int64_t> ident(kd);
  std::vector<float> ones(kd, 1.0f);
  for (int64_t i = 0; i < kd; ++i) ident[i] = i;
  Buf<float> zero = alloc<float>(mp, true);
#pragma omp parallel num_threads(threads)
  {
    const int t = thread_id();
    // w by K-chunks, each [panel][k][lane]: a chunk's panels follow each other, so the kernel
    // calls along a strip read one sequential stream (as syrk_chunk's do)
    for (int64_t k0 = 0; k0 < kd; k0 += kc) {
      const int64_t kcur = std::min(kc, kd - k0);
      const Split u = split(kcur, threads, t);
      pack_units<DType::F32>(k, w, ident.data() + k0, ones.data(), u.begin, u.end, kcur, zero.get(),
                             mp, pw + k0 * mp);
    }
    const Split s = split(strips, threads, t);
    for (int64_t i = s.begin * k.mr; i < std::min(n, s.end * k.mr); ++i)
      std::memset(out + i * md, 0, size_t(md) * sizeof(float));
#pragma omp barrier
    alignas(64) float tile[8 * 32];  // the largest mr × nr
    for (int64_t k0 = 0; k0 < kd; k0 += kc) {
      const int64_t kcur = std::min(kc, kd - k0);
      for (int64_t st = s.begin; st < s.end; ++st)
        pack_strip(x, st * k.mr, k.mr, k0, kcur, pa[t] + (st - s.begin) * kcur * k.mr);
      for (int64_t jb = 0; jb < mp; jb += nc) {
        for (int64_t st = s.begin; st < s.end; ++st) {
          const int64_t i0 = st * k.mr, rows = std::min(k.mr, n - i0);
          const float* A = pa[t] + (st - s.begin) * kcur * k.mr;
          for (int64_t j0 = jb; j0 < std::min(mp, jb + nc); j0 += k.nr) {
            const float* B = slice(pw + k0 * mp, kcur, j0);
            const int64_t cols = std::min(k.nr, md - j0);
            if (rows == k.mr && cols == k.nr) {
              k.strip(kcur, A, B, out + i0 * md + j0, md);
              continue;
            }
            // edge tile: through a full-size buffer (the kernel writes mr × nr)
            for (int64_t r = 0; r < k.mr; ++r)
              for (int64_t c = 0; c < k.nr; ++c)
                tile[r * k.nr + c] = (r < rows && c < cols) ? out[(i0 + r) * md + j0 + c] : 0.0f;
            k.strip(kcur, A, B, tile, k.nr);
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c = 0; c < cols; ++c) out[(i0 + r) * md + j0 + c] = tile[r * k.nr + c];
          }
        }
      }
    }
  }
}

void check_view(const View& x, const char* name) {
  if (x.rows < 0 || x.cols <= 0)
    throw std::invalid_argument(std::string("crh: ") + name + " must have shape (N >= 0, D >= 1)");
  if (x.data == nullptr && x.rows > 0)
    throw std::invalid_argument(std::string("crh: ") + name + " has no data");
}

void check_state(const State& st) {
  if (st.n1 < 0) throw std::invalid_argument("crh: the state's count must be >= 0");
  if (st.mean == nullptr || st.scatter == nullptr)
    throw std::invalid_argument("crh: the state has no data");
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

void matmul_rows(const View& x, const View& w, int threads, float* out) {
  check_view(x, "x");
  check_view(w, "w");
  if (x.dtype != DType::F32 || w.dtype != DType::F32)
    throw std::invalid_argument("crh: matmul_rows takes float32 x and w");
  if (x.cols != w.rows) throw std::invalid_argument("crh: x's columns must equal w's rows");
  if (x.rows == 0) return;
  matmul_rows_t(x, w, std::max(1, threads), out);
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
