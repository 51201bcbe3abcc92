// CPU infrastructure of the crh_kernels CPU kernels (C++17, OpenMP): scratch memory, the
// fp16/bf16 -> fp32 conversions and dtype dispatch, instruction-set detection, streaming
// stores, and the work split of rows over threads. No torch and no math of docs/spec.md §2 here:
// cpu_microkernels.h builds the packing and inner kernels on top of this, moments_cpu.cpp and
// matmul_rows.cpp the passes and the op-facing API.
//
// Everything lives in crh::cpu::detail; non-template functions are `inline` (one definition
// shared by the translation units that include this header, e.g. one scratch arena per thread).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "moments_cpu.h"

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
namespace detail {

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
// touch. Slots are taken in a fixed order per call, so calls of one shape reuse the same
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

#if CRH_HAVE_AVX512_PATH
// 16 elements of type T (masked lanes read as 0) as fp32.
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
#endif

// --------------------------------------------------------------------------------- CPU ISA
// What the inner loops may use: the portable C++ kernels, AVX-512 (fp32 FMA), or AVX-512 with
// the BF16 dot product (bf16 inputs only). Detected once; CRH_CPU_ISA=generic|avx512 caps the
// level for one call (the tests run every path the machine has).
enum class Isa : int { Generic = 0, Avx512 = 1, Avx512Bf16 = 2 };

inline Isa machine_isa() {
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

inline Isa call_isa() {
  Isa level = machine_isa();
  if (const char* cap = std::getenv("CRH_CPU_ISA")) {
    const std::string v(cap);
    if (v == "generic") level = Isa::Generic;
    else if (v == "avx512" && level > Isa::Avx512) level = Isa::Avx512;
  }
  return level;
}

inline bool cpu_has_avx2() {
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
// of the old lines, no eviction of the caller's working set. (Not used for the mirrored half of
// a state: its 256-byte row pieces made the merge slower; NOTES.md.)
#if CRH_HAVE_AVX512_PATH
CRH_TARGET_AVX512 inline void stream_copy_avx512(void* dst, const void* src, size_t bytes) {
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
inline bool can_stream() { return machine_isa() >= Isa::Avx512; }

// dst 64-byte aligned (else a plain copy); an sfence must follow before others read dst.
inline void stream_copy(void* dst, const void* src, size_t bytes) {
#if CRH_HAVE_AVX512_PATH
  if (can_stream() && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    stream_copy_avx512(dst, src, bytes);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void store_fence() {
#if CRH_HAVE_AVX512_PATH
  _mm_sfence();
#endif
}

// -------------------------------------------------------------------------------- threads
// [begin, end) of part k when n items are split into `parts` contiguous parts.
struct Split {
  int64_t begin, end;
};
inline Split split(int64_t n, int parts, int k) {
  return {n * k / parts, n * (k + 1) / parts};
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// -------------------------------------------------------------------------- argument checks
inline void check_view(const View& x, const char* name) {
  if (x.rows < 0 || x.cols <= 0)
    throw std::invalid_argument(std::string("crh: ") + name + " must have shape (N >= 0, D >= 1)");
  if (x.data == nullptr && x.rows > 0)
    throw std::invalid_argument(std::string("crh: ") + name + " has no data");
}

}  // namespace detail
}  // namespace cpu
}  // namespace crh
