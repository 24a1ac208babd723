// The bf16-arithmetic kernels of packed_linear.h: x rounded to bf16, products of bf16 pairs, float32 sums.
//
// Compiled here, beyond the AVX2 baseline, by target pragmas: the AVX512-BF16
// kernel (vdpbf16ps: 16 float32 lanes, each adding the products of one k pair)
// and the AMX kernel (16 x 16 float32 tiles += 16 x 32 bf16 x 32 x 16 bf16).
// Both read the bf16 panels as they are stored: a panel's row of 16 features x
// 2 k is one zmm operand of vdpbf16ps, and 16 such rows are one AMX B tile.
// Nothing here may run before packed_linear has checked the CPU's features, and
// the file instantiates no shared inline code (no std templates), which could
// otherwise be merged with the baseline build's copy at link time.
#include "cpu/packed_linear.h"

#include "cpu/amx_tiles.h"
#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"

#if KVMUX_WIDE_KERNELS

#include <cstring>

#include <immintrin.h>

namespace kvmux {
namespace {

inline int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }

// Rows of x per AVX512-BF16 tile: 12 x 2 accumulators + 2 weight vectors + 1 x in 27 of 32 registers.
constexpr int kRows512 = 12;
// Rows per pass, as in the AVX2 kernel: x's bf16 block stays in L2 while the thread's panels go by.
constexpr int64_t kMr = 128;
// Bytes of B per chunk of the AMX kernel (below): well inside L2 beside x's tiles.
constexpr int64_t kAmxChunkBytes = 768 * 1024;

// The panels of task `task` of `tasks`: a contiguous run, so whoever takes it streams that part of W, and
// whole pairs of panels, which the kernels take two at a time.
inline Span task_panels(int64_t panels, int64_t tasks, int64_t task) {
    const Span pairs = split((panels + 1) / 2, tasks, task);
    return {2 * pairs.begin, lesser(panels, 2 * pairs.end)};
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

// dst[0:width] = src[0:n] as bf16 rounded to nearest even, zero from n on (width a multiple of 32).
void round_row(const float* src, int64_t n, int64_t width, uint16_t* dst) {
    for (int64_t k = 0; k < width; k += 32) {
        const int64_t left = n - k;
        const __mmask16 lo = left >= 16 ? 0xffff : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0;
        const __mmask16 hi = left >= 32 ? 0xffff : left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : 0;
        const __m512 a = _mm512_maskz_loadu_ps(lo, src + k), b = _mm512_maskz_loadu_ps(hi, src + k + 16);
        _mm512_storeu_si512(dst + k, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
    }
}

// x as bf16 rows [M, Kp], all of it ready when this returns.
void round_x_rows(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t Kp, uint16_t* xb, int nt) {
    const int64_t tasks = task_count(M, nt, 16);
    parallel_for(tasks, nt, [&](int64_t task) {
        const Span rows = split(M, tasks, task);
        for (int64_t m = rows.begin; m < rows.end; ++m) round_row(x + m * ldx, K, Kp, xb + m * Kp);
    });
}

// x as AMX A tiles, which AMX loads faster than strided rows: rows in groups of 16, each group's K in tiles of
// 16 rows x 32 k stored contiguously (1 KB; tile t of group g is the (g * Kp / 32 + t)-th). A last group of
// fewer rows leaves the rest of its tiles unwritten: the tile configuration then loads only its rows.
void round_x_tiles(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t Kp, uint16_t* xb, int nt) {
    constexpr int64_t kTile = 16 * kBf16KAlign;
    const int64_t tasks = task_count(M, nt, 16);
    parallel_for(tasks, nt, [&](int64_t task) {
        const Span rows = split(M, tasks, task);
        for (int64_t m = rows.begin; m < rows.end; ++m)
            for (int64_t k = 0; k < Kp; k += kBf16KAlign)
                round_row(x + m * ldx + k, K - k, kBf16KAlign,
                          xb + ((m / 16) * (Kp / kBf16KAlign) + k / kBf16KAlign) * kTile + (m % 16) * kBf16KAlign);
    });
}

// out[rows, cols] = acc[rows, ld] (+ bias): the tile's float32 sums, clipped to the matrix.
void store_sums(const float* acc, int64_t ld, int rows, int cols, const float* bias, float* out, int64_t ldo) {
    const __mmask16 mask = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
    for (int i = 0; i < rows; ++i) _mm512_mask_storeu_ps(out + i * ldo, mask, _mm512_add_ps(_mm512_loadu_ps(acc + i * ld), b));
}

inline __m512bh as_bf16(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// out[MT, NP * 16] = xb[MT, Kp] . panels, NP (1 or 2) adjacent panels, sums in registers over all of K.
// `ahead`, when set, is the next two panels, fetched into L2 meanwhile at the pace this tile reads its own.
template <int MT, int NP>
void tile512(const uint16_t* xb, int64_t Kp, const uint16_t* panel, int64_t panel_stride, const uint16_t* ahead,
             float* out, int64_t ldo, int64_t cols, const float* bias) {
    __m512 acc[MT][NP];
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
    const int32_t* x32 = reinterpret_cast<const int32_t*>(xb);
    const int64_t pairs = Kp / 2;
    for (int64_t q = 0; q < pairs; ++q) {
        if (ahead) {
            _mm_prefetch(reinterpret_cast<const char*>(ahead + q * 2 * kPanelWidth), _MM_HINT_T1);
            _mm_prefetch(reinterpret_cast<const char*>(ahead + panel_stride + q * 2 * kPanelWidth), _MM_HINT_T1);
        }
        __m512i w[NP];
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) w[j] = _mm512_loadu_si512(panel + j * panel_stride + q * 2 * kPanelWidth);
#pragma GCC unroll 16
        for (int i = 0; i < MT; ++i) {
            const __m512i xv = _mm512_set1_epi32(x32[i * pairs + q]);
#pragma GCC unroll 2
            for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], as_bf16(xv), as_bf16(w[j]));
        }
    }
    alignas(64) float sums[MT][NP * kPanelWidth];
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i)
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) _mm512_store_ps(sums[i] + j * kPanelWidth, acc[i][j]);
    for (int j = 0; j < NP; ++j) {
        const int64_t c = lesser(kPanelWidth, cols - j * kPanelWidth);
        if (c > 0)
            store_sums(&sums[0][j * kPanelWidth], NP * kPanelWidth, MT, static_cast<int>(c),
                       bias ? bias + j * kPanelWidth : nullptr, out + j * kPanelWidth, ldo);
    }
}

template <int MT, int NP>
void tile512_rows(int rows, const uint16_t* xb, int64_t Kp, const uint16_t* panel, int64_t panel_stride,
                  const uint16_t* ahead, float* out, int64_t ldo, int64_t cols, const float* bias) {
    if constexpr (MT == 1) {
        tile512<1, NP>(xb, Kp, panel, panel_stride, ahead, out, ldo, cols, bias);
    } else if (rows == MT) {
        tile512<MT, NP>(xb, Kp, panel, panel_stride, ahead, out, ldo, cols, bias);
    } else {
        tile512_rows<MT - 1, NP>(rows, xb, Kp, panel, panel_stride, ahead, out, ldo, cols, bias);
    }
}

#pragma GCC pop_options

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

void packed_linear_bf16_avx512(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* packed,
                               int64_t N, const float* bias, float* out, int64_t ldo, int num_threads,
                               uint16_t* xb) {
    const int64_t Kp = bf16_padded_k(K), panels = (N + kPanelWidth - 1) / kPanelWidth;
    const int64_t panel_stride = Kp * kPanelWidth;  // uint16 per panel
    const int nt = static_cast<int>(lesser(num_threads < 1 ? 1 : num_threads, panels));
    round_x_rows(x, M, K, ldx, Kp, xb, nt);
    const int64_t tasks = task_count((panels + 1) / 2, nt, 1);
    parallel_for(tasks, nt, [&](int64_t task) {
        const Span own = task_panels(panels, tasks, task);
        for (int64_t m0 = 0; m0 < M; m0 += kMr) {
            const int64_t m1 = lesser(M, m0 + kMr);
            for (int64_t p = own.begin; p < own.end; p += 2) {
                const bool two = p + 1 < own.end;
                const int64_t cols = N - p * kPanelWidth;
                const uint16_t* panel = packed + p * panel_stride;
                const float* b = bias ? bias + p * kPanelWidth : nullptr;
                // The first rows read the pair from memory: fetch the next pair meanwhile.
                const uint16_t* ahead = m0 == 0 && p + 3 < own.end ? panel + 2 * panel_stride : nullptr;
                for (int64_t m = m0; m < m1; m += kRows512) {
                    const int rows = static_cast<int>(lesser(kRows512, m1 - m));
                    float* o = out + m * ldo + p * kPanelWidth;
                    const uint16_t* fetch = m == m0 ? ahead : nullptr;
                    if (two)
                        tile512_rows<kRows512, 2>(rows, xb + m * Kp, Kp, panel, panel_stride, fetch, o, ldo, cols, b);
                    else
                        tile512_rows<kRows512, 1>(rows, xb + m * Kp, Kp, panel, panel_stride, fetch, o, ldo, cols, b);
                }
            }
        }
    });
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")

namespace {

// Tiles: C 0-3 (rows 0-15 | 16-31 x panel a | b), A 4-5 (x rows 0-15, 16-31), B 6-7 (panels a, b).
// `top` and `bottom` are the rows of x in the two A tiles (bottom 0: one tile).
void configure(int top, int bottom) {
    TileConfig c;
    std::memset(&c, 0, sizeof c);
    c.palette = 1;
    const int rows[8] = {top, top, bottom ? bottom : top, bottom ? bottom : top, top, bottom ? bottom : top, 16, 16};
    for (int t = 0; t < 8; ++t) {
        c.rows[t] = static_cast<uint8_t>(rows[t]);
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

// out[rows, cols] (+ bias) for up to 32 rows of x (`tiles`: their first group's A tiles, the second group's
// following Kp / 32 tiles on) and two panels (the second may be absent). `ahead`, when set, is the next
// panels' B, fetched into L2 meanwhile: a pair row per k step, so it arrives as this pair finishes.
void amx_block(const uint16_t* tiles, int64_t Kp, int top, int bottom, const uint16_t* pa, const uint16_t* pb,
               const uint16_t* ahead, float* out, int64_t ldo, int64_t cols, const float* bias) {
    constexpr int64_t kTile = 16 * kBf16KAlign;
    const uint16_t* second = tiles + Kp / kBf16KAlign * kTile;
    const int64_t panel_stride = Kp * kPanelWidth;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0, t = 0; k < Kp; k += kBf16KAlign, ++t) {
        if (ahead) {
            // 16 pair rows of 64 bytes per panel and k step, two panels.
            for (int r = 0; r < 16; ++r) {
                _mm_prefetch(reinterpret_cast<const char*>(ahead + k * kPanelWidth + r * 32), _MM_HINT_T1);
                _mm_prefetch(reinterpret_cast<const char*>(ahead + panel_stride + k * kPanelWidth + r * 32),
                             _MM_HINT_T1);
            }
        }
        _tile_loadd(4, tiles + t * kTile, 64);
        _tile_loadd(6, pa + k * kPanelWidth, 64);  // 16 pair rows of 64 bytes from pair k / 2
        _tile_dpbf16ps(0, 4, 6);
        if (pb) {
            _tile_loadd(7, pb + k * kPanelWidth, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (bottom) {
            _tile_loadd(5, second + t * kTile, 64);
            _tile_dpbf16ps(2, 5, 6);
            if (pb) _tile_dpbf16ps(3, 5, 7);
        }
    }
    if (!bias && pb && cols >= 2 * kPanelWidth) {  // whole panels, nothing to add: the tiles go straight out
        const int64_t ld = ldo * static_cast<int64_t>(sizeof(float));
        _tile_stored(0, out, ld);
        _tile_stored(1, out + kPanelWidth, ld);
        if (bottom) {
            _tile_stored(2, out + 16 * ldo, ld);
            _tile_stored(3, out + 16 * ldo + kPanelWidth, ld);
        }
        return;
    }
    alignas(64) float sums[32][2 * kPanelWidth];
    constexpr int64_t ld = 2 * kPanelWidth * sizeof(float);
    _tile_stored(0, &sums[0][0], ld);
    if (pb) _tile_stored(1, &sums[0][kPanelWidth], ld);
    if (bottom) {
        _tile_stored(2, &sums[16][0], ld);
        if (pb) _tile_stored(3, &sums[16][kPanelWidth], ld);
    }
    const int rows = top + bottom;
    store_sums(&sums[0][0], 2 * kPanelWidth, rows, static_cast<int>(lesser(kPanelWidth, cols)), bias, out, ldo);
    if (pb)
        store_sums(&sums[0][kPanelWidth], 2 * kPanelWidth, rows, static_cast<int>(lesser(kPanelWidth, cols - kPanelWidth)),
                   bias ? bias + kPanelWidth : nullptr, out + kPanelWidth, ldo);
}

}  // namespace

namespace {

struct TileShape {  // the rows of the two A tiles the tile configuration was last loaded for
    int top = -1, bottom = -1;
};

// Every row of x (A tiles at xb) times panels [c0, c1), whose B lies from `b` on (panel c0's first): 32 rows
// at a time, the panels two at a time. Panels before `fetch_end` lie after the chunk in memory as they do in it,
// and the first rows fetch them ahead (fetch_end 0: B was just written and is in cache).
void amx_rows(const uint16_t* xb, int64_t M, int64_t Kp, const uint16_t* b, int64_t c0, int64_t c1,
              int64_t fetch_end, int64_t N, const float* bias, float* out, int64_t ldo, TileShape& configured) {
    const int64_t panel_stride = Kp * kPanelWidth;
    for (int64_t m = 0; m < M; m += 32) {
        const int rows = static_cast<int>(lesser(32, M - m));
        const int top = rows < 16 ? rows : 16, bottom = rows - top;
        if (top != configured.top || bottom != configured.bottom) {
            configure(top, bottom);
            configured = {top, bottom};
        }
        for (int64_t p = c0; p < c1; p += 2) {
            const uint16_t* pa = b + (p - c0) * panel_stride;
            const uint16_t* pb = p + 1 < c1 ? pa + panel_stride : nullptr;
            const uint16_t* ahead = m == 0 && p + 3 < fetch_end ? pa + 2 * panel_stride : nullptr;
            amx_block(xb + m * Kp, Kp, top, bottom, pa, pb, ahead, out + m * ldo + p * kPanelWidth, ldo,
                      N - p * kPanelWidth, bias ? bias + p * kPanelWidth : nullptr);
        }
    }
}

// Panels per chunk: a chunk's B stays in L2 while every 32 rows of x pass over it, so B is read from memory (or
// written by a fill) once per call, and the 32 rows' A tiles stay in L1 while the chunk's panels go by.
int64_t chunk_panels(int64_t panel_stride, int64_t panels) {
    const int64_t pairs = kAmxChunkBytes / (2 * panel_stride * 2);
    return 2 * lesser(pairs > 0 ? pairs : 1, (panels + 1) / 2);
}

// Both AMX entry points: B packed in memory at `packed`, or (packed null) written a chunk at a time by `fill`
// into the thread's buffer.
void amx_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* packed, Bf16PanelFill fill,
                const void* source, int64_t N, const float* bias, float* out, int64_t ldo, int num_threads,
                uint16_t* xb) {
    const int64_t Kp = bf16_padded_k(K), panels = (N + kPanelWidth - 1) / kPanelWidth;
    const int64_t panel_stride = Kp * kPanelWidth, chunk = chunk_panels(panel_stride, panels);
    const int nt = static_cast<int>(lesser(num_threads < 1 ? 1 : num_threads, panels));
    round_x_tiles(x, M, K, ldx, Kp, xb, nt);
    const int64_t tasks = task_count((panels + 1) / 2, nt, 1);
    parallel_for(tasks, nt, [&](int64_t task) {
        const Span own = task_panels(panels, tasks, task);
        uint16_t* filled = packed ? nullptr : bf16_chunk_buffer(chunk * panel_stride);
        TileShape configured;
        for (int64_t c0 = own.begin; c0 < own.end; c0 += chunk) {
            const int64_t c1 = lesser(own.end, c0 + chunk);
            if (filled) fill(source, c0, c1, filled);
            amx_rows(xb, M, Kp, filled ? filled : packed + c0 * panel_stride, c0, c1, filled ? 0 : own.end, N, bias,
                     out, ldo, configured);
        }
        if (configured.top >= 0) _tile_release();
    });
}

}  // namespace

void packed_linear_bf16_amx(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* packed, int64_t N,
                            const float* bias, float* out, int64_t ldo, int num_threads, uint16_t* xb) {
    amx_linear(x, M, K, ldx, packed, nullptr, nullptr, N, bias, out, ldo, num_threads, xb);
}

void filled_linear_bf16_amx(const float* x, int64_t M, int64_t K, int64_t ldx, Bf16PanelFill fill,
                            const void* source, int64_t N, const float* bias, float* out, int64_t ldo,
                            int num_threads, uint16_t* xb) {
    amx_linear(x, M, K, ldx, nullptr, fill, source, N, bias, out, ldo, num_threads, xb);
}

#pragma GCC pop_options

}  // namespace kvmux

#else  // a compiler without the instruction sets' intrinsics: linear_kernel_supported says no, nothing calls these

namespace kvmux {

void packed_linear_bf16_avx512(const float*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, const float*,
                               float*, int64_t, int, uint16_t*) {
    throw LinearError("packed_linear: built without the AVX512-BF16 kernel");
}
void packed_linear_bf16_amx(const float*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*,
                            int64_t, int, uint16_t*) {
    throw LinearError("packed_linear: built without the AMX kernel");
}
void filled_linear_bf16_amx(const float*, int64_t, int64_t, int64_t, Bf16PanelFill, const void*, int64_t,
                            const float*, float*, int64_t, int, uint16_t*) {
    throw LinearError("packed_linear: built without the AMX kernel");
}

}  // namespace kvmux

#endif
