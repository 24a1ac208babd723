#include "small_linear.h"

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace kvmux {
namespace {

// W is walked in blocks of rows small enough to stay in L2 while every tile
// of x rows passes over them, so W comes from memory once per call.
constexpr int64_t kBlockBytes = 96 * 1024;

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

// A tile of `rows` <= MT rows of x against NT rows of W.
template <int MT, int NT>
inline void tile_rows(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo,
                      const float* bias) {
    if constexpr (MT == 1) {
        tile<1, NT>(x, ldx, w, K, out, ldo, bias);
    } else if (rows == MT) {
        tile<MT, NT>(x, ldx, w, K, out, ldo, bias);
    } else {
        tile_rows<MT - 1, NT>(rows, x, ldx, w, K, out, ldo, bias);
    }
}

// Output tiles of MT x NT: 12 accumulators either way (with AVX2, plus the
// NT weight vectors and one x vector, within the 16 ymm registers).
template <int MT, int NT>
void blocked(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N, const float* bias,
             float* out, int64_t ldo, int num_threads) {
    const int64_t block_rows =
        std::max<int64_t>(NT, kBlockBytes / (K * static_cast<int64_t>(sizeof(float))) / NT * NT);
    const int64_t blocks = (N + block_rows - 1) / block_rows;
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks)));
    // Contiguous runs of blocks per thread: each thread streams its own part of W.
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * block_rows, n1 = std::min(N, n0 + block_rows);
        for (int64_t m = 0; m < M; m += MT) {
            const int64_t rows = std::min<int64_t>(MT, M - m);
            const float* xm = x + m * ldx;
            float* om = out + m * ldo;
            int64_t n = n0;
            for (; n + NT <= n1; n += NT)
                tile_rows<MT, NT>(rows, xm, ldx, w + n * K, K, om + n, ldo, bias ? bias + n : nullptr);
            for (; n < n1; ++n) tile_rows<MT, 1>(rows, xm, ldx, w + n * K, K, om + n, ldo, bias ? bias + n : nullptr);
        }
    }
}

}  // namespace

void small_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, int64_t N,
                      const float* bias, float* out, int64_t ldo, int num_threads) {
    // Few rows: 4 x 3 tiles load 7 vectors per 12 FMAs. More rows: 6 x 2
    // tiles load fewer x vectors per FMA, which is what runs out as M grows
    // (measured with bench/linear.py: 4 x 3 is faster up to 16 rows, 6 x 2 from 32).
    if (M <= 16)
        blocked<4, 3>(x, M, K, ldx, w, N, bias, out, ldo, num_threads);
    else
        blocked<6, 2>(x, M, K, ldx, w, N, bias, out, ldo, num_threads);
}

}  // namespace kvmux
