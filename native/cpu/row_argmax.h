// The greedy sampler's pass over a step's logits: each row's argmax.
//
// Why native: torch's max over rows runs on one thread (the engine gives torch one; the kernels have the pool)
// and at about 4 GB/s, and Gemma 3's 262,144-token vocabulary makes 64 rows of logits 67 MB: 16 ms of a
// 150 ms decode step. Here chunks of rows are reduced on the pool, vectorised.
#pragma once

#include <cstdint>

namespace kvmux {

// out[r] = the index of row r's largest element, the first one on ties; a NaN beats every number, as in
// torch's max (the first NaN). x: [rows, cols] with row stride ld, float32; cols >= 1.
void row_argmax_f32(const float* x, int64_t rows, int64_t cols, int64_t ld, int64_t* out, int num_threads);

}  // namespace kvmux
