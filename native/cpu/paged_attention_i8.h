// The int8 work item of the CPU paged attention (paged_attention.cpp runs the layer and chooses it;
// paged_attention_i8.cpp, compiled for AVX512-VNNI, implements it).
//
// One item attends the query rows of one sequence's query tile for one KV head over an int8 pool, online
// softmax over chunks of 32 keys as the other kernels, with both products in integers through vpdpbusd:
// - q . K: each query row, rotated as the keys are (paged_attention.h), is quantized to 16 bits once (a scale
//   per row, max |q| / 32767), offset by 32768 and split into two unsigned bytes; a K slab's dwords are 4 head
//   dims of one key, 16 keys side by side, so two vpdpbusd (high and low bytes) score 16 keys against 4 of q's
//   dims with no transpose. The offset's share, 32768 * sum(k), is scored the same way against a vector of
//   ones, once per key for all rows. (q at 8 bits cost 0.3 points of teacher-forced argmax agreement.)
// - weights . V: a chunk's softmax weights, each times its key's V scale, are quantized to unsigned 8 bits
//   (a scale per row and chunk: their max / 255); a V slab's dwords are one head dim of 4 keys, so one vpdpbusd
//   adds 4 keys' weighted values into 16 dims. The chunk's integer sums join the float32 output with its scale.
// Rounding: q to 16 bits (what checks/reference.py's int16 q reproduces exactly), and the weights to 8 bits: at most
// half a step, max(p_t * scale_t) / 510 over the chunk, per weight (reference.py's u8_weight_bound).
//
// Everything crosses as plain pointers and sizes, scratch included (sized by the caller): the AVX-512 file
// must not instantiate shared inline code (std containers), which the linker could merge with the baseline
// build's copy.
#pragma once

#include <cstdint>

namespace kvmux {

constexpr int kI8KeyChunk = 32;  // keys per online-softmax update; slabs' block sizes (8, 16, 32) divide it

struct I8AttendItem {
    const void* q;            // [T, Hq, D] rows, float32 or bf16 (q_bf16)
    int64_t q_row_stride;
    void* out;                // [T, Hq, D] contiguous, the same dtype as q
    bool q_bf16;
    const char* pool;         // the int8 KV pool
    const int32_t* table;     // this sequence's block table
    int64_t block_size;       // 8, 16 or 32
    int64_t block_stride;     // bytes per block across all layers
    int64_t head_offset;      // bytes from a block's start to this layer's K slab of head h
    int64_t v_offset;         // bytes from a K slab to its V slab
    int64_t heads, group, dim, h;
    int32_t q_start, q_len, ctx, q_begin, q_end;
    float scale;
    int32_t window;           // > 0: each query sees only the last `window` keys up to its own position
    // Scratch, rows = (q_end - q_begin) * group:
    uint8_t* qb;              // [rows, 2, dim]: the high bytes, then the low bytes, of q's 16-bit values + 32768
    float* qs;                // [rows]: their scales
    float* acc;               // [rows, dim]
    float* m;                 // [rows]
    float* l;                 // [rows]
    float* scores;            // [rows, kI8KeyChunk]
    uint8_t* pw;              // [rows, kI8KeyChunk]: a chunk's weights as unsigned 8 bits
    float* ws;                // [rows]: their scale
};

// dim must be 64, 128 or 256 (i8_attend_supports).
inline bool i8_attend_supports(int64_t dim) { return dim == 64 || dim == 128 || dim == 256; }
// Its groups of 16 keys lie in one block, or in two of 8 (key_group).
inline bool i8_attend_block_size(int64_t block_size) { return block_size == 8 || block_size % 16 == 0; }
void i8_attend_avx512vnni(const I8AttendItem& item);

}  // namespace kvmux
