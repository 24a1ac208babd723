// quant_linear's AMX-BF16 variant, for prefill's many rows: a chunk of a quantized weight's panels is dequantized
// to bf16, in packed_linear's layout, into a buffer that stays in L2, and packed_linear's AMX kernel multiplies
// every row of x (rounded to bf16) by it; then the next chunk. The int8 variants scale each block's integer sums
// into float ones, one multiply-add per 16 outputs, row and block of 32 (16 for Q6_K): as many instructions as
// the AMX int8 tile saves, so at hundreds of rows that scaling, not the dot products, sets their pace. Here a
// weight is scaled once per call, however many rows there are, and the tiles then run without a float step.
//
// A panel's block in the quant layout (quant_linear.h) becomes pair rows of 16 features x 2 k: Q8_0's chunk g of
// 32 bytes already is pair row g, as signed bytes; a nibble chunk h holds 4 k per 32-bit lane in its low nibbles
// and 4 in its high ones, so each lane's low and high 16 bits of either half are one pair row. Each weight is
// d (q - off) + m, as in quant_rows: the integer difference exact, one float32 rounding, then bf16's (RNE).
#include <immintrin.h>

#include <cstdint>

#include "cpu/cpu_features.h"
#include "cpu/packed_linear.h"
#include "cpu/quant_tiles.h"

#if KVMUX_WIDE_KERNELS

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,f16c")

#include "cpu/quant_nibbles512.h"

namespace kvmux {
namespace {

// A block's 16 scales (and mins) in the order of a pair row's two halves: features 0-7 twice each, 8-15 twice each.
struct PairScales {
    __m512 d[2], m[2];
};

inline PairScales pair_scales(const uint16_t* d, const uint16_t* m) {
    const __m512i order[2] = {_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                              _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15)};
    const __m512 vd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d)));
    const __m512 vm = m ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m))) : _mm512_setzero_ps();
    PairScales s;
    for (int h = 0; h < 2; ++h) {
        s.d[h] = _mm512_permutexvar_ps(order[h], vd);
        s.m[h] = _mm512_permutexvar_ps(order[h], vm);
    }
    return s;
}

// One pair row from its 32 integers (q - off, signed bytes in the row's order): d (q - off) + m, as bf16.
inline void pair_row(__m256i q, const PairScales& s, uint16_t* row) {
    __m512 half[2];
    for (int h = 0; h < 2; ++h) {
        const __m128i part = h ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
        half[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(part)), s.d[h], s.m[h]);
    }
    _mm512_storeu_si512(row, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(half[1], half[0])));
}

// Panels [p0, p1) of the weight at `source` (a QuantWeights), as Bf16PanelFill writes them.
template <QuantType T>
void dequantize_panels(const void* source, int64_t p0, int64_t p1, uint16_t* dst) {
    const QuantWeights& w = *static_cast<const QuantWeights*>(source);
    constexpr int64_t B = quant_block(T), bytes = quant_panel_block_bytes(T);
    constexpr int planes = high_planes(T);
    const int64_t nb = w.K / B;
    const __m256i off = _mm256_set1_epi8(static_cast<char>(quant_offset(T)));
    for (int64_t p = p0; p < p1; ++p) {
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t at = p * nb + b;
            const uint8_t* q = w.quants + at * bytes;
            const PairScales s = pair_scales(w.scales + at * kQuantPanel, has_mins(T) ? w.mins + at * kQuantPanel : nullptr);
            uint16_t* rows = dst + ((p - p0) * w.K + b * B) * kPanelWidth;  // pair row r of the block: 32 r on
            if constexpr (T == QuantType::q8_0) {
                for (int g = 0; g < 16; ++g)
                    pair_row(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * g)), s, rows + 32 * g);
            } else {
                for (int h = 0; h < B / 8; ++h) {
                    __m512i lo, hi;
                    unpack_chunk<B, planes>(q, h, lo, hi);
                    // k 8h + 2r and 8h + 2r + 1 of every feature: lane halves r of lo (r 0, 1) and hi (r 2, 3).
                    const __m512i quads[2] = {lo, hi};
                    for (int r = 0; r < 4; ++r) {
                        const __m512i lanes = r % 2 ? _mm512_srli_epi32(quads[r / 2], 16) : quads[r / 2];
                        pair_row(_mm256_sub_epi8(_mm512_cvtepi32_epi16(lanes), off), s, rows + 32 * (4 * h + r));
                    }
                }
            }
        }
    }
}

Bf16PanelFill fill_for(QuantType t) {
    switch (t) {
        case QuantType::q8_0: return dequantize_panels<QuantType::q8_0>;
        case QuantType::q4_0: return dequantize_panels<QuantType::q4_0>;
        case QuantType::q4_1: return dequantize_panels<QuantType::q4_1>;
        case QuantType::q5_0: return dequantize_panels<QuantType::q5_0>;
        case QuantType::q5_1: return dequantize_panels<QuantType::q5_1>;
        case QuantType::q6_k: break;
    }
    return dequantize_panels<QuantType::q6_k>;
}

}  // namespace

void quant_linear_amx_bf16(const float* x, int64_t M, int64_t ldx, const QuantWeights& w, const float* bias,
                           float* out, int64_t ldo, int num_threads, uint16_t* xb) {
    filled_linear_bf16_amx(x, M, w.K, ldx, fill_for(w.type), &w, w.N, bias, out, ldo, num_threads, xb);
}

}  // namespace kvmux

#pragma GCC pop_options

#else  // a compiler without the instruction sets' intrinsics: kernel_choice never offers the variant

void kvmux::quant_linear_amx_bf16(const float*, int64_t, int64_t, const QuantWeights&, const float*, float*, int64_t,
                                  int, uint16_t*) {}

#endif
