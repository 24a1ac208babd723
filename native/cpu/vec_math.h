// Vectorisable math shared by the CPU kernels.
//
// Internal linkage and builtins only: kernels compiled for wider instruction
// sets (target pragmas) include this too, and a shared inline definition could
// otherwise be emitted there with those instructions and chosen by the linker
// for the baseline build's callers.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvmux {
namespace {

// exp for x <= 0 (softmax scores minus their max, -|x| in a sigmoid),
// written so the compiler vectorises it: Cody-Waite range reduction plus the
// Cephes polynomial, ~1 ulp. libm's scalar expf would cost more than the
// arithmetic around it.
inline float exp_nonpos(float x) {
    x = x > -87.0f ? x : -87.0f;  // below this 2^n underflows; the weight is ~0 anyway
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

// x * sigmoid(x), through exp of -|x| so that it never overflows.
inline float silu(float x) {
    const float e = exp_nonpos(-__builtin_fabsf(x));
    const float r = 1.0f / (1.0f + e);  // one division for both signs, so the loop stays branch-free and vectorises
    return x * (x >= 0.0f ? r : e * r);
}

// GELU's tanh approximation (torch's gelu(approximate="tanh"), Gemma's activation): 0.5 x (1 + tanh(u)) with
// u = sqrt(2 / pi) (x + 0.044715 x^3), which is x * sigmoid(2u): computed as silu is, through exp of -|2u|, so
// neither tail overflows nor loses its digits to 1 - tanh(|u|).
inline float gelu_tanh(float x) {
    const float u2 = 1.5957691216057308f * (x + 0.044715f * x * x * x);
    const float e = exp_nonpos(-__builtin_fabsf(u2));
    const float r = 1.0f / (1.0f + e);
    return x * (u2 >= 0.0f ? r : e * r);
}

}  // namespace
}  // namespace kvmux
