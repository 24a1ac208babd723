// A quantized panel block's nibbles and high bit planes (quant_linear.h's layout) as whole bytes in AVX-512
// registers, for the AMX variants (quant_tiles_amx.cpp, quant_bf16_amx.cpp).
//
// Include only after a `#pragma GCC target` that enables AVX512-BW: everything here has internal linkage, so
// each file compiles its own copy with its own target flags.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace kvmux {
namespace {

// Chunk h of a block of B values with `Planes` high bit planes: lo holds k 8h .. 8h + 3 of each of the panel's 16
// rows (4 bytes a row, in row order), hi k 8h + 4 .. 8h + 7, each plane's bit added as 16 << plane where set.
template <int B, int Planes>
inline void unpack_chunk(const uint8_t* block, int h, __m512i& lo, __m512i& hi) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const __m512i v = _mm512_loadu_si512(block + 64 * h);
    lo = _mm512_and_si512(v, mask);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    for (int j = 0; j < Planes; ++j) {
        uint64_t bits[2];
        __builtin_memcpy(bits, block + 8 * B + 16 * (Planes * h + j), sizeof bits);
        const __m512i value = _mm512_set1_epi8(static_cast<char>(16 << j));
        lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(bits[0]), lo, value);
        hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(bits[1]), hi, value);
    }
}

}  // namespace
}  // namespace kvmux
