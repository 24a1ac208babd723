#include "cpu/fused_ops.h"

#include "cpu/vec_math.h"

#include <algorithm>
#include <cmath>

namespace kvmux {
namespace {

// Threads only when there is enough work to pay for waking them.
int threads_for(int64_t elements, int num_threads) {
    constexpr int64_t kPerThread = 1 << 15;
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, elements / kPerThread)));
}

inline void normalise(const float* x, int64_t H, const float* weight, float eps, float* out) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) out[i] = weight[i] * (x[i] * inv);
}

}  // namespace

void rms_norm_f32(const float* x, int64_t T, int64_t H, int64_t ldx, const float* weight, float eps, float* out,
                  int num_threads) {
#pragma omp parallel for num_threads(threads_for(T * H, num_threads)) schedule(static)
    for (int64_t t = 0; t < T; ++t) normalise(x + t * ldx, H, weight, eps, out + t * H);
}

void add_rms_norm_f32(const float* x, float* residual, int64_t T, int64_t H, const float* weight, float eps,
                      float* out, int num_threads) {
#pragma omp parallel for num_threads(threads_for(T * H, num_threads)) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        float* r = residual + t * H;
        const float* xt = x + t * H;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) r[i] += xt[i];
        normalise(r, H, weight, eps, out + t * H);
    }
}

void rope_f32(float* rows, int64_t T, int64_t ld, int64_t heads, int64_t dim, const float* cos, const float* sin,
              int num_threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads_for(T * heads * dim, num_threads)) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        const float* c = cos + t * half;
        const float* s = sin + t * half;
        for (int64_t h = 0; h < heads; ++h) {
            float* a = rows + t * ld + h * dim;
            float* b = a + half;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float ai = a[i], bi = b[i];
                a[i] = ai * c[i] - bi * s[i];
                b[i] = bi * c[i] + ai * s[i];
            }
        }
    }
}

void silu_mul_f32(const float* gate_up, int64_t T, int64_t I, float* out, int num_threads) {
#pragma omp parallel for num_threads(threads_for(T * I, num_threads)) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        const float* g = gate_up + t * 2 * I;
        const float* u = g + I;
        float* o = out + t * I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) o[i] = silu(g[i]) * u[i];
    }
}

}  // namespace kvmux
