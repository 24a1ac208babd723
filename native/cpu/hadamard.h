// The orthonormal Walsh-Hadamard rotation an int8 KV row is stored in (paged_attention.h).
//
// H acts on a row of dim values in blocks of hadamard_block(dim) values (the largest power of two dividing
// dim, at most 256): in each block the fast transform's butterflies, then 1 / sqrt(block). H is symmetric and
// orthonormal, so H H = I and (H a).(H b) = a.b: a query rotated once scores rotated keys as it would the
// keys themselves, and rotating a sum of rotated values once gives the sum of the values.
//
// Rotating spreads a row's few large channels (RoPE'd K has them) over all of its channels, so the row's
// max |x| / 127 step is no longer set by one outlier. SmolLM2-135M in float32 (issue 25): each layer's attention
// output over int8 rows is off by 0.4-1.3% (relative RMS) rotated, 0.9-2.9% not; teacher-forced KL from float32
// KV 2.3e-4 against 9.4e-4.
//
// AVX2 (the extension's baseline). Included by each translation unit that rotates, inside an unnamed namespace: the AVX-512 file compiles its
// own copy with its own target flags, and no copy is shared through the linker.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace kvmux {
namespace {

inline int64_t hadamard_block(int64_t dim) {
    const int64_t b = dim & -dim;
    return b < 256 ? b : 256;
}

// One butterfly stage of span L (1, 2 or 4) inside each group of 8 lanes: lane i gets x[i] + x[i + L] where
// (i & L) == 0, else x[i - L] - x[i]: the same sums, in the same order, as the scalar loop's.
template <int L>
inline __m256 butterfly8(__m256 x) {
    const __m256i swap = _mm256_setr_epi32(0 ^ L, 1 ^ L, 2 ^ L, 3 ^ L, 4 ^ L, 5 ^ L, 6 ^ L, 7 ^ L);
    const __m256 p = _mm256_permutevar8x32_ps(x, swap);
    constexpr int upper = L == 1 ? 0xAA : L == 2 ? 0xCC : 0xF0;
    return _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), upper);
}

// x[0..dim) <- H x[0..dim), in place: stages of span 1, 2, 4, ... in that order, then the scale (kv_cache.py's
// rotate_rows does the same operations in the same order, so the int8 bytes agree).
inline void hadamard_rotate(float* x, int64_t dim) {
    const int64_t n = hadamard_block(dim);
    const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));  // as kv_cache.py's
    for (int64_t b0 = 0; b0 < dim; b0 += n) {
        float* y = x + b0;
        if (n % 8 == 0) {
            for (int64_t i = 0; i < n; i += 8)
                _mm256_storeu_ps(y + i, butterfly8<4>(butterfly8<2>(butterfly8<1>(_mm256_loadu_ps(y + i)))));
            for (int64_t len = 8; len < n; len <<= 1)
                for (int64_t i = 0; i < n; i += 2 * len)
                    for (int64_t j = i; j < i + len; j += 8) {
                        const __m256 a = _mm256_loadu_ps(y + j), b = _mm256_loadu_ps(y + j + len);
                        _mm256_storeu_ps(y + j, _mm256_add_ps(a, b));
                        _mm256_storeu_ps(y + j + len, _mm256_sub_ps(a, b));
                    }
            for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), _mm256_set1_ps(norm)));
            continue;
        }
        for (int64_t len = 1; len < n; len <<= 1)
            for (int64_t i = 0; i < n; i += 2 * len)
                for (int64_t j = i; j < i + len; ++j) {
                    const float a = y[j], b = y[j + len];
                    y[j] = a + b;
                    y[j + len] = a - b;
                }
        for (int64_t j = 0; j < n; ++j) y[j] *= norm;
    }
}

}  // namespace
}  // namespace kvmux
