#include "small_linear.h"

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace kvmux {
namespace {

// Output tile: MT rows of x by NT rows of W. With AVX2, 4 x 3 uses 12
// accumulators, 3 weight vectors and 1 x vector: all 16 ymm registers.
constexpr int kMaxMT = 4;
constexpr int kNT = 3;

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// Dot products of MT rows of x with NT rows of w, over all K.
template <int MT, int NT>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo,
                 const float* bias) {
    float sums[MT][NT];
    int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[MT][NT];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 wv[NT];
        for (int j = 0; j < NT; ++j) wv[j] = _mm256_loadu_ps(w + j * K + k);
        for (int i = 0; i < MT; ++i) {
            const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
            for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) sums[i][j] = hsum(acc[i][j]);
#else
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) sums[i][j] = 0.0f;
#endif
    for (; k < K; ++k)
        for (int i = 0; i < MT; ++i)
            for (int j = 0; j < NT; ++j) sums[i][j] += x[i * ldx + k] * w[j * K + k];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) out[i * ldo + j] = sums[i][j] + (bias ? bias[j] : 0.0f);
}

// All M rows against NT weight rows; the weight rows stay in L1 across the row tiles.
template <int NT>
inline void column(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float* out, int64_t ldo,
                   const float* bias) {
    int64_t m = 0;
    for (; m + kMaxMT <= M; m += kMaxMT) tile<kMaxMT, NT>(x + m * ldx, ldx, w, K, out + m * ldo, ldo, bias);
    switch (M - m) {
        case 3: tile<3, NT>(x + m * ldx, ldx, w, K, out + m * ldo, ldo, bias); break;
        case 2: tile<2, NT>(x + m * ldx, ldx, w, K, out + m * ldo, ldo, bias); break;
        case 1: tile<1, NT>(x + m * ldx, ldx, w, K, out + m * ldo, ldo, bias); break;
        default: break;
    }
}

}  // namespace

void small_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N,
                      const float* bias, float* out, int64_t ldo, int num_threads) {
    const int64_t full = N / kNT;
    // Contiguous slices of N per thread: each thread streams its own part of W.
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, full)));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < full; ++t) {
        const int64_t n = t * kNT;
        column<kNT>(x, M, K, ldx, w + n * K, out + n, ldo, bias ? bias + n : nullptr);
    }
    for (int64_t n = full * kNT; n < N; ++n)
        column<1>(x, M, K, ldx, w + n * K, out + n, ldo, bias ? bias + n : nullptr);
}

}  // namespace kvmux
