// y = x W^T (+ bias) in float32 on the CPU, with W stored in panels.
//
// A BLAS library receives W in its [N, K] storage and repacks it on every
// call, which dominates at the few rows of a decode step (see
// docs/architecture.md). The engine owns its weights, so it packs each one
// once, at load: W becomes [ceil(N / 16), K, 16], each panel holding 16 output
// features interleaved along K (zero-padded past N). The kernel then streams
// every panel once per call and keeps a 6 x 16 tile of outputs in registers.
#pragma once

#include <cstdint>

namespace kvmux {

// Output features per panel: two AVX2 vectors.
constexpr int64_t kPanelWidth = 16;

// w: [N, K] contiguous -> packed: [ceil(N / 16), K, 16].
void pack_weight_f32(const float* w, int64_t N, int64_t K, float* packed);

// x: [M, K] with row stride ldx; packed: from pack_weight_f32; bias: [N] or
// nullptr; out: [M, N] with row stride ldo. Splits the panels across
// num_threads threads.
void packed_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed, int64_t N,
                       const float* bias, float* out, int64_t ldo, int num_threads);

}  // namespace kvmux
