// Packing and inner kernels of the crh_kernels CPU kernels (C++17): everything that knows the
// packed layout of a chunk of rows. Built on cpu_common.h; used by moments_cpu.cpp (pass 2 of
// the covariance, the cross moment) and matmul_rows.cpp (g_b·W).
//
// Layout of P (one chunk of kc rows): column panels of kPanel = 32 lanes, panel p holds columns
// [32p, 32p+32) of all kc rows, row after row (128 bytes a row; for the BF16 dot product, row
// *pairs* interleaved per lane). The inner kernel reads its "vector" operand as a 32-wide (or
// 16-wide) slice of a panel and its "broadcast" operand as an MR-wide slice of another, so one
// packing feeds both sides of YᵀY; columns past D are zero.
//
// Contents: the packers (portable, AVX-512 fp32, AVX-512 bf16 pairs), the register-blocked
// micro-kernels (portable 4×16, AVX-512 8×32 fp32 FMA and BF16 dot product), the kernel choice
// of a call, and the tile loops over one packed chunk (syrk_chunk: upper tiles of YᵀY;
// gemm_chunk: every tile of YgᵀYh).
#pragma once

#include "cpu_common.h"

namespace crh {
namespace cpu {
namespace detail {

constexpr int64_t kPanel = 32;  // packed panel width (fp32 columns): one 128-byte row per k

// =============================================================================== packing
// A chunk of m valid rows is packed once into P, column panels of kPanel = 32 lanes:
//   fp32 layout: panel p holds m rows of 32 fp32, P[(p·m + r)·32 + c] = y_r[32p + c];
//   bf16 layout: panel p holds ⌈m/2⌉ row *pairs*; lane c of pair q is a 32-bit word with
//                bf16(y_2q[32p + c]) in its low half and bf16(y_2q+1[32p + c]) in its high half
//                (the operand order of the AVX-512 BF16 dot product; a missing 2nd row is 0).
// Either way a panel row is 128 bytes and "prow" (m or ⌈m/2⌉) rows make a panel.
// y_r = s_r · x[rows[r]] − mu, in fp32 (docs/spec.md §2: center first, then round to the unit's type);
// columns ≥ D are 0 (mu is 0 there too).
//
// A tiny row (norm below 2^-100: 1/||x|| may exceed fp32) has its scale stored negative,
// s_r = −2^-64/||x|| (moments_cpu.cpp, row_rule_rescue): y_r = (x·2^64)·|s_r| − mu, both factors
// exact, the value x/||x|| rounded once. The packers below do not know it (their hot loops stay
// as they are); pack_units re-packs such rows afterwards (repack_tiny), only when the caller
// says the chunk's rows hold one.
constexpr float kTinyPre = 0x1p64f;
CRH_INLINE float tiny_scaled(float v, float s) { return (v * kTinyPre) * -s; }

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

// ========================================================================= inner kernels
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
inline void ukr_generic(int64_t kc, const float* A, const float* B, float* C, int64_t ldc) {
  ukr_generic_body<kGenericMR, kGenericNR>(kc, A, B, C, ldc);
}
// The broadcast operand as a compact strip (row stride MR lanes, not kPanel): matmul_rows.
inline void ukr_generic_strip(int64_t kc, const float* A, const float* B, float* C, int64_t ldc) {
  ukr_generic_body<kGenericMR, kGenericNR, kGenericMR>(kc, A, B, C, ldc);
}

#if CRH_HAVE_AVX512_PATH
CRH_TARGET_AVX2 inline void ukr_generic_avx2(
    int64_t kc, const float* A, const float* B, float* C, int64_t ldc) {
  ukr_generic_body<kGenericMR, kGenericNR>(kc, A, B, C, ldc);
}
CRH_TARGET_AVX2 inline void ukr_generic_avx2_strip(
    int64_t kc, const float* A, const float* B, float* C, int64_t ldc) {
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

CRH_TARGET_AVX512 inline void ukr_avx512(
    int64_t prow, const float* A, const float* B, float* C, int64_t ldc) {
  ukr_f32_body<2>(prow, A, B, C, ldc);
}
CRH_TARGET_AVX512 inline void ukr_avx512_strip(
    int64_t prow, const float* A, const float* B, float* C, int64_t ldc) {
  ukr_f32_body<2, kAvxMR>(prow, A, B, C, ldc);
}
CRH_TARGET_AVX512 inline void ukr_avx512_half(
    int64_t prow, const float* A, const float* B, float* C, int64_t ldc) {
  ukr_f32_body<1>(prow, A, B, C, ldc);
}
CRH_TARGET_AVX512_BF16 inline void ukr_bf16(
    int64_t prow, const float* A, const float* B, float* C, int64_t ldc) {
  ukr_bf16_body<2>(prow, A, B, C, ldc);
}
CRH_TARGET_AVX512_BF16 inline void ukr_bf16_half(
    int64_t prow, const float* A, const float* B, float* C, int64_t ldc) {
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

inline KernelChoice pick_kernel(Isa isa, bool bf16_input) {
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

// fp32 -> bf16 bits, round to nearest even (finite y): the scalar bf16_bits.
CRH_INLINE uint32_t bf16_bits_scalar(float y) {
  uint32_t u;
  std::memcpy(&u, &y, 4);
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// The rare path of pack_units: the tiny rows (rscale < 0) among pack-units [u0, u1), packed again
// over what the ordinary packer wrote for them (finite: a subnormal x times |s| ≤ 2^85), in
// either layout. Out of line.
template <DType T>
__attribute__((noinline, cold)) void repack_tiny(const KernelChoice& k, const View& x,
                                                 const int64_t* rows, const float* rscale,
                                                 int64_t u0, int64_t u1, int64_t m,
                                                 const float* mu, int64_t dp, float* P) {
  using E = typename Elem<T>::type;
  const E* base = static_cast<const E*>(x.data);
  const int64_t d = x.cols, sc = x.stride_col, prow = panel_rows(k, m);
  const int64_t r0 = k.pairs ? 2 * u0 : u0, r1 = std::min(m, k.pairs ? 2 * u1 : u1);
  for (int64_t r = r0; r < r1; ++r) {
    const float s = rscale[r];
    if (!(s < 0.0f)) continue;
    const E* row = base + rows[r] * x.stride_row;
    for (int64_t j = 0; j < d; ++j) {
      const float y = tiny_scaled(Elem<T>::load(row + j * sc), s) - mu[j];
      const int64_t p = j / kPanel, c = j % kPanel;
      if (k.pairs) {
        uint32_t* w = reinterpret_cast<uint32_t*>(P) + (p * prow + r / 2) * kPanel + c;
        const uint32_t b = bf16_bits_scalar(y);
        *w = r % 2 ? (*w & 0xffffu) | (b << 16) : (*w & 0xffff0000u) | b;
      } else {
        P[(p * m + r) * kPanel + c] = y;
      }
    }
  }
}

// Pack pack-units [u0, u1) of a chunk of m rows (rows, or row pairs for the bf16 layout);
// tiny: some row of the call may have a negative (tiny-row) scale.
template <DType T>
void pack_units(const KernelChoice& k, const View& x, const int64_t* rows, const float* rscale,
                int64_t u0, int64_t u1, int64_t m, const float* mu, int64_t dp, float* P,
                bool tiny = false) {
#if CRH_HAVE_AVX512_PATH
  if (k.pairs) {
    pack_pairs_avx512<T>(x, rows, rscale, u0, u1, m, mu, dp, P);
  } else if (k.isa >= Isa::Avx512 && x.stride_col == 1) {
    pack_avx512<T>(x, rows, rscale, u0, u1, m, mu, dp, P);
  } else {
    pack_generic<T>(x, rows, rscale, u0, u1, m, mu, dp, P);
  }
#else
  pack_generic<T>(x, rows, rscale, u0, u1, m, mu, dp, P);
#endif
  if (tiny) repack_tiny<T>(k, x, rows, rscale, u0, u1, m, mu, dp, P);
}

CRH_INLINE const float* slice(const float* P, int64_t prow, int64_t col) {
  return P + (col / kPanel) * prow * kPanel + (col % kPanel);
}

// C (dp × dp, ld dp) += YᵀY of one packed chunk, over the micro-tiles [a0, a0+MR) × [b0, b0+NR)
// that hold at least one entry with a ≤ b, for micro-rows a0 in [a_begin, a_end). For a fixed
// a0 the broadcast slice (prow × one cache line) stays in L1 while the vector slices stream
// from L2.
inline void syrk_chunk(const KernelChoice& k, const float* P, int64_t prow, int64_t dp, float* C,
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
inline void gemm_chunk(const KernelChoice& k, const float* Pg, const float* Ph, int64_t prow,
                       int64_t dhp, float* C, int64_t a_begin, int64_t a_end) {
  for (int64_t a0 = a_begin; a0 < a_end; a0 += k.mr) {
    const float* A = slice(Pg, prow, a0);
    for (int64_t b0 = 0; b0 < dhp; b0 += k.nr) k.fn(prow, A, slice(Ph, prow, b0), C + a0 * dhp + b0, dhp);
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace crh
