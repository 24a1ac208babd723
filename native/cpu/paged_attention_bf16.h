// The bf16 dot-product work item of the CPU paged attention (paged_attention.cpp runs the layer and chooses
// it; paged_attention_bf16.cpp, compiled for AVX512-BF16, implements it).
//
// One item attends the query rows of one sequence's query tile for one KV head over a bf16 KV pool, as the
// float32 kernel does (online softmax over chunks of 32 keys), but multiplies in bf16 pairs with float32
// sums: q is rounded to bf16 once, and V is interleaved by key pairs so one vdpbf16ps adds two keys'
// weighted values into 16 output dimensions (the softmax weights rounded to bf16, their sum kept float32).
// An item of many rows (a prefill tile) transposes each chunk's K, so one vdpbf16ps scores 16 keys against a
// pair of q's dimensions, and interleaves the chunk's V once into scratch; an item of a few rows (a decode's
// query heads of one KV head) reads both in place, where the rows could not repay the copies.
//
// Everything crosses as plain pointers and sizes, scratch included (sized by the caller): the AVX-512 file
// must not instantiate shared inline code (std containers), which the linker could merge with the baseline
// build's copy.
#pragma once

#include <cstdint>

namespace kvmux {

constexpr int kBf16KeyChunk = 32;  // keys per online-softmax update, as in the float32 kernel

struct Bf16AttendItem {
    const void* q;            // [T, Hq, D] rows, float32 or bf16 (q_bf16)
    int64_t q_row_stride;
    void* out;                // [T, Hq, D] contiguous, the same dtype as q
    bool q_bf16;
    const char* pool;         // the bf16 KV pool
    const int32_t* table;     // this sequence's block table
    // As Shape in paged_attention.cpp (head_offset for h), in bytes.
    int64_t block_size, block_stride, head_offset, v_offset, row;
    int64_t heads, group, dim, h;
    int32_t q_start, q_len, ctx, q_begin, q_end;
    float scale;
    int32_t window;           // > 0: each query sees only the last `window` keys up to its own position
    // Scratch, rows = (q_end - q_begin) * group:
    uint16_t* qb;             // [rows, dim]
    float* acc;               // [rows, dim]
    float* m;                 // [rows]
    float* l;                 // [rows]
    float* scores;            // [rows, kBf16KeyChunk]
    int32_t* pp;              // [rows, kBf16KeyChunk / 2]: the softmax weights as bf16 pairs
    uint32_t* kt;             // [dim / 2, kBf16KeyChunk]
    uint32_t* vp;             // [kBf16KeyChunk / 2, dim]
};

// dim must be 64, 128 or 256 (bf16_attend_supports).
inline bool bf16_attend_supports(int64_t dim) { return dim == 64 || dim == 128 || dim == 256; }
void bf16_attend_avx512(const Bf16AttendItem& item);

}  // namespace kvmux
