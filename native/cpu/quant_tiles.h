// The instruction-set-specific half of quant_linear: one function per kernel
// variant runs rows [m0, m1) against panels [p0, p1) of a quantized weight,
// over activations quant_linear has already quantized. Each lives in its own
// quant_tiles_<variant>.cpp, compiled for that instruction set only.
#pragma once

#include <cstdint>

#include "cpu/quant_linear.h"

namespace kvmux {

// Rows of one tile of each variant. quant_linear lays the quantized activations out in groups of that many rows,
// block by block (tiled_at), so that a tile finds row i of block b at a constant offset from one pointer: with a
// pointer per row the compiler ran out of registers and spent three integer instructions on each dot product's
// address (the AMX variant loads row-major tiles: groups of 1).
constexpr int tile_rows(QuantKernel kernel) {
    return kernel == QuantKernel::avx512vnni ? 8 : kernel == QuantKernel::amx ? 1 : 3;
}

// Where row m's block b sits in activations tiled in groups of R rows (nb blocks a row): its index among the
// per-block values (scales, sums); times the block's length, among the quants. R = 1: row-major.
constexpr int64_t tiled_at(int64_t m, int64_t b, int64_t nb, int64_t R) { return (m / R * nb + b) * R + m % R; }

struct QuantTileJob {
    QuantWeights w;
    int64_t nb;           // blocks per row: K / quant_block
    const void* xq;       // quantized activations, tiled (tiled_at): int16 for Q8_0 weights, int8 for Q4
    const float* xd;      // their scales, tiled alike
    const int32_t* xo;    // forms with an offset: each block's block_offset, tiled alike
    const float* xm;      // forms with mins: each block's block_min_weight, tiled alike
    const float* bias;    // [N] or nullptr
    float* out;
    int64_t ldo;
    // The AMX variant's Q8_0 activations: each int16 as 256 hi + lo, [M, K] each (else nullptr).
    const uint8_t* x_lo = nullptr;
    const int8_t* x_hi = nullptr;
};

void quant_tiles_avx2(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void quant_tiles_avxvnni(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void quant_tiles_avx512vnni(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
void quant_tiles_amx(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1);

// The one variant that quantizes no activations: quant_linear for QuantKernel::amx_bf16, x rounded to bf16 into
// xb ([M rounded up to 16, K]) and multiplied by the weight dequantized to bf16.
void quant_linear_amx_bf16(const float* x, int64_t M, int64_t ldx, const QuantWeights& w, const float* bias,
                           float* out, int64_t ldo, int num_threads, uint16_t* xb);

}  // namespace kvmux
