#include "cpu/row_argmax.h"

#include <algorithm>
#include <vector>

#include "cpu/thread_pool.h"

namespace kvmux {
namespace {

constexpr int64_t kChunk = 1 << 15;  // columns a task reduces: 128 KB, a share of L2 the second look finds there

struct Best {
    float value;
    int64_t index;
    bool nan;
};

// One chunk: its largest value (vectorised; NaNs noted beside it, since a max ignores them), then where it first
// stands (a second look at memory the first just brought in).
Best reduce(const float* x, int64_t n) {
    float m = x[0];
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < n; ++i) {
        m = x[i] > m ? x[i] : m;
        nan |= x[i] != x[i];
    }
    for (int64_t i = 0; i < n; ++i)
        if (nan ? x[i] != x[i] : x[i] == m) return {x[i], i, nan != 0};
    return {m, 0, false};  // unreachable: m is one of x
}

}  // namespace

void row_argmax_f32(const float* x, int64_t rows, int64_t cols, int64_t ld, int64_t* out, int num_threads) {
    const int64_t chunks = (cols + kChunk - 1) / kChunk;
    std::vector<Best> best(static_cast<size_t>(rows * chunks));
    parallel_for(rows * chunks, num_threads, [&](int64_t task) {
        const int64_t r = task / chunks, c = task % chunks, first = c * kChunk;
        Best b = reduce(x + r * ld + first, std::min(kChunk, cols - first));
        b.index += first;
        best[static_cast<size_t>(task)] = b;
    });
    for (int64_t r = 0; r < rows; ++r) {
        Best b = best[static_cast<size_t>(r * chunks)];
        for (int64_t c = 1; c < chunks && !b.nan; ++c) {  // strictly greater: the earlier chunk keeps a tie
            const Best& o = best[static_cast<size_t>(r * chunks + c)];
            if (o.nan || o.value > b.value) b = o;
        }
        out[r] = b.index;
    }
}

}  // namespace kvmux
