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
        .def("check_invariants", &BlockAllocator::check_invariants);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "kvmux native extension: KV block allocator";
    bind_block_allocator(m);
}
