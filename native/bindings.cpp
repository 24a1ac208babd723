// Python module kvmux._native. Each component gets its own bind_* section so
// kernels can be added without touching the allocator's bindings.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "allocator/block_allocator.h"
#include "dtype.h"
#include "cpu/cpu_features.h"
#include "cpu/decoder_stack.h"
#include "cpu/fused_ops.h"
#include "cpu/paged_attention.h"
#include "cpu/packed_linear.h"
#include "cpu/quant_linear.h"
#include "cpu/row_argmax.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;

namespace {

void bind_block_allocator(py::module_& m) {
    using kvmux::BlockAllocator;

    py::register_exception<kvmux::OutOfBlocks>(m, "OutOfBlocks", PyExc_MemoryError);
    py::register_exception<kvmux::BlockError>(m, "BlockError", PyExc_ValueError);

    py::class_<BlockAllocator>(m, "BlockAllocator",
                               "Fixed pool of reference-counted KV blocks.")
        .def(py::init<BlockAllocator::BlockId>(), py::arg("num_blocks"))
        .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
        .def_property_readonly("num_free", &BlockAllocator::num_free)
        .def("allocate_n", &BlockAllocator::allocate_n, py::arg("n"),
             "Allocate n blocks, or none (OutOfBlocks) if fewer are free.")
        .def("decref", &BlockAllocator::decref, py::arg("block"),
             "Drop one reference; True if the block returned to the free list.")
        .def("refcount", &BlockAllocator::refcount, py::arg("block"))
        .def("fork", &BlockAllocator::fork, py::arg("blocks"))
        .def("free_blocks", &BlockAllocator::free_blocks, py::arg("blocks"))
        // Prefix cache: chained 64-bit content hashes of full, computed blocks.
        .def_property_readonly("num_cached", &BlockAllocator::num_cached)
        .def_property_readonly("num_cached_free", &BlockAllocator::num_cached_free)
        .def_property_readonly("num_shared", &BlockAllocator::num_shared)
        .def("lookup", &BlockAllocator::lookup, py::arg("hashes"),
             "Blocks cached under the longest leading run of hashes (nothing is taken).")
        .def("prefix_cost", &BlockAllocator::prefix_cost, py::arg("hashes"), py::arg("n"),
             "Free blocks allocate_with_prefix(hashes, n) would consume.")
        .def("allocate_with_prefix", &BlockAllocator::allocate_with_prefix, py::arg("hashes"),
             py::arg("n"),
             "(blocks, hits): n blocks, the first `hits` shared from the cache; all or nothing.")
        .def("register_block", &BlockAllocator::register_block, py::arg("block"), py::arg("hash"),
             "Cache an in-use block's computed KV under hash; False if another block has it.")
        .def("has_hash", &BlockAllocator::has_hash, py::arg("block"))
        .def("block_hash", &BlockAllocator::block_hash, py::arg("block"))
        .def("evict", &BlockAllocator::evict, py::arg("n"),
             "Uncache up to n least recently used free cached blocks; returns how many.")
        // Tiers (host and disk pools): one block per content hash, and a log of reclaimed cached blocks.
        .def("acquire", &BlockAllocator::acquire, py::arg("hashes"), py::arg("n_plain") = 0,
             "(blocks, hits): a block per hash (cached one shared, else fresh and registered), then "
             "n_plain plain blocks; all or nothing.")
        .def("acquire_cost", &BlockAllocator::acquire_cost, py::arg("hashes"), py::arg("n_plain") = 0,
             "Free blocks acquire(hashes, n_plain) would consume.")
        .def_property("record_evictions", &BlockAllocator::record_evictions,
                      &BlockAllocator::set_record_evictions)
        .def("take_evicted", &BlockAllocator::take_evicted,
             "[(block, hash)] of cached blocks reclaimed by allocations since the last call.")
        .def_property_readonly("num_evicted", &BlockAllocator::num_evicted,
                               "Entries take_evicted would return now (it leaves them).")
        .def("check_invariants", &BlockAllocator::check_invariants);
}

// Tensors cross as integer addresses (tensor.data_ptr()) plus sizes; the
// Python side (kvmux/ops/cpu_attention.py) has checked dtype, device, shape.
void bind_paged_attention(py::module_& m) {
    using kvmux::AttentionMetadata;
    using kvmux::DType;

    py::register_exception<kvmux::AttentionError>(m, "AttentionError", PyExc_ValueError);
    py::enum_<kvmux::AttentionKernel>(m, "AttentionKernel", "The CPU attention work-item kernels.")
        .value("avx2", kvmux::AttentionKernel::avx2)
        .value("avx512bf16", kvmux::AttentionKernel::avx512bf16)
        .value("avx512vnni", kvmux::AttentionKernel::avx512vnni);
    m.def("attention_kernel_supported", &kvmux::attention_kernel_supported, py::arg("kernel"), py::arg("kv_dtype"),
          py::arg("head_dim"), "Whether this CPU runs the kernel on a pool of kv_dtype with this head_dim.");

    py::class_<AttentionMetadata>(m, "AttentionMetadata",
                              "One step's attention metadata, validated once and reused by every layer.")
        .def(py::init([](std::uintptr_t slot_mapping, int64_t num_tokens, const std::vector<int64_t>& query_lens,
                         const std::vector<int64_t>& context_lens, std::uintptr_t block_tables, int64_t max_blocks,
                         int64_t block_size, int64_t num_blocks) {
                 return AttentionMetadata(reinterpret_cast<const int64_t*>(slot_mapping), num_tokens, query_lens,
                                      context_lens, reinterpret_cast<const int32_t*>(block_tables), max_blocks,
                                      block_size, num_blocks);
             }),
             py::arg("slot_mapping"), py::arg("num_tokens"), py::arg("query_lens"), py::arg("context_lens"),
             py::arg("block_tables"), py::arg("max_blocks"), py::arg("block_size"), py::arg("num_blocks"),
             "slot_mapping: address of int64 [num_tokens]; block_tables: address of int32 [S, max_blocks].")
        .def_property_readonly("num_tokens", &AttentionMetadata::num_tokens)
        .def_property_readonly("num_seqs", &AttentionMetadata::num_seqs)
        .def_property_readonly("num_work_tiles", &AttentionMetadata::num_work_tiles)
        .def(
            "run",
            [](const AttentionMetadata& meta, std::uintptr_t q, int64_t q_stride, std::uintptr_t k, int64_t k_stride,
               std::uintptr_t v, int64_t v_stride, std::uintptr_t out, int act_dtype, std::uintptr_t kv,
               int kv_dtype, int64_t num_blocks, int64_t num_layers, int64_t block_size, int64_t layer,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int num_threads,
               kvmux::AttentionKernel kernel, int32_t window, std::uintptr_t k_mean) {
                kvmux::LayerArgs a;
                a.q = {reinterpret_cast<const void*>(q), q_stride};
                a.k = {reinterpret_cast<const void*>(k), k_stride};
                a.v = {reinterpret_cast<const void*>(v), v_stride};
                a.out = reinterpret_cast<void*>(out);
                a.act_dtype = static_cast<DType>(act_dtype);
                a.kv = reinterpret_cast<void*>(kv);
                a.kv_dtype = static_cast<DType>(kv_dtype);
                a.num_blocks = num_blocks;
                a.num_layers = num_layers;
                a.block_size = block_size;
                a.layer = layer;
                a.num_heads = num_heads;
                a.num_kv_heads = num_kv_heads;
                a.head_dim = head_dim;
                a.scale = scale;
                a.num_threads = num_threads;
                a.kernel = kernel;
                a.window = window;
                a.k_mean = reinterpret_cast<const float*>(k_mean);
                // The engine's event loop runs beside the forward thread.
                py::gil_scoped_release release;
                meta.run(a);
            },
            py::arg("q"), py::arg("q_stride"), py::arg("k"), py::arg("k_stride"), py::arg("v"), py::arg("v_stride"),
            py::arg("out"), py::arg("act_dtype"), py::arg("kv"), py::arg("kv_dtype"), py::arg("num_blocks"),
            py::arg("num_layers"), py::arg("block_size"), py::arg("layer"), py::arg("num_heads"),
            py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("num_threads"),
            py::arg("kernel") = kvmux::AttentionKernel::avx2, py::arg("window") = 0,
            py::arg("k_mean") = 0,
            "Write this layer's new K/V into their slots, then attend every new query over its context (its last "
            "`window` keys where window > 0: a sliding-window layer). k_mean: an int8 pool's [kv heads, head_dim] float32 "
            "offset of this layer's K (0: none).");
}

// Addresses again; kvmux/ops/linear.py checks the tensors.
void bind_packed_linear(py::module_& m) {
    using kvmux::LinearKernel;

    py::register_exception<kvmux::LinearError>(m, "LinearError", PyExc_ValueError);
    m.attr("PANEL_WIDTH") = kvmux::kPanelWidth;
    m.attr("BF16_K_ALIGN") = kvmux::kBf16KAlign;
    py::enum_<LinearKernel>(m, "LinearKernel", "The native matmul kernels (native/cpu/packed_linear.h).")
        .value("f32_avx2", LinearKernel::f32_avx2)
        .value("bf16_widen_avx2", LinearKernel::bf16_widen_avx2)
        .value("bf16_avx512", LinearKernel::bf16_avx512)
        .value("bf16_amx", LinearKernel::bf16_amx);
    m.def("linear_kernel_supported", &kvmux::linear_kernel_supported, py::arg("kernel"),
          "Whether this CPU (and, for AMX, the OS) can run the kernel.");
    m.def(
        "packed_linear",
        [](LinearKernel kernel, std::uintptr_t x, int64_t rows, int64_t in_features, int64_t x_stride,
           std::uintptr_t packed, int64_t out_features, std::uintptr_t bias, std::uintptr_t out, int64_t out_stride,
           int num_threads) {
            py::gil_scoped_release release;
            kvmux::packed_linear(kernel, reinterpret_cast<const float*>(x), rows, in_features, x_stride,
                                 reinterpret_cast<const void*>(packed), out_features,
                                 reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out), out_stride,
                                 num_threads);
        },
        py::arg("kernel"), py::arg("x"), py::arg("rows"), py::arg("in_features"), py::arg("x_stride"),
        py::arg("packed"), py::arg("out_features"), py::arg("bias"), py::arg("out"), py::arg("out_stride"),
        py::arg("num_threads"),
        "out[rows, out_features] = x @ weight.T (+ bias) from the packed weight in the layout of the kernel's "
        "weight dtype; x, bias and out float32; bias 0 means none.");
}

// A span the kernels can walk: whole blocks, whole spans a row (else they would read past it).
void check_span(const char* fn, int qtype, int64_t span, int64_t in_features) {
    if (qtype < 0 || qtype > 5) throw py::value_error(std::string(fn) + ": qtype must be 0-5");
    if (in_features % kvmux::kQuantBlock)
        throw py::value_error(std::string(fn) + ": in_features must be a multiple of " +
                              std::to_string(kvmux::kQuantBlock) + ", got " + std::to_string(in_features));
    const int64_t block = kvmux::quant_block(static_cast<kvmux::QuantType>(qtype));
    if (span <= 0 || span % block || in_features % span)
        throw py::value_error(std::string(fn) + ": span must be a multiple of the block (" + std::to_string(block) +
                              ") dividing in_features (" + std::to_string(in_features) + "), got " +
                              std::to_string(span));
}

// Addresses again; kvmux/ops/quant.py checks the tensors and that the CPU can run the kernel asked for.
void bind_quant_linear(py::module_& m) {
    m.attr("QUANT_BLOCK") = kvmux::kQuantBlock;
    m.attr("QUANT_PANEL") = kvmux::kQuantPanel;
    m.def(
        "quant_linear",
        [](std::uintptr_t x, int64_t rows, int64_t in_features, int64_t x_stride, int qtype, std::uintptr_t quants,
           std::uintptr_t scales, std::uintptr_t mins, int64_t span, int64_t out_features, std::uintptr_t bias,
           std::uintptr_t out, int64_t out_stride, int kernel, int num_threads) {
            check_span("quant_linear", qtype, span, in_features);
            const kvmux::QuantWeights w{static_cast<kvmux::QuantType>(qtype), out_features, in_features,
                                        reinterpret_cast<const uint8_t*>(quants),
                                        reinterpret_cast<const uint16_t*>(scales),
                                        reinterpret_cast<const uint16_t*>(mins), span};
            py::gil_scoped_release release;
            kvmux::quant_linear(reinterpret_cast<const float*>(x), rows, x_stride, w,
                                reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out), out_stride,
                                static_cast<kvmux::QuantKernel>(kernel), num_threads);
        },
        py::arg("x"), py::arg("rows"), py::arg("in_features"), py::arg("x_stride"), py::arg("qtype"),
        py::arg("quants"), py::arg("scales"), py::arg("mins"), py::arg("span"), py::arg("out_features"),
        py::arg("bias"), py::arg("out"), py::arg("out_stride"), py::arg("kernel"), py::arg("num_threads"),
        "out[rows, out_features] = x @ W.T (+ bias), W in quantized panels (qtype 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0, "
        "4 Q5_1, 5 Q6_K), x quantized per block on the fly (int16 for Q8_0, int8 for the rest) under one scale a "
        "span of K (a multiple of the block dividing K) by kernel 0 AVX2, 1 AVX-VNNI, 2 AVX512-VNNI, 3 AMX; or by "
        "kernel 4 AMX-BF16, x rounded to bf16 times W dequantized to bf16 a chunk at a time; bias 0 means none.");
    m.def(
        "quant_rows",
        [](int qtype, std::uintptr_t quants, std::uintptr_t scales, std::uintptr_t mins, int64_t out_features,
           int64_t in_features, std::uintptr_t ids, int64_t n, std::uintptr_t out) {
            const kvmux::QuantWeights w{static_cast<kvmux::QuantType>(qtype), out_features, in_features,
                                        reinterpret_cast<const uint8_t*>(quants),
                                        reinterpret_cast<const uint16_t*>(scales),
                                        reinterpret_cast<const uint16_t*>(mins), kvmux::quant_block(
                                            static_cast<kvmux::QuantType>(qtype))};  // the span is the matmul's
            py::gil_scoped_release release;
            kvmux::quant_rows(w, reinterpret_cast<const int64_t*>(ids), n, reinterpret_cast<float*>(out));
        },
        py::arg("qtype"), py::arg("quants"), py::arg("scales"), py::arg("mins"), py::arg("out_features"),
        py::arg("in_features"), py::arg("ids"), py::arg("n"), py::arg("out"),
        "out[n, in_features] = rows ids[0..n) of W (int64, each in [0, out_features)) dequantized to float32.");
    m.def(
        "quantize_activations",
        [](std::uintptr_t x, int64_t rows, int64_t in_features, int64_t x_stride, int qtype, int64_t span,
           std::uintptr_t q, std::uintptr_t d, std::uintptr_t offsets, std::uintptr_t min_weights) {
            check_span("quantize_activations", qtype, span, in_features);
            py::gil_scoped_release release;
            kvmux::quantize_activations(reinterpret_cast<const float*>(x), rows, x_stride, in_features,
                                        static_cast<kvmux::QuantType>(qtype), span, reinterpret_cast<void*>(q),
                                        reinterpret_cast<float*>(d), reinterpret_cast<int32_t*>(offsets),
                                        reinterpret_cast<float*>(min_weights));
        },
        py::arg("x"), py::arg("rows"), py::arg("in_features"), py::arg("x_stride"), py::arg("qtype"),
        py::arg("span"), py::arg("q"), py::arg("d"), py::arg("offsets"), py::arg("min_weights"),
        "The per-block quantization quant_linear applies to the activations of weights of form qtype (as "
        "quant_linear numbers them): to int16 for Q8_0, else int8, per block of 32 (Q6_K's 16), with each block's "
        "integer starting value -offset * sum (forms with an offset) or min weight d * sum (forms with mins); d is "
        "taken over spans of `span` values (equal within one).");
}

// Addresses and sizes; kvmux/ops/fused.py checks the tensors.
void bind_fused_ops(py::module_& m) {
    m.def(
        "rms_norm_f32",
        [](std::uintptr_t x, int64_t rows, int64_t hidden, int64_t x_stride, std::uintptr_t weight, float eps,
           std::uintptr_t out, int num_threads) {
            py::gil_scoped_release release;
            kvmux::rms_norm_f32(reinterpret_cast<const float*>(x), rows, hidden, x_stride,
                                reinterpret_cast<const float*>(weight), eps, reinterpret_cast<float*>(out),
                                num_threads);
        },
        py::arg("x"), py::arg("rows"), py::arg("hidden"), py::arg("x_stride"), py::arg("weight"), py::arg("eps"),
        py::arg("out"), py::arg("num_threads"));
    m.def(
        "add_rms_norm_f32",
        [](std::uintptr_t x, std::uintptr_t residual, int64_t rows, int64_t hidden, std::uintptr_t weight, float eps,
           std::uintptr_t out, int num_threads) {
            py::gil_scoped_release release;
            kvmux::add_rms_norm_f32(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(residual), rows,
                                    hidden, reinterpret_cast<const float*>(weight), eps,
                                    reinterpret_cast<float*>(out), num_threads);
        },
        py::arg("x"), py::arg("residual"), py::arg("rows"), py::arg("hidden"), py::arg("weight"), py::arg("eps"),
        py::arg("out"), py::arg("num_threads"), "residual += x, then out = rms_norm(residual).");
    m.def(
        "rope_f32",
        [](std::uintptr_t rows, int64_t num_rows, int64_t row_stride, int64_t heads, int64_t head_dim,
           std::uintptr_t cos, std::uintptr_t sin, int num_threads) {
            py::gil_scoped_release release;
            kvmux::rope_f32(reinterpret_cast<float*>(rows), num_rows, row_stride, heads, head_dim,
                            reinterpret_cast<const float*>(cos), reinterpret_cast<const float*>(sin), num_threads);
        },
        py::arg("rows"), py::arg("num_rows"), py::arg("row_stride"), py::arg("heads"), py::arg("head_dim"),
        py::arg("cos"), py::arg("sin"), py::arg("num_threads"), "Rotate the first heads heads of each row in place.");
    m.def(
        "silu_mul_f32",
        [](std::uintptr_t gate_up, int64_t rows, int64_t inter, std::uintptr_t out, int num_threads) {
            py::gil_scoped_release release;
            kvmux::silu_mul_f32(reinterpret_cast<const float*>(gate_up), rows, inter, reinterpret_cast<float*>(out),
                                num_threads);
        },
        py::arg("gate_up"), py::arg("rows"), py::arg("inter"), py::arg("out"), py::arg("num_threads"));
    m.def(
        "gelu_tanh_mul_f32",
        [](std::uintptr_t gate_up, int64_t rows, int64_t inter, std::uintptr_t out, int num_threads) {
            py::gil_scoped_release release;
            kvmux::gelu_tanh_mul_f32(reinterpret_cast<const float*>(gate_up), rows, inter,
                                     reinterpret_cast<float*>(out), num_threads);
        },
        py::arg("gate_up"), py::arg("rows"), py::arg("inter"), py::arg("out"), py::arg("num_threads"));
    m.def(
        "row_argmax_f32",
        [](std::uintptr_t x, int64_t rows, int64_t cols, int64_t row_stride, std::uintptr_t out, int num_threads) {
            if (cols < 1) throw std::invalid_argument("row_argmax_f32: rows need at least one column");
            py::gil_scoped_release release;
            kvmux::row_argmax_f32(reinterpret_cast<const float*>(x), rows, cols, row_stride,
                                  reinterpret_cast<int64_t*>(out), num_threads);
        },
        py::arg("x"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("out"), py::arg("num_threads"),
        "Each row's argmax into out (int64): the first on ties, the first NaN before any number.");
    m.def(
        "head_rms_norm_f32",
        [](std::uintptr_t rows, int64_t num_rows, int64_t row_stride, int64_t heads, int64_t head_dim,
           std::uintptr_t weight, float eps, int num_threads) {
            py::gil_scoped_release release;
            kvmux::head_rms_norm_f32(reinterpret_cast<float*>(rows), num_rows, row_stride, heads, head_dim,
                                     reinterpret_cast<const float*>(weight), eps, num_threads);
        },
        py::arg("rows"), py::arg("num_rows"), py::arg("row_stride"), py::arg("heads"), py::arg("head_dim"),
        py::arg("weight"), py::arg("eps"), py::arg("num_threads"), "RMSNorm each of the first heads heads of each "
        "row in place.");
}

// The decoder stack's parts are built once, at load, by kvmux/model/native_stack.py from the model's checked
// matmuls (QuantLinear, PackedLinear); a step hands addresses of tensors it made itself.
void bind_decoder_stack(py::module_& m) {
    using kvmux::DecoderLayer;
    using kvmux::LayerMatmul;
    using kvmux::MatmulCall;
    py::class_<MatmulCall>(m, "MatmulCall", "One kernel call of a matmul (kvmux/ops/linear.py's native_call).");
    m.def(
        "quant_matmul_call",
        [](int qtype, std::uintptr_t quants, std::uintptr_t scales, std::uintptr_t mins, int64_t span,
           int64_t out_features, int64_t in_features, std::uintptr_t bias, int kernel) {
            check_span("quant_matmul_call", qtype, span, in_features);
            MatmulCall c{};
            c.quantized = true;
            c.quant = {static_cast<kvmux::QuantType>(qtype), out_features, in_features,
                       reinterpret_cast<const uint8_t*>(quants), reinterpret_cast<const uint16_t*>(scales),
                       reinterpret_cast<const uint16_t*>(mins), span};
            c.quant_kernel = static_cast<kvmux::QuantKernel>(kernel);
            c.N = out_features;
            c.K = in_features;
            c.bias = reinterpret_cast<const float*>(bias);
            return c;
        },
        py::arg("qtype"), py::arg("quants"), py::arg("scales"), py::arg("mins"), py::arg("span"),
        py::arg("out_features"), py::arg("in_features"), py::arg("bias"), py::arg("kernel"),
        "quant_linear's call, as a MatmulCall.");
    m.def(
        "packed_matmul_call",
        [](kvmux::LinearKernel kernel, std::uintptr_t packed, int64_t out_features, int64_t in_features,
           std::uintptr_t bias) {
            MatmulCall c{};
            c.quantized = false;
            c.packed_kernel = kernel;
            c.packed = reinterpret_cast<const void*>(packed);
            c.N = out_features;
            c.K = in_features;
            c.bias = reinterpret_cast<const float*>(bias);
            return c;
        },
        py::arg("kernel"), py::arg("packed"), py::arg("out_features"), py::arg("in_features"), py::arg("bias"),
        "packed_linear's call, as a MatmulCall.");
    py::class_<LayerMatmul>(m, "LayerMatmul", "A layer's matmul: its pieces' calls per row range, a bias after.")
        .def(py::init([](const std::vector<std::tuple<std::vector<int64_t>, std::vector<MatmulCall>, int64_t>>& pieces,
                         std::uintptr_t bias, int64_t out_features, int64_t in_features) {
                 LayerMatmul l;
                 int64_t total = 0;
                 for (const auto& [bounds, calls, n] : pieces) {
                     if (calls.size() != bounds.size() + 1)
                         throw std::invalid_argument("LayerMatmul: a piece needs one call more than its bounds");
                     l.pieces.push_back({bounds, calls, n});
                     total += n;
                 }
                 if (total != out_features) throw std::invalid_argument("LayerMatmul: pieces do not sum to out_features");
                 l.bias = reinterpret_cast<const float*>(bias);
                 l.N = out_features;
                 l.K = in_features;
                 return l;
             }),
             py::arg("pieces"), py::arg("bias"), py::arg("out_features"), py::arg("in_features"));
    using kvmux::GemmaParts;
    using kvmux::StackPool;
    py::class_<GemmaParts>(m, "GemmaParts", "A Gemma 3 layer's q/k norms, MLP norms and sliding window.")
        .def(py::init([](std::uintptr_t q_norm, float q_eps, std::uintptr_t k_norm, float k_eps,
                         std::uintptr_t pre_ff_norm, float pre_ff_eps, std::uintptr_t post_ff_norm, float post_ff_eps,
                         int32_t window, int64_t pool_layer) {
                 return GemmaParts{reinterpret_cast<const float*>(q_norm), q_eps, reinterpret_cast<const float*>(k_norm),
                                   k_eps, reinterpret_cast<const float*>(pre_ff_norm), pre_ff_eps,
                                   reinterpret_cast<const float*>(post_ff_norm), post_ff_eps, window, pool_layer};
             }),
             py::arg("q_norm"), py::arg("q_eps"), py::arg("k_norm"), py::arg("k_eps"), py::arg("pre_ff_norm"),
             py::arg("pre_ff_eps"), py::arg("post_ff_norm"), py::arg("post_ff_eps"), py::arg("window"),
             py::arg("pool_layer"));
    py::class_<DecoderLayer>(m, "DecoderLayer", "One Llama-family or Gemma 3 layer's weights and shape for "
                                                "run_decoder_stack.")
        .def(py::init([](std::uintptr_t input_norm, float input_eps, std::uintptr_t post_norm, float post_eps,
                         const LayerMatmul& qkv, const LayerMatmul& o_proj, const LayerMatmul& gate_up,
                         const LayerMatmul& down, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         int64_t intermediate, float scale, int64_t layer, std::optional<GemmaParts> gemma) {
                 return DecoderLayer{reinterpret_cast<const float*>(input_norm), input_eps,
                                     reinterpret_cast<const float*>(post_norm), post_eps, qkv, o_proj, gate_up, down,
                                     heads, kv_heads, head_dim, intermediate, scale, layer, gemma.has_value(),
                                     gemma.value_or(GemmaParts{})};
             }),
             py::arg("input_norm"), py::arg("input_eps"), py::arg("post_norm"), py::arg("post_eps"), py::arg("qkv"),
             py::arg("o_proj"), py::arg("gate_up"), py::arg("down"), py::arg("heads"), py::arg("kv_heads"),
             py::arg("head_dim"), py::arg("intermediate"), py::arg("scale"), py::arg("layer"),
             py::arg("gemma") = py::none());
    py::class_<StackPool>(m, "StackPool", "A KV pool a step of the stack writes and reads, with its metadata.")
        .def(py::init([](const kvmux::AttentionMetadata& meta, std::uintptr_t kv, int kv_dtype, int64_t num_blocks,
                         int64_t num_layers, int64_t block_size, std::uintptr_t k_mean) {
                 return StackPool{&meta, reinterpret_cast<void*>(kv), static_cast<kvmux::DType>(kv_dtype), num_blocks,
                                  num_layers, block_size, reinterpret_cast<const float*>(k_mean)};
             }),
             py::arg("meta"), py::arg("kv"), py::arg("kv_dtype"), py::arg("num_blocks"), py::arg("num_layers"),
             py::arg("block_size"), py::arg("k_mean"), py::keep_alive<1, 2>());
    // Held by a Python object, so a step passes no list to convert.
    struct DecoderStack {
        std::vector<DecoderLayer> layers;
    };
    py::class_<DecoderStack>(m, "DecoderStack", "A model's layers for run_decoder_stack, in order.")
        .def(py::init([](std::vector<DecoderLayer> layers) { return DecoderStack{std::move(layers)}; }),
             py::arg("layers"))
        .def_property_readonly("num_layers", [](const DecoderStack& d) { return d.layers.size(); })
        .def(
        "run",
        [](const DecoderStack& stack, std::uintptr_t x, std::uintptr_t residual, int64_t rows, int64_t hidden,
           std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t cos_local, std::uintptr_t sin_local,
           const StackPool& pool, std::optional<StackPool> sliding, kvmux::AttentionKernel attention_kernel,
           int attention_threads, std::uintptr_t h, std::uintptr_t qkv, std::uintptr_t attn, std::uintptr_t gate_up,
           std::uintptr_t act, std::uintptr_t normed, int num_threads) {
            kvmux::StackStep s{rows, hidden, reinterpret_cast<const float*>(cos), reinterpret_cast<const float*>(sin),
                               reinterpret_cast<const float*>(cos_local), reinterpret_cast<const float*>(sin_local),
                               pool, sliding.value_or(StackPool{}), attention_kernel, attention_threads,
                               reinterpret_cast<float*>(h), reinterpret_cast<float*>(qkv),
                               reinterpret_cast<float*>(attn), reinterpret_cast<float*>(gate_up),
                               reinterpret_cast<float*>(act), reinterpret_cast<float*>(normed), num_threads};
            // The engine's event loop runs beside the forward thread.
            py::gil_scoped_release release;
            kvmux::run_decoder_stack(stack.layers, s, reinterpret_cast<float*>(x), reinterpret_cast<float*>(residual));
        },
        py::arg("x"), py::arg("residual"), py::arg("rows"), py::arg("hidden"), py::arg("cos"), py::arg("sin"),
        py::arg("cos_local"), py::arg("sin_local"), py::arg("pool"), py::arg("sliding"), py::arg("attention_kernel"),
        py::arg("attention_threads"), py::arg("h"), py::arg("qkv"), py::arg("attn"), py::arg("gate_up"),
        py::arg("act"), py::arg("normed"), py::arg("num_threads"),
        "Every layer of a step: x [rows, hidden] the embeddings in; a Llama-family stack leaves the last MLP output "
        "in x and the residual stream before it in residual [rows, hidden], a Gemma one the residual stream in x. "
        "Addresses of float32 tensors (the scratch sized per layer width).");
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "kvmux native extension: KV block allocator, CPU paged-attention, packed-weight linear and fused layer kernels";
    // The element types every kernel (CPU and CUDA) is told its tensors hold.
    py::enum_<kvmux::DType>(m, "DType")
        .value("f32", kvmux::DType::f32)
        .value("bf16", kvmux::DType::bf16)
        .value("f16", kvmux::DType::f16)
        .value("i8", kvmux::DType::i8);
    m.def(
        "cpu_features",
        [] {
            const auto& f = kvmux::cpu_features();
            return py::dict(py::arg("avx2") = f.avx2, py::arg("fma") = f.fma, py::arg("f16c") = f.f16c,
                            py::arg("avx512f") = f.avx512f, py::arg("avx512bw") = f.avx512bw,
                            py::arg("avx512vl") = f.avx512vl, py::arg("avx512bf16") = f.avx512bf16,
                            py::arg("avx512vnni") = f.avx512vnni, py::arg("avxvnni") = f.avxvnni,
                            py::arg("amx_tile") = f.amx_tile, py::arg("amx_bf16") = f.amx_bf16,
                            py::arg("amx_int8") = f.amx_int8);
        },
        "The instruction sets this CPU (and, for AMX, the OS) lets the kernels use.");
    m.def(
        "pool_stats",
        [] {
            const kvmux::PoolStats s = kvmux::pool_stats();
            return py::dict(py::arg("calls") = s.calls, py::arg("shared_calls") = s.shared_calls,
                            py::arg("helper_tasks") = s.helper_tasks, py::arg("stalls") = s.stalls,
                            py::arg("solo_calls") = s.solo_calls, py::arg("helpers") = s.helpers);
        },
        "The kernels' thread pool since the process started (native/cpu/thread_pool.h): calls, calls the helpers "
        "joined, tasks they ran, stalls on a descheduled helper, calls run alone after one, helper threads.");
    m.def("set_task_delay", &kvmux::set_task_delay, py::arg("max_us"),
          "Test hook: every pool task first sleeps a random 0..max_us microseconds (0: off).");
    bind_block_allocator(m);
    bind_paged_attention(m);
    bind_packed_linear(m);
    bind_quant_linear(m);
    bind_fused_ops(m);
    bind_decoder_stack(m);
}
