// The tile loop every quant_tiles_<variant>.cpp shares, written against that
// file's instruction-set type `Isa` (its vectors and integer dot product).
//
// Included once per variant file, after the file's `#pragma GCC target`, and
// everything here sits in an anonymous namespace: each file compiles its own
// internal copy for its own instruction set, so the linker can never pick one
// variant's code for another's (as it may with ordinary inline functions).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/quant_tiles.h"

namespace kvmux {
namespace {

inline int32_t load4(const void* p) {  // 4 bytes of activations, to be broadcast to every lane
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// A tile asks for W this many bytes ahead of the block it works on, so the next blocks are on their way while
// it computes. Measured (bench.quant, q4_0/q4_1, AVX512-VNNI): a pass over SmolLM2's weights at 3-8 rows -- a
// speculative step's verification -- 15-20% faster than without, at 16-64 rows 6-16%, at 512 rows within 3%.
constexpr int64_t kPrefetchAhead = 2048;

// What a tile over panel p and rows m.. of form T reads: the panel's integers, scales and mins; and for the AMX
// variant, whose activations are row-major (tile_rows 1), the rows' activation scales and block corrections.
template <QuantType T>
struct PanelRefs {
    const uint8_t* wq;
    const uint16_t* wd;
    const uint16_t* wm;  // has_mins(T) only
    const float* xd;
    const int32_t* xo;
    const float* xm;
    PanelRefs(const QuantTileJob& j, int64_t m, int64_t p)
        : wq(j.w.quants + p * j.nb * quant_panel_block_bytes(T)),
          wd(j.w.scales + p * j.nb * kQuantPanel),
          wm(has_mins(T) ? j.w.mins + p * j.nb * kQuantPanel : nullptr),
          xd(j.xd + m * j.nb),
          xo(j.xo + m * j.nb),
          xm(j.xm + m * j.nb) {}
};

// out[m:m+MT, panel p] = x[m:m+MT] . W[panel p]^T (+ bias), over every block of K.
//
// Per block, each row's integer dot products run into an Acc; at the block's
// end it is scaled into the row's float Sum: d_x (d (acc - off sum q_x) + m sum q_x).
// `Isa::start` may fold -off sum q_x (block_offset) into the accumulator's starting value; d_x sum q_x is
// block_min_weight. Both come with the activations, computed once per row and block rather than in every
// panel's tile (a scalar convert, multiply and broadcast a row and block there, beside a Q4_1 block's 8 dot
// products: 3% of Llama 3.2 1B Q4_K_M's matmuls at 8 rows).
// With Spans, the blocks of a span share d_x (QuantWeights::span): the tile sums d (acc - off sum q_x) over
// the span in a part and multiplies by d_x once at its end, a float multiply a row and block fewer. Every
// variant does (the AMX one in its own loop), so that they all compute the same floats as well as the same
// integers and the load-time plan may mix them across row ranges without changing a model's outputs (the
// 256-bit ones, 16 registers for 3 rows of two-vector Sums, were thought to spill the parts: on a 2-core Xeon
// their Q4_K and Q6_K matmuls at 1-8 rows ran as fast as without spans, or up to 15% faster). A span of one
// block runs without (its loop and part measured 8% slower on Q6_K).
// m is a multiple of Isa::kRows: the tile's rows are one group of the tiled activations (tiled_at), where row i
// of block b sits at a constant offset from the block's start.
template <class Isa, QuantType T, int MT, bool Spans>
void tile(const QuantTileJob& j, int64_t m, int64_t p, int cols) {
    using XT = std::conditional_t<T == QuantType::q8_0, int16_t, int8_t>;  // see activation_bits
    constexpr int64_t block_bytes = quant_panel_block_bytes(T), B = quant_block(T), R = Isa::kRows;
    constexpr int32_t off = quant_offset(T);
    const int64_t nb = j.nb, span_blocks = Spans ? j.w.span / B : 1;
    const PanelRefs<T> r(j, m, p);
    const uint8_t* wq = r.wq;
    const XT* xq = static_cast<const XT*>(j.xq) + tiled_at(m, 0, nb, R) * B;
    const float* xd = j.xd + tiled_at(m, 0, nb, R);
    const int32_t* xo = j.xo + tiled_at(m, 0, nb, R);
    const float* xm = j.xm + tiled_at(m, 0, nb, R);

    typename Isa::Sum sum[MT];
    const typename Isa::Sum init = j.bias ? Isa::load(j.bias + p * kQuantPanel, cols) : Isa::zero();
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) sum[i] = init;
    for (int64_t s = 0; s < nb; s += span_blocks) {
        typename Isa::Sum part[Spans ? MT : 1];
        if constexpr (Spans) {
#pragma GCC unroll 16
            for (int i = 0; i < MT; ++i) part[i] = Isa::zero();
        }
        for (int64_t b = s; b < s + span_blocks; ++b, wq += block_bytes) {
#pragma GCC unroll 8
            for (int64_t line = 0; line < block_bytes; line += 64) __builtin_prefetch(wq + kPrefetchAhead + line);
            typename Isa::Acc acc[MT];
            const XT* xb = xq + b * R * B;
            if constexpr (T == QuantType::q8_0) {
#pragma GCC unroll 16
                for (int i = 0; i < MT; ++i) acc[i] = Isa::start(0);
#pragma GCC unroll 16
                for (int g = 0; g < 16; ++g) {  // 2 k per lane
                    const typename Isa::W w = Isa::q8(wq + g * 32);
#pragma GCC unroll 16
                    for (int i = 0; i < MT; ++i) Isa::template dot<T>(acc[i], w, xb + i * B + 2 * g);
                }
            } else {
#pragma GCC unroll 16
                for (int i = 0; i < MT; ++i) acc[i] = Isa::start(off ? xo[b * R + i] : 0);
                constexpr int planes = high_planes(T);
#pragma GCC unroll 4
                for (int h = 0; h < B / 8; ++h) {  // 8 k per chunk: 4 per lane in the low nibbles, 4 in the high
                    typename Isa::W lo, hi;
                    Isa::q4(wq + h * 64, lo, hi);
#pragma GCC unroll 2
                    for (int j = 0; j < planes; ++j)
                        Isa::high_bits(wq + 8 * B + 16 * (planes * h + j), lo, hi, static_cast<char>(16 << j));
#pragma GCC unroll 16
                    for (int i = 0; i < MT; ++i) {
                        Isa::template dot<T>(acc[i], lo, xb + i * B + 8 * h);
                        Isa::template dot<T>(acc[i], hi, xb + i * B + 8 * h + 4);
                    }
                }
            }
            const typename Isa::Sum d = Isa::half(r.wd + b * kQuantPanel);
#pragma GCC unroll 16
            for (int i = 0; i < MT; ++i) {
                const int32_t correction = off ? xo[b * R + i] : 0;
                if constexpr (Spans)
                    Isa::int_mul_add(part[i], Isa::template total<T>(acc[i], correction), d);
                else
                    Isa::scale_add(sum[i], Isa::template total<T>(acc[i], correction), d, xd[b * R + i]);
            }
            if constexpr (has_mins(T)) {
                const typename Isa::Sum mins = Isa::half(r.wm + b * kQuantPanel);
#pragma GCC unroll 16
                for (int i = 0; i < MT; ++i) Isa::mul_add(sum[i], mins, xm[b * R + i]);
            }
        }
        if constexpr (Spans) {
#pragma GCC unroll 16
            for (int i = 0; i < MT; ++i) Isa::mul_add(sum[i], part[i], xd[s * R + i]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) Isa::store(j.out + (m + i) * j.ldo + p * kQuantPanel, sum[i], cols);
}

// A tile of rows <= MT rows.
template <class Isa, QuantType T, int MT, bool Spans>
void tile_rows(int rows, const QuantTileJob& j, int64_t m, int64_t p, int cols) {
    if constexpr (MT == 1) {
        tile<Isa, T, 1, Spans>(j, m, p, cols);
    } else if (rows == MT) {
        tile<Isa, T, MT, Spans>(j, m, p, cols);
    } else {
        tile_rows<Isa, T, MT - 1, Spans>(rows, j, m, p, cols);
    }
}

template <class Isa, QuantType T, bool Spans>
void run_tiles(const QuantTileJob& j, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t left = j.w.N - p * kQuantPanel;
        const int cols = static_cast<int>(left < kQuantPanel ? left : kQuantPanel);
        for (int64_t m = m0; m < m1; m += Isa::kRows) {
            const int64_t rows = m1 - m < Isa::kRows ? m1 - m : Isa::kRows;
            tile_rows<Isa, T, Isa::kRows, Spans>(static_cast<int>(rows), j, m, p, cols);
        }
    }
}

template <class Isa, QuantType T>
void run_tiles(const QuantTileJob& j, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    if (j.w.span > quant_block(T))
        run_tiles<Isa, T, true>(j, m0, m1, p0, p1);
    else
        run_tiles<Isa, T, false>(j, m0, m1, p0, p1);
}

template <class Isa>
void run_tiles(const QuantTileJob& j, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    switch (j.w.type) {
        case QuantType::q8_0: return run_tiles<Isa, QuantType::q8_0>(j, m0, m1, p0, p1);
        case QuantType::q4_0: return run_tiles<Isa, QuantType::q4_0>(j, m0, m1, p0, p1);
        case QuantType::q4_1: return run_tiles<Isa, QuantType::q4_1>(j, m0, m1, p0, p1);
        case QuantType::q5_0: return run_tiles<Isa, QuantType::q5_0>(j, m0, m1, p0, p1);
        case QuantType::q5_1: return run_tiles<Isa, QuantType::q5_1>(j, m0, m1, p0, p1);
        case QuantType::q6_k: return run_tiles<Isa, QuantType::q6_k>(j, m0, m1, p0, p1);
    }
}

// The float side of a 256-bit variant: 16 outputs as two 8-float vectors.
struct Float256 {
    struct Sum {
        __m256 v[2];
    };
    static Sum zero() { return {{_mm256_setzero_ps(), _mm256_setzero_ps()}}; }
    static Sum load(const float* p, int cols) {
        alignas(32) float buf[kQuantPanel] = {};
        if (cols < kQuantPanel) p = static_cast<const float*>(std::memcpy(buf, p, cols * sizeof(float)));
        return {{_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}};
    }
    static void store(float* p, const Sum& s, int cols) {
        if (cols == kQuantPanel) {
            _mm256_storeu_ps(p, s.v[0]);
            _mm256_storeu_ps(p + 8, s.v[1]);
            return;
        }
        alignas(32) float buf[kQuantPanel];
        _mm256_store_ps(buf, s.v[0]);
        _mm256_store_ps(buf + 8, s.v[1]);
        std::memcpy(p, buf, cols * sizeof(float));
    }
    static Sum half(const uint16_t* p) {
        return {{_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                 _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))}};
    }
    struct Int {
        __m256i v[2];
    };
    // sum += float(t) * d * dx
    static void scale_add(Sum& s, const Int& t, const Sum& d, float dx) {
        const __m256 vx = _mm256_set1_ps(dx);
        for (int h = 0; h < 2; ++h)
            s.v[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t.v[h]), _mm256_mul_ps(d.v[h], vx), s.v[h]);
    }
    // sum += float(t) * d
    static void int_mul_add(Sum& s, const Int& t, const Sum& d) {
        for (int h = 0; h < 2; ++h) s.v[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t.v[h]), d.v[h], s.v[h]);
    }
    // sum += a * c
    static void mul_add(Sum& s, const Sum& a, float c) {
        const __m256 vc = _mm256_set1_ps(c);
        for (int h = 0; h < 2; ++h) s.v[h] = _mm256_fmadd_ps(a.v[h], vc, s.v[h]);
    }
    struct W {
        __m256i v[2];
    };
    // 32 bytes of Q8_0 (16 rows x 2 k) widened to int16 pairs.
    static W q8(const uint8_t* p) {
        W w;
        for (int h = 0; h < 2; ++h)
            w.v[h] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
        return w;
    }
    // A high bit plane (two 64-bit masks at p, bit j for byte j of lo and of hi) added as `value` (16 or 32).
    static void high_bits(const uint8_t* p, W& lo, W& hi, char value) {
        uint32_t m[4];
        std::memcpy(m, p, sizeof m);
        for (int h = 0; h < 2; ++h) {
            lo.v[h] = _mm256_or_si256(lo.v[h], bit_bytes(m[h], value));
            hi.v[h] = _mm256_or_si256(hi.v[h], bit_bytes(m[2 + h], value));
        }
    }
    // 32 bits -> 32 bytes, byte j `value` where bit j is set.
    static __m256i bit_bytes(uint32_t bits, char value) {
        const __m256i spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(static_cast<int32_t>(bits)),
            _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
        const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
        return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select), _mm256_set1_epi8(value));
    }
    // 64 bytes of nibbles as their low and high halves, each 16 rows x 4 bytes.
    static void q4(const uint8_t* p, W& lo, W& hi) {
        const __m256i mask = _mm256_set1_epi8(0x0F);
        for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
            lo.v[h] = _mm256_and_si256(v, mask);
            hi.v[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        }
    }
};

}  // namespace
}  // namespace kvmux
