// Fused float32 element-wise steps of a Llama or Gemma 3 layer, on the CPU.
//
// Each replaces a chain of torch operators that would each make a pass over
// the activations and pay a dispatch: RMSNorm (with the residual add folded
// in, or per head), rotary embedding of q and k in place, and the gated MLP's
// silu(gate) * up or gelu(gate) * up.
// Rows are split across threads; all pointers are float32.
#pragma once

#include <cstdint>

namespace kvmux {

// out[t] = x[t] / rms(x[t]) * weight. x has row stride ldx; out is [T, H] contiguous.
void rms_norm_f32(const float* x, int64_t T, int64_t H, int64_t ldx, const float* weight, float eps, float* out,
                  int num_threads);

// residual[t] += x[t]; out[t] = rms_norm(residual[t]). x, residual, out: [T, H] contiguous.
void add_rms_norm_f32(const float* x, float* residual, int64_t T, int64_t H, const float* weight, float eps,
                      float* out, int num_threads);

// Rotates the first `heads` heads of each row in place, Hugging Face's
// half-split layout: (a, b) -> (a cos - b sin, b cos + a sin) with a, b the
// two halves of a head. rows: [T, ld]; cos, sin: [T, dim / 2].
void rope_f32(float* rows, int64_t T, int64_t ld, int64_t heads, int64_t dim, const float* cos, const float* sin,
              int num_threads);

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i]. gate_up: [T, 2I]; out: [T, I].
void silu_mul_f32(const float* gate_up, int64_t T, int64_t I, float* out, int num_threads);

// The same with GELU's tanh approximation (Gemma's MLP) for silu.
void gelu_tanh_mul_f32(const float* gate_up, int64_t T, int64_t I, float* out, int num_threads);

// RMSNorm per head, in place, of the first `heads` heads of each row (Gemma's q and k norms): rows [T, ld], each
// head `dim` floats, one weight [dim] for every head.
void head_rms_norm_f32(float* rows, int64_t T, int64_t ld, int64_t heads, int64_t dim, const float* weight,
                       float eps, int num_threads);

// x[t] += y[t], both [T, H] contiguous: a sublayer's normed output joining Gemma's residual stream.
void add_f32(float* x, const float* y, int64_t T, int64_t H, int num_threads);

}  // namespace kvmux
