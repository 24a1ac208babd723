// The instruction-set-specific half of quant_linear: one function per kernel
// variant runs rows [m0, m1) against panels [p0, p1) of a quantized weight,
// over activations quant_linear has already quantized. Each lives in its own
// quant_tiles_<variant>.cpp, compiled for that instruction set only.
#pragma once

#include <cstdint>

#include "cpu/quant_linear.h"

namespace kvmux {

struct QuantTileJob {
    QuantWeights w;
    int64_t nb;           // blocks per row: K / 32
    const void* xq;       // [M, K] quantized activations: int16 for Q8_0 weights, int8 for Q4
    const float* xd;      // [M, nb] their scales
    const int32_t* xs;    // [M, nb] the sum of each block's quants
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

}  // namespace kvmux
