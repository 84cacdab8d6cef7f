// Python-facing entry points: check the arguments once, then call the plain kernels.
// bindings_cpu.cpp / bindings_cuda.cpp bind these and nothing else.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>

namespace aptp {
namespace api {

namespace py = pybind11;

// ---- CPU (aptp._C): numpy arrays in and out -------------------------------------------
std::pair<py::array_t<int64_t>, py::array_t<int64_t>> group_by_code(py::handle codes,
                                                                  int64_t num_codes);
py::array gather_rows(py::handle src, py::handle index, py::object out);
void scatter_rows(py::handle src, py::handle index, py::handle dst);
void guided_step(py::handle x, py::handle m_uncond, py::handle m_cond, double guidance_scale,
                 py::handle prev_x, py::handle prev_m, py::handle coefs);
py::array cfg_input(py::handle x, double scale, py::object out);

}  // namespace api

namespace api_cuda {

namespace py = pybind11;

// ---- CUDA (aptp._C_cuda): raw device pointers as ints, host indices, a stream handle ----
int device_count();
std::string driver_status();
void gather_rows(std::uintptr_t dst, std::uintptr_t src, py::handle index, int64_t src_rows,
                 int64_t row_bytes, std::uintptr_t stream);
void scatter_rows(std::uintptr_t dst, std::uintptr_t src, py::handle index, int64_t dst_rows,
                  int64_t row_bytes, std::uintptr_t stream);
void guided_step(std::uintptr_t x, std::uintptr_t m_uncond, std::uintptr_t m_cond,
                 double guidance_scale, std::uintptr_t prev_x, std::uintptr_t prev_m, int64_t n,
                 py::handle coefs, const std::string& dtype, std::uintptr_t stream);
void cfg_input(std::uintptr_t out, std::uintptr_t x, int64_t n, double scale,
               const std::string& dtype, std::uintptr_t stream);

}  // namespace api_cuda
}  // namespace aptp
