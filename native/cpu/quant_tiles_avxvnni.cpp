// quant_linear's AVX-VNNI variant (VEX-encoded, 256-bit: Alder Lake and later, Zen 5): vpdpbusd multiplies 4
// unsigned nibbles by 4 signed activation bytes per lane and vpdpwssd 2 int16 pairs, both accumulating into
// int32 without saturating; Q4_0's offset is folded into the accumulator's start.
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

    static Acc start(int32_t c) { return {{_mm256_set1_epi32(c), _mm256_set1_epi32(c)}}; }

    template <QuantType T>
    static void dot(Acc& acc, const W& w, const void* xp) {
        const int32_t x4 = load4(xp);
        const __m256i x = _mm256_set1_epi32(x4);
        for (int h = 0; h < 2; ++h) {
            if constexpr (T == QuantType::q8_0)
                acc.v[h] = _mm256_dpwssd_avx_epi32(acc.v[h], w.v[h], x);
            else
                acc.v[h] = _mm256_dpbusd_avx_epi32(acc.v[h], w.v[h], x);
        }
    }

    template <QuantType>
    static Int total(const Acc& acc, int32_t) { return acc; }
};

static_assert(AvxVnni::kRows == tile_rows(QuantKernel::avxvnni), "quant_linear tiles the activations in groups of kRows");

}  // namespace

void quant_tiles_avxvnni(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    run_tiles<AvxVnni>(job, m0, m1, p0, p1);
}

}  // namespace kvmux

#pragma GCC pop_options
