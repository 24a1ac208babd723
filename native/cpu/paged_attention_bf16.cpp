// The AVX512-BF16 work item of the CPU paged attention (see paged_attention_bf16.h). Compiled for those
// instruction sets by a target pragma; paged_attention.cpp calls it only where the CPU has them.
#include "cpu/paged_attention_bf16.h"

#include "cpu/cpu_features.h"

#if KVMUX_WIDE_KERNELS

#include <immintrin.h>
#include <type_traits>

// GCC 12's unpack intrinsics pass an "undefined" vector through, which -Wmaybe-uninitialized misreads.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,f16c")

#include "cpu/vec_math.h"
#include "cpu/vec_math512.h"

namespace kvmux {
namespace {

constexpr int kChunk = kBf16KeyChunk;
constexpr int kInPlaceRows = 8;

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// 16 rows of 16 dwords transposed in registers: r[i] lane j <- r[j] lane i.
inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // r[4i + c], 128-bit lane L: rows 4i..4i+3 of column 4L + c.
    for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        const __m512i a0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), a1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xee);
        const __m512i b0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
        const __m512i b1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xee);
        t[c] = _mm512_shuffle_i32x4(a0, b0, 0x88);
        t[4 + c] = _mm512_shuffle_i32x4(a0, b0, 0xdd);
        t[8 + c] = _mm512_shuffle_i32x4(a1, b1, 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(a1, b1, 0xdd);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Head dims 32b..32b+31 of a pool row.
inline __m512i row_bf16x32(const char* row, int b) { return _mm512_loadu_si512(row + 64 * b); }

// The chunk's keys as kt[pair i of head dims][key]: dword (k[2i], k[2i + 1]) of each of the n keys (0 past n).
template <int D>
void transpose_keys(const char* const* keys, int n, uint32_t* kt) {
    for (int g = 0; g < kChunk; g += 16) {
        for (int b = 0; b < D / 32; ++b) {  // 16 dword columns (32 head dims) at a time
            __m512i r[16];
            for (int t = 0; t < 16; ++t)
                r[t] = g + t < n ? row_bf16x32(keys[g + t], b) : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; ++i) _mm512_storeu_si512(kt + (16 * b + i) * kChunk + g, r[i]);
        }
    }
}

// Head dims 32b..32b+31 of key pair p's values interleaved: dwords (v[2p][d], v[2p + 1][d]) for the d of
// unpacklo (lo) and unpackhi (hi) within each 128-bit lane (undone by `unpermute` at the end); 0 for a key past n.
inline void interleave_pair(const char* const* values, int n, int p, int b, __m512i& lo, __m512i& hi) {
    const __m512i x = row_bf16x32(values[2 * p], b);
    const __m512i y = 2 * p + 1 < n ? row_bf16x32(values[2 * p + 1], b) : _mm512_setzero_si512();
    lo = _mm512_unpacklo_epi16(x, y);
    hi = _mm512_unpackhi_epi16(x, y);
}

// The chunk's values by key pairs: vp[pair][32-dim block][lo, hi of interleave_pair].
template <int D>
void interleave_values(const char* const* values, int n, uint32_t* vp) {
    for (int p = 0; 2 * p < n; ++p) {
        for (int b = 0; b < D / 32; ++b) {
            __m512i lo, hi;
            interleave_pair(values, n, p, b, lo, hi);
            _mm512_storeu_si512(vp + p * D + 32 * b, lo);
            _mm512_storeu_si512(vp + p * D + 32 * b + 16, hi);
        }
    }
}

// Head dim of accumulator slot s (the order interleave_values leaves them in).
inline int unpermute(int s) {
    const int block = s / 32, half = (s % 32) / 16, lane = (s % 16) / 4, i = s % 4;
    return 32 * block + 8 * lane + 4 * half + i;
}

// scores[r][t] = q_r . k_t for R rows at once (rows share each load of K; 2R independent sums).
template <int D, int R>
void score_rows(const uint16_t* qb, const uint32_t* kt, float* scores) {
    __m512 s[R][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
    const int32_t* q32 = reinterpret_cast<const int32_t*>(qb);
#pragma GCC unroll 4
    for (int i = 0; i < D / 2; ++i) {
        const __m512bh k0 = as_bh(_mm512_loadu_si512(kt + i * kChunk)), k1 = as_bh(_mm512_loadu_si512(kt + i * kChunk + 16));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const __m512bh qp = as_bh(_mm512_set1_epi32(q32[r * D / 2 + i]));
            s[r][0] = _mm512_dpbf16_ps(s[r][0], qp, k0);
            s[r][1] = _mm512_dpbf16_ps(s[r][1], qp, k1);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(scores + r * kChunk, s[r][0]);
        _mm512_storeu_ps(scores + r * kChunk + 16, s[r][1]);
    }
}

// The 16 sums of 16 vectors' lanes: lane t of the result = the sum of v[t]'s lanes (a transposing add tree).
inline __m512 sum_lanes16(const __m512 v[16]) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; ++i)  // 128-bit lane L of a[i]: lane L's partial sums of v[2i], v[2i+1] (2 each)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // lane L of b[i]: lane L's sums of v[4i .. 4i + 3], in order
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xee));
    const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xdd));
}

// scores[r][t] = q_r . k_t for R rows, reading the n keys where they lie: one 16-lane sum per row and key,
// reduced 16 keys at a time. For a few rows this beats transposing the chunk, whose cost no row shares.
template <int D, int R>
void score_keys(const uint16_t* qb, const char* const* keys, int n, float* scores) {
    for (int g = 0; g < kChunk; g += 16) {
        __m512 s[R][16];
        for (int t = 0; t < 16; ++t) {
            __m512 sum[R];
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_ps();
            if (g + t < n) {
#pragma GCC unroll 8
                for (int b = 0; b < D / 32; ++b) {
                    const __m512bh k = as_bh(row_bf16x32(keys[g + t], b));
#pragma GCC unroll 4
                    for (int r = 0; r < R; ++r)
                        sum[r] = _mm512_dpbf16_ps(sum[r], as_bh(_mm512_loadu_si512(qb + r * D + 32 * b)), k);
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) s[r][t] = sum[r];
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) _mm512_storeu_ps(scores + r * kChunk + g, sum_lanes16(s[r]));
    }
}

// acc[r] += sum over key pairs j < pairs of (p[r][2j], p[r][2j + 1]) . (v[2j], v[2j + 1]) for R rows, 64 head
// dims at a time so that R rows share each pair's values in registers. `pair_values(j, s, v)` gives the four
// interleaved 16-dword vectors of pair j's dims 64s .. 64s + 63 (from the chunk's interleaved copy, or
// interleaved from the pool there and then).
template <int D, int R, typename PairValues>
void accumulate_rows(const int32_t* pp, int pairs, PairValues&& pair_values, float* acc) {
    for (int s = 0; s < D / 64; ++s) {
        __m512 o[R][4];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) o[r][j] = _mm512_loadu_ps(acc + r * D + 64 * s + 16 * j);
        for (int q = 0; q < pairs; ++q) {
            __m512bh v[4];
            pair_values(q, s, v);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                const __m512bh w = as_bh(_mm512_set1_epi32(pp[r * kChunk / 2 + q]));
                for (int j = 0; j < 4; ++j) o[r][j] = _mm512_dpbf16_ps(o[r][j], w, v[j]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + r * D + 64 * s + 16 * j, o[r][j]);
    }
}

// Rows [r0, rows) in blocks of R (then of fewer), through fn<R>(first row).
template <int R, typename Fn>
void row_blocks(int r0, int rows, Fn&& fn) {
    for (; r0 + R <= rows; r0 += R) fn(r0, std::integral_constant<int, R>{});
    if constexpr (R > 1) row_blocks<R / 2>(r0, rows, fn);
}

// Asks for the keys and values of the chunk from key c0 on (if any) while this one is worked on: a chunk's
// rows sit in per-block runs of block_size * dim values, each run too short for the hardware prefetcher
// to ramp up on, so without this every run starts with a wait on memory.
template <int D>
void prefetch_chunk(const Bf16AttendItem& a, int32_t c0, int32_t num_keys) {
    const int32_t end = c0 + kChunk < num_keys ? c0 + kChunk : num_keys;
    for (int32_t key = c0; key < end;) {
        const int64_t blk = key / a.block_size, off = key % a.block_size;
        const int64_t run = (a.block_size - off < end - key ? a.block_size - off : end - key);
        const char* k = a.pool + a.table[blk] * a.block_stride + a.head_offset + off * a.row;
        const char* v = k + a.v_offset;
        for (int64_t byte = 0; byte < run * a.row; byte += 64) {
            _mm_prefetch(k + byte, _MM_HINT_T0);
            _mm_prefetch(v + byte, _MM_HINT_T0);
        }
        key += static_cast<int32_t>(run);
    }
}

template <int D>
void attend(const Bf16AttendItem& a) {
    const int64_t G = a.group;
    const int rows = static_cast<int>((a.q_end - a.q_begin) * G);
    // Few rows (a decode step's query heads of one KV head) read K and V where they lie; many rows share
    // one transposed K and one interleaved V per chunk.
    const bool in_place = rows <= kInPlaceRows;

    // q, scaled, as bf16 pairs; the row's running max, sum and (permuted) output.
    for (int32_t i = a.q_begin; i < a.q_end; ++i) {
        const int64_t row0 = static_cast<int64_t>(a.q_start + i) * a.q_row_stride + a.h * G * D;
        for (int64_t g = 0; g < G; ++g) {
            const int r = static_cast<int>((i - a.q_begin) * G + g);
            uint16_t* dst = a.qb + r * D;
            if (a.q_bf16) {
                const uint16_t* src = static_cast<const uint16_t*>(a.q) + row0 + g * D;
                for (int d = 0; d < D; ++d) dst[d] = float_to_bits(bits_to_float(src[d]) * a.scale);
            } else {
                const float* src = static_cast<const float*>(a.q) + row0 + g * D;
                for (int d = 0; d < D; d += 32) {
                    const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(src + d), _mm512_set1_ps(a.scale));
                    const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(src + d + 16), _mm512_set1_ps(a.scale));
                    _mm512_storeu_si512(dst + d, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
                }
            }
            a.m[r] = -__builtin_inff();
            a.l[r] = 0.0f;
            for (int d = 0; d < D; ++d) a.acc[r * D + d] = 0.0f;
        }
    }

    const int32_t num_keys = a.ctx - a.q_len + a.q_end;
    const char* keys[kChunk];
    const char* values[kChunk];
    // The first row's window starts first; keys before it are seen by no row of the tile.
    const int32_t first0 = a.window > 0 ? a.ctx - a.q_len + a.q_begin - a.window + 1 : 0;
    for (int32_t c0 = first0 > 0 ? first0 : 0; c0 < num_keys; c0 += kChunk) {
        const int n = num_keys - c0 < kChunk ? num_keys - c0 : kChunk;
        // Walk the chunk block by block (no division per key).
        int64_t blk = c0 / a.block_size, off = c0 % a.block_size;
        const char* head = a.pool + a.table[blk] * a.block_stride + a.head_offset;
        for (int t = 0; t < n; ++t) {
            keys[t] = head + off * a.row;
            values[t] = keys[t] + a.v_offset;
            if (++off == a.block_size && t + 1 < n) {
                off = 0;
                head = a.pool + a.table[++blk] * a.block_stride + a.head_offset;
            }
        }
        prefetch_chunk<D>(a, c0 + kChunk, num_keys);
        if (in_place) {
            row_blocks<4>(0, rows, [&](int r0, auto R) { score_keys<D, R>(a.qb + r0 * D, keys, n, a.scores + r0 * kChunk); });
        } else {
            transpose_keys<D>(keys, n, a.kt);
            interleave_values<D>(values, n, a.vp);
            row_blocks<4>(0, rows, [&](int r0, auto R) { score_rows<D, R>(a.qb + r0 * D, a.kt, a.scores + r0 * kChunk); });
        }

        // Online softmax per row, in registers; the weights go out as bf16 pairs (0 for keys the row does not see).
        int pairs = 0;
        for (int r = 0; r < rows; ++r) {
            // Query token i = q_begin + r / G sits at position ctx - q_len + i and sees keys up to it.
            const int32_t last = a.ctx - a.q_len + a.q_begin + static_cast<int32_t>(r / G);
            const int valid = last - c0 + 1 < n ? last - c0 + 1 : n;
            // and, in a sliding-window layer, only keys from last - window + 1 on: the chunk's keys lo .. valid - 1.
            const int lo = a.window > 0 && last - a.window + 1 > c0 ? last - a.window + 1 - c0 : 0;
            int32_t* pp = a.pp + r * kChunk / 2;
            if (valid <= lo) {
                _mm512_storeu_si512(pp, _mm512_setzero_si512());
                continue;
            }
            pairs = (valid + 1) / 2 > pairs ? (valid + 1) / 2 : pairs;
            __m512 e[2];
            __mmask16 seen[2];
            softmax_chunk<D>(a.scores + r * kChunk, lo, valid, a.m[r], a.l[r], a.acc + r * D, e, seen);
            _mm512_storeu_si512(pp, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e[1], e[0])));
        }
        // The values of pair j, dims 64s .. 64s + 63, as interleave_values lays them out.
        const auto from_pool = [&](int j, int s, __m512bh v[4]) {
            for (int h = 0; h < 2; ++h) {
                __m512i lo, hi;
                interleave_pair(values, n, j, 2 * s + h, lo, hi);
                v[2 * h] = as_bh(lo);
                v[2 * h + 1] = as_bh(hi);
            }
        };
        const auto from_copy = [&](int j, int s, __m512bh v[4]) {
            for (int i = 0; i < 4; ++i) v[i] = as_bh(_mm512_loadu_si512(a.vp + j * D + 64 * s + 16 * i));
        };
        row_blocks<4>(0, rows, [&](int r0, auto R) {
            if (in_place) accumulate_rows<D, R>(a.pp + r0 * kChunk / 2, pairs, from_pool, a.acc + r0 * D);
            else accumulate_rows<D, R>(a.pp + r0 * kChunk / 2, pairs, from_copy, a.acc + r0 * D);
        });
    }

    for (int32_t i = a.q_begin; i < a.q_end; ++i) {
        const int64_t orow = (static_cast<int64_t>(a.q_start + i) * a.heads + a.h * G) * D;
        for (int64_t g = 0; g < G; ++g) {
            const int r = static_cast<int>((i - a.q_begin) * G + g);
            const float inv = 1.0f / a.l[r];
            const float* acc = a.acc + r * D;
            if (a.q_bf16) {
                uint16_t* o = static_cast<uint16_t*>(a.out) + orow + g * D;
                for (int s = 0; s < D; ++s) o[unpermute(s)] = float_to_bits(acc[s] * inv);
            } else {
                float* o = static_cast<float*>(a.out) + orow + g * D;
                for (int s = 0; s < D; ++s) o[unpermute(s)] = acc[s] * inv;
            }
        }
    }
}

}  // namespace

void bf16_attend_avx512(const Bf16AttendItem& item) {
    if (item.dim == 64) attend<64>(item);
    else if (item.dim == 128) attend<128>(item);
    else attend<256>(item);
}

}  // namespace kvmux

#pragma GCC pop_options

#else  // a compiler without AVX512-BF16 intrinsics: attention_kernel_supported says no, nothing calls this

#include "cpu/paged_attention.h"

void kvmux::bf16_attend_avx512(const Bf16AttendItem&) { throw AttentionError("built without the avx512bf16 kernel"); }

#endif
