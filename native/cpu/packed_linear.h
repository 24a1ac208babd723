// y = x W^T (+ bias) on the CPU, x and y in float32, W in panels of float32 or bf16.
//
// A BLAS library receives W in its [N, K] storage and repacks it on every
// call, which dominates at the few rows of a decode step (see
// docs/architecture.md). The engine owns its weights, so it packs each one
// once, at load: W becomes [ceil(N / 16), K, 16], each panel holding 16 output
// features interleaved along K (zero-padded past N). The kernel then streams
// every panel once per call and keeps a 6 x 16 tile of outputs in registers.
// bf16 panels are widened to float32 as they are read: on CPUs without bf16
// arithmetic this halves the weight memory and traffic at float32 speed.
#pragma once

#include <cstdint>

namespace kvmux {

// Output features per panel: two AVX2 vectors.
constexpr int64_t kPanelWidth = 16;

// x: [M, K] with row stride ldx; packed: [ceil(N / 16), K, 16]; bias: [N] or
// nullptr; out: [M, N] with row stride ldo. Splits the panels across
// num_threads threads.
void packed_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed, int64_t N,
                       const float* bias, float* out, int64_t ldo, int num_threads);
// The same with bf16 panels (raw bits).
void packed_linear_bf16w(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* packed, int64_t N,
                         const float* bias, float* out, int64_t ldo, int num_threads);

}  // namespace kvmux
