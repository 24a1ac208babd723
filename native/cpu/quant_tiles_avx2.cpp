// quant_linear's AVX2 variant, the baseline every x86-64 host of the project runs (the build's own flags).
// Without VNNI the byte dot product is vpmaddubsw (unsigned nibbles x signed activation bytes, pairs summed into
// saturating int16; 2 x 15 x 127 never saturates, nor does a block's sum of 8 of them, 8 x 3810 < 2^15, so a
// block accumulates in int16 and widens once with vpmaddwd), and Q8_0's int8 x int16 products are vpmaddwd.
// Q5 and Q6_K integers (up to 31 and 63) would overflow a block's int16 sum, so each product pair widens at once.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/quant_tiles.h"
#include "cpu/quant_tile_loop.h"

namespace kvmux {
namespace {

struct Avx2 : Float256 {
    static constexpr int kRows = 3;
    using Acc = Int;  // int16 pairs per row for Q4 (widened at the block's end), int32 for Q8_0

    static Acc start(int32_t) { return {{_mm256_setzero_si256(), _mm256_setzero_si256()}}; }

    template <QuantType T>
    static void dot(Acc& acc, const W& w, const void* xp) {
        const int32_t x4 = load4(xp);
        const __m256i x = _mm256_set1_epi32(x4);
        for (int h = 0; h < 2; ++h) {
            if constexpr (T == QuantType::q8_0)
                acc.v[h] = _mm256_add_epi32(acc.v[h], _mm256_madd_epi16(w.v[h], x));
            else if constexpr (high_planes(T) > 0)
                acc.v[h] = _mm256_add_epi32(
                    acc.v[h], _mm256_madd_epi16(_mm256_maddubs_epi16(w.v[h], x), _mm256_set1_epi16(1)));
            else
                acc.v[h] = _mm256_add_epi16(acc.v[h], _mm256_maddubs_epi16(w.v[h], x));
        }
    }

    template <QuantType T>
    static Int total(const Acc& acc, int32_t correction) {
        if constexpr (T == QuantType::q8_0) return acc;
        const __m256i c = _mm256_set1_epi32(correction);
        Int t;
        if constexpr (high_planes(T) > 0) {
            for (int h = 0; h < 2; ++h) t.v[h] = _mm256_add_epi32(acc.v[h], c);
            return t;
        }
        for (int h = 0; h < 2; ++h) t.v[h] = _mm256_add_epi32(_mm256_madd_epi16(acc.v[h], _mm256_set1_epi16(1)), c);
        return t;
    }
};

static_assert(Avx2::kRows == tile_rows(QuantKernel::avx2), "quant_linear tiles the activations in groups of kRows");

}  // namespace

void quant_tiles_avx2(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    run_tiles<Avx2>(job, m0, m1, p0, p1);
}

}  // namespace kvmux
