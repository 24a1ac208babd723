#include "cpu/fused_ops.h"

#include "cpu/thread_pool.h"
#include "cpu/vec_math.h"

#include <algorithm>
#include <cmath>

namespace kvmux {
namespace {

// Rows 0..T-1, `width` floats each, split into tasks of at least kPerTask floats: a decode step's few rows
// run on the calling thread, where waking helpers would cost more than the rows.
template <typename F>
void for_rows(int64_t T, int64_t width, int num_threads, F&& row) {
    constexpr int64_t kPerTask = 1 << 14;
    const int64_t tasks = task_count(T, num_threads, std::max<int64_t>(1, kPerTask / std::max<int64_t>(width, 1)));
    parallel_for(tasks, num_threads, [&](int64_t task) {
        const Span rows = split(T, tasks, task);
        for (int64_t t = rows.begin; t < rows.end; ++t) row(t);
    });
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
    for_rows(T, H, num_threads, [&](int64_t t) { normalise(x + t * ldx, H, weight, eps, out + t * H); });
}

void add_rms_norm_f32(const float* x, float* residual, int64_t T, int64_t H, const float* weight, float eps,
                      float* out, int num_threads) {
    for_rows(T, H, num_threads, [&](int64_t t) {
        float* r = residual + t * H;
        const float* xt = x + t * H;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) r[i] += xt[i];
        normalise(r, H, weight, eps, out + t * H);
    });
}

void rope_f32(float* rows, int64_t T, int64_t ld, int64_t heads, int64_t dim, const float* cos, const float* sin,
              int num_threads) {
    const int64_t half = dim / 2;
    for_rows(T, heads * dim, num_threads, [&](int64_t t) {
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
    });
}

namespace {

// out[t, i] = act(gate_up[t, i]) * gate_up[t, I + i]: a gated MLP's activation.
template <float (*Act)(float)>
void gated_mul(const float* gate_up, int64_t T, int64_t I, float* out, int num_threads) {
    for_rows(T, I, num_threads, [&](int64_t t) {
        const float* g = gate_up + t * 2 * I;
        const float* u = g + I;
        float* o = out + t * I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) o[i] = Act(g[i]) * u[i];
    });
}

}  // namespace

void silu_mul_f32(const float* gate_up, int64_t T, int64_t I, float* out, int num_threads) {
    gated_mul<silu>(gate_up, T, I, out, num_threads);
}

void gelu_tanh_mul_f32(const float* gate_up, int64_t T, int64_t I, float* out, int num_threads) {
    gated_mul<gelu_tanh>(gate_up, T, I, out, num_threads);
}

void head_rms_norm_f32(float* rows, int64_t T, int64_t ld, int64_t heads, int64_t dim, const float* weight,
                       float eps, int num_threads) {
    for_rows(T, heads * dim, num_threads, [&](int64_t t) {
        for (int64_t h = 0; h < heads; ++h) {
            float* head = rows + t * ld + h * dim;
            normalise(head, dim, weight, eps, head);  // reads each element before writing it
        }
    });
}

void add_f32(float* x, const float* y, int64_t T, int64_t H, int num_threads) {
    for_rows(T, H, num_threads, [&](int64_t t) {
        float* xt = x + t * H;
        const float* yt = y + t * H;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) xt[i] += yt[i];
    });
}

}  // namespace kvmux
