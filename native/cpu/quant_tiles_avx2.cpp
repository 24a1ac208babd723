// quant_linear's AVX2 variant, the baseline every x86-64 host of the project runs (the build's own flags).
// Without VNNI the integer dot product is vpmaddubsw (unsigned x signed bytes, pairs summed into saturating
// int16) and vpmaddwd to widen: nibbles times activations (|q_x| <= 127) never saturate, even summed over a
// block in int16 (8 x 2 x 15 x 127 < 2^15), but signed Q8_0 weights would, so for Q8_0 the weights' signs move
// onto the activations (vpsignb) and their magnitudes multiply (2 x 128 x 127 < 2^15).
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

    template <QuantType T>
    static constexpr int32_t offset() { return T == QuantType::q4_0 ? 8 : 0; }
    static Acc start(int32_t) { return {{_mm256_setzero_si256(), _mm256_setzero_si256()}}; }

    static W q8(const uint8_t* p) {
        W w;
        for (int h = 0; h < 2; ++h) {
            w.sign[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
            w.v[h] = _mm256_abs_epi8(w.sign[h]);
        }
        return w;
    }

    template <QuantType T>
    static void dot(Acc& acc, const W& w, int32_t x4) {
        const __m256i x = _mm256_set1_epi32(x4);
        for (int h = 0; h < 2; ++h) {
            if constexpr (T == QuantType::q8_0) {
                const __m256i pairs = _mm256_maddubs_epi16(w.v[h], _mm256_sign_epi8(x, w.sign[h]));
                acc.v[h] = _mm256_add_epi32(acc.v[h], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
            } else {
                acc.v[h] = _mm256_add_epi16(acc.v[h], _mm256_maddubs_epi16(w.v[h], x));
            }
        }
    }

    template <QuantType T>
    static Int total(const Acc& acc, int32_t correction) {
        if constexpr (T == QuantType::q8_0) return acc;
        const __m256i c = _mm256_set1_epi32(correction);
        Int t;
        for (int h = 0; h < 2; ++h) t.v[h] = _mm256_add_epi32(_mm256_madd_epi16(acc.v[h], _mm256_set1_epi16(1)), c);
        return t;
    }
};

}  // namespace

void quant_tiles_avx2(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    run_tiles<Avx2>(job, m0, m1, p0, p1);
}

}  // namespace kvmux
