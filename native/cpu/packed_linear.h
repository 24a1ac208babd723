// y = x W^T (+ bias) on the CPU, x and y in float32, W packed once at load.
//
// A BLAS library receives W in its [N, K] storage and repacks it on every
// call, which dominates at the few rows of a decode step (see
// docs/architecture.md). The engine owns its weights, so it packs each one
// once, at load, into panels of 16 output features (zero-padded past N):
//
//   float32: [ceil(N / 16), K, 16], the 16 features interleaved along K.
//   bf16:    [ceil(N / 16), Kp / 2, 16, 2] with Kp = K rounded up to 32 (zero-padded): each row of a panel holds
//            16 features x 2 consecutive k. That is the operand layout of the bf16 dot-product instructions
//            (AVX512-BF16 vdpbf16ps takes pairs along K) and of an AMX B tile (16 rows of k pairs), and it is
//            cheap to widen to float32 on CPUs without them (two shifts/masks per 32 weights).
//
// Several kernels read the same layout; which one runs is the caller's choice
// (kvmux/ops/kernel_choice.py times them at load). Kernels needing more than
// the AVX2/FMA baseline are compiled with target pragmas in their own files
// and refuse (LinearError) to run on a CPU without their instruction sets.
#pragma once

#include <cstdint>
#include <stdexcept>

namespace kvmux {

// Output features per panel: two AVX2 vectors, one AVX-512 vector, one AMX tile's columns.
constexpr int64_t kPanelWidth = 16;
// bf16 panels pad K to this: one AMX tile's depth (16 rows of k pairs).
constexpr int64_t kBf16KAlign = 32;

inline int64_t bf16_padded_k(int64_t K) { return (K + kBf16KAlign - 1) / kBf16KAlign * kBf16KAlign; }

enum class LinearKernel : int {
    f32_avx2 = 0,         // float32 panels, float32 FMA
    bf16_widen_avx2 = 1,  // bf16 panels widened to float32, float32 FMA
    bf16_avx512 = 2,      // x rounded to bf16, AVX512-BF16 dot products, float32 accumulation
    bf16_amx = 3,         // x rounded to bf16, AMX tiles, float32 accumulation
};

// A bad argument or a kernel this CPU cannot run; surfaces in Python as ValueError.
class LinearError : public std::invalid_argument {
   public:
    using std::invalid_argument::invalid_argument;
};

// Whether this CPU (and, for AMX, the OS) can run `kernel`.
bool linear_kernel_supported(LinearKernel kernel);

// x: [M, K] float32 with row stride ldx; packed: the layout of `kernel`'s weight dtype (above); bias: [N] float32
// or nullptr; out: [M, N] float32 with row stride ldo. Splits the panels across num_threads threads.
void packed_linear(LinearKernel kernel, const float* x, int64_t M, int64_t K, int64_t ldx, const void* packed,
                   int64_t N, const float* bias, float* out, int64_t ldo, int num_threads);

// The bf16 kernels' entry points, each in its own file compiled for its instruction sets; xb is scratch for x
// rounded to bf16, [M rounded up to 16, bf16_padded_k(K)].
void packed_linear_bf16_avx512(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* packed,
                               int64_t N, const float* bias, float* out, int64_t ldo, int num_threads,
                               uint16_t* xb);
void packed_linear_bf16_amx(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* packed, int64_t N,
                            const float* bias, float* out, int64_t ldo, int num_threads, uint16_t* xb);

// The calling thread's scratch for x rounded to bf16 (the xb above), reused across calls: x is rounded once per
// call and shared by every thread.
uint16_t* bf16_x_buffer(int64_t M, int64_t K);

// Writes panels [p0, p1) of a weight kept in another form, in the bf16 layout above, to dst (each panel
// bf16_padded_k(K) * kPanelWidth values after the one before); `source` is what the caller handed over.
using Bf16PanelFill = void (*)(const void* source, int64_t p0, int64_t p1, uint16_t* dst);
// The calling thread's buffer of at least `elems` bf16 values for such a chunk, reused across calls (a fresh one
// each call would fault its pages in again) and freed when the thread ends; built for the baseline, where a
// std::vector may live.
uint16_t* bf16_chunk_buffer(int64_t elems);
// packed_linear_bf16_amx over panels that `fill` writes a chunk at a time into a thread's L2-sized buffer just
// before the tiles read them (quant_linear's amx_bf16 variant, kvmux/ops/quant.py).
void filled_linear_bf16_amx(const float* x, int64_t M, int64_t K, int64_t ldx, Bf16PanelFill fill,
                            const void* source, int64_t N, const float* bias, float* out, int64_t ldo,
                            int num_threads, uint16_t* xb);

}  // namespace kvmux
