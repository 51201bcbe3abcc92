// Torch binding of the CUDA kernels: CUDA implementations of the crh:: ops defined in
// bindings.cpp (load crh_kernels._C first). Compiles only against a CUDA build of torch.
//
// Owns: argument checks, the device guard and current stream, the scratch allocation (torch's
// caching allocator), and the Python module init of crh_kernels._C_cuda. The kernels and their
// math are in moments_cuda.cu; shapes and outputs as in bindings.cpp.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "bindings_common.h"
#include "moments_cuda.h"

namespace {

using crh::binding::mask_of;

int dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return CRH_CUDA_BF16;
    case at::kHalf: return CRH_CUDA_F16;
    default: return CRH_CUDA_F32;  // check_rows admitted only these three
  }
}

// The kernels read rows with unit column stride: anything else is copied once (coalesced
// loads matter more on the GPU than the copy).
at::Tensor rows_of(const at::Tensor& x, const char* name) {
  crh::binding::check_rows(x, name, c10::DeviceType::CUDA);
  return (x.stride(1) == 1 || x.size(1) == 1) ? x : x.contiguous();
}

crh_cuda_view view_of(const at::Tensor& x) {
  crh_cuda_view v;
  v.data = x.data_ptr();
  v.dtype = dtype_code(x);
  v.rows = x.size(0);
  v.cols = x.size(1);
  v.stride_row = x.size(0) > 1 ? x.stride(0) : x.size(1);
  return v;
}

const unsigned char* mask_ptr(const at::Tensor& m) {
  return m.defined() ? reinterpret_cast<const unsigned char*>(m.data_ptr<bool>()) : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_stats_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& mask, bool normalize) {
  const at::Tensor x = rows_of(x_in, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor m = mask_of(mask, x);
  const int64_t n = x.size(0), d = x.size(1);
  auto opts = x.options();
  at::Tensor mean = at::empty({d}, opts.dtype(at::kDouble));
  at::Tensor scatter = at::empty({d, d}, opts.dtype(at::kFloat));
  at::Tensor counts = at::empty({2}, opts.dtype(at::kLong));
  const size_t bytes = crh_cuda_batch_workspace(n, d);
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, opts.dtype(at::kByte));
  const cudaError_t err = crh_cuda_batch_stats(
      view_of(x), mask_ptr(m), normalize ? 1 : 0, mean.data_ptr<double>(),
      scatter.data_ptr<float>(), counts.data_ptr<int64_t>(), ws.data_ptr(), bytes,
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "crh::batch_stats (CUDA): ", cudaGetErrorString(err));
  return {mean, scatter, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_stats_cuda(
    const at::Tensor& g_in, const at::Tensor& h_in, const std::optional<at::Tensor>& mask,
    bool normalize) {
  const at::Tensor g = rows_of(g_in, "g");
  const at::Tensor h = rows_of(h_in, "h");
  TORCH_CHECK(g.size(0) == h.size(0), "crh: g and h must have the same number of rows, got ",
              g.sizes(), " and ", h.sizes());
  TORCH_CHECK(g.scalar_type() == h.scalar_type(), "crh: g and h must share a dtype, got ",
              g.scalar_type(), " and ", h.scalar_type());
  TORCH_CHECK(g.device() == h.device(), "crh: g is on ", g.device(), " but h is on ", h.device());
  const c10::cuda::CUDAGuard guard(g.device());
  const at::Tensor m = mask_of(mask, g);
  const int64_t n = g.size(0), dg = g.size(1), dh = h.size(1);
  auto opts = g.options();
  at::Tensor mean_g = at::empty({dg}, opts.dtype(at::kDouble));
  at::Tensor mean_h = at::empty({dh}, opts.dtype(at::kDouble));
  at::Tensor scatter = at::empty({dg, dh}, opts.dtype(at::kFloat));
  at::Tensor counts = at::empty({2}, opts.dtype(at::kLong));
  const size_t bytes = crh_cuda_cross_workspace(n, dg, dh);
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, opts.dtype(at::kByte));
  const cudaError_t err = crh_cuda_cross_stats(
      view_of(g), view_of(h), mask_ptr(m), normalize ? 1 : 0, mean_g.data_ptr<double>(),
      mean_h.data_ptr<double>(), scatter.data_ptr<float>(), counts.data_ptr<int64_t>(),
      ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream(g.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "crh::cross_stats (CUDA): ", cudaGetErrorString(err));
  return {mean_g, mean_h, scatter, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(crh, CUDA, m) {
  m.impl("batch_stats", &batch_stats_cuda);
  m.impl("cross_stats", &cross_stats_cuda);
}

// ------------------------------------------------------------------------- Python module
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cuda
#endif

static struct PyModuleDef crh_cuda_module = {PyModuleDef_HEAD_INIT, CRH_STR(TORCH_EXTENSION_NAME),
                                             "crh:: ops (CUDA)", -1, nullptr};

PyMODINIT_FUNC CRH_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&crh_cuda_module);
}
