// The CPU GEMM of crh_kernels: out (N, M) = x (N, K) · w (K, M) in fp32, the collector's
// g_a = g_b·W on the CPU (crh::matmul_rows; a backend's `row_matmul` capability). It is not a
// statistic of docs/spec.md §2: it only borrows the packing and the inner kernels of the covariance
// (cpu_microkernels.h), which beat torch.mm on the CPUs measured (NOTES.md).
//
// w is packed once into column panels (the "vector" operand), and for each micro-row strip of
// x and each K-chunk the strip is transposed into a small panel (the "broadcast" operand, in
// L1) while w's chunk (kc × M) stays in L2. Threads own strips of rows (no synchronisation
// after w's packing). Each out entry is Σ_k in fp32, chunk after chunk.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_common.h"
#include "cpu_microkernels.h"
#include "moments_cpu.h"

namespace crh {
namespace cpu {
namespace {

using namespace detail;  // the CPU infrastructure, packing and inner kernels of the headers

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
  // w's chunk of kc × nc (256 KiB) stays in L2 while the thread's strips pass over it (the
  // sizes are flat over a wide range; NOTES.md)
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

}  // namespace

// ==================================================================================== API
void matmul_rows(const View& x, const View& w, int threads, float* out) {
  check_view(x, "x");
  check_view(w, "w");
  if (x.dtype != DType::F32 || w.dtype != DType::F32)
    throw std::invalid_argument("crh: matmul_rows takes float32 x and w");
  if (x.cols != w.rows) throw std::invalid_argument("crh: x's columns must equal w's rows");
  if (x.rows == 0) return;
  matmul_rows_t(x, w, std::max(1, threads), out);
}

}  // namespace cpu
}  // namespace crh
