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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

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

// Pool geometry of one layer, in elements.
struct Pool {
    int64_t block_stride, layer_offset, head_stride, v_offset, block_size, dim;
    __device__ __forceinline__ int64_t key(int32_t block, int64_t h, int64_t off) const {
        return block * block_stride + layer_offset + h * head_stride + off * dim;
    }
};

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

struct DecodeParams {
    const int32_t *decode_seqs, *query_starts, *context_lens, *block_tables;
    int64_t max_blocks, q_stride, num_heads, kv_heads, group, max_partitions;
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
    const int nparts = (ctx + kPartition - 1) / kPartition;
    if (part >= nparts) return;
    const int32_t k0 = part * kPartition;
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
    __syncthreads();

    // Scores: a thread per key, all G query heads against one K row read once.
    for (int t = tid; t < n; t += kThreads) {
        const int32_t pos = k0 + t;
        const KT* krow = pool + P.key(table[pos / P.block_size], h, pos % P.block_size);
        float acc[kMaxGroup];
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.0f;
        for (int64_t c = 0; c < D; c += 8) {
            float kf[8];
            load8(krow + c, kf);
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
                const KT* vrow = pool + P.key(table[pos / P.block_size], h, pos % P.block_size) + P.v_offset;
                float vf[8];
                load8(vrow + c * 8, vf);
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
    const int nparts = (p.context_lens[s] + kPartition - 1) / kPartition;
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
    int64_t max_blocks, q_stride, num_heads, group;
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

    float* q_s = smem;                     // [rows, D]
    float* k_s = q_s + kPrefillRows * D;   // [32, D + 1]: padded so lanes reading a column avoid bank conflicts
    float* v_s = k_s + kKeyChunk * (D + 1);  // [32, D]
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

    for (int64_t i = tid; i < rows * D; i += kThreads) {
        const int64_t r = i / D, d = i % D;
        const int64_t tok = token0 + qb + r / G, head = h * G + r % G;
        q_s[i] = to_float(q[tok * p.q_stride + head * D + d]) * p.scale;
    }

    float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
        m[j] = -INFINITY, l[j] = 0.0f;
#pragma unroll
        for (int e = 0; e < kDimsPerLane; ++e) acc[j][e] = 0.0f;
    }

    for (int32_t c0 = 0; c0 < num_keys; c0 += kKeyChunk) {
        __syncthreads();  // the previous chunk is consumed (and, first time, q_s is written)
        for (int64_t i = tid; i < kKeyChunk * D; i += kThreads) {
            const int t = static_cast<int>(i / D);
            const int64_t d = i % D;
            const int32_t pos = c0 + t;
            if (pos < num_keys) {
                const int64_t at = P.key(table[pos / P.block_size], h, pos % P.block_size) + d;
                k_s[t * (D + 1) + d] = to_float(pool[at]);
                v_s[t * D + d] = to_float(pool[at + P.v_offset]);
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kRowsPerWarp; ++j) {
            const int r = warp + kWarps * j;
            if (r >= rows) break;
            const int32_t last = ctx - qlen + qb + static_cast<int32_t>(r / G);  // last key this row sees
            if (c0 > last) continue;
            const bool valid = c0 + lane <= last;
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
    Pool P;
    P.block_size = a.block_size;
    P.dim = D;
    P.head_stride = a.block_size * D;
    P.v_offset = a.num_kv_heads * P.head_stride;
    P.block_stride = a.num_layers * 2 * P.v_offset;
    P.layer_offset = a.layer * 2 * P.v_offset;
    auto* pool = reinterpret_cast<KT*>(a.kv);
    const auto* q = reinterpret_cast<const QT*>(a.q);
    auto* out = reinterpret_cast<QT*>(a.out);

    write_kv_kernel<QT, KT><<<static_cast<unsigned>(a.num_tokens), kThreads, 0, stream>>>(
        reinterpret_cast<const QT*>(a.k), reinterpret_cast<const QT*>(a.v), a.k_stride, a.v_stride, pool,
        reinterpret_cast<const int64_t*>(a.slot_mapping), a.num_kv_heads, P);
    check(cudaGetLastError(), "write_kv_kernel");

    if (a.num_decode > 0) {
        DecodeParams d{reinterpret_cast<const int32_t*>(a.decode_seqs), reinterpret_cast<const int32_t*>(a.query_starts),
                       reinterpret_cast<const int32_t*>(a.context_lens), reinterpret_cast<const int32_t*>(a.block_tables),
                       a.max_blocks, a.q_stride, a.num_heads, a.num_kv_heads, G, a.max_partitions, a.scale,
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
                         a.scale};
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
    const auto act = a.act_dtype, kv = a.kv_dtype;
    if (act == DType::f32 && kv == DType::f32) return launch<float, float>(a);
    if (act == DType::f32 && kv == DType::bf16) return launch<float, __nv_bfloat16>(a);
    if (act == DType::bf16 && kv == DType::bf16) return launch<__nv_bfloat16, __nv_bfloat16>(a);
    if (act == DType::f16 && kv == DType::f16) return launch<__half, __half>(a);
    throw std::invalid_argument("unsupported (activation, KV) dtype pair; supported: (f32, f32), (f32, bf16), "
                                "(bf16, bf16), (f16, f16)");
}

}  // namespace kvmux::cuda
