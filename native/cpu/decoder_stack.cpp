#include "cpu/decoder_stack.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "cpu/fused_ops.h"

namespace kvmux {

void MatmulCall::run(const float* x, int64_t M, int64_t ldx, float* out, int64_t ldo, int num_threads) const {
    if (quantized) quant_linear(x, M, ldx, quant, bias, out, ldo, quant_kernel, num_threads);
    else packed_linear(packed_kernel, x, M, K, ldx, packed, N, bias, out, ldo, num_threads);
}

void LayerMatmul::run(const float* x, int64_t M, float* out, int num_threads) const {
    int64_t column = 0;
    for (const MatmulPiece& piece : pieces) {
        // As the Python Dispatch's bisect_left: the first range whose bound is at least M.
        const auto at = std::lower_bound(piece.bounds.begin(), piece.bounds.end(), M) - piece.bounds.begin();
        piece.calls[static_cast<size_t>(at)].run(x, M, K, out + column, N, num_threads);
        column += piece.N;
    }
    if (bias)
        for (int64_t r = 0; r < M; ++r)
            for (int64_t c = 0; c < N; ++c) out[r * N + c] += bias[c];
}

namespace {

// Attention over s.qkv into s.attn, in `pool` at its layer `layer`: writes the step's k and v into their slots.
void attend(const DecoderLayer& p, const StackStep& s, const StackPool& pool, int64_t layer, int32_t window) {
    const int64_t q_width = p.heads * p.head_dim, kv_width = p.kv_heads * p.head_dim;
    const int64_t width = q_width + 2 * kv_width;
    LayerArgs a;
    a.q = {s.qkv, width};
    a.k = {s.qkv + q_width, width};
    a.v = {s.qkv + q_width + kv_width, width};
    a.out = s.attn;
    a.act_dtype = DType::f32;
    a.kv = pool.kv;
    a.kv_dtype = pool.kv_dtype;
    a.num_blocks = pool.num_blocks;
    a.num_layers = pool.num_layers;
    a.block_size = pool.block_size;
    a.layer = layer;
    a.num_heads = p.heads;
    a.num_kv_heads = p.kv_heads;
    a.head_dim = p.head_dim;
    a.scale = p.scale;
    a.k_mean = pool.k_mean ? pool.k_mean + layer * kv_width : nullptr;
    a.window = window;
    a.num_threads = s.attention_threads;
    a.kernel = s.attention_kernel;
    pool.meta->run(a);
}

void run_layer(const DecoderLayer& p, const StackStep& s, float* x, float* residual, bool first) {
    const int64_t rows = s.rows, hidden = s.hidden, nt = s.num_threads;
    if (first) {
        rms_norm_f32(x, rows, hidden, hidden, p.input_norm, p.input_eps, s.h, nt);
        std::memcpy(residual, x, sizeof(float) * rows * hidden);
    } else {
        add_rms_norm_f32(x, residual, rows, hidden, p.input_norm, p.input_eps, s.h, nt);
    }
    p.qkv.run(s.h, rows, s.qkv, nt);
    const int64_t width = (p.heads + 2 * p.kv_heads) * p.head_dim;
    rope_f32(s.qkv, rows, width, p.heads + p.kv_heads, p.head_dim, s.cos, s.sin, nt);
    attend(p, s, s.pool, p.layer, 0);

    // o_proj into h, the post-attention norm into x (the layer's input is in the residual by now), the MLP into x.
    p.o_proj.run(s.attn, rows, s.h, nt);
    add_rms_norm_f32(s.h, residual, rows, hidden, p.post_norm, p.post_eps, x, nt);
    p.gate_up.run(x, rows, s.gate_up, nt);
    silu_mul_f32(s.gate_up, rows, p.intermediate, s.act, nt);
    p.down.run(s.act, rows, x, nt);
}

// As Gemma3DecoderLayer.forward: x += post_norm(attention(input_norm(x))); x += post_ff_norm(mlp(pre_ff_norm(x))).
void run_gemma_layer(const DecoderLayer& p, const StackStep& s, float* x) {
    const GemmaParts& g = p.parts;
    const int64_t rows = s.rows, hidden = s.hidden, nt = s.num_threads;
    const int64_t q_width = p.heads * p.head_dim, width = q_width + 2 * p.kv_heads * p.head_dim;
    rms_norm_f32(x, rows, hidden, hidden, p.input_norm, p.input_eps, s.h, nt);
    p.qkv.run(s.h, rows, s.qkv, nt);
    head_rms_norm_f32(s.qkv, rows, width, p.heads, p.head_dim, g.q_norm, g.q_eps, nt);
    head_rms_norm_f32(s.qkv + q_width, rows, width, p.kv_heads, p.head_dim, g.k_norm, g.k_eps, nt);
    const bool local = g.window > 0;
    rope_f32(s.qkv, rows, width, p.heads + p.kv_heads, p.head_dim, local ? s.cos_local : s.cos,
             local ? s.sin_local : s.sin, nt);
    if (s.sliding.kv == nullptr) attend(p, s, s.pool, p.layer, g.window);
    else attend(p, s, local ? s.sliding : s.pool, g.pool_layer, g.window);

    p.o_proj.run(s.attn, rows, s.h, nt);
    rms_norm_f32(s.h, rows, hidden, hidden, p.post_norm, p.post_eps, s.normed, nt);
    add_f32(x, s.normed, rows, hidden, nt);
    rms_norm_f32(x, rows, hidden, hidden, g.pre_ff_norm, g.pre_ff_eps, s.h, nt);
    p.gate_up.run(s.h, rows, s.gate_up, nt);
    gelu_tanh_mul_f32(s.gate_up, rows, p.intermediate, s.act, nt);
    p.down.run(s.act, rows, s.h, nt);
    rms_norm_f32(s.h, rows, hidden, hidden, g.post_ff_norm, g.post_ff_eps, s.normed, nt);
    add_f32(x, s.normed, rows, hidden, nt);
}

}  // namespace

void run_decoder_stack(const std::vector<DecoderLayer>& layers, const StackStep& s, float* x, float* residual) {
    if (s.rows < 1) throw std::invalid_argument("decoder stack: a step needs at least one row");
    for (size_t i = 0; i < layers.size(); ++i) {
        if (layers[i].gemma) run_gemma_layer(layers[i], s, x);
        else run_layer(layers[i], s, x, residual, i == 0);
    }
}

}  // namespace kvmux
