// CPU paged attention over the block-major KV pool
// kv[num_blocks, num_layers, 2, num_kv_heads, block_size, row], row = head_dim
// for float32 and bf16 pools. An int8 pool (DType::i8) stores each token's K
// or V of a head as head_dim int8 values and their float16 scale: x ~ q * scale,
// scale = max|x| / 127. A (layer, K or V, head) slab of a block holds its
// block_size tokens' values in the order the int8 kernel's vpdpbusd reads them,
// then their scales (row = head_dim + 2 bytes per token):
//   K value (t, d) at byte ((d / 4) * block_size + t) * 4 + d % 4: a dword is 4
//     head dims of one key, consecutive keys side by side;
//   V value (t, d) at byte ((t / 4) * head_dim + d) * 4 + t % 4: a dword is one
//     head dim of 4 consecutive keys;
//   scale of token t at byte block_size * head_dim + 2 t.
// (kvmux/cache/kv_cache.py's slab_positions is the same map; head_dim must be a
// multiple of 4.) The scales travel inside the block, so every block copy
// (copy-on-write, swap, tiers, disk) moves them with their values. The values are those of the row rotated by
// the orthonormal Walsh-Hadamard transform H (hadamard.h), K's after
// subtracting its layer's and head's k_mean where one is given: the row
// holds H (k - k_mean) or H v. Attention reads them unchanged: each query is
// rotated once (H q . H (k - k_mean) = q.k - q.k_mean, the same for every key
// a query sees, which softmax drops) and each output once (H sum p H v =
// sum p v).
//
// One call per layer writes the step's new K/V into their slots and then
// attends every new query token causally over its sequence's context, reading
// K/V straight from the blocks named by its block table (no gather copy, no
// score matrix over the whole context: softmax is streamed chunk by chunk).
//
// The per-step metadata (slots, query/context lengths, block tables) is the
// same in every layer, so it is validated and turned into a work list once per
// step by AttentionMetadata; AttentionMetadata::run is the per-layer call.
//
// Everything is raw pointers and sizes: the Python side validates tensors,
// and this module never links against torch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "dtype.h"

namespace kvmux {

// A bad argument (shape, index, dtype); surfaces in Python as ValueError.
class AttentionError : public std::invalid_argument {
   public:
    using std::invalid_argument::invalid_argument;
};

// Row-strided [T, H, D] activations: rows may be views into a wider tensor
// (k and v are column slices of the fused qkv projection), heads and head_dim
// are contiguous.
struct TokenRows {
    const void* data;
    int64_t row_stride;  // elements between consecutive tokens
};

// Which work-item kernel attends (kvmux/ops/kernel_choice.py names them): float32 FMA over float32 or
// widened bf16 or int8 K/V, bf16 dot products (AVX512-BF16; a bf16 pool and head_dim 64, 128 or 256), or
// int8 dot products (AVX512-VNNI; an int8 pool and head_dim 64, 128 or 256).
enum class AttentionKernel : int { avx2 = 0, avx512bf16 = 1, avx512vnni = 2 };

// Whether this CPU can run `kernel` on a pool of kv_dtype with this head_dim.
bool attention_kernel_supported(AttentionKernel kernel, DType kv_dtype, int64_t head_dim);

struct LayerArgs {
    TokenRows q, k, v;  // [T, Hq, D], [T, Hkv, D], [T, Hkv, D], all of act_dtype
    void* out;          // [T, Hq, D] contiguous, act_dtype; every element is written
    DType act_dtype;
    void* kv;           // pool base pointer
    DType kv_dtype;
    int64_t num_blocks, num_layers, block_size, layer;
    int64_t num_heads, num_kv_heads, head_dim;
    float scale;
    // An int8 pool's per-(KV head, channel) offset of this layer's K, [num_kv_heads, head_dim] float32,
    // subtracted before a K row is rotated and quantized; nullptr: none. Any offset the same for every key of a
    // sequence leaves attention as it is; the mean of K takes its common part out of the int8 rows.
    const float* k_mean = nullptr;
    // > 0: a sliding-window layer, where the query at position p sees keys p - window + 1 .. p only.
    int32_t window = 0;
    int num_threads;
    AttentionKernel kernel = AttentionKernel::avx2;
};

class AttentionMetadata {
   public:
    // slot_mapping [num_tokens]; block_tables [num_seqs, max_blocks] row-major.
    // Copies what it needs, so the caller's buffers may go away afterwards.
    AttentionMetadata(const int64_t* slot_mapping, int64_t num_tokens, const std::vector<int64_t>& query_lens,
                  const std::vector<int64_t>& context_lens, const int32_t* block_tables, int64_t max_blocks,
                  int64_t block_size, int64_t num_blocks);

    void run(const LayerArgs& args) const;

    int64_t num_tokens() const { return static_cast<int64_t>(slots_.size()); }
    int64_t num_seqs() const { return static_cast<int64_t>(ctx_.size()); }
    int64_t num_work_tiles() const { return static_cast<int64_t>(tiles_.size()); }

    // A tile is a run of query tokens of one sequence; with each KV head it is one work item.
    struct Tile {
        int32_t seq, q_begin, q_end;  // query indices within the sequence
    };

   private:
    std::vector<int64_t> slots_;
    std::vector<int32_t> q_start_;  // packed index of each sequence's first new token
    std::vector<int32_t> q_len_, ctx_;
    std::vector<int32_t> tables_;  // [num_seqs, max_blocks]
    int64_t max_blocks_, block_size_, num_blocks_;
    std::vector<Tile> tiles_;  // costliest first, for dynamic scheduling
};

}  // namespace kvmux
