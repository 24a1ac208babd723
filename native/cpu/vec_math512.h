// AVX-512 math shared by the attention kernels compiled for wider instruction sets.
//
// Include only after a `#pragma GCC target` that enables AVX-512F, and after vec_math.h: like it, everything
// here has internal linkage, so each file compiles its own copy with its own target flags.
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

// One attention row's online-softmax step over a chunk of 32 scores, of which it sees keys lo .. valid - 1
// (valid > lo): its running max m and sum l move on, and its output acc [D] shrinks by exp(old - new) where the
// max moved. The chunk's weights exp(s - m), 0 for keys it does not see, go to e[0..1] (16 keys each), the
// masks of the keys it sees to seen[0..1].
template <int D>
inline void softmax_chunk(const float* scores, int lo, int valid, float& m, float& l, float* acc, __m512 e[2],
                          __mmask16 seen[2]) {
    const uint32_t bits = (valid >= 32 ? ~0u : (1u << valid) - 1) & ~((1u << lo) - 1);
    seen[0] = static_cast<__mmask16>(bits);
    seen[1] = static_cast<__mmask16>(bits >> 16);
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
    const __m512 s0 = _mm512_mask_loadu_ps(ninf, seen[0], scores);
    const __m512 s1 = _mm512_mask_loadu_ps(ninf, seen[1], scores + 16);
    const float chunk_max = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
    const float mx = chunk_max > m ? chunk_max : m;
    e[0] = _mm512_maskz_mov_ps(seen[0], exp_nonpos16(_mm512_sub_ps(s0, _mm512_set1_ps(mx))));
    e[1] = _mm512_maskz_mov_ps(seen[1], exp_nonpos16(_mm512_sub_ps(s1, _mm512_set1_ps(mx))));
    if (mx > m) {
        const float corr = exp_nonpos(m - mx);
        l *= corr;
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), _mm512_set1_ps(corr)));
        m = mx;
    }
    l += _mm512_reduce_add_ps(_mm512_add_ps(e[0], e[1]));
}

}  // namespace
}  // namespace kvmux
