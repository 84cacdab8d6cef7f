// Boundary checks shared by the CPU and CUDA entry points (api_cpu.cpp, api_cuda.cpp).
//
// Each raises the Python exception a numpy user expects (TypeError for a wrong dtype or
// type, ValueError for a wrong shape, layout or value, IndexError for a row index out of
// range) with a message naming the argument, what it got and what it needs.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "aptp_kernels.h"

namespace aptp {
namespace checks {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(a.shape(d));
  }
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

inline bool is_dtype(const py::array& a, const char* name) {
  return a.dtype().equal(py::dtype(name));
}

enum class Access { kRead, kWrite };

// A float array a kernel can read (and write) through a raw pointer: a numpy.ndarray
// (never a copy, so in-place updates land in the caller's array) of float32, or also
// float16 when allow_half, C-contiguous, aligned, and writeable when written.
inline py::array float_array(py::handle obj, const char* name, bool allow_half, Access access) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a numpy.ndarray, got " +
                         py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!is_dtype(a, "float32") && !(allow_half && is_dtype(a, "float16"))) {
    throw py::type_error(std::string(name) + " has dtype " + dtype_str(a) + "; this kernel takes " +
                         (allow_half ? "float32 or float16" : "float32") +
                         " in native byte order: convert it with .astype(np.float32)");
  }
  if (!py::detail::check_flags(a.ptr(), py::array::c_style)) {
    throw py::value_error(std::string(name) + " is not C-contiguous (shape " + shape_str(a) +
                          "): pass np.ascontiguousarray(" + name + ") and use the result");
  }
  if (!py::detail::check_flags(a.ptr(), py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    throw py::value_error(std::string(name) + " is not aligned to its dtype: pass a copy");
  }
  if (access == Access::kWrite && !a.writeable()) {
    throw py::value_error(std::string(name) + " is read-only but this kernel writes it in place");
  }
  return a;
}

inline void same_shape(const py::array& a, const char* a_name, const py::array& ref,
                       const char* ref_name) {
  bool same = a.ndim() == ref.ndim();
  for (py::ssize_t d = 0; same && d < a.ndim(); ++d) same = a.shape(d) == ref.shape(d);
  if (!same) {
    throw py::value_error(std::string(a_name) + " has shape " + shape_str(a) + " but " + ref_name +
                          " has shape " + shape_str(ref) + "; they must match");
  }
}

inline void same_dtype(const py::array& a, const char* a_name, const py::array& ref,
                       const char* ref_name) {
  if (!a.dtype().equal(ref.dtype())) {
    throw py::type_error(std::string(a_name) + " has dtype " + dtype_str(a) + " but " + ref_name +
                         " has dtype " + dtype_str(ref) + "; they must match");
  }
}

// Batch arrays are (rows, ...); the row is everything after the first axis.
inline void batched(const py::array& a, const char* name) {
  if (a.ndim() < 1) {
    throw py::value_error(std::string(name) + " must have a leading batch axis, got a 0-d array");
  }
}

inline void same_row_shape(const py::array& a, const char* a_name, const py::array& ref,
                           const char* ref_name) {
  bool same = a.ndim() == ref.ndim();
  for (py::ssize_t d = 1; same && d < a.ndim(); ++d) same = a.shape(d) == ref.shape(d);
  if (!same) {
    throw py::value_error(std::string(a_name) + " has shape " + shape_str(a) + " and " +
                          ref_name + " has shape " + shape_str(ref) +
                          "; their rows (all axes after the first) must match");
  }
}

inline int64_t row_bytes(const py::array& a) {
  int64_t bytes = a.itemsize();
  for (py::ssize_t d = 1; d < a.ndim(); ++d) bytes *= a.shape(d);
  return bytes;
}

// A 1-d sequence of integers (any integer dtype, or a list) as a contiguous int64 array.
// Small (one entry per prompt), so the conversion copy costs nothing.
inline py::array_t<int64_t> int_vector(py::handle obj, const char* name) {
  py::array a = py::array::ensure(obj);
  if (!a) {
    throw py::type_error(std::string(name) + " must be a 1-d array of integers, got " +
                         py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  if (a.ndim() != 1) {
    throw py::value_error(std::string(name) + " must be 1-d, got shape " + shape_str(a));
  }
  const char kind = a.dtype().kind();
  // An empty list becomes a float64 array; it is still a valid empty index.
  if (kind != 'i' && kind != 'u' && a.size() != 0) {
    throw py::type_error(std::string(name) + " must hold integers, got dtype " + dtype_str(a));
  }
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

// Every index in [0, rows): IndexError naming the first one outside.
inline void index_in_range(const int64_t* index, int64_t count, int64_t rows, const char* name,
                           const char* target) {
  for (int64_t i = 0; i < count; ++i) {
    if (index[i] < 0 || index[i] >= rows) {
      throw py::index_error(std::string(name) + "[" + std::to_string(i) + "] = " +
                            std::to_string(index[i]) + " is out of range for " + target +
                            " with " + std::to_string(rows) + " rows (negative indices are not " +
                            "wrapped)");
    }
  }
}

// Scattered rows must be distinct: with a repeated row the result would depend on the
// order of the writes, which differs between the CPU and the GPU.
inline void index_distinct(const int64_t* index, int64_t count, int64_t rows, const char* name) {
  std::vector<int64_t> first(static_cast<size_t>(rows), -1);
  for (int64_t i = 0; i < count; ++i) {
    int64_t& seen = first[static_cast<size_t>(index[i])];
    if (seen >= 0) {
      throw py::value_error(std::string(name) + " holds row " + std::to_string(index[i]) +
                            " twice (positions " + std::to_string(seen) + " and " +
                            std::to_string(i) + "); each destination row can be written once");
    }
    seen = i;
  }
}

// The 4 scheduler coefficients (sample, model, prev_sample, prev_model) of one step.
inline StepCoefs step_coefs(py::handle obj) {
  auto c = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!c || c.ndim() != 1 || c.size() != 4) {
    throw py::value_error(
        "coefs must be 4 numbers (sample, model, prev_sample, prev_model), got " +
        py::repr(obj).cast<std::string>());
  }
  const double* v = c.data();
  return StepCoefs{static_cast<float>(v[0]), static_cast<float>(v[1]), static_cast<float>(v[2]),
                   static_cast<float>(v[3])};
}

}  // namespace checks
}  // namespace aptp
