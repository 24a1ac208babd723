#include "cpu/paged_attention.h"
#include "cpu/cpu_features.h"
#include "cpu/hadamard.h"
#include "cpu/paged_attention_bf16.h"
#include "cpu/paged_attention_i8.h"
#include "cpu/thread_pool.h"
#include "cpu/vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace kvmux {

namespace {

// Query tokens per work item in a prefill chunk: enough rows to reuse each
// K/V chunk many times, few enough that a long chunk still splits across cores.
constexpr int32_t kQueryTile = 16;
// Keys scored together before one online-softmax update; spans blocks when
// blocks are smaller, so block size 8 does not double the per-update cost.
constexpr int kKeyChunk = 32;

struct bf16 {
    uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
    uint32_t u = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) {
    return x;
}
// Round to nearest even, as torch's .to(torch.bfloat16) does, so the pool holds
// bit-identical values whichever backend wrote them.
template <>
inline bf16 from_float<bf16>(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16{static_cast<uint16_t>(u >> 16)};
}

// 8 floats: one AVX2 register. GCC's vector extension keeps the hot loops
// in registers with no gathers (auto-vectorisation picked gathers across keys
// for the P.V update) while staying portable C++.
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
    v8f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline float hsum8(v8f v) {
    const float a = (v[0] + v[4]) + (v[1] + v[5]);
    const float b = (v[2] + v[6]) + (v[3] + v[7]);
    return a + b;
}

// q.k over head_dim; D > 0 (a multiple of 8) unrolls into registers.
template <int D>
inline float dot(const float* q, const float* k, int64_t dim) {
    if constexpr (D > 0) {
        static_assert(D % 8 == 0);
        v8f acc0 = load8(q) * load8(k), acc1 = load8(q + 8) * load8(k + 8);
        for (int d = 16; d < D; d += 16) {
            acc0 += load8(q + d) * load8(k + d);
            acc1 += load8(q + d + 8) * load8(k + d + 8);
        }
        return hsum8(acc0 + acc1);
    } else {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < dim; ++d) sum += q[d] * k[d];
        return sum;
    }
}

// Eight horizontal sums at once: lane j of the result is the sum of a[j]'s lanes.
inline v8f hsum8x8(const v8f* a) {
#if defined(__AVX__)
    const __m256 t0 = _mm256_hadd_ps(__m256(a[0]), __m256(a[1]));
    const __m256 t1 = _mm256_hadd_ps(__m256(a[2]), __m256(a[3]));
    const __m256 t2 = _mm256_hadd_ps(__m256(a[4]), __m256(a[5]));
    const __m256 t3 = _mm256_hadd_ps(__m256(a[6]), __m256(a[7]));
    const __m256 u0 = _mm256_hadd_ps(t0, t1);  // per 128-bit half: partial sums of a0..a3
    const __m256 u1 = _mm256_hadd_ps(t2, t3);  // and of a4..a7
    return v8f(_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
    v8f out;
    for (int j = 0; j < 8; ++j) out[j] = hsum8(a[j]);
    return out;
#endif
}

// scores[t] = q.k[t] for t < n. With a compile-time head_dim, eight keys are
// scored together and reduced by one transposing sum: a separate horizontal
// sum per key would cost as much as the 64-wide dot product itself.
template <int D>
inline void dots(const float* q, const float* const* k, int32_t n, float* scores, int64_t dim) {
    int32_t t = 0;
    if constexpr (D > 0) {
        for (; t + 8 <= n; t += 8) {
            v8f acc[8];
            for (int j = 0; j < 8; ++j) {
                const float* kj = k[t + j];
                v8f a = load8(q) * load8(kj);
                for (int d = 8; d < D; d += 8) a += load8(q + d) * load8(kj + d);
                acc[j] = a;
            }
            store8(scores + t, hsum8x8(acc));
        }
    }
    for (; t < n; ++t) scores[t] = dot<D>(q, k[t], dim);
}

// acc += sum_t p[t] * V[t]; with a compile-time head_dim the row stays in
// registers for the whole chunk instead of round-tripping through memory.
template <int D>
inline void accumulate(float* acc, const float* p, const float* const* v, int32_t n, int64_t dim) {
    if constexpr (D > 0) {
        // In slabs of at most 128 dimensions, whose sums fit the 16 vector registers (D = 256 takes two passes).
        constexpr int S = D < 128 ? D : 128, R = S / 8;
        for (int s0 = 0; s0 < D; s0 += S) {
            v8f a[R];
            for (int j = 0; j < R; ++j) a[j] = load8(acc + s0 + 8 * j);
            for (int32_t t = 0; t < n; ++t) {
                const v8f pt = v8f{} + p[t];
                const float* vt = v[t] + s0;
                for (int j = 0; j < R; ++j) a[j] += pt * load8(vt + 8 * j);
            }
            for (int j = 0; j < R; ++j) store8(acc + s0 + 8 * j, a[j]);
        }
    } else {
        for (int32_t t = 0; t < n; ++t) {
            const float pt = p[t];
            const float* vt = v[t];
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) acc[d] += pt * vt[d];
        }
    }
}

// An int8 slab's float16 scale of token t (paged_attention.h's layout).
inline float slab_scale(const int8_t* slab, int64_t t, int64_t block_size, int64_t dim) {
    uint16_t h;
    std::memcpy(&h, slab + block_size * dim + 2 * t, sizeof h);
    return _cvtsh_ss(h);
}

// x ~ q * scale with scale = max|x| / 127 rounded to float16 first, so that q is computed with the scale read
// back; a row of zeros gets scale 0. Returns the scale's float16 bits.
inline uint16_t quantize_row(const float* x, int8_t* out, int64_t dim) {
    float peak = 0.0f;
#pragma omp simd reduction(max : peak)
    for (int64_t d = 0; d < dim; ++d) peak = std::max(peak, std::fabs(x[d]));
    const uint16_t h = _cvtss_sh(peak / 127.0f, _MM_FROUND_TO_NEAREST_INT);
    const float scale = _cvtsh_ss(h);
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) {
        const float q = std::nearbyint(x[d] * inv);
        out[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
    }
    return h;
}

// Token t's quantized row (dim values, the scale's bits) into its place in a K slab or a V slab.
inline void store_key(const int8_t* q, uint16_t h, int8_t* slab, int64_t t, int64_t block_size, int64_t dim) {
    for (int64_t i = 0; i < dim / 4; ++i) std::memcpy(slab + (i * block_size + t) * 4, q + 4 * i, 4);
    std::memcpy(slab + block_size * dim + 2 * t, &h, sizeof h);
}
inline void store_value(const int8_t* q, uint16_t h, int8_t* slab, int64_t t, int64_t block_size, int64_t dim) {
    int8_t* dst = slab + (t / 4) * dim * 4 + t % 4;
    for (int64_t d = 0; d < dim; ++d) dst[4 * d] = q[d];
    std::memcpy(slab + block_size * dim + 2 * t, &h, sizeof h);
}

// Token t's K (less k_mean) and V of a K slab and a V slab, widened to float32 and scaled: K two dwords (8 head
// dims) at a time; V 8 dims at a time from the 32 bytes holding them for t's 4 keys, t's byte of each picked out.
inline void widen_key(const int8_t* kslab, const int8_t* vslab, int64_t t, int64_t block_size, int64_t dim,
                      float* k, float* v) {
    const __m256 ks = _mm256_set1_ps(slab_scale(kslab, t, block_size, dim));
    const __m256 vs = _mm256_set1_ps(slab_scale(vslab, t, block_size, dim));
    auto widen8 = [](__m128i bytes, __m256 scale, float* out) {  // the low 8 bytes
        _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale));
    };
    auto widen4 = [](const int8_t* bytes, float scale, float* out) {
        for (int j = 0; j < 4; ++j) out[j] = static_cast<float>(bytes[j]) * scale;
    };
    const int64_t dwords = dim / 4;
    int64_t i = 0;
    for (; i + 2 <= dwords; i += 2) {
        int32_t a, b;
        std::memcpy(&a, kslab + (i * block_size + t) * 4, 4);
        std::memcpy(&b, kslab + ((i + 1) * block_size + t) * 4, 4);
        widen8(_mm_setr_epi32(a, b, 0, 0), ks, k + 4 * i);
    }
    if (i < dwords) widen4(kslab + (i * block_size + t) * 4, _mm256_cvtss_f32(ks), k + 4 * i);

    const int8_t* src = vslab + (t / 4) * dim * 4;
    const int8_t j = static_cast<int8_t>(t % 4);
    // In each 128-bit lane (4 dims of 4 keys), bytes j, j + 4, j + 8, j + 12 to the lane's first dword; the rest 0.
    const __m256i pick = _mm256_add_epi8(
        _mm256_setr_epi8(0, 4, 8, 12, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128,
                         0, 4, 8, 12, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128),
        _mm256_set1_epi8(j));
    const __m256i lanes = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
        const __m256i x = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 4 * d)), pick);
        widen8(_mm256_castsi256_si128(_mm256_permutevar8x32_epi32(x, lanes)), vs, v + d);
    }
    for (; d < dim; ++d) v[d] = static_cast<float>(src[4 * d + j]) * _mm256_cvtss_f32(vs);
}

struct Shape {
    int64_t heads, kv_heads, group, dim;
    int64_t row;  // elements per token of a (K or V, head) slab: dim, and an int8 pool's 2-byte scale
    int64_t block_size;
    int64_t block_stride;  // elements per block across all layers
    int64_t layer_offset;  // elements from a block's start to this layer's K
    int64_t head_stride;   // elements per (K or V, head) slab: block_size * row
    int64_t v_offset;      // elements from a layer's K to its V
};

// Per-thread scratch, reused across work items and calls.
struct Scratch {
    std::vector<float> q, acc, m, l, scores, kbuf, vbuf, rot;
    std::vector<int32_t> first_key, last_key;
    std::vector<uint16_t> qb;          // the bf16 kernel's q
    std::vector<int32_t> pp;           // its softmax weights as bf16 pairs
    std::vector<uint32_t> kt, vp;      // its transposed keys, interleaved values
    std::vector<uint8_t> qbytes, pw;       // the int8 kernel's q (two bytes a value) and softmax weights
    std::vector<float> qs, ws;         // and their scales
};

// A work item for the bf16 dot-product kernel (paged_attention_bf16.h), its scratch sized here.
void attend_bf16(const LayerArgs& a, const Shape& s, Scratch& w, const int32_t* table, int32_t q_start,
                 int32_t q_len, int32_t ctx, int32_t q_begin, int32_t q_end, int64_t h) {
    const int64_t rows = (q_end - q_begin) * s.group;
    w.qb.resize(rows * s.dim);
    w.acc.resize(rows * s.dim);
    w.m.resize(rows);
    w.l.resize(rows);
    w.scores.resize(rows * kBf16KeyChunk);
    w.pp.resize(rows * kBf16KeyChunk / 2);
    w.kt.resize(s.dim / 2 * kBf16KeyChunk);
    w.vp.resize(kBf16KeyChunk / 2 * s.dim);
    constexpr int64_t bytes = 2;  // of a bf16 pool element
    Bf16AttendItem item{a.q.data, a.q.row_stride, a.out, a.act_dtype == DType::bf16, static_cast<const char*>(a.kv),
                        table, s.block_size, s.block_stride * bytes,
                        (s.layer_offset + h * s.head_stride) * bytes, s.v_offset * bytes, s.row * bytes,
                        s.heads, s.group, s.dim, h, q_start, q_len, ctx, q_begin, q_end, a.scale, a.window,
                        w.qb.data(), w.acc.data(), w.m.data(), w.l.data(), w.scores.data(), w.pp.data(),
                        w.kt.data(), w.vp.data()};
    bf16_attend_avx512(item);
}

// A work item for the int8 dot-product kernel (paged_attention_i8.h), its scratch sized here.
void attend_i8(const LayerArgs& a, const Shape& s, Scratch& w, const int32_t* table, int32_t q_start,
               int32_t q_len, int32_t ctx, int32_t q_begin, int32_t q_end, int64_t h) {
    const int64_t rows = (q_end - q_begin) * s.group;
    w.qbytes.resize(rows * 2 * s.dim);
    w.qs.resize(rows);
    w.acc.resize(rows * s.dim);
    w.m.resize(rows);
    w.l.resize(rows);
    w.scores.resize(rows * kI8KeyChunk);
    w.pw.resize(rows * kI8KeyChunk);
    w.ws.resize(rows);
    I8AttendItem item{a.q.data, a.q.row_stride, a.out, a.act_dtype == DType::bf16, static_cast<const char*>(a.kv),
                      table, s.block_size, s.block_stride, s.layer_offset + h * s.head_stride, s.v_offset,
                      s.heads, s.group, s.dim, h, q_start, q_len, ctx, q_begin, q_end, a.scale, a.window,
                      w.qbytes.data(), w.qs.data(), w.acc.data(), w.m.data(), w.l.data(), w.scores.data(),
                      w.pw.data(), w.ws.data()};
    i8_attend_avx512vnni(item);
}

// D > 0: head_dim known at compile time, so the inner loops fully unroll and
// the accumulators stay in registers; D == 0: any head_dim at run time.
template <int D, typename QT, typename KT>
struct Kernel {
    static void write_kv(const LayerArgs& a, const Shape& s, const std::vector<int64_t>& slots) {
        const int64_t dim = D > 0 ? D : s.dim;
        KT* pool = static_cast<KT*>(a.kv);
        const int64_t T = static_cast<int64_t>(slots.size());
        // An int8 row is stored rotated (hadamard.h), K less the layer's offset first (paged_attention.h).
        std::vector<float> rot(std::is_same_v<KT, int8_t> ? dim : 0);
        std::vector<int8_t> q8(rot.size());
        for (int64_t t = 0; t < T; ++t) {
            const int64_t block = slots[t] / s.block_size, off = slots[t] % s.block_size;
            // An int8 token's bytes are spread over its slab (paged_attention.h); other pools' are one row.
            KT* kdst = pool + block * s.block_stride + s.layer_offset + (std::is_same_v<KT, int8_t> ? 0 : off * s.row);
            const QT* ksrc = static_cast<const QT*>(a.k.data) + t * a.k.row_stride;
            const QT* vsrc = static_cast<const QT*>(a.v.data) + t * a.v.row_stride;
            for (int64_t h = 0; h < s.kv_heads; ++h) {
                KT* kd = kdst + h * s.head_stride;
                KT* vd = kd + s.v_offset;
                const QT* ks = ksrc + h * dim;
                const QT* vs = vsrc + h * dim;
                if constexpr (std::is_same_v<KT, int8_t>) {
                    const float* mean = a.k_mean ? a.k_mean + h * dim : nullptr;
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) rot[d] = to_float(ks[d]) - (mean ? mean[d] : 0.0f);
                    hadamard_rotate(rot.data(), dim);
                    store_key(q8.data(), quantize_row(rot.data(), q8.data(), dim), kd, off, s.block_size, dim);
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) rot[d] = to_float(vs[d]);
                    hadamard_rotate(rot.data(), dim);
                    store_value(q8.data(), quantize_row(rot.data(), q8.data(), dim), vd, off, s.block_size, dim);
                } else {
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) {
                        kd[d] = from_float<KT>(to_float(ks[d]));
                        vd[d] = from_float<KT>(to_float(vs[d]));
                    }
                }
            }
        }
    }

    // Attend rows = (query token i in [q_begin, q_end)) x (query head g of kv head h).
    static void attend(const LayerArgs& a, const Shape& s, Scratch& w, const int32_t* table, int32_t q_start,
                       int32_t q_len, int32_t ctx, int32_t q_begin, int32_t q_end, int64_t h) {
        const int64_t dim = D > 0 ? D : s.dim;
        const int64_t G = s.group;
        const int64_t rows = (q_end - q_begin) * G;
        w.q.resize(rows * dim);
        w.acc.assign(rows * dim, 0.0f);
        w.m.assign(rows, -std::numeric_limits<float>::infinity());
        w.l.assign(rows, 0.0f);
        w.first_key.resize(rows);
        w.last_key.resize(rows);
        w.scores.resize(kKeyChunk);
        if constexpr (!std::is_same_v<KT, float>) {
            w.kbuf.resize(kKeyChunk * dim);
            w.vbuf.resize(kKeyChunk * dim);
        }

        // Query token i sits at position ctx - q_len + i and sees keys 0..that position (the window's last
        // keys up to it in a sliding-window layer).
        const QT* qbase = static_cast<const QT*>(a.q.data);
        for (int32_t i = q_begin; i < q_end; ++i) {
            const QT* qrow = qbase + static_cast<int64_t>(q_start + i) * a.q.row_stride + h * G * dim;
            for (int64_t g = 0; g < G; ++g) {
                const int64_t r = (i - q_begin) * G + g;
                float* dst = w.q.data() + r * dim;
                const QT* src = qrow + g * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) dst[d] = to_float(src[d]) * a.scale;
                if constexpr (std::is_same_v<KT, int8_t>) hadamard_rotate(dst, dim);  // as the keys are
                w.last_key[r] = ctx - q_len + i;
                w.first_key[r] = a.window > 0 ? std::max(0, w.last_key[r] - a.window + 1) : 0;
            }
        }

        const KT* pool = static_cast<const KT*>(a.kv);
        const int32_t num_keys = ctx - q_len + q_end;
        const int64_t head_offset = s.layer_offset + h * s.head_stride;
        const KT* krows[kKeyChunk];  // an int8 pool's: the key's K slab, its offset in the block in offs
        const KT* vrows[kKeyChunk];
        int64_t offs[kKeyChunk];
        // Keys before the first row's window are seen by no row of the tile.
        for (int32_t c0 = w.first_key[0]; c0 < num_keys; c0 += kKeyChunk) {
            const int32_t n = std::min<int32_t>(kKeyChunk, num_keys - c0);
            // Walk the chunk block by block (no division per key).
            int64_t blk = c0 / s.block_size, off = c0 % s.block_size;
            const KT* head = pool + table[blk] * s.block_stride + head_offset;
            for (int32_t t = 0; t < n; ++t) {
                krows[t] = head + (std::is_same_v<KT, int8_t> ? 0 : off * s.row);
                vrows[t] = krows[t] + s.v_offset;
                offs[t] = off;
                if (++off == s.block_size && t + 1 < n) {
                    off = 0;
                    head = pool + table[++blk] * s.block_stride + head_offset;
                }
            }
            // bf16 K/V are widened once per chunk and shared by all rows (the GQA group and the query tile).
            const float* kf[kKeyChunk];
            const float* vf[kKeyChunk];
            for (int32_t t = 0; t < n; ++t) {
                if constexpr (std::is_same_v<KT, float>) {
                    kf[t] = krows[t];
                    vf[t] = vrows[t];
                } else {
                    float* kb = w.kbuf.data() + t * dim;
                    float* vb = w.vbuf.data() + t * dim;
                    if constexpr (std::is_same_v<KT, int8_t>) {
                        widen_key(krows[t], vrows[t], offs[t], s.block_size, dim, kb, vb);
                    } else {
#pragma omp simd
                        for (int64_t d = 0; d < dim; ++d) {
                            kb[d] = to_float(krows[t][d]);
                            vb[d] = to_float(vrows[t][d]);
                        }
                    }
                    kf[t] = kb;
                    vf[t] = vb;
                }
            }

            for (int64_t r = 0; r < rows; ++r) {
                // The row sees the chunk's keys lo .. valid - 1.
                const int32_t lo = std::max(0, w.first_key[r] - c0);
                const int32_t valid = std::min<int32_t>(n, w.last_key[r] - c0 + 1);
                if (valid <= lo) continue;
                const float* qr = w.q.data() + r * dim;
                float* sc = w.scores.data();
                dots<D>(qr, kf + lo, valid - lo, sc + lo, dim);
                float mx = w.m[r];
                for (int32_t t = lo; t < valid; ++t) mx = std::max(mx, sc[t]);
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int32_t t = lo; t < valid; ++t) {
                    sc[t] = exp_nonpos(sc[t] - mx);
                    sum += sc[t];
                }
                float* acc = w.acc.data() + r * dim;
                if (mx > w.m[r]) {
                    // The running max moved: earlier weights shrink by exp(old - new).
                    const float corr = exp_nonpos(w.m[r] - mx);
                    w.l[r] *= corr;
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) acc[d] *= corr;
                    w.m[r] = mx;
                }
                w.l[r] += sum;
                accumulate<D>(acc, sc + lo, vf + lo, valid - lo, dim);
            }
        }

        QT* out = static_cast<QT*>(a.out);
        for (int32_t i = q_begin; i < q_end; ++i) {
            QT* orow = out + (static_cast<int64_t>(q_start + i) * s.heads + h * G) * dim;
            for (int64_t g = 0; g < G; ++g) {
                const int64_t r = (i - q_begin) * G + g;
                const float inv = 1.0f / w.l[r];
                const float* acc = w.acc.data() + r * dim;
                QT* o = orow + g * dim;
                if constexpr (std::is_same_v<KT, int8_t>) {
                    // The sum of rotated values, rotated back.
                    w.rot.resize(dim);
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) w.rot[d] = acc[d] * inv;
                    hadamard_rotate(w.rot.data(), dim);
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) o[d] = from_float<QT>(w.rot[d]);
                    continue;
                }
#pragma omp simd
                for (int64_t d = 0; d < dim; ++d) o[d] = from_float<QT>(acc[d] * inv);
            }
        }
    }
};

template <int D, typename QT, typename KT>
void run_layer(const LayerArgs& a, const Shape& s, const std::vector<int64_t>& slots,
               const std::vector<AttentionMetadata::Tile>& tiles, const std::vector<int32_t>& q_start,
               const std::vector<int32_t>& q_len, const std::vector<int32_t>& ctx,
               const std::vector<int32_t>& tables, int64_t max_blocks) {
    using K = Kernel<D, QT, KT>;
    const int64_t items = static_cast<int64_t>(tiles.size()) * s.kv_heads;
    const int nt = std::max(1, std::min<int>(a.num_threads, static_cast<int>(std::max<int64_t>(items, 1))));
    // Every new key must be in the pool before any query reads it. The write
    // is a few microseconds, so it runs on the calling thread before the tasks
    // are handed out rather than adding a wait a descheduled thread would hold up.
    K::write_kv(a, s, slots);
    parallel_for(items, nt, [&](int64_t it) {
        thread_local Scratch scratch;
        const auto& tile = tiles[it / s.kv_heads];
        const int64_t h = it % s.kv_heads;
        const int32_t* table = tables.data() + tile.seq * max_blocks;
        if (a.kernel == AttentionKernel::avx512vnni)
            attend_i8(a, s, scratch, table, q_start[tile.seq], q_len[tile.seq], ctx[tile.seq], tile.q_begin,
                      tile.q_end, h);
        else if (a.kernel == AttentionKernel::avx512bf16)
            attend_bf16(a, s, scratch, table, q_start[tile.seq], q_len[tile.seq], ctx[tile.seq], tile.q_begin,
                        tile.q_end, h);
        else
            K::attend(a, s, scratch, table, q_start[tile.seq], q_len[tile.seq], ctx[tile.seq], tile.q_begin,
                      tile.q_end, h);
    });
}

template <typename QT, typename KT>
void dispatch_dim(const LayerArgs& a, const Shape& s, const std::vector<int64_t>& slots,
                  const std::vector<AttentionMetadata::Tile>& tiles, const std::vector<int32_t>& q_start,
                  const std::vector<int32_t>& q_len, const std::vector<int32_t>& ctx,
                  const std::vector<int32_t>& tables, int64_t max_blocks) {
    switch (s.dim) {
        case 64:
            return run_layer<64, QT, KT>(a, s, slots, tiles, q_start, q_len, ctx, tables, max_blocks);
        case 128:
            return run_layer<128, QT, KT>(a, s, slots, tiles, q_start, q_len, ctx, tables, max_blocks);
        case 256:  // Gemma's
            return run_layer<256, QT, KT>(a, s, slots, tiles, q_start, q_len, ctx, tables, max_blocks);
        default:
            return run_layer<0, QT, KT>(a, s, slots, tiles, q_start, q_len, ctx, tables, max_blocks);
    }
}

[[noreturn]] void fail(const std::string& what) { throw AttentionError(what); }

}  // namespace

bool attention_kernel_supported(AttentionKernel kernel, DType kv_dtype, int64_t head_dim) {
    const CpuFeatures& f = cpu_features();
    switch (kernel) {
        case AttentionKernel::avx2:
            return f.avx2 && f.fma;
        case AttentionKernel::avx512bf16:
            return KVMUX_WIDE_KERNELS && f.avx512f && f.avx512bw && f.avx512vl && f.avx512bf16 &&
                   kv_dtype == DType::bf16 && bf16_attend_supports(head_dim);
        case AttentionKernel::avx512vnni:
            return KVMUX_WIDE_KERNELS && f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni && f.f16c &&
                   kv_dtype == DType::i8 && i8_attend_supports(head_dim);
    }
    return false;
}

AttentionMetadata::AttentionMetadata(const int64_t* slot_mapping, int64_t num_tokens, const std::vector<int64_t>& query_lens,
                             const std::vector<int64_t>& context_lens, const int32_t* block_tables,
                             int64_t max_blocks, int64_t block_size, int64_t num_blocks)
    : max_blocks_(max_blocks), block_size_(block_size), num_blocks_(num_blocks) {
    const int64_t S = static_cast<int64_t>(query_lens.size());
    if (S == 0) fail("query_lens: no sequences");
    if (static_cast<int64_t>(context_lens.size()) != S) fail("context_lens: length differs from query_lens");
    if (block_size < 1 || num_blocks < 1 || max_blocks < 1) fail("block_size, num_blocks, max_blocks must be >= 1");

    q_start_.resize(S);
    q_len_.resize(S);
    ctx_.resize(S);
    int64_t start = 0;
    for (int64_t i = 0; i < S; ++i) {
        const int64_t ql = query_lens[i], cl = context_lens[i];
        if (ql < 1) fail("query_lens[" + std::to_string(i) + "] must be >= 1");
        if (cl < ql) fail("context_lens[" + std::to_string(i) + "] is shorter than its query");
        if (cl > max_blocks * block_size)
            fail("context_lens[" + std::to_string(i) + "] needs more blocks than block_tables has columns");
        if (cl > std::numeric_limits<int32_t>::max()) fail("context_lens: too long");
        q_start_[i] = static_cast<int32_t>(start);
        q_len_[i] = static_cast<int32_t>(ql);
        ctx_[i] = static_cast<int32_t>(cl);
        start += ql;
    }
    if (start != num_tokens) fail("slot_mapping: length differs from the sum of query_lens");

    tables_.assign(block_tables, block_tables + S * max_blocks);
    for (int64_t i = 0; i < S; ++i) {
        const int64_t used = (ctx_[i] + block_size - 1) / block_size;
        for (int64_t j = 0; j < used; ++j) {
            const int32_t b = tables_[i * max_blocks + j];
            if (b < 0 || b >= num_blocks)
                fail("block_tables[" + std::to_string(i) + ", " + std::to_string(j) + "] = " + std::to_string(b) +
                     " is outside the pool of " + std::to_string(num_blocks) + " blocks");
        }
    }
    slots_.assign(slot_mapping, slot_mapping + num_tokens);
    for (int64_t t = 0; t < num_tokens; ++t)
        if (slots_[t] < 0 || slots_[t] >= num_blocks * block_size)
            fail("slot_mapping[" + std::to_string(t) + "] = " + std::to_string(slots_[t]) + " is outside the pool");

    for (int32_t i = 0; i < S; ++i)
        for (int32_t b = 0; b < q_len_[i]; b += kQueryTile)
            tiles_.push_back({i, b, std::min(q_len_[i], b + kQueryTile)});
    // Costliest first (queries x keys they see), so dynamic scheduling does not
    // end a layer waiting on one long tile picked up last.
    auto cost = [this](const Tile& t) {
        return static_cast<int64_t>(t.q_end - t.q_begin) * (ctx_[t.seq] - q_len_[t.seq] + t.q_end);
    };
    std::stable_sort(tiles_.begin(), tiles_.end(), [&](const Tile& x, const Tile& y) { return cost(x) > cost(y); });
}

void AttentionMetadata::run(const LayerArgs& a) const {
    if (a.num_heads < 1 || a.num_kv_heads < 1 || a.num_heads % a.num_kv_heads != 0)
        fail("num_heads must be a positive multiple of num_kv_heads");
    if (a.head_dim < 1) fail("head_dim must be >= 1");
    if (a.window < 0) fail("window must be >= 0 (0: no sliding window)");
    if (a.kv_dtype == DType::i8 && a.head_dim % 4 != 0) fail("an int8 pool needs head_dim a multiple of 4");
    if (a.num_blocks != num_blocks_ || a.block_size != block_size_)
        fail("kv: pool shape differs from the one the metadata was made for");
    if (a.layer < 0 || a.layer >= a.num_layers) fail("layer is outside [0, num_layers)");
    if (a.q.row_stride < a.num_heads * a.head_dim) fail("q: row stride smaller than a row");
    if (a.k.row_stride < a.num_kv_heads * a.head_dim) fail("k: row stride smaller than a row");
    if (a.v.row_stride < a.num_kv_heads * a.head_dim) fail("v: row stride smaller than a row");

    Shape s;
    s.heads = a.num_heads;
    s.kv_heads = a.num_kv_heads;
    s.group = a.num_heads / a.num_kv_heads;
    s.dim = a.head_dim;
    s.block_size = block_size_;
    s.row = a.head_dim + (a.kv_dtype == DType::i8 ? 2 : 0);
    s.head_stride = block_size_ * s.row;
    s.v_offset = a.num_kv_heads * s.head_stride;
    s.block_stride = a.num_layers * 2 * s.v_offset;
    s.layer_offset = a.layer * 2 * s.v_offset;

    const bool q_bf16 = a.act_dtype == DType::bf16, kv_bf16 = a.kv_dtype == DType::bf16;
    const bool kv_i8 = a.kv_dtype == DType::i8;
    if (!q_bf16 && a.act_dtype != DType::f32) fail("act_dtype must be f32 or bf16");
    if (!kv_bf16 && !kv_i8 && a.kv_dtype != DType::f32) fail("kv_dtype must be f32, bf16 or i8");
    if (!attention_kernel_supported(a.kernel, a.kv_dtype, a.head_dim))
        fail("attention kernel " + std::to_string(static_cast<int>(a.kernel)) +
             " does not run here: the avx512bf16 kernel needs AVX512-BF16, a bf16 pool and head_dim 64, 128 or 256; "
             "the avx512vnni kernel AVX512-VNNI, an int8 pool and head_dim 64, 128 or 256");
    // The int8 kernel reads 16 keys from one slab (or two of 8): other block sizes would read past a block.
    if (a.kernel == AttentionKernel::avx512vnni && !i8_attend_block_size(a.block_size))
        fail("the avx512vnni kernel needs block_size 8 or a multiple of 16, got " + std::to_string(a.block_size));
    auto go = [&](auto qt, auto kt) {
        dispatch_dim<decltype(qt), decltype(kt)>(a, s, slots_, tiles_, q_start_, q_len_, ctx_, tables_, max_blocks_);
    };
    if (kv_i8 && q_bf16) go(bf16{}, int8_t{});
    else if (kv_i8) go(float{}, int8_t{});
    else if (q_bf16 && kv_bf16) go(bf16{}, bf16{});
    else if (q_bf16) go(bf16{}, float{});
    else if (kv_bf16) go(float{}, bf16{});
    else go(float{}, float{});
}

}  // namespace kvmux
