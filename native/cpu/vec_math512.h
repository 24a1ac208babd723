// AVX-512 math shared by the attention kernels compiled for wider instruction sets.
//
// Include only after a `#pragma GCC target` that enables AVX-512F: like vec_math.h, everything here has
// internal linkage, so each file compiles its own copy with its own target flags.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace kvmux {
namespace {

inline float bits_to_float(uint16_t b) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

// Round to nearest even, as _mm512_cvtne2ps_pbh does (and torch's .to(torch.bfloat16)).
inline uint16_t float_to_bits(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// exp_nonpos (vec_math.h) on 16 lanes at once: the same range reduction and polynomial.
inline __m512 exp_nonpos16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                                          _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    constexpr float kPoly[] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                               5.0000001201e-1f};
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    for (const float c : kPoly) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

}  // namespace
}  // namespace kvmux
