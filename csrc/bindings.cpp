// pybind11 module infinity._C: the only file that knows about Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "infinity/arena.h"
#include "infinity/planner.h"
#include "infinity/scheduler.h"

#ifndef INFINITY_SOURCE_HASH
#define INFINITY_SOURCE_HASH "unknown"
#endif

namespace py = pybind11;
using infinity::Arena;
using infinity::ArenaStats;

PYBIND11_MODULE(_C, m) {
  m.doc() = "infinity C++ core: pinned arena allocator, prefetch planner and scheduler (C++17)";
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

  // -- planner and scheduler ----------------------------------------------------------------
  using infinity::Action;
  using infinity::Bandwidths;
  using infinity::Plan;
  using infinity::PlanInput;
  using infinity::Scheduler;
  using infinity::SimResult;

  py::class_<Bandwidths>(m, "Bandwidths")
      .def(py::init([](double disk_read, double disk_write, double h2d, double d2h) {
             return Bandwidths{disk_read, disk_write, h2d, d2h};
           }),
           py::arg("disk_read"), py::arg("disk_write"), py::arg("h2d"), py::arg("d2h"))
      .def_readonly("disk_read", &Bandwidths::disk_read)
      .def_readonly("disk_write", &Bandwidths::disk_write)
      .def_readonly("h2d", &Bandwidths::h2d)
      .def_readonly("d2h", &Bandwidths::d2h);

  py::class_<Plan>(m, "Plan")
      .def_property_readonly("sizes", [](const Plan& p) { return p.input.sizes; })
      .def_property_readonly("order", [](const Plan& p) { return p.input.order; })
      .def_property_readonly("repeats", [](const Plan& p) { return p.input.repeats; })
      .def_property_readonly("gpu_bytes", [](const Plan& p) { return p.input.gpu_bytes; })
      .def_property_readonly("pinned_bytes", [](const Plan& p) { return p.input.pinned_bytes; })
      .def_property_readonly("bandwidths", [](const Plan& p) { return p.input.bandwidths; })
      .def_property_readonly("compute_s", [](const Plan& p) { return p.input.compute_s; })
      .def_property_readonly("writes", [](const Plan& p) { return p.input.writes; })
      .def_readonly("trace", &Plan::trace)
      .def_readonly("source", &Plan::source)
      .def_readonly("keep_gpu", &Plan::keep_gpu)
      .def_readonly("keep_pinned", &Plan::keep_pinned)
      .def_readonly("evict_gpu", &Plan::evict_gpu)
      .def_readonly("evict_pinned", &Plan::evict_pinned)
      .def_readonly("resident_gpu_list", &Plan::resident_gpu)
      .def_readonly("resident_pinned_list", &Plan::resident_pinned)
      .def_readonly("gpu_stream_bytes", &Plan::gpu_stream_bytes)
      .def_readonly("pinned_stream_bytes", &Plan::pinned_stream_bytes)
      .def_readonly("gpu_cache_bytes", &Plan::gpu_cache_bytes)
      .def_readonly("pinned_cache_bytes", &Plan::pinned_cache_bytes)
      .def_readonly("pinned_write_bytes", &Plan::pinned_write_bytes)
      .def_readonly("cyclic", &Plan::cyclic);

  m.def(
      "make_plan",
      [](std::vector<uint64_t> sizes, std::vector<int32_t> order, uint32_t repeats,
         uint64_t gpu_bytes, uint64_t pinned_bytes, const Bandwidths& bw,
         std::vector<double> compute_s, int gpu_stream_buffers, int pinned_stream_buffers,
         std::vector<uint8_t> writes) {
        PlanInput in{std::move(sizes), std::move(order), repeats,
                     gpu_bytes,        pinned_bytes,     bw,
                     std::move(compute_s), gpu_stream_buffers, pinned_stream_buffers,
                     std::move(writes)};
        py::gil_scoped_release release;
        return infinity::make_plan(in);
      },
      py::arg("sizes"), py::arg("order"), py::arg("repeats"), py::arg("gpu_bytes"),
      py::arg("pinned_bytes"), py::arg("bandwidths"), py::arg("compute_s"),
      py::arg("gpu_stream_buffers") = -1, py::arg("pinned_stream_buffers") = -1,
      py::arg("writes") = std::vector<uint8_t>{});

  py::class_<SimResult>(m, "SimResult")
      .def_readonly("time_s", &SimResult::time_s)
      .def_readonly("bound_s", &SimResult::bound_s)
      .def_readonly("disk_read_bytes", &SimResult::disk_read_bytes)
      .def_readonly("h2d_bytes", &SimResult::h2d_bytes)
      .def_readonly("peak_gpu_bytes", &SimResult::peak_gpu_bytes)
      .def_readonly("peak_pinned_bytes", &SimResult::peak_pinned_bytes)
      .def_readonly("disk_busy_s", &SimResult::disk_busy_s)
      .def_readonly("h2d_busy_s", &SimResult::h2d_busy_s)
      .def_readonly("compute_s", &SimResult::compute_s)
      .def_readonly("stall_s", &SimResult::stall_s)
      .def_readonly("step_end_s", &SimResult::step_end_s)
      .def_readonly("disk_write_bytes", &SimResult::disk_write_bytes)
      .def_readonly("d2h_bytes", &SimResult::d2h_bytes)
      .def_readonly("d2h_busy_s", &SimResult::d2h_busy_s)
      .def_readonly("transfers", &SimResult::transfers);

  m.def(
      "simulate",
      [](const Plan& p) {
        py::gil_scoped_release release;
        return infinity::simulate(p);
      },
      py::arg("plan"));

  // Actions cross as tuples (id, kind, tensor, step, nbytes, cached): cheap to build and unpack.
  auto as_tuples = [](const std::vector<Action>& actions) {
    py::list out(actions.size());
    for (size_t i = 0; i < actions.size(); ++i) {
      const Action& a = actions[i];
      out[i] = py::make_tuple(a.id, int(a.kind), a.tensor, a.step, a.nbytes, bool(a.cached));
    }
    return out;
  };
  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init<const Plan&, bool>(), py::arg("plan"), py::arg("past_end") = true)
      .def("start", [as_tuples](Scheduler& s) { return as_tuples(s.start()); })
      .def(
          "step",
          [as_tuples](Scheduler& s, int32_t t, int write) { return as_tuples(s.step(t, write)); },
          py::arg("tensor"), py::arg("write") = -1)
      .def("finish", [as_tuples](Scheduler& s) { return as_tuples(s.finish()); })
      .def("flush", [as_tuples](Scheduler& s) { return as_tuples(s.flush()); })
      .def("flushed", &Scheduler::flushed)
      .def("done", [as_tuples](Scheduler& s, int64_t id) { return as_tuples(s.done(id)); },
           py::arg("action_id"))
      .def("on_gpu", &Scheduler::on_gpu, py::arg("tensor"))
      .def_property_readonly("position", &Scheduler::position)
      .def("stats", [](const Scheduler& s) {
        const auto& st = s.stats();
        py::dict d;
        d["steps"] = st.steps;
        d["events"] = st.events;
        d["divergences"] = st.divergences;
        d["demand_fetches"] = st.demand_fetches;
        d["reads"] = st.reads;
        d["copies"] = st.copies;
        d["gpu_hits"] = st.gpu_hits;
        d["pinned_hits"] = st.pinned_hits;
        d["copy_backs"] = st.copy_backs;
        d["writes"] = st.writes;
        d["dirty_steps"] = st.dirty_steps;
        d["gpu_used"] = st.gpu_used;
        d["pinned_used"] = st.pinned_used;
        d["peak_gpu"] = st.peak_gpu;
        d["peak_pinned"] = st.peak_pinned;
        return d;
      });
}
