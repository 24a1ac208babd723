// y = x W^T (+ bias) with W kept in GGUF's quantized blocks and x quantized per block on the fly.
//
// GGUF stores a weight row as blocks of 32 values, each block one fp16 scale d
// (and, for Q4_1 / Q5_1, an fp16 offset m) and 32 integers: Q8_0 w = d q with q int8,
// Q4_0 w = d (q - 8) and Q4_1 w = d q + m with q a nibble in 0..15, Q5_0 w = d (q - 16) and Q5_1
// w = d q + m with q in 0..31. The K-quants group 8 or 16 such sub-blocks under one fp16 super-scale:
// kvmux/ops/quant.py turns Q4_K into Q4_1's form, Q5_K into Q5_1's and Q6_K into blocks of 16 with
// w = d (q - 32), q in 0..63, each sub-block's d = super-scale x its integer scale rounded to fp16. The
// engine keeps those numbers in the file's bits per weight, rearranged once at load into panels of 16 rows:
//   quants [ceil(N / 16), K / B, block bytes]   per panel and block of B (32; 16 for Q6_K), its 16 rows'
//                                               integers interleaved along K, so one 32-bit lane of a
//                                               vector holds one output feature's next few k:
//     Q8_0: 16 chunks of 32 bytes; chunk g, byte 2c + i = q[row c][k = 2g + i]   (2 k per lane once widened)
//     Q4:   B / 8 chunks of 64 bytes; chunk h, byte 4c + i = q[c][8h + i] | q[c][8h + 4 + i] << 4 (4 k per lane)
//     Q5, Q6_K: Q4's low nibbles, then per chunk h and high bit (Q5 the fifth; Q6_K the fifth and sixth) two
//           64-bit masks (the low and the high nibbles' k) whose bit 4c + i is that bit of the integer at
//           byte 4c + i: 320 bytes per block of 32 for Q5, 192 per 16 for Q6_K
//   scales [ceil(N / 16), K / B, 16] fp16       d per row and block
//   mins   [ceil(N / 16), K / B, 16] fp16       m per row and block (Q4_1 and Q5_1 only)
// Rows past N are zero (scale 0). Activations are quantized per row and block
// of 32 with d_x = amax / L and q_x = round-half-even(x * (L / amax)), amax taken over a span of K: the block,
// except a K-quant's, 4 blocks (kvmux/ops/quant.py, activation_span), whose blocks then share d_x, which the
// tiles apply once a span rather than once a block:
// - for Q4, Q5 and Q6_K weights to bytes (L = 127, as llama.cpp does; per 16 for Q6_K), multiplied 4 per
//   lane by vpdpbusd (VNNI) or vpmaddubsw (AVX2); the sum of each block's q_x is
//   kept for the offsets: sum_k w x = d_x (d (sum q q_x - off sum q_x) + m sum q_x),
//   off 8 for Q4_0, 16 for Q5_0, 32 for Q6_K and 0 for Q4_1 and Q5_1;
// - for Q8_0 weights to int16 (L = 32767), multiplied 2 per lane by vpdpwssd
//   (VNNI) or vpmaddwd (AVX2): byte activations would make the activations'
//   rounding, not the weights', the larger error (measured on SmolLM2-135M:
//   95.9% argmax agreement with float32 instead of 98.2%), and on AVX2 16-bit
//   products cost no more than the sign juggling signed bytes would need.
// A block then costs integer dot products and one float multiply-add per 16
// outputs per row.
#pragma once

#include <cstdint>

namespace kvmux {

enum class QuantType : int { q8_0 = 0, q4_0 = 1, q4_1 = 2, q5_0 = 3, q5_1 = 4, q6_k = 5 };

// The instruction sets a kernel is built for; the caller checks the CPU has them (kvmux/ops/quant.py).
// amx_bf16 multiplies x rounded to bf16 by the weight dequantized to bf16 a chunk at a time (quant_bf16_amx.cpp).
enum class QuantKernel : int { avx2 = 0, avxvnni = 1, avx512vnni = 2, amx = 3, amx_bf16 = 4 };

constexpr int64_t kQuantBlock = 32;       // values per block along K (Q6_K: quant_block)
constexpr int64_t kQuantPanel = 16;       // rows per panel

constexpr int64_t quant_block(QuantType t) { return t == QuantType::q6_k ? 16 : kQuantBlock; }
// Planes of high bits after the nibbles of every form but Q8_0 (whose integers are signed bytes).
constexpr int high_planes(QuantType t) {
    return t == QuantType::q5_0 || t == QuantType::q5_1 ? 1 : t == QuantType::q6_k ? 2 : 0;
}
constexpr bool has_mins(QuantType t) { return t == QuantType::q4_1 || t == QuantType::q5_1; }
// What is subtracted from each unsigned integer: w = d (q - off).
constexpr int32_t quant_offset(QuantType t) {
    return t == QuantType::q4_0 ? 8 : t == QuantType::q5_0 ? 16 : t == QuantType::q6_k ? 32 : 0;
}
constexpr int64_t quant_panel_block_bytes(QuantType t) {  // one panel's quants for one block
    return t == QuantType::q8_0 ? kQuantPanel * kQuantBlock
                                : kQuantPanel * quant_block(t) / 2 + 2 * quant_block(t) * high_planes(t);
}
// Bits of the activations multiplied by weights of type t.
constexpr int activation_bits(QuantType t) { return t == QuantType::q8_0 ? 16 : 8; }
// What an activation block's sum of quants s enters the product as, computed once per row and block when x is
// quantized rather than by every panel's tile: with an offset, the block's integer dot starts at -off s; with mins,
// the block's min is weighted by d_x s.
constexpr int32_t block_offset(QuantType t, int32_t s) { return -quant_offset(t) * s; }
constexpr float block_min_weight(float dx, int32_t s) { return dx * static_cast<float>(s); }

struct QuantWeights {
    QuantType type;
    int64_t N, K;              // out and in features; K a multiple of 32
    const uint8_t* quants;
    const uint16_t* scales;    // fp16 bits
    const uint16_t* mins;      // fp16 bits; Q4_1 and Q5_1 only, else nullptr
    int64_t span;              // values of K sharing one activation scale: a multiple of quant_block(type) dividing K
};

// x: [M, K] float32 with row stride ldx; bias: [N] or nullptr; out: [M, N] with row stride ldo.
void quant_linear(const float* x, int64_t M, int64_t ldx, const QuantWeights& w, const float* bias, float* out,
                  int64_t ldo, QuantKernel kernel, int num_threads);

// Rows ids[0 .. n) of W dequantized, out [n, K] float32 (an embedding lookup); each id in [0, N).
void quant_rows(const QuantWeights& w, const int64_t* ids, int64_t n, float* out);

// The activation quantization every kernel applies to x before multiplying it by weights of form t and span
// `span` (a multiple of the block that divides K), for the tests' reference: q [M, K] (int16 for Q8_0, else
// int8), d [M, K / quant_block(t)] (equal within a span), and each block's
// correction (block_offset, block_min_weight): offsets [M, K / block] for the forms with an offset, min_weights
// for the forms with mins (the other left untouched).
void quantize_activations(const float* x, int64_t M, int64_t ldx, int64_t K, QuantType t, int64_t span, void* q,
                          float* d, int32_t* offsets, float* min_weights);

}  // namespace kvmux
