// pybind11 module infinity._C: the only file that knows about Python.
#include <pybind11/pybind11.h>

#include "infinity/arena.h"

#ifndef INFINITY_SOURCE_HASH
#define INFINITY_SOURCE_HASH "unknown"
#endif

namespace py = pybind11;
using infinity::Arena;
using infinity::ArenaStats;

PYBIND11_MODULE(_C, m) {
  m.doc() = "infinity C++ core: pinned arena allocator (plain C++17)";
  m.attr("SOURCE_HASH") = INFINITY_SOURCE_HASH;

  // C++ CapacityError -> infinity.errors.CapacityError (a Python class with the numbers
  // already in its message). Resolved lazily so that importing _C imports nothing else.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const infinity::CapacityError& e) {
      py::object cls = py::module_::import("infinity.errors").attr("CapacityError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  py::class_<ArenaStats>(m, "ArenaStats")
      .def_readonly("capacity_bytes", &ArenaStats::capacity_bytes)
      .def_readonly("used_bytes", &ArenaStats::used_bytes)
      .def_readonly("free_bytes", &ArenaStats::free_bytes)
      .def_readonly("largest_free_bytes", &ArenaStats::largest_free_bytes)
      .def_readonly("allocation_count", &ArenaStats::allocation_count)
      .def_readonly("free_block_count", &ArenaStats::free_block_count)
      .def("__repr__", [](const ArenaStats& s) {
        return "ArenaStats(capacity_bytes=" + std::to_string(s.capacity_bytes) +
               ", used_bytes=" + std::to_string(s.used_bytes) +
               ", free_bytes=" + std::to_string(s.free_bytes) +
               ", largest_free_bytes=" + std::to_string(s.largest_free_bytes) +
               ", allocation_count=" + std::to_string(s.allocation_count) +
               ", free_block_count=" + std::to_string(s.free_block_count) + ")";
      });

  py::class_<Arena>(m, "Arena")
      .def(py::init<uint64_t, uint64_t>(), py::arg("capacity_bytes"), py::arg("alignment") = 4096)
      .def("alloc", &Arena::alloc, py::arg("nbytes"),
           "Reserve nbytes (rounded up to the alignment); returns the block's offset.")
      .def("reserve", &Arena::reserve, py::arg("offset"), py::arg("nbytes"),
           "Mark a specific aligned range as allocated (raises ValueError if not free).")
      .def("free", &Arena::free, py::arg("offset"))
      .def("size_of", &Arena::size_of, py::arg("offset"))
      .def("stats", &Arena::stats)
      .def_property_readonly("capacity_bytes", &Arena::capacity_bytes)
      .def_property_readonly("alignment", &Arena::alignment);
}
