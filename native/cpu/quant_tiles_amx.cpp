// quant_linear's AMX variant (Sapphire Rapids and later, with the OS's leave to use the tile state): per block of
// K, one tile dot product multiplies 16 rows of quantized activations by a panel's 16 outputs, 16 x 16 x 32
// products in one instruction where AVX512-VNNI needs 128, and the int32 tile is then scaled into float sums as
// the other variants scale their accumulators (one multiply-add per row and 16 outputs, the offsets and mins from
// the activation block's integer sum), so every variant computes the same integers.
//
// A tile's B operand is 4 k per 32-bit lane, 16 lanes (outputs) per row of 64 bytes. The nibble forms are split
// into their low and high halves (chunk h's low nibbles are B row 2h, its high ones row 2h + 1; Q5's and Q6_K's
// high bits added), and Q8_0's pairs of k per lane are interleaved into fours.
// Activations are signed bytes against unsigned weights (tdpbsud); Q8_0's int16 activations are split into a
// signed high byte and an unsigned low one, x = 256 hi + lo, two tile products (tdpbssd, tdpbusd) summed exactly.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/amx_tiles.h"
#include "cpu/cpu_features.h"
#include "cpu/quant_tiles.h"

#if KVMUX_WIDE_KERNELS

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,f16c,fma,amx-tile,amx-int8")

#include "cpu/quant_nibbles512.h"
#include "cpu/quant_tile_loop.h"

namespace kvmux {
namespace {

// Tiles: C (0) and, for Q8_0, C of the high bytes (1); A (2), A of the high bytes (3); B (4).
void configure(int rows, int a_bytes, int b_rows) {
    TileConfig c;
    std::memset(&c, 0, sizeof c);
    c.palette = 1;
    const int shape[5][2] = {{rows, 64}, {rows, 64}, {rows, a_bytes}, {rows, a_bytes}, {b_rows, 64}};
    for (int t = 0; t < 5; ++t) {
        c.rows[t] = static_cast<uint8_t>(shape[t][0]);
        c.colsb[t] = static_cast<uint16_t>(shape[t][1]);
    }
    _tile_loadconfig(&c);
}

// Q8_0's panel block, 16 chunks of 32 bytes with 2 k per lane, as 8 B rows of 64 bytes with 4 k per lane: row r
// interleaves the 16-bit lanes of chunks 2r and 2r + 1, which lie side by side.
inline void q8_rows(const uint8_t* block, uint8_t* rows) {
    alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i idx = _mm512_load_si512(order);
    for (int r = 0; r < 8; ++r)
        _mm512_store_si512(rows + 64 * r, _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(block + 64 * r)));
}

// A panel block of B values of nibble pairs (B / 8 chunks of 64 bytes) and `Planes` high bit planes, as B / 4 B rows
// of bytes: chunk h's low nibbles are row 2h, its high ones row 2h + 1, each plane's bits added where set.
template <int B, int Planes>
inline void nibble_rows(const uint8_t* block, uint8_t* rows) {
    for (int h = 0; h < B / 8; ++h) {
        __m512i lo, hi;
        unpack_chunk<B, Planes>(block, h, lo, hi);
        _mm512_store_si512(rows + 128 * h, lo);
        _mm512_store_si512(rows + 128 * h + 64, hi);
    }
}

// out[m:m+rows, panel p] over every block of K; rows <= 16. With Spans, as the other variants' tile
// (quant_tile_loop.h): d times each block's sum into a part, the part times the span's d_x at its end.
template <QuantType T, bool Spans>
void group(const QuantTileJob& j, int64_t m, int rows, int64_t p, int cols) {
    constexpr int64_t B = quant_block(T), block_bytes = quant_panel_block_bytes(T);
    constexpr int32_t off = quant_offset(T);
    const int64_t nb = j.nb, K = j.w.K;
    const PanelRefs<T> r(j, m, p);
    const uint8_t* wq = r.wq;
    const uint16_t *wd = r.wd, *wm = r.wm;
    const float* xd = r.xd;
    const int32_t* xo = r.xo;
    const float* xm = r.xm;
    const __mmask16 lanes = static_cast<__mmask16>((1u << cols) - 1);
    const __m512 init = j.bias ? _mm512_maskz_loadu_ps(lanes, j.bias + p * kQuantPanel) : _mm512_setzero_ps();
    const int64_t span_blocks = Spans ? j.w.span / B : 1;
    __m512 sum[16], part[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
        sum[i] = init;
        part[i] = _mm512_setzero_ps();
    }
    alignas(64) uint8_t wrows[512];
    alignas(64) int32_t c[16][16], c_hi[16][16];
    for (int64_t b = 0; b < nb; ++b, wq += block_bytes) {
#pragma GCC unroll 8
        for (int64_t line = 0; line < block_bytes; line += 64) _mm_prefetch(wq + kPrefetchAhead + line, _MM_HINT_T0);
        _tile_zero(0);
        if constexpr (T == QuantType::q8_0) {
            q8_rows(wq, wrows);
            _tile_loadd(4, wrows, 64);
            _tile_loadd(2, j.x_lo + m * K + b * B, K);
            _tile_loadd(3, j.x_hi + m * K + b * B, K);
            _tile_zero(1);
            _tile_dpbusd(0, 2, 4);
            _tile_dpbssd(1, 3, 4);
            _tile_stored(1, c_hi, 64);
        } else {
            nibble_rows<B, high_planes(T)>(wq, wrows);
            _tile_loadd(4, wrows, 64);
            _tile_loadd(2, static_cast<const int8_t*>(j.xq) + m * K + b * B, K);
            _tile_dpbsud(0, 2, 4);
        }
        _tile_stored(0, c, 64);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wd + b * kQuantPanel)));
        __m512 mins = _mm512_setzero_ps();
        if constexpr (has_mins(T))
            mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wm + b * kQuantPanel)));
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
            const int64_t at = (i < rows ? i : 0) * nb + b;  // rows past the tile's are never stored
            __m512i t = _mm512_load_si512(c[i]);
            if constexpr (T == QuantType::q8_0) t = _mm512_add_epi32(t, _mm512_slli_epi32(_mm512_load_si512(c_hi[i]), 8));
            if constexpr (off != 0) t = _mm512_add_epi32(t, _mm512_set1_epi32(xo[at]));
            if constexpr (Spans)
                part[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), d, part[i]);
            else
                sum[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(d, _mm512_set1_ps(xd[at])), sum[i]);
            if constexpr (has_mins(T))
                sum[i] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xm[at]), sum[i]);
        }
        if (Spans && (b + 1) % span_blocks == 0) {
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i) {
                sum[i] = _mm512_fmadd_ps(part[i], _mm512_set1_ps(xd[(i < rows ? i : 0) * nb + b]), sum[i]);
                part[i] = _mm512_setzero_ps();
            }
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
        if (i < rows) _mm512_mask_storeu_ps(j.out + (m + i) * j.ldo + p * kQuantPanel, lanes, sum[i]);
}

template <QuantType T>
void run(const QuantTileJob& j, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    int configured = -1;
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t left = j.w.N - p * kQuantPanel;
        const int cols = static_cast<int>(left < kQuantPanel ? left : kQuantPanel);
        for (int64_t m = m0; m < m1; m += 16) {
            const int rows = static_cast<int>(m1 - m < 16 ? m1 - m : 16);
            if (rows != configured) {
                configure(rows, static_cast<int>(quant_block(T)), static_cast<int>(quant_block(T) / 4));
                configured = rows;
            }
            if (j.w.span > quant_block(T))
                group<T, true>(j, m, rows, p, cols);
            else
                group<T, false>(j, m, rows, p, cols);
        }
    }
    _tile_release();
}

}  // namespace

void quant_tiles_amx(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    switch (job.w.type) {
        case QuantType::q8_0: return run<QuantType::q8_0>(job, m0, m1, p0, p1);
        case QuantType::q4_0: return run<QuantType::q4_0>(job, m0, m1, p0, p1);
        case QuantType::q4_1: return run<QuantType::q4_1>(job, m0, m1, p0, p1);
        case QuantType::q5_0: return run<QuantType::q5_0>(job, m0, m1, p0, p1);
        case QuantType::q5_1: return run<QuantType::q5_1>(job, m0, m1, p0, p1);
        case QuantType::q6_k: return run<QuantType::q6_k>(job, m0, m1, p0, p1);
    }
}

}  // namespace kvmux

#pragma GCC pop_options

#else  // a compiler without the AMX intrinsics: kernel_choice never offers the variant

void kvmux::quant_tiles_amx(const QuantTileJob&, int64_t, int64_t, int64_t, int64_t) {}

#endif
