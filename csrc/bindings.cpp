// Torch binding of the CPU kernels: the `crh::` op schemas and their CPU implementations.
//
// Owns: TORCH_LIBRARY(crh) (the schemas every device implements), argument checks, the
// Tensor -> View translation, and the Python module init of crh_kernels._C. The fake (meta)
// kernels are registered in Python (crh_kernels/backends/cpp.py, torch.library.register_fake);
// the CUDA implementations live in bindings_cuda.cpp (a separate extension, CUDA torch only).
//
// Ops (x of shape (N, D), fp32/bf16/fp16, any strides; mask bool (N,) or None):
//   crh::batch_stats(x, mask, normalize) -> (mean f64 (D,), scatter f32 (D, D), counts i64 (2,))
//   crh::cross_stats(g, h, mask, normalize)
//       -> (mean_g f64 (Dg,), mean_h f64 (Dh,), scatter f32 (Dg, Dh), counts i64 (2,))
//   crh::batch_update_(x, mask, normalize, strict, state_counts, state_mean, state_scatter)
//       -> (mean f64 (D,), counts i64 (2,)) of the batch; CPU only: merges the batch into the
//       state in place, all of it in this one call: state_scatter (f32/f64 (D, D)), state_mean
//       (its dtype, (D,)) and state_counts (i64 (2,) = [n, n_skipped]). With strict, a batch with
//       a skipped row leaves the state untouched; a refused argument too.
//   crh::stage_rows_(x, mask, normalize, buf, scale, status, sum) -> (); CPU only: x's rows copied
//       into buf (x's shape and dtype) with pass 1 done on the way: status u8 (N,) (row_status.h:
//       0 masked, 1 skipped, 2 valid), scale f32 (N,) (< 0: a tiny row's −2^-64/||x||,
//       moments_cpu.cpp row_rule_rescue), sum f64 (D,) += Σ s_i x_i
//       (crh::batch_update_staged_ finishes the batch later)
//   crh::batch_update_staged_(x, scale, status, sum, strict, state_counts, state_mean,
//                             state_scatter) -> (mean, counts); batch_update_ of staged rows
//   crh::matmul_rows(x (N, K) f32, w (K, M) f32) -> (N, M) f32; CPU only: x·w in fp32 with the
//       covariance's inner kernels (the collector's g_a = g_b·W).
// counts = [n valid rows, n skipped rows]; scatter = Σ (x̂ − μ)(x̂ − μ)ᵀ, exactly symmetric.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <exception>
#include <optional>
#include <tuple>

#include "bindings_common.h"
#include "moments_cpu.h"

namespace {

using crh::cpu::DType;

using crh::binding::check_rows;
using crh::binding::mask_of;

DType dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: return DType::F32;  // check_rows admitted only these three
  }
}

crh::cpu::View view_of(const at::Tensor& x) {
  return {x.data_ptr(), dtype_code(x), x.size(0), x.size(1), x.stride(0), x.stride(1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_stats_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& mask, bool normalize) {
  check_rows(x, "x", c10::DeviceType::CPU);
  const int64_t d = x.size(1);
  const at::Tensor m = mask_of(mask, x);
  auto opts = x.options();
  at::Tensor mean = at::empty({d}, opts.dtype(at::kDouble));
  at::Tensor scatter = at::empty({d, d}, opts.dtype(at::kFloat));
  at::Tensor counts = at::empty({2}, opts.dtype(at::kLong));
  crh::cpu::Counts c{0, 0};
  try {
    c = crh::cpu::batch_stats(view_of(x), m.defined() ? m.data_ptr<bool>() : nullptr,
                              normalize, at::get_num_threads(), mean.data_ptr<double>(),
                              scatter.data_ptr<float>());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "crh::batch_stats: ", e.what());
  }
  counts.data_ptr<int64_t>()[0] = c.n;
  counts.data_ptr<int64_t>()[1] = c.n_skipped;
  return {mean, scatter, counts};
}

// The state is checked here, before anything runs: a bad state is an error, not a corrupted one.
crh::cpu::State state_of(const char* op, int64_t d, at::Tensor& state_counts,
                         at::Tensor& state_mean, at::Tensor& state_scatter) {
  const auto st = state_scatter.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              op, ": state_scatter must be float32 or float64, got ", st);
  TORCH_CHECK(state_mean.scalar_type() == st, op, ": state_mean must have the "
              "dtype of state_scatter (", st, "), got ", state_mean.scalar_type());
  TORCH_CHECK(state_scatter.device().is_cpu() && state_mean.device().is_cpu(),
              op, ": the state must be on the CPU");
  TORCH_CHECK(state_scatter.dim() == 2 && state_scatter.size(0) == d && state_scatter.size(1) == d
                  && state_scatter.is_contiguous(),
              op, ": state_scatter must be a contiguous (", d, ", ", d, ") tensor, got ",
              state_scatter.sizes());
  TORCH_CHECK(state_mean.dim() == 1 && state_mean.size(0) == d && state_mean.is_contiguous(),
              op, ": state_mean must be a contiguous (", d, ",) tensor, got ", state_mean.sizes());
  TORCH_CHECK(state_counts.scalar_type() == at::kLong && state_counts.device().is_cpu()
                  && state_counts.dim() == 1 && state_counts.size(0) == 2
                  && state_counts.is_contiguous(),
              op, ": state_counts must be a contiguous int64 CPU tensor of shape (2,), got ",
              state_counts.scalar_type(), " ", state_counts.sizes());
  int64_t* counts = state_counts.data_ptr<int64_t>();
  TORCH_CHECK(counts[0] >= 0 && counts[1] >= 0, op, ": state_counts must be >= 0, got [",
              counts[0], ", ", counts[1], "]");
  return {st == at::kDouble, counts, state_mean.data_ptr(), state_scatter.data_ptr()};
}

// The common end of the two update ops: the batch mean (D,) f64 and counts [n, n_skipped],
// with run(mean) -> Counts calling the kernel; its errors carry the op's name.
template <class Run>
std::tuple<at::Tensor, at::Tensor> update_outputs(const char* op, const at::Tensor& x, Run&& run) {
  auto opts = x.options();
  at::Tensor mean = at::empty({x.size(1)}, opts.dtype(at::kDouble));
  at::Tensor counts = at::empty({2}, opts.dtype(at::kLong));
  crh::cpu::Counts c{0, 0};
  try {
    c = run(mean.data_ptr<double>());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
  counts.data_ptr<int64_t>()[0] = c.n;
  counts.data_ptr<int64_t>()[1] = c.n_skipped;
  return {mean, counts};
}

std::tuple<at::Tensor, at::Tensor> batch_update_cpu(const at::Tensor& x,
                                                    const std::optional<at::Tensor>& mask,
                                                    bool normalize, bool strict,
                                                    at::Tensor& state_counts,
                                                    at::Tensor& state_mean,
                                                    at::Tensor& state_scatter) {
  check_rows(x, "x", c10::DeviceType::CPU);
  const int64_t d = x.size(1);
  const at::Tensor m = mask_of(mask, x);
  const crh::cpu::State state =
      state_of("crh::batch_update_", d, state_counts, state_mean, state_scatter);
  return update_outputs("crh::batch_update_", x, [&](double* mean) {
    return crh::cpu::batch_update(view_of(x), m.defined() ? m.data_ptr<bool>() : nullptr,
                                  normalize, at::get_num_threads(), strict, state, mean);
  });
}

// Row statistics of a staged block: scale f32 (R,), status u8 (R,), sum f64 (D,), all contiguous.
void check_staged(const char* op, const at::Tensor& x, const at::Tensor& scale,
                  const at::Tensor& status, const at::Tensor& sum) {
  const int64_t r = x.size(0), d = x.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == r
                  && scale.is_contiguous() && scale.device().is_cpu(),
              op, ": scale must be a contiguous float32 CPU tensor of shape (", r, ",), got ",
              scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(status.scalar_type() == at::kByte && status.dim() == 1 && status.size(0) == r
                  && status.is_contiguous() && status.device().is_cpu(),
              op, ": status must be a contiguous uint8 CPU tensor of shape (", r, ",), got ",
              status.scalar_type(), " ", status.sizes());
  TORCH_CHECK(sum.scalar_type() == at::kDouble && sum.dim() == 1 && sum.size(0) == d
                  && sum.is_contiguous() && sum.device().is_cpu(),
              op, ": sum must be a contiguous float64 CPU tensor of shape (", d, ",), got ",
              sum.scalar_type(), " ", sum.sizes());
}

void stage_rows_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, bool normalize,
                    at::Tensor& buf, at::Tensor& scale, at::Tensor& status, at::Tensor& sum) {
  check_rows(x, "x", c10::DeviceType::CPU);
  const at::Tensor m = mask_of(mask, x);
  TORCH_CHECK(buf.scalar_type() == x.scalar_type() && buf.device().is_cpu() && buf.dim() == 2
                  && buf.size(0) == x.size(0) && buf.size(1) == x.size(1)
                  && (buf.stride(1) == 1 || buf.size(1) == 1),
              "crh::stage_rows_: buf must be a ", x.scalar_type(), " CPU tensor of shape (",
              x.size(0), ", ", x.size(1), ") with unit column stride, got ", buf.scalar_type(),
              " ", buf.sizes(), " strides ", buf.strides());
  check_staged("crh::stage_rows_", x, scale, status, sum);
  try {
    crh::cpu::stage_rows(view_of(x), m.defined() ? m.data_ptr<bool>() : nullptr, normalize,
                         at::get_num_threads(), buf.data_ptr(), buf.stride(0),
                         scale.data_ptr<float>(), status.data_ptr<uint8_t>(),
                         sum.data_ptr<double>());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "crh::stage_rows_: ", e.what());
  }
}

std::tuple<at::Tensor, at::Tensor> batch_update_staged_cpu(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& status, const at::Tensor& sum,
    bool strict, at::Tensor& state_counts, at::Tensor& state_mean, at::Tensor& state_scatter) {
  check_rows(x, "x", c10::DeviceType::CPU);
  check_staged("crh::batch_update_staged_", x, scale, status, sum);
  const int64_t d = x.size(1);
  const crh::cpu::State state =
      state_of("crh::batch_update_staged_", d, state_counts, state_mean, state_scatter);
  return update_outputs("crh::batch_update_staged_", x, [&](double* mean) {
    return crh::cpu::batch_update_staged(view_of(x), scale.data_ptr<float>(),
                                         status.data_ptr<uint8_t>(), sum.data_ptr<double>(),
                                         at::get_num_threads(), strict, state, mean);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_stats_cpu(
    const at::Tensor& g, const at::Tensor& h, const std::optional<at::Tensor>& mask,
    bool normalize) {
  check_rows(g, "g", c10::DeviceType::CPU);
  check_rows(h, "h", c10::DeviceType::CPU);
  TORCH_CHECK(g.size(0) == h.size(0), "crh: g and h must have the same number of rows, got ",
              g.sizes(), " and ", h.sizes());
  const int64_t dg = g.size(1), dh = h.size(1);
  const at::Tensor m = mask_of(mask, g);
  auto opts = g.options();
  at::Tensor mean_g = at::empty({dg}, opts.dtype(at::kDouble));
  at::Tensor mean_h = at::empty({dh}, opts.dtype(at::kDouble));
  at::Tensor scatter = at::empty({dg, dh}, opts.dtype(at::kFloat));
  at::Tensor counts = at::empty({2}, opts.dtype(at::kLong));
  crh::cpu::Counts c{0, 0};
  try {
    c = crh::cpu::cross_stats(view_of(g), view_of(h),
                              m.defined() ? m.data_ptr<bool>() : nullptr, normalize,
                              at::get_num_threads(), mean_g.data_ptr<double>(),
                              mean_h.data_ptr<double>(), scatter.data_ptr<float>());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "crh::cross_stats: ", e.what());
  }
  counts.data_ptr<int64_t>()[0] = c.n;
  counts.data_ptr<int64_t>()[1] = c.n_skipped;
  return {mean_g, mean_h, scatter, counts};
}

// x (N, K) · w (K, M), both float32 on the CPU, any strides: a new contiguous (N, M) float32.
at::Tensor matmul_rows_cpu(const at::Tensor& x, const at::Tensor& w) {
  check_rows(x, "x", c10::DeviceType::CPU);
  check_rows(w, "w", c10::DeviceType::CPU);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "crh::matmul_rows: x and w must be float32, got ", x.scalar_type(), " and ",
              w.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(0), "crh::matmul_rows: w must have ", x.size(1),
              " rows (x's columns), got shape ", w.sizes());
  at::Tensor out = at::empty({x.size(0), w.size(1)}, x.options());
  try {
    crh::cpu::matmul_rows(view_of(x), view_of(w), at::get_num_threads(), out.data_ptr<float>());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "crh::matmul_rows: ", e.what());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(crh, m) {
  m.def("batch_stats(Tensor x, Tensor? mask, bool normalize) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // CPU only: the batch merged into a running (counts, mean, scatter) in place, in one call
  m.def(
      "batch_update_(Tensor x, Tensor? mask, bool normalize, bool strict, "
      "Tensor(a!) state_counts, Tensor(b!) state_mean, Tensor(c!) state_scatter) "
      "-> (Tensor, Tensor)");
  m.def(
      "cross_stats(Tensor g, Tensor h, Tensor? mask, bool normalize) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // CPU only: pass 1 while staging rows for a later batch_update_staged_
  m.def(
      "stage_rows_(Tensor x, Tensor? mask, bool normalize, Tensor(a!) buf, Tensor(b!) scale, "
      "Tensor(c!) status, Tensor(d!) sum) -> ()");
  m.def(
      "batch_update_staged_(Tensor x, Tensor scale, Tensor status, Tensor sum, bool strict, "
      "Tensor(a!) state_counts, Tensor(b!) state_mean, Tensor(c!) state_scatter) "
      "-> (Tensor, Tensor)");
  // CPU only: rows times a matrix with the covariance's inner kernels (g_a = g_b·W)
  m.def("matmul_rows(Tensor x, Tensor w) -> Tensor", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(crh, CPU, m) {
  m.impl("batch_stats", &batch_stats_cpu);
  m.impl("batch_update_", &batch_update_cpu);
  m.impl("cross_stats", &cross_stats_cpu);
  m.impl("matmul_rows", &matmul_rows_cpu);
  m.impl("stage_rows_", &stage_rows_cpu);
  m.impl("batch_update_staged_", &batch_update_staged_cpu);
}

// ------------------------------------------------------------------------- Python module
// Importing the module loads the op registrations above; cpu_isa() says which inner kernel
// this machine runs ("avx512" or "generic").
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

static PyObject* crh_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(crh::cpu::isa());
}

static PyMethodDef crh_methods[] = {
    {"cpu_isa", crh_cpu_isa, METH_NOARGS, "Inner kernel of this machine: 'avx512' or 'generic'."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef crh_module = {PyModuleDef_HEAD_INIT, CRH_STR(TORCH_EXTENSION_NAME),
                                        "crh:: ops (CPU)", -1, crh_methods};

PyMODINIT_FUNC CRH_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&crh_module); }
