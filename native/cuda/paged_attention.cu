// CUDA kernels behind native/cuda/paged_attention.h.
//
// Three kernels per layer, all on the caller's stream:
//   write_kv  -- new K/V into their slots (must precede any read of them);
//   decode    -- one query token per sequence: a CTA per (partition of the
//                context, KV head, sequence) scores its keys for the whole GQA
//                group at once (each K/V row is read once per KV head), then
//                decode_merge combines partitions of long contexts;
//   prefill   -- query tiles of a prompt chunk attend causally over cached
//                blocks plus the chunk itself, flash-style (online softmax
//                over 32-key chunks staged in shared memory).
// With a window (a sliding-window layer), a query at position i sees keys
// max(0, i - window + 1) .. i: decode's partitions start at its first key,
// prefill's key walk at its tile's first row's, and earlier keys are masked.
//
// An int8 pool (kv_cache.py, native/cpu/paged_attention.h) keeps each row
// rotated by the Walsh-Hadamard transform (K less the layer's k_mean first),
// as int8 with a float16 scale, in slabs laid out for the CPU's integer dot
// products. Here its values are widened to float as they are read; the query
// is rotated as the keys are (a rotation keeps dot products), and the
// weighted sum of rotated values is rotated back (H is its own inverse).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/paged_attention.h"

namespace kvmux::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 16;     // query heads per KV head
constexpr int kGroupPass = 8;     // query heads accumulated per pass of the decode P.V loop
constexpr int kMaxDim = 256;
constexpr int kPrefillRows = 32;  // query rows (tokens x group) per prefill CTA
constexpr int kKeyChunk = 32;     // keys per prefill step: one per lane

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Eight consecutive elements in 16-byte loads (rows are 16-byte aligned since D % 8 == 0).
__device__ __forceinline__ void load8(const float* p, float (&f)[8]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = to_float(h[e]);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Pool geometry of one layer, in elements (an int8 pool's head_stride is a slab's: block_size * (dim + 2)).
struct Pool {
    int64_t block_stride, layer_offset, head_stride, v_offset, block_size, dim;
    __device__ __forceinline__ int64_t key(int32_t block, int64_t h, int64_t off) const {
        return block * block_stride + layer_offset + h * head_stride + off * dim;
    }
    __device__ __forceinline__ int64_t slab(int32_t block, int64_t h) const {
        return block * block_stride + layer_offset + h * head_stride;
    }
};

// A token's K and V as the kernels read them: rows of dim elements...
template <typename KT>
struct KvRef {
    const KT* k;
    int64_t v_offset;
    __device__ __forceinline__ KvRef(const KT* pool, const Pool& P, int32_t block, int64_t h, int64_t off)
        : k(pool + P.key(block, h, off)), v_offset(P.v_offset) {}
    __device__ __forceinline__ void key8(int64_t c, float (&f)[8]) const { load8(k + c, f); }
    __device__ __forceinline__ void value8(int64_t c, float (&f)[8]) const { load8(k + v_offset + c, f); }
    __device__ __forceinline__ float key(int64_t d) const { return to_float(k[d]); }
    __device__ __forceinline__ float value(int64_t d) const { return to_float(k[v_offset + d]); }
};

// ... or, in an int8 pool, token t's bytes in its block's K slab (dwords of 4 dims of one token, tokens side by
// side) and V slab (dwords of one dim of 4 consecutive tokens), each followed by the tokens' float16 scales.
template <>
struct KvRef<int8_t> {
    const int8_t *kslab, *vslab;
    int64_t t, bs, D;
    float ks, vs;
    __device__ __forceinline__ KvRef(const int8_t* pool, const Pool& P, int32_t block, int64_t h, int64_t off)
        : kslab(pool + P.slab(block, h)), vslab(kslab + P.v_offset), t(off), bs(P.block_size), D(P.dim),
          ks(__half2float(*reinterpret_cast<const __half*>(kslab + P.block_size * P.dim + 2 * off))),
          vs(__half2float(*reinterpret_cast<const __half*>(vslab + P.block_size * P.dim + 2 * off))) {}
    __device__ __forceinline__ void key8(int64_t c, float (&f)[8]) const {  // c: a multiple of 8
        const char4 a = *reinterpret_cast<const char4*>(kslab + ((c / 4) * bs + t) * 4);
        const char4 b = *reinterpret_cast<const char4*>(kslab + ((c / 4 + 1) * bs + t) * 4);
        f[0] = a.x * ks, f[1] = a.y * ks, f[2] = a.z * ks, f[3] = a.w * ks;
        f[4] = b.x * ks, f[5] = b.y * ks, f[6] = b.z * ks, f[7] = b.w * ks;
    }
    __device__ __forceinline__ void value8(int64_t c, float (&f)[8]) const {
        const int8_t* row = vslab + (t / 4) * D * 4 + t % 4;
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = row[4 * (c + e)] * vs;
    }
    __device__ __forceinline__ float key(int64_t d) const { return kslab[((d / 4) * bs + t) * 4 + d % 4] * ks; }
    __device__ __forceinline__ float value(int64_t d) const { return vslab[((t / 4) * D + d) * 4 + t % 4] * vs; }
};

// x[r, 0..D) <- H x[r, 0..D) for rows r < rows, in shared memory, by the whole CTA (every thread must call it):
// per block of hadamard_block(D) values the butterflies of span 1, 2, 4, ... (a + b, a - b), then the scale, the
// operations hadamard.h and kv_cache.rotate_rows do in the same order, so a row rotates to the same floats. The
// _rn intrinsics keep --use_fast_math from contracting or approximating them (it still flushes subnormals).
__device__ void hadamard_rows(float* x, int rows, int D) {
    const int n = (D & -D) < 256 ? (D & -D) : 256;  // a power of two, at least 8 (D % 8 == 0)
    const int log_half = __ffs(n / 2) - 1;
    const float norm = static_cast<float>(1.0 / sqrt(static_cast<double>(n)));
    const int pairs = rows * D / 2, row_pairs = D / 2;
    __syncthreads();
    for (int len = 1, shift = 0; len < n; len <<= 1, ++shift) {
        for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
            const int r = i / row_pairs, j = i - r * row_pairs;  // pair j of row r
            const int k = j & (n / 2 - 1);                       // pair k of its block
            const int lo = r * D + (j >> log_half) * n + ((k >> shift) << (shift + 1)) + (k & (len - 1));
            const float a = x[lo], b = x[lo + len];
            x[lo] = __fadd_rn(a, b);
            x[lo + len] = __fsub_rn(a, b);
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) x[i] = __fmul_rn(x[i], norm);
    __syncthreads();
}

template <typename QT, typename KT>
__global__ void write_kv_kernel(const QT* __restrict__ k, const QT* __restrict__ v, int64_t k_stride,
                                int64_t v_stride, KT* __restrict__ pool, const int64_t* __restrict__ slots,
                                int64_t kv_heads, Pool P) {
    const int64_t t = blockIdx.x;
    const int64_t slot = slots[t];
    const int64_t block = slot / P.block_size, off = slot % P.block_size;
    for (int64_t i = threadIdx.x; i < kv_heads * P.dim; i += blockDim.x) {
        const int64_t h = i / P.dim, d = i % P.dim;
        const int64_t dst = P.key(static_cast<int32_t>(block), h, off) + d;
        pool[dst] = from_float<KT>(to_float(k[t * k_stride + i]));
        pool[dst + P.v_offset] = from_float<KT>(to_float(v[t * v_stride + i]));
    }
}

// An int8 pool's writer, one CTA per new token: each KV head's K (less k_mean) and V rotated, then stored as
// kv_cache.quantize_rows does (scale = max |x| / 127 rounded to float16 first, q = round(x / scale) in
// [-127, 127], a row of zeros scale 0), every step in IEEE arithmetic, so the bytes equal the torch reference's.
__device__ void quantize_store(const float* x, int8_t* slab, int64_t t, const Pool& P, bool key, float* red) {
    const int64_t D = P.dim, bs = P.block_size;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    float peak = 0.0f;
    for (int64_t d = tid; d < D; d += blockDim.x) peak = fmaxf(peak, fabsf(x[d]));
    peak = warp_max(peak);
    if (lane == 0) red[warp] = peak;
    __syncthreads();
    peak = 0.0f;
    for (int w = 0; w < kWarps; ++w) peak = fmaxf(peak, red[w]);
    __syncthreads();  // red is written again by the next row
    const __half h = __float2half_rn(__fdiv_rn(peak, 127.0f));
    const float scale = __half2float(h);
    const float inv = scale > 0.0f ? __frcp_rn(scale) : 0.0f;
    for (int64_t d = tid; d < D; d += blockDim.x) {
        const float q = fminf(127.0f, fmaxf(-127.0f, rintf(__fmul_rn(x[d], inv))));
        slab[key ? ((d / 4) * bs + t) * 4 + d % 4 : ((t / 4) * D + d) * 4 + t % 4] = static_cast<int8_t>(q);
    }
    if (tid == 0) *reinterpret_cast<__half*>(slab + bs * D + 2 * t) = h;
}

template <typename QT>
__global__ void __launch_bounds__(kThreads) write_kv_int8_kernel(const QT* __restrict__ k, const QT* __restrict__ v,
                                                                 int64_t k_stride, int64_t v_stride,
                                                                 int8_t* __restrict__ pool,
                                                                 const int64_t* __restrict__ slots, int64_t kv_heads,
                                                                 const float* __restrict__ k_mean, Pool P) {
    extern __shared__ float smem[];
    const int64_t D = P.dim, t = blockIdx.x;
    float* rows = smem;         // [2, D]: this head's K and V
    float* red = rows + 2 * D;  // [kWarps]
    const int64_t slot = slots[t];
    const int32_t block = static_cast<int32_t>(slot / P.block_size);
    const int64_t off = slot % P.block_size;
    for (int64_t h = 0; h < kv_heads; ++h) {
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
            const float x = to_float(k[t * k_stride + h * D + d]);
            rows[d] = k_mean ? __fsub_rn(x, k_mean[h * D + d]) : x;
            rows[D + d] = to_float(v[t * v_stride + h * D + d]);
        }
        hadamard_rows(rows, 2, static_cast<int>(D));
        int8_t* kslab = pool + P.slab(block, h);
        quantize_store(rows, kslab, off, P, true, red);
        quantize_store(rows + D, kslab + P.v_offset, off, P, false, red);
    }
}

struct DecodeParams {
    const int32_t *decode_seqs, *query_starts, *context_lens, *block_tables;
    int64_t max_blocks, q_stride, num_heads, kv_heads, group, max_partitions, window;
    float scale;
    float *part_out, *part_max, *part_sum;
};

// One CTA: sequence decode_seqs[blockIdx.z], KV head blockIdx.y, keys
// [blockIdx.x * kPartition, +kPartition). Shared memory: the group's queries
// [G, D], scores [G, kPartition], output sums [G, D], then max and sum [G].
template <typename QT, typename KT>
__global__ void __launch_bounds__(kThreads) decode_kernel(const QT* __restrict__ q, const KT* __restrict__ pool,
                                                          QT* __restrict__ out, DecodeParams p, Pool P) {
    extern __shared__ float smem[];
    const int64_t G = p.group, D = P.dim;
    const int seq_i = blockIdx.z, h = blockIdx.y, part = blockIdx.x;
    const int32_t s = p.decode_seqs[seq_i];
    const int32_t ctx = p.context_lens[s];
    const int32_t first = p.window > 0 ? max(0, ctx - static_cast<int32_t>(p.window)) : 0;  // its first key
    const int nparts = (ctx - first + kPartition - 1) / kPartition;
    if (part >= nparts) return;
    const int32_t k0 = first + part * kPartition;
    const int n = min(kPartition, ctx - k0);
    const int32_t* table = p.block_tables + s * p.max_blocks;
    const int64_t token = p.query_starts[s];

    float* q_s = smem;                  // [G, D]
    float* sc = q_s + G * D;            // [G, kPartition]
    float* o_s = sc + G * kPartition;   // [G, D]
    float* m_s = o_s + G * D;           // [G]
    float* l_s = m_s + G;               // [G]
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

    for (int64_t i = tid; i < G * D; i += kThreads) {
        q_s[i] = to_float(q[token * p.q_stride + h * G * D + i]) * p.scale;
        o_s[i] = 0.0f;
    }
    if constexpr (std::is_same_v<KT, int8_t>) hadamard_rows(q_s, static_cast<int>(G), static_cast<int>(D));  // as the keys are
    __syncthreads();

    // Scores: a thread per key, all G query heads against one K row read once.
    for (int t = tid; t < n; t += kThreads) {
        const int32_t pos = k0 + t;
        const KvRef<KT> key(pool, P, table[pos / P.block_size], h, pos % P.block_size);
        float acc[kMaxGroup];
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.0f;
        for (int64_t c = 0; c < D; c += 8) {
            float kf[8];
            key.key8(c, kf);
#pragma unroll
            for (int g = 0; g < kMaxGroup; ++g) {
                if (g < G) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[g] += q_s[g * D + c + e] * kf[e];
                }
            }
        }
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
            if (g < G) sc[g * kPartition + t] = acc[g];
    }
    __syncthreads();

    // Softmax statistics of this partition, a warp per query head.
    for (int64_t g = warp; g < G; g += kWarps) {
        float mx = -INFINITY;
        for (int t = lane; t < n; t += 32) mx = fmaxf(mx, sc[g * kPartition + t]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int t = lane; t < n; t += 32) {
            const float e = __expf(sc[g * kPartition + t] - mx);
            sc[g * kPartition + t] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) m_s[g] = mx, l_s[g] = sum;
    }
    __syncthreads();

    // P.V: thread = (8-wide slice of D, stripe of keys); neighbouring lanes read
    // neighbouring slices of one V row, so loads coalesce.
    const int chunks = static_cast<int>(D / 8), stripes = kThreads / chunks;
    const int c = tid % chunks, stripe = tid / chunks;
    if (stripe < stripes) {
        for (int64_t g0 = 0; g0 < G; g0 += kGroupPass) {
            float acc[kGroupPass][8];
#pragma unroll
            for (int g = 0; g < kGroupPass; ++g)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
            for (int t = stripe; t < n; t += stripes) {
                const int32_t pos = k0 + t;
                float vf[8];
                KvRef<KT>(pool, P, table[pos / P.block_size], h, pos % P.block_size).value8(c * 8, vf);
#pragma unroll
                for (int g = 0; g < kGroupPass; ++g) {
                    if (g0 + g < G) {
                        const float w = sc[(g0 + g) * kPartition + t];
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[g][e] += w * vf[e];
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < kGroupPass; ++g)
                if (g0 + g < G)
#pragma unroll
                    for (int e = 0; e < 8; ++e) atomicAdd(&o_s[(g0 + g) * D + c * 8 + e], acc[g][e]);
        }
    }
    __syncthreads();
    if constexpr (std::is_same_v<KT, int8_t>) hadamard_rows(o_s, static_cast<int>(G), static_cast<int>(D));  // the sum of rotated values, rotated back

    if (nparts == 1) {
        for (int64_t i = tid; i < G * D; i += kThreads)
            out[(token * p.num_heads + h * G) * D + i] = from_float<QT>(o_s[i] / l_s[i / D]);
        return;
    }
    const int64_t base = ((static_cast<int64_t>(seq_i) * p.kv_heads + h) * p.max_partitions + part) * G;
    for (int64_t i = tid; i < G * D; i += kThreads) p.part_out[base * D + i] = o_s[i] / l_s[i / D];
    for (int64_t g = tid; g < G; g += kThreads) p.part_max[base + g] = m_s[g], p.part_sum[base + g] = l_s[g];
}

// Merges the partitions of one (sequence, query head): weights exp(m_p - m) * l_p.
template <typename QT>
__global__ void decode_merge_kernel(QT* __restrict__ out, DecodeParams p, int64_t dim) {
    const int seq_i = blockIdx.y, head = blockIdx.x;
    const int32_t s = p.decode_seqs[seq_i];
    const int32_t ctx = p.context_lens[s];
    const int32_t first = p.window > 0 ? max(0, ctx - static_cast<int32_t>(p.window)) : 0;
    const int nparts = (ctx - first + kPartition - 1) / kPartition;
    if (nparts == 1) return;  // decode_kernel wrote it directly
    const int64_t h = head / p.group, g = head % p.group;
    const int64_t row0 = (static_cast<int64_t>(seq_i) * p.kv_heads + h) * p.max_partitions;
    float m = -INFINITY;
    for (int i = 0; i < nparts; ++i) m = fmaxf(m, p.part_max[(row0 + i) * p.group + g]);
    float total = 0.0f;
    for (int i = 0; i < nparts; ++i) total += __expf(p.part_max[(row0 + i) * p.group + g] - m) * p.part_sum[(row0 + i) * p.group + g];
    const int64_t token = p.query_starts[s];
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < nparts; ++i) {
            const int64_t r = (row0 + i) * p.group + g;
            acc += __expf(p.part_max[r] - m) * p.part_sum[r] * p.part_out[r * dim + d];
        }
        out[(token * p.num_heads + head) * dim + d] = from_float<QT>(acc / total);
    }
}

struct PrefillParams {
    const int32_t *tiles, *query_starts, *query_lens, *context_lens, *block_tables;
    int64_t max_blocks, q_stride, num_heads, group, window;
    float scale;
};

// One CTA: tile blockIdx.x (query tokens [qb, qe) of one sequence) x KV head
// blockIdx.y; rows = tokens x group <= 32, warp w owns rows w, w+4, ...; lane
// i scores key i of each 32-key chunk and owns output dims lane, lane+32, ...
template <typename QT, typename KT>
__global__ void __launch_bounds__(kThreads) prefill_kernel(const QT* __restrict__ q, const KT* __restrict__ pool,
                                                           QT* __restrict__ out, PrefillParams p, Pool P) {
    extern __shared__ float smem[];
    constexpr int kRowsPerWarp = kPrefillRows / kWarps;
    constexpr int kDimsPerLane = kMaxDim / 32;
    const int64_t G = p.group, D = P.dim;
    const int32_t s = p.tiles[3 * blockIdx.x], qb = p.tiles[3 * blockIdx.x + 1], qe = p.tiles[3 * blockIdx.x + 2];
    const int h = blockIdx.y;
    const int rows = static_cast<int>((qe - qb) * G);
    const int32_t qlen = p.query_lens[s], ctx = p.context_lens[s];
    const int64_t token0 = p.query_starts[s];
    const int32_t* table = p.block_tables + s * p.max_blocks;
    const int32_t num_keys = ctx - qlen + qe;
    const int32_t window = static_cast<int32_t>(p.window);
    // The first key the tile's first row sees: no row of the tile sees one before it.
    const int32_t tile_first = window > 0 ? max(0, ctx - qlen + qb - window + 1) : 0;

    float* q_s = smem;                     // [rows, D]
    float* k_s = q_s + kPrefillRows * D;   // [32, D + 1]: padded so lanes reading a column avoid bank conflicts
    float* v_s = k_s + kKeyChunk * (D + 1);  // [32, D]
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

    for (int64_t i = tid; i < rows * D; i += kThreads) {
        const int64_t r = i / D, d = i % D;
        const int64_t tok = token0 + qb + r / G, head = h * G + r % G;
        q_s[i] = to_float(q[tok * p.q_stride + head * D + d]) * p.scale;
    }
    if constexpr (std::is_same_v<KT, int8_t>) hadamard_rows(q_s, rows, static_cast<int>(D));  // as the keys are

    float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
        m[j] = -INFINITY, l[j] = 0.0f;
#pragma unroll
        for (int e = 0; e < kDimsPerLane; ++e) acc[j][e] = 0.0f;
    }

    for (int32_t c0 = tile_first; c0 < num_keys; c0 += kKeyChunk) {
        __syncthreads();  // the previous chunk is consumed (and, first time, q_s is written)
        for (int64_t i = tid; i < kKeyChunk * D; i += kThreads) {
            const int t = static_cast<int>(i / D);
            const int64_t d = i % D;
            const int32_t pos = c0 + t;
            if (pos < num_keys) {
                const KvRef<KT> kv(pool, P, table[pos / P.block_size], h, pos % P.block_size);
                k_s[t * (D + 1) + d] = kv.key(d);
                v_s[t * D + d] = kv.value(d);
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kRowsPerWarp; ++j) {
            const int r = warp + kWarps * j;
            if (r >= rows) break;
            const int32_t last = ctx - qlen + qb + static_cast<int32_t>(r / G);  // last key this row sees
            const int32_t first = window > 0 ? max(0, last - window + 1) : 0;  // first key this row sees
            if (c0 > last || c0 + kKeyChunk <= first) continue;  // a chunk with no key of the row leaves it as it is
            const bool valid = c0 + lane <= last && c0 + lane >= first;
            float score = -INFINITY;
            if (valid) {
                float dot = 0.0f;
                for (int64_t d = 0; d < D; ++d) dot += q_s[r * D + d] * k_s[lane * (D + 1) + d];
                score = dot;
            }
            const float m_new = fmaxf(m[j], warp_max(score));
            const float corr = __expf(m[j] - m_new);  // 0 on the first chunk (m = -inf)
            const float pr = valid ? __expf(score - m_new) : 0.0f;
            l[j] = l[j] * corr + warp_sum(pr);
            m[j] = m_new;
            const int nt = min(kKeyChunk, last - c0 + 1);
#pragma unroll
            for (int e = 0; e < kDimsPerLane; ++e) acc[j][e] *= corr;
            for (int t = 0; t < nt; ++t) {
                const float w = __shfl_sync(0xffffffffu, pr, t);
#pragma unroll
                for (int e = 0; e < kDimsPerLane; ++e) {
                    const int64_t d = lane + 32 * e;
                    if (d < D) acc[j][e] += w * v_s[t * D + d];
                }
            }
        }
    }

    if constexpr (std::is_same_v<KT, int8_t>) {
        // Rotated back through shared memory: each warp's rows of q_s are its own, done with by now.
#pragma unroll
        for (int j = 0; j < kRowsPerWarp; ++j) {
            const int r = warp + kWarps * j;
            if (r >= rows) break;
            const float inv = 1.0f / l[j];
#pragma unroll
            for (int e = 0; e < kDimsPerLane; ++e) {
                const int64_t d = lane + 32 * e;
                if (d < D) q_s[r * D + d] = acc[j][e] * inv;
            }
        }
        hadamard_rows(q_s, rows, static_cast<int>(D));
        for (int64_t i = tid; i < rows * D; i += kThreads) {
            const int64_t r = i / D, tok = token0 + qb + r / G, head = h * G + r % G;
            out[(tok * p.num_heads + head) * D + i % D] = from_float<QT>(q_s[i]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < kRowsPerWarp; ++j) {
            const int r = warp + kWarps * j;
            if (r >= rows) break;
            const int64_t tok = token0 + qb + r / G, head = h * G + r % G;
            const float inv = 1.0f / l[j];
#pragma unroll
            for (int e = 0; e < kDimsPerLane; ++e) {
                const int64_t d = lane + 32 * e;
                if (d < D) out[(tok * p.num_heads + head) * D + d] = from_float<QT>(acc[j][e] * inv);
            }
        }
    }
}

void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Opts a kernel into more than the default 48 KiB of dynamic shared memory when it needs it.
template <typename Kernel>
void reserve_smem(Kernel kernel, size_t bytes) {
    if (bytes > 48 * 1024)
        check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
              "cudaFuncSetAttribute");
}

template <typename QT, typename KT>
void launch(const Args& a) {
    auto stream = reinterpret_cast<cudaStream_t>(a.stream);
    const int64_t G = a.num_heads / a.num_kv_heads, D = a.head_dim;
    constexpr bool int8_pool = std::is_same_v<KT, int8_t>;
    Pool P;
    P.block_size = a.block_size;
    P.dim = D;
    P.head_stride = a.block_size * (int8_pool ? D + 2 : D);
    P.v_offset = a.num_kv_heads * P.head_stride;
    P.block_stride = a.num_layers * 2 * P.v_offset;
    P.layer_offset = a.layer * 2 * P.v_offset;
    auto* pool = reinterpret_cast<KT*>(a.kv);
    const auto* q = reinterpret_cast<const QT*>(a.q);
    auto* out = reinterpret_cast<QT*>(a.out);

    if constexpr (int8_pool) {
        write_kv_int8_kernel<QT><<<static_cast<unsigned>(a.num_tokens), kThreads, sizeof(float) * (2 * D + kWarps),
                                   stream>>>(
            reinterpret_cast<const QT*>(a.k), reinterpret_cast<const QT*>(a.v), a.k_stride, a.v_stride, pool,
            reinterpret_cast<const int64_t*>(a.slot_mapping), a.num_kv_heads, reinterpret_cast<const float*>(a.k_mean),
            P);
        check(cudaGetLastError(), "write_kv_int8_kernel");
    } else {
        write_kv_kernel<QT, KT><<<static_cast<unsigned>(a.num_tokens), kThreads, 0, stream>>>(
            reinterpret_cast<const QT*>(a.k), reinterpret_cast<const QT*>(a.v), a.k_stride, a.v_stride, pool,
            reinterpret_cast<const int64_t*>(a.slot_mapping), a.num_kv_heads, P);
        check(cudaGetLastError(), "write_kv_kernel");
    }

    if (a.num_decode > 0) {
        DecodeParams d{reinterpret_cast<const int32_t*>(a.decode_seqs), reinterpret_cast<const int32_t*>(a.query_starts),
                       reinterpret_cast<const int32_t*>(a.context_lens), reinterpret_cast<const int32_t*>(a.block_tables),
                       a.max_blocks, a.q_stride, a.num_heads, a.num_kv_heads, G, a.max_partitions, a.window, a.scale,
                       reinterpret_cast<float*>(a.part_out), reinterpret_cast<float*>(a.part_max),
                       reinterpret_cast<float*>(a.part_sum)};
        const size_t smem = sizeof(float) * (2 * G * D + G * kPartition + 2 * G);
        reserve_smem(decode_kernel<QT, KT>, smem);
        const dim3 grid(static_cast<unsigned>(a.max_partitions), static_cast<unsigned>(a.num_kv_heads),
                        static_cast<unsigned>(a.num_decode));
        decode_kernel<QT, KT><<<grid, kThreads, smem, stream>>>(q, pool, out, d, P);
        check(cudaGetLastError(), "decode_kernel");
        if (a.max_partitions > 1) {
            decode_merge_kernel<QT><<<dim3(static_cast<unsigned>(a.num_heads), static_cast<unsigned>(a.num_decode)),
                                      static_cast<unsigned>(std::min<int64_t>(D, 256)), 0, stream>>>(out, d, D);
            check(cudaGetLastError(), "decode_merge_kernel");
        }
    }

    if (a.num_tiles > 0) {
        PrefillParams pp{reinterpret_cast<const int32_t*>(a.prefill_tiles), reinterpret_cast<const int32_t*>(a.query_starts),
                         reinterpret_cast<const int32_t*>(a.query_lens), reinterpret_cast<const int32_t*>(a.context_lens),
                         reinterpret_cast<const int32_t*>(a.block_tables), a.max_blocks, a.q_stride, a.num_heads, G,
                         a.window, a.scale};
        const size_t smem = sizeof(float) * (kPrefillRows * D + kKeyChunk * (D + 1) + kKeyChunk * D);
        reserve_smem(prefill_kernel<QT, KT>, smem);
        const dim3 grid(static_cast<unsigned>(a.num_tiles), static_cast<unsigned>(a.num_kv_heads));
        prefill_kernel<QT, KT><<<grid, kThreads, smem, stream>>>(q, pool, out, pp, P);
        check(cudaGetLastError(), "prefill_kernel");
    }
}

}  // namespace

int prefill_tile_tokens(int64_t group) { return static_cast<int>(std::max<int64_t>(1, kPrefillRows / group)); }

void paged_attention(const Args& a) {
    if (a.num_heads < 1 || a.num_kv_heads < 1 || a.num_heads % a.num_kv_heads != 0)
        throw std::invalid_argument("num_heads must be a positive multiple of num_kv_heads");
    if (a.num_heads / a.num_kv_heads > kMaxGroup)
        throw std::invalid_argument("more than " + std::to_string(kMaxGroup) + " query heads per KV head");
    if (a.head_dim % 8 != 0 || a.head_dim > kMaxDim)
        throw std::invalid_argument("head_dim must be a multiple of 8 and at most " + std::to_string(kMaxDim));
    if (a.layer < 0 || a.layer >= a.num_layers) throw std::invalid_argument("layer is outside [0, num_layers)");
    if (a.num_tokens < 1) throw std::invalid_argument("no tokens");
    if (a.window < 0 || a.window > INT32_MAX) throw std::invalid_argument("window must be in [0, 2^31) (0: none)");
    const auto act = a.act_dtype, kv = a.kv_dtype;
    if (act == DType::f32 && kv == DType::f32) return launch<float, float>(a);
    if (act == DType::f32 && kv == DType::bf16) return launch<float, __nv_bfloat16>(a);
    if (act == DType::bf16 && kv == DType::bf16) return launch<__nv_bfloat16, __nv_bfloat16>(a);
    if (act == DType::f16 && kv == DType::f16) return launch<__half, __half>(a);
    if (kv == DType::i8) {
        if (a.block_size % 4 != 0) throw std::invalid_argument("an int8 pool needs block_size a multiple of 4");
        if (act == DType::f32) return launch<float, int8_t>(a);
        if (act == DType::bf16) return launch<__nv_bfloat16, int8_t>(a);
        if (act == DType::f16) return launch<__half, int8_t>(a);
    }
    throw std::invalid_argument("unsupported (activation, KV) dtype pair; supported: (f32, f32), (f32, bf16), "
                                "(bf16, bf16), (f16, f16), and f32, bf16 or f16 over i8");
}

}  // namespace kvmux::cuda
