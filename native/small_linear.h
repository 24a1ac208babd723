// y = x W^T (+ bias) for a few rows of x, in float32, on the CPU.
//
// Decode steps multiply a handful of token rows by every weight matrix of the
// model. BLAS libraries are built for large matrices: at a few rows they
// repack the weights on every call and fall far short of the memory
// bandwidth that actually bounds this case (see docs/architecture.md). This
// kernel reads W once, in its stored [N, K] layout, and keeps all rows of x
// hot in cache while it does.
#pragma once

#include <cstdint>

namespace kvmux {

// x: [M, K] with row stride ldx; w: [N, K] contiguous; bias: [N] or nullptr;
// out: [M, N] with row stride ldo. Splits N across num_threads threads.
void small_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N,
                      const float* bias, float* out, int64_t ldo, int num_threads);

}  // namespace kvmux
