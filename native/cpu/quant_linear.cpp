#include "cpu/quant_linear.h"

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/packed_linear.h"
#include "cpu/quant_tiles.h"
#include "cpu/thread_pool.h"

namespace kvmux {
namespace {

// Rows per pass over a task's panels: their quantized activations (72 x K bytes) stay in L2 while the
// panels, each a few KB for the whole of K, go by once per pass. A multiple of every variant's tile_rows, so
// each pass starts at a group of the tiled activations; AMX's 64, four whole tiles of 16 rows (a part tile
// costs a tile configuration of its own).
constexpr int64_t row_block(QuantKernel kernel) { return kernel == QuantKernel::amx ? 64 : 72; }
static_assert(row_block(QuantKernel::avx512vnni) % tile_rows(QuantKernel::avx512vnni) == 0 &&
              row_block(QuantKernel::avx2) % tile_rows(QuantKernel::avx2) == 0 &&
              row_block(QuantKernel::avxvnni) % tile_rows(QuantKernel::avxvnni) == 0);
// Up to this many rows the calling thread quantizes the activations alone: a few rows take microseconds,
// less than handing them out as tasks and waiting for them.
constexpr int64_t kSerialRows = 16;
// A task's panels at least: a run long enough that the hardware prefetcher streams it.
constexpr int64_t kPanelsPerTask = 4;

// The largest |x| of n activations (n a multiple of 16).
float amax_of(const float* x, int64_t n) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

// N activations (16 or 32) as integers of `levels` under their span's amax: qi = round-half-even(x * (L / amax)),
// as int32 vectors.
template <int N>
void round_block(const float* x, float levels, float amax, __m256i* qi) {
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? levels / amax : 0.0f);
    for (int j = 0; j < N / 8; ++j)
        qi[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), inv),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

int32_t hsum(__m256i s) {
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    return _mm_cvtsi128_si32(t);
}

// One block of 32 activations: q = round-half-even(x * (L / amax)) with L = 127 (bytes, and the sum of q kept)
// or 32767 (int16).
template <typename XT>
void quantize_block(const float* x, float amax, XT* q, int32_t* sum) {
    __m256i qi[4];
    round_block<32>(x, sizeof(XT) == 1 ? 127.0f : 32767.0f, amax, qi);
    // The packs work within 128-bit lanes; the permutations put the values back in order.
    const __m256i lo = _mm256_packs_epi32(qi[0], qi[1]), hi = _mm256_packs_epi32(qi[2], qi[3]);
    if constexpr (sizeof(XT) == 2) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permute4x64_epi64(lo, 0xd8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), _mm256_permute4x64_epi64(hi, 0xd8));
    } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(
                                _mm256_packs_epi16(lo, hi), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        *sum = hsum(_mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3])));
    }
}

// One block of 16 activations to bytes (Q6_K's blocks), as quantize_block does 32.
void quantize_block16(const float* x, float amax, int8_t* q, int32_t* sum) {
    __m256i qi[2];
    round_block<16>(x, 127.0f, amax, qi);
    // packs work within 128-bit lanes: the permutation puts the int16s in order, then each lane's low 8 bytes.
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[0], qi[1]), 0xd8);
    const __m256i b = _mm256_packs_epi16(w, w);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                     _mm_unpacklo_epi64(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
    *sum = hsum(_mm256_add_epi32(qi[0], qi[1]));
}

// Row m of x into the activations' buffers for weights of form t (q, d, and the blocks' block_offset or
// block_min_weight), per block of quant_block(t) under one scale a span, tiled in groups of R rows (tiled_at).
void quantize_row(const float* x, int64_t m, int64_t ldx, int64_t K, QuantType t, int64_t span, void* q, float* d,
                  int32_t* offsets, float* min_weights, int64_t R) {
    const int64_t block = quant_block(t), nb = K / block;
    const float levels = activation_bits(t) == 16 ? 32767.0f : 127.0f;
    float amax = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + m * ldx + b * block;
        if (b * block % span == 0) amax = amax_of(xb, span);
        const int64_t at = tiled_at(m, b, nb, R);
        d[at] = amax / levels;
        int32_t sum = 0;
        if (block == 16)
            quantize_block16(xb, amax, static_cast<int8_t*>(q) + at * block, &sum);
        else if (activation_bits(t) == 16)
            quantize_block(xb, amax, static_cast<int16_t*>(q) + at * block, nullptr);
        else
            quantize_block(xb, amax, static_cast<int8_t*>(q) + at * block, &sum);
        if (has_mins(t))
            min_weights[at] = block_min_weight(d[at], sum);
        else if (quant_offset(t))
            offsets[at] = block_offset(t, sum);
    }
}

using TilesFn = void (*)(const QuantTileJob&, int64_t, int64_t, int64_t, int64_t);

TilesFn tiles_for(QuantKernel kernel) {
    switch (kernel) {
        case QuantKernel::avxvnni: return quant_tiles_avxvnni;
        case QuantKernel::avx512vnni: return quant_tiles_avx512vnni;
        case QuantKernel::amx: return quant_tiles_amx;
        case QuantKernel::avx2:
        case QuantKernel::amx_bf16: break;  // quant_linear sends amx_bf16 elsewhere
    }
    return quant_tiles_avx2;
}

}  // namespace

void quant_rows(const QuantWeights& w, const int64_t* ids, int64_t n, float* out) {
    const int64_t block = quant_block(w.type), nb = w.K / block, bytes = quant_panel_block_bytes(w.type);
    const int planes = high_planes(w.type);
    const int32_t off = quant_offset(w.type);
    for (int64_t r = 0; r < n; ++r) {
        const int64_t panel = ids[r] / kQuantPanel, c = ids[r] % kQuantPanel;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t at = panel * nb + b;
            const uint8_t* q = w.quants + at * bytes;
            const float d = _cvtsh_ss(w.scales[at * kQuantPanel + c]);
            const float m = w.mins ? _cvtsh_ss(w.mins[at * kQuantPanel + c]) : 0.0f;
            float* o = out + r * w.K + b * block;
            for (int k = 0; k < block; ++k) {
                int32_t v;
                if (w.type == QuantType::q8_0) {
                    v = static_cast<int8_t>(q[(k / 2) * 32 + 2 * c + k % 2]);
                } else {  // chunk h of 8 k: byte 4c + i holds k = 8h + i low, 8h + 4 + i high; then the planes
                    const int h = k / 8, half = (k % 8) / 4, lane = static_cast<int>(4 * c + k % 4);
                    v = half ? q[64 * h + lane] >> 4 : q[64 * h + lane] & 15;
                    const uint8_t* masks = q + kQuantPanel * block / 2;
                    for (int j = 0; j < planes; ++j)
                        v |= (masks[((h * planes + j) * 2 + half) * 8 + lane / 8] >> (lane % 8) & 1) << (4 + j);
                }
                o[k] = static_cast<float>(v - off) * d + m;
            }
        }
    }
}

void quantize_activations(const float* x, int64_t M, int64_t ldx, int64_t K, QuantType t, int64_t span, void* q,
                          float* d, int32_t* offsets, float* min_weights) {
    for (int64_t m = 0; m < M; ++m) quantize_row(x, m, ldx, K, t, span, q, d, offsets, min_weights, 1);
}

void quant_linear(const float* x, int64_t M, int64_t ldx, const QuantWeights& w, const float* bias, float* out,
                  int64_t ldo, QuantKernel kernel, int num_threads) {
    if (M == 0) return;
    if (kernel == QuantKernel::amx_bf16)
        return quant_linear_amx_bf16(x, M, ldx, w, bias, out, ldo, num_threads, bf16_x_buffer(M, w.K));
    const int64_t block = quant_block(w.type), K = w.K, nb = K / block;
    const int64_t panels = (w.N + kQuantPanel - 1) / kQuantPanel;
    const int bits = activation_bits(w.type);
    const int64_t R = tile_rows(kernel), padded = (M + R - 1) / R * R;  // the last group padded
    // The calling thread's scratch, reused across calls; the pool's helpers reach it through the job's pointers.
    thread_local std::vector<int16_t> xq_buf;
    thread_local std::vector<float> xd_buf;
    thread_local std::vector<int32_t> xo_buf;
    thread_local std::vector<float> xm_buf;
    xq_buf.resize(padded * K * bits / 16);
    xd_buf.resize(padded * nb);
    xo_buf.resize(padded * nb);
    xm_buf.resize(padded * nb);
    void* xq = xq_buf.data();
    float* xd = xd_buf.data();
    int32_t* xo = xo_buf.data();
    float* xm = xm_buf.data();
    QuantTileJob job{w, nb, xq, xd, xo, xm, bias, out, ldo};
    const TilesFn tiles = tiles_for(kernel);
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, panels)));
    if (M <= kSerialRows) {
        for (int64_t m = 0; m < M; ++m) quantize_row(x, m, ldx, K, w.type, w.span, xq, xd, xo, xm, R);
    } else {
        // Whole groups a task, so no two threads write the same group's scales and sums.
        const int64_t groups = padded / R, row_tasks = task_count(groups, nt, (4 + R - 1) / R);
        parallel_for(row_tasks, nt, [&](int64_t task) {
            const Span own = split(groups, row_tasks, task);
            for (int64_t m = own.begin * R; m < std::min(M, own.end * R); ++m)
                quantize_row(x, m, ldx, K, w.type, w.span, xq, xd, xo, xm, R);
        });
    }
    if (kernel == QuantKernel::amx && w.type == QuantType::q8_0) {  // AMX multiplies bytes: int16 as two of them
        thread_local std::vector<uint8_t> lo_buf;
        thread_local std::vector<int8_t> hi_buf;
        lo_buf.resize(M * K);
        hi_buf.resize(M * K);
        const int16_t* q16 = xq_buf.data();
        for (int64_t i = 0; i < M * K; ++i) {
            lo_buf[i] = static_cast<uint8_t>(q16[i] & 0xFF);
            hi_buf[i] = static_cast<int8_t>(q16[i] >> 8);
        }
        job.x_lo = lo_buf.data();
        job.x_hi = hi_buf.data();
    }
    // Each task is a contiguous run of panels, so whoever takes it streams that part of W.
    const int64_t rows = row_block(kernel);
    const int64_t tasks = task_count(panels, nt, kPanelsPerTask);
    parallel_for(tasks, nt, [&](int64_t task) {
        const Span own = split(panels, tasks, task);
        for (int64_t m0 = 0; m0 < M; m0 += rows) tiles(job, m0, std::min(M, m0 + rows), own.begin, own.end);
    });
}

}  // namespace kvmux
