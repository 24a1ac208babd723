// quant_linear's AVX-VNNI variant (VEX-encoded vpdpbusd on 256-bit vectors: Alder Lake and later, Zen 5):
// one instruction multiplies 4 unsigned weight bytes by 4 signed activation bytes per lane and accumulates
// into int32 without saturating. Q8_0's signed weights are flipped to unsigned (q + 128, one xor per vector
// shared by the tile's rows) and the offset is folded into the accumulator's start.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/quant_tiles.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")

#include "cpu/quant_tile_loop.h"

namespace kvmux {
namespace {

struct AvxVnni : Float256 {
    static constexpr int kRows = 3;
    using Acc = Int;

    template <QuantType T>
    static constexpr int32_t offset() { return T == QuantType::q4_1 ? 0 : T == QuantType::q4_0 ? 8 : 128; }
    static Acc start(int32_t c) { return {{_mm256_set1_epi32(c), _mm256_set1_epi32(c)}}; }

    static W q8(const uint8_t* p) {
        const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
        W w;
        for (int h = 0; h < 2; ++h)
            w.v[h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h)), flip);
        return w;
    }

    template <QuantType>
    static void dot(Acc& acc, const W& w, int32_t x4) {
        const __m256i x = _mm256_set1_epi32(x4);
        for (int h = 0; h < 2; ++h) acc.v[h] = _mm256_dpbusd_avx_epi32(acc.v[h], w.v[h], x);
    }

    template <QuantType>
    static Int total(const Acc& acc, int32_t) { return acc; }
};

}  // namespace

void quant_tiles_avxvnni(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    run_tiles<AvxVnni>(job, m0, m1, p0, p1);
}

}  // namespace kvmux

#pragma GCC pop_options
