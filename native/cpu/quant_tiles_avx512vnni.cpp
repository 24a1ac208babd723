// quant_linear's AVX512-VNNI variant (Ice Lake and later, Zen 4): a panel's 16 outputs are one 512-bit vector,
// vpdpbusd / vpdpwssd as in the AVX-VNNI variant, and 32 registers leave room for more rows per tile.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/quant_tiles.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")

#include "cpu/quant_tile_loop.h"

namespace kvmux {
namespace {

struct Avx512Vnni {
    static constexpr int kRows = 8;
    using Acc = __m512i;
    using Int = __m512i;
    using Sum = __m512;
    using W = __m512i;

    static Acc start(int32_t c) { return _mm512_set1_epi32(c); }

    static W q8(const uint8_t* p) {  // 16 rows x 2 k, widened to int16
        return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static void high_bits(const uint8_t* p, W& lo, W& hi, char value) {  // two 64-bit masks, `value` where set
        uint64_t m[2];
        std::memcpy(m, p, sizeof m);
        const __m512i v = _mm512_set1_epi8(value);
        lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(m[0]), lo, v);
        hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(m[1]), hi, v);
    }
    static void q4(const uint8_t* p, W& lo, W& hi) {
        const __m512i v = _mm512_loadu_si512(p), mask = _mm512_set1_epi8(0x0F);
        lo = _mm512_and_si512(v, mask);
        hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    }

    // The 4 activation bytes at x broadcast as the instruction's own memory operand ({1to16}): GCC loads them
    // with a separate vpbroadcastd, which costs a vector uop per dot product.
    template <QuantType T>
    static void dot(Acc& acc, const W& w, const void* x) {
        if constexpr (T == QuantType::q8_0)
            asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*static_cast<const int32_t*>(x)));
        else
            asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*static_cast<const int32_t*>(x)));
    }
    template <QuantType>
    static Int total(const Acc& acc, int32_t) { return acc; }

    static Sum zero() { return _mm512_setzero_ps(); }
    static __mmask16 lanes(int cols) { return static_cast<__mmask16>((1u << cols) - 1); }
    static Sum load(const float* p, int cols) { return _mm512_maskz_loadu_ps(lanes(cols), p); }
    static void store(float* p, const Sum& s, int cols) { _mm512_mask_storeu_ps(p, lanes(cols), s); }
    static Sum half(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static void scale_add(Sum& s, const Int& t, const Sum& d, float dx) {
        s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(d, _mm512_set1_ps(dx)), s);
    }
    static void int_mul_add(Sum& s, const Int& t, const Sum& d) { s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), d, s); }
    static void mul_add(Sum& s, const Sum& a, float c) { s = _mm512_fmadd_ps(a, _mm512_set1_ps(c), s); }
};

static_assert(Avx512Vnni::kRows == tile_rows(QuantKernel::avx512vnni), "quant_linear tiles the activations in groups of kRows");

}  // namespace

void quant_tiles_avx512vnni(const QuantTileJob& job, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    run_tiles<Avx512Vnni>(job, m0, m1, p0, p1);
}

}  // namespace kvmux

#pragma GCC pop_options
