// Python module kvmux._native. Each component gets its own bind_* section so
// kernels can be added without touching the allocator's bindings.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_allocator.h"

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
        .def("allocate", &BlockAllocator::allocate)
        .def("allocate_n", &BlockAllocator::allocate_n, py::arg("n"),
             "Allocate n blocks, or none (OutOfBlocks) if fewer are free.")
        .def("incref", &BlockAllocator::incref, py::arg("block"))
        .def("decref", &BlockAllocator::decref, py::arg("block"),
             "Drop one reference; True if the block returned to the free list.")
        .def("refcount", &BlockAllocator::refcount, py::arg("block"))
        .def("fork", &BlockAllocator::fork, py::arg("blocks"))
        .def("free_blocks", &BlockAllocator::free_blocks, py::arg("blocks"))
        .def("copy_on_write", &BlockAllocator::copy_on_write, py::arg("block"),
             "(new_block, True) after moving one reference to a fresh block if "
             "`block` is shared, else (block, False).")
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
        .def("check_invariants", &BlockAllocator::check_invariants);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "kvmux native extension: KV block allocator";
    bind_block_allocator(m);
}
