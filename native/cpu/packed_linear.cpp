#include "cpu/packed_linear.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"

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

// A bf16 panel row: 16 features x 2 consecutive k as 32-bit words (k even in the low half, k + 1 in the high).
struct Bf16Pair {
    uint16_t bits[2 * kPanelWidth];
};

inline float bf16_to_float(uint16_t w) {  // bf16 is the top half of a float32
    const uint32_t u = static_cast<uint32_t>(w) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__AVX2__) && defined(__FMA__)
// 16 bf16 pairs as four float32 vectors: features 0-7 and 8-15 at k (even) and k + 1 (odd).
inline void widen_pairs(const uint16_t* p, __m256& e0, __m256& e1, __m256& o0, __m256& o1) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    e0 = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
    e1 = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
    o0 = _mm256_castsi256_ps(_mm256_and_si256(a, hi));
    o1 = _mm256_castsi256_ps(_mm256_and_si256(b, hi));
}
#endif

// The tile's partial sums start from the bias (or zero) on the first K pass and from out on later ones, and
// pass through a stack tile, so a partial last panel needs no special path in the hot loop.
template <int MT>
struct Sums {
    alignas(32) float v[MT][kPanelWidth];

    Sums(const float* out, int64_t ldo, int cols, const float* bias, bool first) {
        if (first) {
            for (int i = 0; i < MT; ++i)
                for (int j = 0; j < kPanelWidth; ++j) v[i][j] = bias && j < cols ? bias[j] : 0.0f;
        } else {
            if (cols < kPanelWidth) std::memset(v, 0, sizeof v);
            for (int i = 0; i < MT; ++i) std::memcpy(v[i], out + i * ldo, cols * sizeof(float));
        }
    }
    void store(float* out, int64_t ldo, int cols) const {
        for (int i = 0; i < MT; ++i) std::memcpy(out + i * ldo, v[i], cols * sizeof(float));
    }
#if defined(__AVX2__) && defined(__FMA__)
    // The tile as 2 x MT accumulators (features 0-7, 8-15 of each row), and back.
    void to_registers(__m256* c0, __m256* c1) const {
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) {
            c0[i] = _mm256_load_ps(v[i]);
            c1[i] = _mm256_load_ps(v[i] + 8);
        }
    }
    void from_registers(const __m256* c0, const __m256* c1) {
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) {
            _mm256_store_ps(v[i], c0[i]);
            _mm256_store_ps(v[i] + 8, c1[i]);
        }
    }
#endif
};

// Weight (k, feature j) of a panel slice, for the scalar fallback.
inline float weight_at(const float* panel, int64_t k, int j) { return panel[k * kPanelWidth + j]; }
inline float weight_at(const Bf16Pair* panel, int64_t k, int j) { return bf16_to_float(panel[k / 2].bits[2 * j + k % 2]); }

#if defined(__AVX2__) && defined(__FMA__)
// c[i] += x[i][k] * (w0 | w1) for the tile's rows.
template <int MT>
inline void fma_rows(__m256* c0, __m256* c1, const float* x, int64_t ldx, int64_t k, __m256 w0, __m256 w1) {
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
        const __m256 xv = _mm256_broadcast_ss(x + i * ldx + k);
        c0[i] = _mm256_fmadd_ps(xv, w0, c0[i]);
        c1[i] = _mm256_fmadd_ps(xv, w1, c1[i]);
    }
}
#endif

// out[MT, cols] (+)= x[MT, 0:kc] . W[0:kc, 16] for a panel slice: float32 rows of 16 features, or bf16 pair
// rows (kc / 2 of them from an even k0) widened as they are read, for the few rows of a decode step where the
// weights' traffic is the bound. Every loop over the accumulators is unrolled so they stay in registers;
// `next`, when set, is the next panel's slice, fetched meanwhile.
template <int MT, typename WT>
void tile(const float* x, int64_t ldx, const WT* panel, int64_t kc, float* out, int64_t ldo, int cols,
          const float* bias, bool first, const WT* next) {
    Sums<MT> s(out, ldo, cols, bias, first);
#if defined(__AVX2__) && defined(__FMA__)
    __m256 c0[MT], c1[MT];
    s.to_registers(c0, c1);
    if constexpr (std::is_same_v<WT, float>) {
        for (int64_t k = 0; k < kc; ++k) {
            if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanelWidth), _MM_HINT_T0);
            fma_rows<MT>(c0, c1, x, ldx, k, _mm256_loadu_ps(panel + k * kPanelWidth),
                         _mm256_loadu_ps(panel + k * kPanelWidth + 8));
        }
    } else {
        for (int64_t q = 0; q < (kc + 1) / 2; ++q) {
            if (next) _mm_prefetch(reinterpret_cast<const char*>(next + q), _MM_HINT_T0);
            __m256 e0, e1, o0, o1;
            widen_pairs(panel[q].bits, e0, e1, o0, o1);
            fma_rows<MT>(c0, c1, x, ldx, 2 * q, e0, e1);
            if (2 * q + 1 < kc) fma_rows<MT>(c0, c1, x, ldx, 2 * q + 1, o0, o1);  // an odd K's last pair: one k
        }
    }
    s.from_registers(c0, c1);
#else
    (void)next;
    for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < MT; ++i)
            for (int j = 0; j < kPanelWidth; ++j) s.v[i][j] += x[i * ldx + k] * weight_at(panel, k, j);
#endif
    s.store(out, ldo, cols);
}

// A tile of rows <= MT rows.
template <int MT, typename WT>
void tile_rows(int rows, const float* x, int64_t ldx, const WT* panel, int64_t kc, float* out, int64_t ldo,
               int cols, const float* bias, bool first, const WT* next) {
    if constexpr (MT == 1) {
        tile<1, WT>(x, ldx, panel, kc, out, ldo, cols, bias, first, next);
    } else if (rows == MT) {
        tile<MT, WT>(x, ldx, panel, kc, out, ldo, cols, bias, first, next);
    } else {
        tile_rows<MT - 1>(rows, x, ldx, panel, kc, out, ldo, cols, bias, first, next);
    }
}

// A bf16 slice of `kc` k as float32 [kc, 16], fetching the next slice into cache meanwhile.
void widen_slice(const Bf16Pair* src, int64_t kc, float* dst, const Bf16Pair* next) {
    for (int64_t q = 0; q < (kc + 1) / 2; ++q) {
        float* d = dst + 2 * q * kPanelWidth;
#if defined(__AVX2__) && defined(__FMA__)
        if (next) _mm_prefetch(reinterpret_cast<const char*>(next + q), _MM_HINT_T0);
        __m256 e0, e1, o0, o1;
        widen_pairs(src[q].bits, e0, e1, o0, o1);
        _mm256_storeu_ps(d, e0);
        _mm256_storeu_ps(d + 8, e1);
        _mm256_storeu_ps(d + 16, o0);
        _mm256_storeu_ps(d + 24, o1);
#else
        (void)next;
        for (int j = 0; j < kPanelWidth; ++j) {
            d[j] = bf16_to_float(src[q].bits[2 * j]);
            d[kPanelWidth + j] = bf16_to_float(src[q].bits[2 * j + 1]);
        }
#endif
    }
}

// WT = float: [P, K, 16] panels; WT = Bf16Pair: [P, Kp / 2] pair rows per panel.
template <typename WT>
void run(const float* x, int64_t M, int64_t K, int64_t ldx, const WT* packed, int64_t N, const float* bias,
         float* out, int64_t ldo, int num_threads) {
    constexpr bool kBf16 = std::is_same_v<WT, Bf16Pair>;
    const int64_t panels = (N + kPanelWidth - 1) / kPanelWidth;
    // Panel rows (a k, or a pair of k) per panel, and k per panel row.
    const int64_t panel_rows = kBf16 ? bf16_padded_k(K) / 2 : K;
    constexpr int64_t kPerRow = kBf16 ? 2 : 1;
    // Even K passes: K = 1536 runs as 3 x 512 rather than 576 + 576 + 384; bf16 passes start on a pair.
    const int64_t passes = (K + kMaxKc - 1) / kMaxKc;
    const int64_t kc_max = ((K + passes - 1) / passes + kPerRow - 1) / kPerRow * kPerRow;
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, panels)));
    // Each task is a contiguous run of panels, so whoever takes it streams that part of W.
    const int64_t tasks = task_count(panels, nt, 2);
    parallel_for(tasks, nt, [&](int64_t task) {
        // bf16 slices that several row tiles will read are widened once, into this buffer.
        thread_local std::vector<float> widened;
        const Span own = split(panels, tasks, task);
        const int64_t p0 = own.begin, p1 = own.end;
        for (int64_t m0 = 0; m0 < M; m0 += kMr) {
            const int64_t m1 = std::min(M, m0 + kMr);
            for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
                const int64_t kc = std::min(kc_max, K - k0);
                for (int64_t p = p0; p < p1; ++p) {
                    const int cols = static_cast<int>(std::min(kPanelWidth, N - p * kPanelWidth));
                    const WT* panel = packed + p * panel_rows * (kBf16 ? 1 : kPanelWidth) +
                                      (kBf16 ? k0 / 2 : k0 * kPanelWidth);
                    // The first row tile fetches the next panel's slice while it works on this one.
                    const WT* next = p + 1 < p1 ? panel + panel_rows * (kBf16 ? 1 : kPanelWidth) : nullptr;
                    const float* b = bias ? bias + p * kPanelWidth : nullptr;
                    auto tiles = [&](auto* w, auto* fetch) {
                        for (int64_t m = m0; m < m1; m += kRows)
                            tile_rows<kRows>(static_cast<int>(std::min<int64_t>(kRows, m1 - m)), x + m * ldx + k0,
                                             ldx, w, kc, out + m * ldo + p * kPanelWidth, ldo, cols, b, k0 == 0,
                                             m == m0 ? fetch : nullptr);
                    };
                    if constexpr (kBf16) {
                        if (m1 - m0 > kRows) {
                            widened.resize((kc + 1) / 2 * 2 * kPanelWidth);
                            widen_slice(panel, kc, widened.data(), next);
                            tiles(widened.data(), static_cast<const float*>(nullptr));
                            continue;
                        }
                    }
                    tiles(panel, next);
                }
            }
        }
    });
}

[[noreturn]] void fail(const std::string& what) { throw LinearError(what); }

}  // namespace

bool linear_kernel_supported(LinearKernel kernel) {
    const CpuFeatures& f = cpu_features();
    const bool avx512 = KVMUX_WIDE_KERNELS && f.avx512f && f.avx512bw && f.avx512vl;
    switch (kernel) {
        case LinearKernel::f32_avx2:
        case LinearKernel::bf16_widen_avx2:
            return f.avx2 && f.fma;
        case LinearKernel::bf16_avx512:
            return avx512 && f.avx512bf16;
        case LinearKernel::bf16_amx:
            return avx512 && f.avx512bf16 && f.amx_tile && f.amx_bf16;
    }
    return false;
}

uint16_t* bf16_x_buffer(int64_t M, int64_t K) {
    thread_local std::vector<uint16_t> xb;
    xb.resize((M + 15) / 16 * 16 * bf16_padded_k(K));
    return xb.data();
}

uint16_t* bf16_chunk_buffer(int64_t elems) {
    struct Free {
        void operator()(uint16_t* p) const { std::free(p); }
    };
    // 64-byte aligned: a std::vector's data sat 16 bytes past a page, so every 64-byte B row and store of the
    // dequantizer straddled two cache lines, and amx_bf16 ran 1.3-1.4x slower (Q4_K 8192 x 2048 at 256 rows,
    // 6.30 ms against 4.39).
    thread_local std::unique_ptr<uint16_t[], Free> buffer;
    thread_local int64_t capacity = 0;
    if (elems > capacity) {
        buffer.reset(static_cast<uint16_t*>(std::aligned_alloc(64, (elems * sizeof(uint16_t) + 63) / 64 * 64)));
        if (!buffer) throw std::bad_alloc();  // a few hundred KB: the process is out of memory anyway
        capacity = elems;
    }
    return buffer.get();
}

void packed_linear(LinearKernel kernel, const float* x, int64_t M, int64_t K, int64_t ldx, const void* packed,
                   int64_t N, const float* bias, float* out, int64_t ldo, int num_threads) {
    if (M < 0 || K < 1 || N < 1) fail("packed_linear: need rows >= 0 and in/out features >= 1");
    if (M > 1 && ldx < K) fail("packed_linear: x's row stride is smaller than a row");
    if (M > 1 && ldo < N) fail("packed_linear: out's row stride is smaller than a row");
    if (!linear_kernel_supported(kernel))
        fail("packed_linear: kernel " + std::to_string(static_cast<int>(kernel)) +
             " needs instruction sets this CPU lacks");
    if (M == 0) return;
    const auto* bf16 = static_cast<const uint16_t*>(packed);
    switch (kernel) {
        case LinearKernel::f32_avx2:
            return run(x, M, K, ldx, static_cast<const float*>(packed), N, bias, out, ldo, num_threads);
        case LinearKernel::bf16_widen_avx2:
            return run(x, M, K, ldx, static_cast<const Bf16Pair*>(packed), N, bias, out, ldo, num_threads);
        case LinearKernel::bf16_avx512:
        case LinearKernel::bf16_amx: {
            uint16_t* xb = bf16_x_buffer(M, K);
            if (kernel == LinearKernel::bf16_avx512)
                return packed_linear_bf16_avx512(x, M, K, ldx, bf16, N, bias, out, ldo, num_threads, xb);
            return packed_linear_bf16_amx(x, M, K, ldx, bf16, N, bias, out, ldo, num_threads, xb);
        }
    }
    fail("packed_linear: unknown kernel " + std::to_string(static_cast<int>(kernel)));
}

}  // namespace kvmux
