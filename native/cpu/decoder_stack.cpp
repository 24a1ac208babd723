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

void run_layer(const DecoderLayer& p, const StackStep& s, float* x, float* residual, bool first) {
    const int64_t rows = s.rows, hidden = s.hidden, nt = s.num_threads;
    if (first) {
        rms_norm_f32(x, rows, hidden, hidden, p.input_norm, p.input_eps, s.h, nt);
        std::memcpy(residual, x, sizeof(float) * rows * hidden);
    } else {
        add_rms_norm_f32(x, residual, rows, hidden, p.input_norm, p.input_eps, s.h, nt);
    }
    p.qkv.run(s.h, rows, s.qkv, nt);
    const int64_t q_width = p.heads * p.head_dim, kv_width = p.kv_heads * p.head_dim;
    const int64_t width = q_width + 2 * kv_width;
    rope_f32(s.qkv, rows, width, p.heads + p.kv_heads, p.head_dim, s.cos, s.sin, nt);

    LayerArgs a;
    a.q = {s.qkv, width};
    a.k = {s.qkv + q_width, width};
    a.v = {s.qkv + q_width + kv_width, width};
    a.out = s.attn;
    a.act_dtype = DType::f32;
    a.kv = s.kv;
    a.kv_dtype = s.kv_dtype;
    a.num_blocks = s.num_blocks;
    a.num_layers = s.num_layers;
    a.block_size = s.block_size;
    a.layer = p.layer;
    a.num_heads = p.heads;
    a.num_kv_heads = p.kv_heads;
    a.head_dim = p.head_dim;
    a.scale = p.scale;
    a.k_mean = s.k_mean ? s.k_mean + p.layer * kv_width : nullptr;
    a.num_threads = s.attention_threads;
    a.kernel = s.attention_kernel;
    s.meta->run(a);

    // o_proj into h, the post-attention norm into x (the layer's input is in the residual by now), the MLP into x.
    p.o_proj.run(s.attn, rows, s.h, nt);
    add_rms_norm_f32(s.h, residual, rows, hidden, p.post_norm, p.post_eps, x, nt);
    p.gate_up.run(x, rows, s.gate_up, nt);
    silu_mul_f32(s.gate_up, rows, p.intermediate, s.act, nt);
    p.down.run(s.act, rows, x, nt);
}

}  // namespace

void run_decoder_stack(const std::vector<DecoderLayer>& layers, const StackStep& s, float* x, float* residual) {
    if (s.rows < 1) throw std::invalid_argument("decoder stack: a step needs at least one row");
    for (size_t i = 0; i < layers.size(); ++i) run_layer(layers[i], s, x, residual, i == 0);
}

}  // namespace kvmux
