// CUDA paged attention (module kvmux._native_cuda): the same fused operation as
// the CPU kernels in native/cpu/paged_attention.h -- write the step's new K/V into
// their slots, then attend every new query causally over its sequence's blocks.
//
// Plain types only (addresses as integers, the stream as an integer), so the
// pybind11 side compiles with the host compiler and never sees CUDA headers.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace kvmux::cuda {

using kvmux::DType;

// Keys one decode work item covers; longer contexts split into partitions that
// run in parallel and are merged by a second kernel.
constexpr int kPartition = 256;

struct Args {
    // Activations [T, H, D] with contiguous heads; rows may be strided.
    std::uintptr_t q, k, v, out;  // out: [T, Hq, D] contiguous
    int64_t q_stride, k_stride, v_stride;
    DType act_dtype;
    std::uintptr_t kv;  // pool [num_blocks, num_layers, 2, Hkv, block_size, D]; int8: [..., Hkv, slab]
    DType kv_dtype;
    std::uintptr_t k_mean;  // an int8 pool's K offset of this layer, float32 [Hkv, D] on the device; 0: none
    int64_t num_layers, layer, block_size, max_blocks;
    int64_t num_tokens, num_heads, num_kv_heads, head_dim;
    float scale;
    int64_t window;  // a sliding-window layer's: a query sees its last `window` keys (its own included); 0: all
    // Step metadata, all device int32 except slot_mapping (int64).
    std::uintptr_t slot_mapping;   // [T]
    std::uintptr_t query_starts;   // [S] packed index of each sequence's first new token
    std::uintptr_t query_lens;     // [S]
    std::uintptr_t context_lens;   // [S]
    std::uintptr_t block_tables;   // [S, max_blocks]
    std::uintptr_t decode_seqs;    // [num_decode] sequences with one new token
    int64_t num_decode, max_partitions;
    std::uintptr_t prefill_tiles;  // [num_tiles, 3] (seq, first query, end query)
    int64_t num_tiles;
    // Decode scratch for split contexts (float32), used when max_partitions > 1:
    // partial outputs [num_decode, Hkv, max_partitions, G, D], max and sum [.., G].
    std::uintptr_t part_out, part_max, part_sum;
    std::uintptr_t stream;  // cudaStream_t
};

// Query tokens per prefill tile for a GQA group size (rows = tokens x group <= 32).
int prefill_tile_tokens(int64_t group);

// Enqueues the kernels on args.stream; throws std::invalid_argument on bad
// arguments and std::runtime_error on a CUDA error.
void paged_attention(const Args& args);

}  // namespace kvmux::cuda
