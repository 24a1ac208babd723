// Element types the kernels take, shared by the CPU and CUDA modules. The
// values cross into Python as kvmux._native.DType (kvmux/ops/tensor_checks.py
// maps torch dtypes onto it), so the two sides cannot drift apart.
#pragma once

namespace kvmux {

// i8: a KV pool of int8 rows, each followed by its float16 scale (see paged_attention.h).
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2, i8 = 3 };

}  // namespace kvmux
