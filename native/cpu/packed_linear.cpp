#include "cpu/packed_linear.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace kvmux {
namespace {

constexpr int kRows = 6;  // rows of x per tile: 6 x 2 accumulators + 2 weight vectors + 1 x in 16 registers
// K per pass over a panel. A panel's slice (kc x 64 bytes) is read by every
// row tile, so it should stay near L1; long slices amortise the tile's
// load/store of its outputs. 576 measured best for SmolLM2's shapes
// (bench/linear.py; 256 lost ~15%).
constexpr int64_t kMaxKc = 576;
// Rows per pass: x's [kMr, kc] block stays in L2 while the thread's panels go by.
constexpr int64_t kMr = 96;

// out[MT, cols] (+)= x[MT, 0:kc] . panel[0:kc, 16]. Every loop over the
// accumulators is unrolled so they stay in registers; outputs pass through a
// stack tile, so a partial last panel needs no special path in the hot loop.
// `first` starts from the bias (or zero) instead of the partial sums in out;
// `next`, when set, is the next panel's slice, fetched into cache meanwhile.
inline float widen(float w) { return w; }
inline float widen(uint16_t w) {  // bf16: the top half of a float32
    const uint32_t u = static_cast<uint32_t>(w) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__AVX2__) && defined(__FMA__)
// One k of a panel: 16 weights as two float32 vectors.
inline void load_panel(const float* p, __m256& w0, __m256& w1) {
    w0 = _mm256_loadu_ps(p);
    w1 = _mm256_loadu_ps(p + 8);
}
inline void load_panel(const uint16_t* p, __m256& w0, __m256& w1) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
    w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
}
#endif

template <int MT, typename WT>
void tile(const float* x, int64_t ldx, const WT* panel, int64_t kc, float* out, int64_t ldo, int cols,
          const float* bias, bool first, const WT* next) {
    alignas(32) float sums[MT][kPanelWidth];
    if (first) {
        for (int i = 0; i < MT; ++i)
            for (int j = 0; j < kPanelWidth; ++j) sums[i][j] = bias && j < cols ? bias[j] : 0.0f;
    } else {
        if (cols < kPanelWidth) std::memset(sums, 0, sizeof sums);
        for (int i = 0; i < MT; ++i) std::memcpy(sums[i], out + i * ldo, cols * sizeof(float));
    }
#if defined(__AVX2__) && defined(__FMA__)
    __m256 c0[MT], c1[MT];
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
        c0[i] = _mm256_load_ps(sums[i]);
        c1[i] = _mm256_load_ps(sums[i] + 8);
    }
    for (int64_t k = 0; k < kc; ++k) {
        if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanelWidth), _MM_HINT_T0);
        __m256 w0, w1;
        load_panel(panel + k * kPanelWidth, w0, w1);
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) {
            const __m256 xv = _mm256_broadcast_ss(x + i * ldx + k);
            c0[i] = _mm256_fmadd_ps(xv, w0, c0[i]);
            c1[i] = _mm256_fmadd_ps(xv, w1, c1[i]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
        _mm256_store_ps(sums[i], c0[i]);
        _mm256_store_ps(sums[i] + 8, c1[i]);
    }
#else
    (void)next;
    for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < MT; ++i)
            for (int j = 0; j < kPanelWidth; ++j) sums[i][j] += x[i * ldx + k] * widen(panel[k * kPanelWidth + j]);
#endif
    for (int i = 0; i < MT; ++i) std::memcpy(out + i * ldo, sums[i], cols * sizeof(float));
}

// A tile of rows <= MT rows.
template <int MT, typename WT>
void tile_rows(int rows, const float* x, int64_t ldx, const WT* panel, int64_t kc, float* out, int64_t ldo,
               int cols, const float* bias, bool first, const WT* next) {
    if constexpr (MT == 1) {
        tile<1>(x, ldx, panel, kc, out, ldo, cols, bias, first, next);
    } else if (rows == MT) {
        tile<MT>(x, ldx, panel, kc, out, ldo, cols, bias, first, next);
    } else {
        tile_rows<MT - 1>(rows, x, ldx, panel, kc, out, ldo, cols, bias, first, next);
    }
}

#if defined(__AVX2__) && defined(__FMA__)
// A bf16 slice as float32, fetching the next slice into cache meanwhile.
void widen_slice(const uint16_t* src, int64_t n, float* dst, const uint16_t* next) {
    for (int64_t i = 0; i < n; i += kPanelWidth) {
        if (next) _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T0);
        __m256 w0, w1;
        load_panel(src + i, w0, w1);
        _mm256_storeu_ps(dst + i, w0);
        _mm256_storeu_ps(dst + i + 8, w1);
    }
}
#else
void widen_slice(const uint16_t* src, int64_t n, float* dst, const uint16_t*) {
    for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}
#endif

template <typename WT>
void run(const float* x, int64_t M, int64_t K, int64_t ldx, const WT* packed, int64_t N, const float* bias,
         float* out, int64_t ldo, int num_threads) {
    const int64_t panels = (N + kPanelWidth - 1) / kPanelWidth;
    // Even K passes: K = 1536 runs as 3 x 512 rather than 576 + 576 + 384.
    const int64_t passes = (K + kMaxKc - 1) / kMaxKc;
    const int64_t kc_max = (K + passes - 1) / passes;
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, panels)));
    // Each thread owns a contiguous run of panels, so it streams its own part of W.
#pragma omp parallel num_threads(nt)
    {
        // bf16 slices that several row tiles will read are widened once, into this buffer.
        thread_local std::vector<float> widened;
        const int t = omp_get_thread_num();
        const int64_t p0 = panels * t / nt, p1 = panels * (t + 1) / nt;
        for (int64_t m0 = 0; m0 < M; m0 += kMr) {
            const int64_t m1 = std::min(M, m0 + kMr);
            for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
                const int64_t kc = std::min(kc_max, K - k0);
                for (int64_t p = p0; p < p1; ++p) {
                    const int cols = static_cast<int>(std::min(kPanelWidth, N - p * kPanelWidth));
                    const WT* panel = packed + (p * K + k0) * kPanelWidth;
                    // The first row tile fetches the next panel's slice while it works on this one.
                    const WT* next = p + 1 < p1 ? panel + K * kPanelWidth : nullptr;
                    const float* b = bias ? bias + p * kPanelWidth : nullptr;
                    auto tiles = [&](auto* w, auto* fetch) {
                        for (int64_t m = m0; m < m1; m += kRows)
                            tile_rows<kRows>(static_cast<int>(std::min<int64_t>(kRows, m1 - m)), x + m * ldx + k0,
                                             ldx, w, kc, out + m * ldo + p * kPanelWidth, ldo, cols, b, k0 == 0,
                                             m == m0 ? fetch : nullptr);
                    };
                    if constexpr (std::is_same_v<WT, uint16_t>) {
                        if (m1 - m0 > kRows) {
                            widened.resize(kc * kPanelWidth);
                            widen_slice(panel, kc * kPanelWidth, widened.data(), next);
                            tiles(widened.data(), static_cast<const float*>(nullptr));
                            continue;
                        }
                    }
                    tiles(panel, next);
                }
            }
        }
    }
}

}  // namespace

void packed_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed, int64_t N,
                       const float* bias, float* out, int64_t ldo, int num_threads) {
    run(x, M, K, ldx, packed, N, bias, out, ldo, num_threads);
}

void packed_linear_bf16w(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* packed, int64_t N,
                         const float* bias, float* out, int64_t ldo, int num_threads) {
    run(x, M, K, ldx, packed, N, bias, out, ldo, num_threads);
}

}  // namespace kvmux
