// A Llama-family or Gemma 3 decoder stack run as one native call per step, for a CPU model whose matmuls all run
// native kernels (kvmux/model/native_stack.py builds it from the model; the Python layers stay the reference and
// the path for everything else: tensor parallelism, Qwen3's q/k norms, the torch attention backend, oneDNN
// matmuls).
//
// Why: at a decode step's few rows the Python between a layer's nine kernels (module calls, argument checks,
// new tensors) cost more than the kernels. SmolLM2-135M at batch 1 spent 9.1 ms per step in the forward, about
// 3.5 of it in kernels (2-core AMD EPYC, docs/benchmarks.md). Here the same kernels run in the same order on the
// same values, so the outputs are bit for bit the Python layers'.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/packed_linear.h"
#include "cpu/paged_attention.h"
#include "cpu/quant_linear.h"

namespace kvmux {

// One kernel call of a matmul over quantized blocks (quant_linear) or packed panels (packed_linear).
struct MatmulCall {
    bool quantized;
    QuantWeights quant;          // quantized: the blocks
    QuantKernel quant_kernel;
    LinearKernel packed_kernel;  // else: the panels
    const void* packed;
    int64_t N, K;
    const float* bias;           // nullptr: none
    // x [M, K] with row stride ldx into out [M, N] with row stride ldo.
    void run(const float* x, int64_t M, int64_t ldx, float* out, int64_t ldo, int num_threads) const;
};

// Consecutive output features of a matmul held in one form, with the call timed fastest for each row range:
// calls[i] for rows up to bounds[i] (past the previous bound), the last call for more.
struct MatmulPiece {
    std::vector<int64_t> bounds;
    std::vector<MatmulCall> calls;
    int64_t N;
};

// A layer's matmul: its pieces side by side (one piece for most; a merged matmul whose parts share no quantized
// form has several), then a bias over all of them where the pieces carry none of their own.
struct LayerMatmul {
    std::vector<MatmulPiece> pieces;
    const float* bias;  // nullptr: none, or in the calls
    int64_t N, K;
    // x [M, K] contiguous into out [M, N] contiguous.
    void run(const float* x, int64_t M, float* out, int num_threads) const;
};

// Gemma 3's parts of a layer (kvmux/model/gemma3.py), which a Llama-family layer has not: RMSNorm per head of q
// and k before rotation, a norm before the MLP and one on each sublayer's output before it joins the residual
// stream, GELU (tanh) in the MLP, and a sliding-window layer's window, rope and pool.
struct GemmaParts {
    const float* q_norm;  // [head_dim] float32
    float q_eps;
    const float* k_norm;
    float k_eps;
    const float* pre_ff_norm;  // [hidden]
    float pre_ff_eps;
    const float* post_ff_norm;
    float post_ff_eps;
    int32_t window;      // > 0: a sliding-window layer (the local rope; the sliding pool where there is one)
    int64_t pool_layer;  // its layer in its group's pool, where the sliding layers have a pool of their own
};

struct DecoderLayer {
    const float* input_norm;  // [hidden] float32
    float input_eps;
    const float* post_norm;   // Llama: the norm before the MLP; Gemma: the attention output's
    float post_eps;
    LayerMatmul qkv, o_proj, gate_up, down;
    int64_t heads, kv_heads, head_dim, intermediate;
    float scale;
    int64_t layer;  // its layer in the model (and in a pool of every layer)
    bool gemma;     // then `parts` holds its Gemma parts
    GemmaParts parts;
};

// A KV pool a step's layers write and read: one of every layer, or one per layer group.
struct StackPool {
    const AttentionMetadata* meta;  // the step's slots and tables in this pool
    void* kv;
    DType kv_dtype;
    int64_t num_blocks, num_layers, block_size;
    const float* k_mean;  // an int8 pool's [num_layers, kv_heads, head_dim] K offset, or nullptr
};

// What a step hands every layer.
struct StackStep {
    int64_t rows, hidden;
    const float* cos;  // [rows, head_dim / 2]
    const float* sin;
    const float* cos_local;  // a Gemma sliding-window layer's rope, or nullptr
    const float* sin_local;
    StackPool pool;
    StackPool sliding;  // the sliding-window layers' own pool (Gemma 3); kv nullptr: none, they are in `pool`
    AttentionKernel attention_kernel;
    int attention_threads;
    // Scratch, [rows, width] each: the normed input / o_proj's output (hidden), q|k|v, attention's output
    // (heads x head_dim), gate|up, act(gate) * up (intermediate), a sublayer's normed output (hidden, Gemma).
    float *h, *qkv, *attn, *gate_up, *act, *normed;
    int num_threads;
};

// x [rows, hidden]: the embeddings in. A Llama-family stack leaves the last layer's MLP output in x and the
// residual stream before it in residual [rows, hidden] (their sum is the stack's output, as the Python layers
// leave them); a Gemma stack leaves the residual stream itself in x and does not touch residual.
void run_decoder_stack(const std::vector<DecoderLayer>& layers, const StackStep& s, float* x, float* residual);

}  // namespace kvmux
