// Shared by bindings.cpp (CPU) and bindings_cuda.cpp (CUDA): the argument checks of the crh::
// ops and the macros that name each Python module after TORCH_EXTENSION_NAME.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#define CRH_STR2(x) #x
#define CRH_STR(x) CRH_STR2(x)
#define CRH_CAT2(a, b) a##b
#define CRH_CAT(a, b) CRH_CAT2(a, b)

namespace crh {
namespace binding {

// x must be 2-D (N, D >= 1), dense, float32/bfloat16/float16, on a `where` device.
inline void check_rows(const at::Tensor& x, const char* name, c10::DeviceType where) {
  TORCH_CHECK(x.dim() == 2, "crh: ", name, " must be 2-D (N, D), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) >= 1, "crh: ", name, " must have D >= 1 features, got shape ", x.sizes());
  TORCH_CHECK(x.device().type() == where, "crh: ", name, " must be a ", c10::DeviceTypeName(where),
              " tensor here, got ", x.device());
  TORCH_CHECK(x.layout() == at::kStrided, "crh: ", name, " must be a dense (strided) tensor");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "crh: ", name,
              " must be float32, bfloat16 or float16, got ", t);
}

// The mask as a contiguous bool (N,) tensor on x's device (a view costs nothing; anything else
// is one small copy), or an undefined tensor when there is none.
inline at::Tensor mask_of(const std::optional<at::Tensor>& mask, const at::Tensor& x) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, "crh: mask must be bool, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 1 && m.size(0) == x.size(0), "crh: mask must have shape (", x.size(0),
              ",), got ", m.sizes());
  TORCH_CHECK(m.device() == x.device(), "crh: mask is on ", m.device(), " but x is on ",
              x.device());
  return m.contiguous();
}

}  // namespace binding
}  // namespace crh
