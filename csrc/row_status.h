// The row status of crh_kernels: one byte per row, written by pass 1 (row statistics) of the
// CPU and CUDA kernels and read by the passes after it, and by crh::stage_rows_ /
// crh::batch_update_staged_. Same values as crh_kernels.backends.base.ROW_MASKED /
// ROW_SKIPPED / ROW_VALID (the Triton kernels write them too):
//   masked   the mask says False: the row counts nowhere;
//   skipped  a live row that cannot be used: a non-finite fp32 squared norm, or a zero norm
//            when normalizing; counted in n_skipped;
//   valid    enters the mean and the scatter.
// Plain C++ (no standard library beyond <stdint.h>): included by moments_cuda.cu, which nvcc
// compiles with CUDA headers only.
#pragma once

#include <stdint.h>

namespace crh {

enum RowStatus : uint8_t { kRowMasked = 0, kRowSkipped = 1, kRowValid = 2 };

static_assert(sizeof(RowStatus) == 1, "the row status is one byte (uint8 tensors)");

}  // namespace crh
