// Python module kvmux._native_cuda: the CUDA paged-attention kernels. Built
// with the host compiler; the kernels live in paged_attention.cu (nvcc).
#include <pybind11/pybind11.h>

#include "cuda/paged_attention.h"

namespace py = pybind11;

PYBIND11_MODULE(_native_cuda, m) {
    using kvmux::cuda::Args;
    using kvmux::cuda::DType;
    m.doc() = "kvmux CUDA paged-attention kernels (addresses in, nothing linked against torch)";
    m.attr("PARTITION") = kvmux::cuda::kPartition;
    m.def("prefill_tile_tokens", &kvmux::cuda::prefill_tile_tokens, py::arg("group"),
          "Query tokens per prefill tile for a GQA group size.");
    m.def(
        "paged_attention",
        [](std::uintptr_t q, int64_t q_stride, std::uintptr_t k, int64_t k_stride, std::uintptr_t v,
           int64_t v_stride, std::uintptr_t out, int act_dtype, std::uintptr_t kv, int kv_dtype,
           std::uintptr_t k_mean, int64_t num_layers,
           int64_t layer, int64_t block_size, int64_t max_blocks, int64_t num_tokens, int64_t num_heads,
           int64_t num_kv_heads, int64_t head_dim, float scale, int64_t window, std::uintptr_t slot_mapping,
           std::uintptr_t query_starts, std::uintptr_t query_lens, std::uintptr_t context_lens,
           std::uintptr_t block_tables, std::uintptr_t decode_seqs, int64_t num_decode, int64_t max_partitions,
           std::uintptr_t prefill_tiles, int64_t num_tiles, std::uintptr_t part_out, std::uintptr_t part_max,
           std::uintptr_t part_sum, std::uintptr_t stream) {
            Args a{q, k, v, out, q_stride, k_stride, v_stride, static_cast<DType>(act_dtype), kv,
                   static_cast<DType>(kv_dtype), k_mean, num_layers, layer, block_size, max_blocks, num_tokens, num_heads,
                   num_kv_heads, head_dim, scale, window, slot_mapping, query_starts, query_lens, context_lens,
                   block_tables, decode_seqs, num_decode, max_partitions, prefill_tiles, num_tiles, part_out,
                   part_max, part_sum, stream};
            // Launches are asynchronous, but the event loop should not wait on them either.
            py::gil_scoped_release release;
            kvmux::cuda::paged_attention(a);
        },
        py::arg("q"), py::arg("q_stride"), py::arg("k"), py::arg("k_stride"), py::arg("v"), py::arg("v_stride"),
        py::arg("out"), py::arg("act_dtype"), py::arg("kv"), py::arg("kv_dtype"), py::arg("k_mean"),
        py::arg("num_layers"),
        py::arg("layer"), py::arg("block_size"), py::arg("max_blocks"), py::arg("num_tokens"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("window"), py::arg("slot_mapping"),
        py::arg("query_starts"), py::arg("query_lens"), py::arg("context_lens"), py::arg("block_tables"),
        py::arg("decode_seqs"), py::arg("num_decode"), py::arg("max_partitions"), py::arg("prefill_tiles"),
        py::arg("num_tiles"), py::arg("part_out"), py::arg("part_max"), py::arg("part_sum"), py::arg("stream"),
        "Enqueue: write this layer's K/V into their slots, then attend (decode, split-context merge, prefill).");
}
