#include "packed_linear.h"

#include <algorithm>
#include <cstring>

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
template <int MT>
void tile(const float* x, int64_t ldx, const float* panel, int64_t kc, float* out, int64_t ldo, int cols,
          const float* bias, bool first, const float* next) {
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
        const __m256 w0 = _mm256_loadu_ps(panel + k * kPanelWidth);
        const __m256 w1 = _mm256_loadu_ps(panel + k * kPanelWidth + 8);
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
            for (int j = 0; j < kPanelWidth; ++j) sums[i][j] += x[i * ldx + k] * panel[k * kPanelWidth + j];
#endif
    for (int i = 0; i < MT; ++i) std::memcpy(out + i * ldo, sums[i], cols * sizeof(float));
}

// A tile of rows <= MT rows.
template <int MT>
void tile_rows(int rows, const float* x, int64_t ldx, const float* panel, int64_t kc, float* out, int64_t ldo,
               int cols, const float* bias, bool first, const float* next) {
    if constexpr (MT == 1) {
        tile<1>(x, ldx, panel, kc, out, ldo, cols, bias, first, next);
    } else if (rows == MT) {
        tile<MT>(x, ldx, panel, kc, out, ldo, cols, bias, first, next);
    } else {
        tile_rows<MT - 1>(rows, x, ldx, panel, kc, out, ldo, cols, bias, first, next);
    }
}

}  // namespace

void pack_weight_f32(const float* w, int64_t N, int64_t K, float* packed) {
    const int64_t panels = (N + kPanelWidth - 1) / kPanelWidth;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < kPanelWidth; ++j) {
                const int64_t n = p * kPanelWidth + j;
                packed[(p * K + k) * kPanelWidth + j] = n < N ? w[n * K + k] : 0.0f;
            }
}

void packed_linear_f32(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed, int64_t N,
                       const float* bias, float* out, int64_t ldo, int num_threads) {
    const int64_t panels = (N + kPanelWidth - 1) / kPanelWidth;
    // Even K passes: K = 1536 runs as 3 x 512 rather than 576 + 576 + 384.
    const int64_t passes = (K + kMaxKc - 1) / kMaxKc;
    const int64_t kc_max = (K + passes - 1) / passes;
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, panels)));
    // Each thread owns a contiguous run of panels, so it streams its own part of W.
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num();
        const int64_t p0 = panels * t / nt, p1 = panels * (t + 1) / nt;
        for (int64_t m0 = 0; m0 < M; m0 += kMr) {
            const int64_t m1 = std::min(M, m0 + kMr);
            for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
                const int64_t kc = std::min(kc_max, K - k0);
                for (int64_t p = p0; p < p1; ++p) {
                    const int cols = static_cast<int>(std::min(kPanelWidth, N - p * kPanelWidth));
                    const float* panel = packed + (p * K + k0) * kPanelWidth;
                    // The first row tile fetches the next panel's slice while it works on this one.
                    const float* next = p + 1 < p1 ? panel + K * kPanelWidth : nullptr;
                    for (int64_t m = m0; m < m1; m += kRows)
                        tile_rows<kRows>(static_cast<int>(std::min<int64_t>(kRows, m1 - m)), x + m * ldx + k0, ldx,
                                         panel, kc, out + m * ldo + p * kPanelWidth, ldo, cols,
                                         bias ? bias + p * kPanelWidth : nullptr, k0 == 0, m == m0 ? next : nullptr);
                }
            }
        }
    }
}

}  // namespace kvmux
