// The AVX512-VNNI work item of the CPU paged attention over an int8 pool (see paged_attention_i8.h). Compiled
// for those instruction sets by a target pragma; paged_attention.cpp calls it only where the CPU has them.
#include "cpu/paged_attention_i8.h"

#include "cpu/cpu_features.h"

#if KVMUX_WIDE_KERNELS

#include <immintrin.h>
#include <type_traits>

// GCC 12's AVX-512 intrinsics pass an "undefined" vector through, which -Wmaybe-uninitialized misreads.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")

#include "cpu/hadamard.h"
#include "cpu/vec_math.h"
#include "cpu/vec_math512.h"

namespace kvmux {
namespace {

constexpr int kChunk = kI8KeyChunk;

// What a group of 16 keys reads from a block of 8 whose second half lies past the sequence's keys.
alignas(64) const char kZeros[256 / 4 * 32] = {};

// The K slab of this layer and head in the block holding `key` (its V slab is v_offset further).
inline const char* slab(const I8AttendItem& a, int32_t key) {
    return a.pool + a.table[key / a.block_size] * a.block_stride + a.head_offset;
}

// The 16 keys from key c (a multiple of 16): where their K dwords start, in one slab (blocks of 16 or 32 keys)
// or in two (blocks of 8).
struct KeyGroup {
    const char* first;
    const char* second;
    int64_t dword_stride;  // bytes from a key's dword of 4 head dims to its next: block_size * 4
};

inline KeyGroup key_group(const I8AttendItem& a, int32_t c, int32_t num_keys) {
    if (a.block_size >= 16) return {slab(a, c) + c % a.block_size * 4, nullptr, a.block_size * 4};
    return {slab(a, c), c + 8 < num_keys ? slab(a, c + 8) : kZeros, 32};
}

// Dword i (head dims 4i .. 4i + 3) of the group's 16 keys.
template <bool Split>
inline __m512i key_dwords(const KeyGroup& g, int i) {
    if constexpr (!Split) {
        return _mm512_loadu_si512(g.first + i * g.dword_stride);
    } else {
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.first + i * 32));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.second + i * 32));
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
}

// The float16 scales of the 16 keys from key c, of their K slab (which = 0) or V slab (which = v_offset); 0 past
// the sequence's keys in a block of 8 that is not there.
template <int D>
inline __m512 group_scales(const I8AttendItem& a, int32_t c, int32_t num_keys, int64_t which) {
    const int64_t bs = a.block_size;
    if (bs >= 16)
        return _mm512_cvtph_ps(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(slab(a, c) + which + bs * D + 2 * (c % bs))));
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(slab(a, c) + which + 8 * D));
    const __m128i hi = c + 8 < num_keys
                           ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(slab(a, c + 8) + which + 8 * D))
                           : _mm_setzero_si128();
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}

// scores[r][0 .. 16) = q_r . k for the group's 16 keys, R rows at once (they share each load of K). q's 16 bits
// offset to unsigned, u = q + 32768 = 256 hi + lo, are two unsigned bytes, each scored by its own vpdpbusd:
// q . k = 256 (sum(hi k) - 128 sum(k)) + sum(lo k), exact in int32 (|q . k| <= 32767 * 127 * 256 < 2^31), then
// times the row's and each key's scale. sum(k) is taken on the first pass over the group (Sum) and kept in ksum
// for the others.
template <int D, int R, bool Sum, bool Split>
void score_rows(const KeyGroup& g, const uint8_t* qb, const float* qs, __m512 kscale, __m512i& ksum,
                float* scores) {
    __m512i hi[R], lo[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) hi[r] = lo[r] = _mm512_setzero_si512();
    __m512i sum = _mm512_setzero_si512();
    const __m512i ones = _mm512_set1_epi8(1);
#pragma GCC unroll 4
    for (int i = 0; i < D / 4; ++i) {
        const __m512i k = key_dwords<Split>(g, i);
        if constexpr (Sum) sum = _mm512_dpbusd_epi32(sum, ones, k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            int32_t h4, l4;
            __builtin_memcpy(&h4, qb + r * 2 * D + 4 * i, sizeof h4);
            __builtin_memcpy(&l4, qb + r * 2 * D + D + 4 * i, sizeof l4);
            hi[r] = _mm512_dpbusd_epi32(hi[r], _mm512_set1_epi32(h4), k);
            lo[r] = _mm512_dpbusd_epi32(lo[r], _mm512_set1_epi32(l4), k);
        }
    }
    if constexpr (Sum) ksum = sum;
    const __m512i offset = _mm512_slli_epi32(ksum, 7);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(_mm512_sub_epi32(hi[r], offset), 8), lo[r]);
        _mm512_storeu_ps(scores + r * kChunk,
                         _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(kscale, _mm512_set1_ps(qs[r]))));
    }
}

// acc[r] += ws[r] * sum over quads j < quads of weights pw[r][4j .. 4j + 3] . the quad's values, R rows at once
// (they share each load of V); vq[j]: quad j's values, head dim d of its 4 keys in dword d. In slabs of at most
// 128 dims, whose sums fit the 32 vector registers.
template <int D, int R>
void accumulate_rows(const uint8_t* pw, const float* ws, int quads, const char* const* vq, float* acc) {
    constexpr int S = D < 128 ? D : 128, J = S / 16;
    for (int s0 = 0; s0 < D; s0 += S) {
        __m512i o[R][J];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
            for (int j = 0; j < J; ++j) o[r][j] = _mm512_setzero_si512();
        for (int q = 0; q < quads; ++q) {
            __m512i v[J];
#pragma GCC unroll 8
            for (int j = 0; j < J; ++j) v[j] = _mm512_loadu_si512(vq[q] + (s0 + 16 * j) * 4);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                int32_t w4;
                __builtin_memcpy(&w4, pw + r * kChunk + 4 * q, sizeof w4);
                const __m512i w = _mm512_set1_epi32(w4);
#pragma GCC unroll 8
                for (int j = 0; j < J; ++j) o[r][j] = _mm512_dpbusd_epi32(o[r][j], w, v[j]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
            for (int j = 0; j < J; ++j) {
                float* dst = acc + r * D + s0 + 16 * j;
                _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_cvtepi32_ps(o[r][j]), _mm512_set1_ps(ws[r]),
                                                      _mm512_loadu_ps(dst)));
            }
    }
}

// fn(r0, R) over rows [0, rows): blocks of Max rows, then one of exactly the rows left (an unrolled kernel each).
template <int R, typename Fn>
void rest_rows(int r0, int left, Fn& fn) {
    if constexpr (R > 0) {
        if (left == R) fn(r0, std::integral_constant<int, R>{});
        else rest_rows<R - 1>(r0, left, fn);
    }
}

template <int Max, typename Fn>
void row_blocks(int rows, Fn&& fn) {
    int r0 = 0;
    for (; r0 + Max <= rows; r0 += Max) fn(r0, std::integral_constant<int, Max>{});
    rest_rows<Max - 1>(r0, rows - r0, fn);
}

// Asks for the slabs of the next chunk's blocks (block sizes divide the chunk) while this one is worked on: they
// are runs of a few hundred bytes, too short for the hardware prefetcher to ramp up on.
template <int D>
void prefetch_chunk(const I8AttendItem& a, int32_t c0, int32_t num_keys) {
    const int64_t bytes = a.block_size * (D + 2);
    for (int32_t key = c0; key < c0 + kChunk && key < num_keys; key += static_cast<int32_t>(a.block_size)) {
        const char* k = slab(a, key);
        for (int64_t b = 0; b < bytes; b += 64) {
            _mm_prefetch(k + b, _MM_HINT_T0);
            _mm_prefetch(k + a.v_offset + b, _MM_HINT_T0);
        }
    }
}

template <int D>
void attend(const I8AttendItem& a) {
    const int64_t G = a.group;
    const int rows = static_cast<int>((a.q_end - a.q_begin) * G);
    constexpr int kAccRows = D == 64 ? 4 : 2;  // R rows of D / 16 (at most 8) sums, and the values, in 32 registers

    // q, scaled and rotated as the keys are (hadamard.h), quantized to 16 bits per row, offset to unsigned and
    // split into its high bytes, then its low bytes.
    for (int32_t i = a.q_begin; i < a.q_end; ++i) {
        const int64_t row0 = static_cast<int64_t>(a.q_start + i) * a.q_row_stride + a.h * G * D;
        for (int64_t g = 0; g < G; ++g) {
            const int r = static_cast<int>((i - a.q_begin) * G + g);
            alignas(64) float x[D];
            if (a.q_bf16) {
                const uint16_t* src = static_cast<const uint16_t*>(a.q) + row0 + g * D;
                for (int d = 0; d < D; ++d) x[d] = bits_to_float(src[d]) * a.scale;
            } else {
                const float* src = static_cast<const float*>(a.q) + row0 + g * D;
                for (int d = 0; d < D; ++d) x[d] = src[d] * a.scale;
            }
            hadamard_rotate(x, D);
            __m512 peak = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_load_ps(x + d)));
            const float p = _mm512_reduce_max_ps(peak);
            const __m512 inv = _mm512_set1_ps(p > 0.0f ? 32767.0f / p : 0.0f);
            for (int d = 0; d < D; d += 16) {
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(x + d), inv));  // nearest even
                const __m512i u = _mm512_add_epi32(q, _mm512_set1_epi32(32768));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(a.qb + r * 2 * D + d),
                                 _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8)));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(a.qb + r * 2 * D + D + d), _mm512_cvtepi32_epi8(u));
            }
            a.qs[r] = p / 32767.0f;
            a.m[r] = -__builtin_inff();
            a.l[r] = 0.0f;
            for (int d = 0; d < D; ++d) a.acc[r * D + d] = 0.0f;
        }
    }

    const int32_t num_keys = a.ctx - a.q_len + a.q_end;
    const bool split = a.block_size < 16;
    const char* vq[kChunk / 4];
    // The first row's window starts first; keys before its chunk are seen by no row of the tile.
    const int32_t first0 = a.window > 0 ? a.ctx - a.q_len + a.q_begin - a.window + 1 : 0;
    for (int32_t c0 = first0 > 0 ? first0 / kChunk * kChunk : 0; c0 < num_keys; c0 += kChunk) {
        const int n = num_keys - c0 < kChunk ? num_keys - c0 : kChunk;
        prefetch_chunk<D>(a, c0 + kChunk, num_keys);
        __m512 vscale[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int g = 0; 16 * g < n; ++g) {
            const int32_t c = c0 + 16 * g;
            const KeyGroup kg = key_group(a, c, num_keys);
            const __m512 kscale = group_scales<D>(a, c, num_keys, 0);
            vscale[g] = group_scales<D>(a, c, num_keys, a.v_offset);
            __m512i ksum = _mm512_setzero_si512();
            row_blocks<8>(rows, [&](int r0, auto R) {
                float* sc = a.scores + r0 * kChunk + 16 * g;
                const uint8_t* qb = a.qb + r0 * 2 * D;
                if (split) {
                    if (r0 == 0) score_rows<D, R, true, true>(kg, qb, a.qs + r0, kscale, ksum, sc);
                    else score_rows<D, R, false, true>(kg, qb, a.qs + r0, kscale, ksum, sc);
                } else {
                    if (r0 == 0) score_rows<D, R, true, false>(kg, qb, a.qs + r0, kscale, ksum, sc);
                    else score_rows<D, R, false, false>(kg, qb, a.qs + r0, kscale, ksum, sc);
                }
            });
        }

        // Online softmax per row, in registers; the weights times their V scales go out as unsigned 8 bits with a
        // scale per row (0 for keys the row does not see).
        int quads = 0;
        for (int r = 0; r < rows; ++r) {
            // Query token i = q_begin + r / G sits at position ctx - q_len + i and sees keys up to it,
            const int32_t last = a.ctx - a.q_len + a.q_begin + static_cast<int32_t>(r / G);
            const int valid = last - c0 + 1 < n ? last - c0 + 1 : n;
            // and, in a sliding-window layer, only keys from last - window + 1 on: the chunk's keys lo .. valid - 1.
            const int lo = a.window > 0 && last - a.window + 1 > c0 ? last - a.window + 1 - c0 : 0;
            uint8_t* pw = a.pw + r * kChunk;
            if (valid <= lo) {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(pw), _mm256_setzero_si256());
                a.ws[r] = 0.0f;
                continue;
            }
            quads = (valid + 3) / 4 > quads ? (valid + 3) / 4 : quads;
            __m512 e[2];
            __mmask16 seen[2];
            softmax_chunk<D>(a.scores + r * kChunk, lo, valid, a.m[r], a.l[r], a.acc + r * D, e, seen);
            // Masked, so that a scale past the sequence's keys (stale bytes) never meets a weight.
            const __m512 w0 = _mm512_maskz_mul_ps(seen[0], e[0], vscale[0]);
            const __m512 w1 = _mm512_maskz_mul_ps(seen[1], e[1], vscale[1]);
            const float wmax = _mm512_reduce_max_ps(_mm512_max_ps(w0, w1));
            if (!(wmax > 0.0f)) {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(pw), _mm256_setzero_si256());
                a.ws[r] = 0.0f;
                continue;
            }
            const __m512 inv = _mm512_set1_ps(255.0f / wmax);
            const __m512i top = _mm512_set1_epi32(255);
            const __m512i u0 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(w0, inv)), top);
            const __m512i u1 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(w1, inv)), top);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(pw), _mm512_cvtepi32_epi8(u0));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(pw + 16), _mm512_cvtepi32_epi8(u1));
            a.ws[r] = wmax / 255.0f;
        }
        for (int q = 0; q < quads; ++q) {
            const int32_t key = c0 + 4 * q;
            vq[q] = slab(a, key) + a.v_offset + key % a.block_size / 4 * (4 * D);
        }
        row_blocks<kAccRows>(rows, [&](int r0, auto R) {
            accumulate_rows<D, R>(a.pw + r0 * kChunk, a.ws + r0, quads, vq, a.acc + r0 * D);
        });
    }

    for (int32_t i = a.q_begin; i < a.q_end; ++i) {
        const int64_t orow = (static_cast<int64_t>(a.q_start + i) * a.heads + a.h * G) * D;
        for (int64_t g = 0; g < G; ++g) {
            const int r = static_cast<int>((i - a.q_begin) * G + g);
            const float inv = 1.0f / a.l[r];
            // The sum of rotated values, rotated back.
            alignas(64) float x[D];
            for (int d = 0; d < D; ++d) x[d] = a.acc[r * D + d] * inv;
            hadamard_rotate(x, D);
            if (a.q_bf16) {
                uint16_t* o = static_cast<uint16_t*>(a.out) + orow + g * D;
                for (int d = 0; d < D; ++d) o[d] = float_to_bits(x[d]);
            } else {
                float* o = static_cast<float*>(a.out) + orow + g * D;
                for (int d = 0; d < D; ++d) o[d] = x[d];
            }
        }
    }
}

}  // namespace

void i8_attend_avx512vnni(const I8AttendItem& item) {
    if (item.dim == 64) attend<64>(item);
    else if (item.dim == 128) attend<128>(item);
    else attend<256>(item);
}

}  // namespace kvmux

#pragma GCC pop_options

#else  // a compiler without AVX-512 VNNI intrinsics: attention_kernel_supported says no, nothing calls this

#include "cpu/paged_attention.h"

void kvmux::i8_attend_avx512vnni(const I8AttendItem&) { throw AttentionError("built without the avx512vnni kernel"); }

#endif
