// Entry points of aptp._C_cuda: device pointers arrive as ints, so the checks here are
// what the driver can tell about them (device memory, same device, alignment); shapes
// were matched by the Python wrapper that read them from __cuda_array_interface__.
//
// Nothing runs at import: a machine without a driver imports this module and gets a
// RuntimeError from the first kernel call instead.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "aptp_api.h"
#include "aptp_checks.h"
#include "aptp_kernels.h"

namespace aptp {
namespace api_cuda {

namespace {

std::string error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

void require_device() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the non-sticky error for later calls
    throw std::runtime_error(
        "aptp._C_cuda: no usable CUDA device (" +
        (err != cudaSuccess ? error_text(err) : std::string("0 devices")) +
        "); check the driver with nvidia-smi, or keep the latents on the host and use the CPU "
        "kernels of aptp.runtime.kernels");
  }
}

std::string hex(std::uintptr_t p) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

// The device of a pointer into device (or managed) memory; ValueError for anything else,
// since a host pointer in a kernel would poison the whole CUDA context.
int device_of(std::uintptr_t ptr, const char* name, size_t align) {
  if (ptr == 0) throw py::value_error(std::string(name) + " is a null device pointer");
  if (ptr % align != 0) {
    throw py::value_error(std::string(name) + " = " + hex(ptr) + " is not aligned to its " +
                          std::to_string(align) + "-byte elements");
  }
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw py::value_error(std::string(name) + " = " + hex(ptr) +
                          " is not a CUDA pointer (" + error_text(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    throw py::value_error(std::string(name) + " = " + hex(ptr) +
                          " points to host memory; these kernels take device memory (move the "
                          "array to the GPU or use the CPU kernels)");
  }
  return attr.device;
}

// Launches on the pointers' device, and restores the caller's current device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device) {
      cudaSetDevice(device);
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

int same_device(std::initializer_list<std::pair<std::uintptr_t, const char*>> ptrs, size_t align) {
  int device = -1;
  const char* first = nullptr;
  for (const auto& [ptr, name] : ptrs) {
    const int d = device_of(ptr, name, align);
    if (device >= 0 && d != device) {
      throw py::value_error(std::string(name) + " is on device " + std::to_string(d) + " but " +
                            first + " is on device " + std::to_string(device) +
                            "; all buffers of one call must share a device");
    }
    device = d;
    first = first ? first : name;
  }
  return device;
}

DType parse_dtype(const std::string& dtype) {
  if (dtype == "float32") return DType::kFloat32;
  if (dtype == "float16") return DType::kFloat16;
  throw py::type_error("dtype must be 'float32' or 'float16', got '" + dtype + "'");
}

size_t itemsize(DType dtype) { return dtype == DType::kFloat16 ? 2 : 4; }

void check_launch(int err, const char* kernel) {
  if (err != 0) {
    throw std::runtime_error(std::string("aptp._C_cuda.") + kernel + " failed to launch: " +
                             error_text(static_cast<cudaError_t>(err)));
  }
}

cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void check_rows(int64_t rows, const char* name, int64_t row_bytes) {
  if (rows < 0) throw py::value_error(std::string(name) + " must be >= 0");
  if (row_bytes < 0) throw py::value_error("row_bytes must be >= 0");
}

}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string driver_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return error_text(err);
  }
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  return std::to_string(count) + " device(s), driver " + std::to_string(driver) + ", runtime " +
         std::to_string(runtime);
}

void gather_rows(std::uintptr_t dst, std::uintptr_t src, py::handle index, int64_t src_rows,
                 int64_t row_bytes, std::uintptr_t stream) {
  check_rows(src_rows, "src_rows", row_bytes);
  auto idx = checks::int_vector(index, "index");
  const int64_t count = idx.size();
  checks::index_in_range(idx.data(), count, src_rows, "index", "src");
  if (count == 0 || row_bytes == 0) return;
  require_device();
  DeviceGuard guard(same_device({{dst, "dst"}, {src, "src"}}, 1));
  int err;
  {
    py::gil_scoped_release nogil;
    err = cuda::gather_rows(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                            idx.data(), count, row_bytes, as_stream(stream));
  }
  check_launch(err, "gather_rows");
}

void scatter_rows(std::uintptr_t dst, std::uintptr_t src, py::handle index, int64_t dst_rows,
                  int64_t row_bytes, std::uintptr_t stream) {
  check_rows(dst_rows, "dst_rows", row_bytes);
  auto idx = checks::int_vector(index, "index");
  const int64_t count = idx.size();
  checks::index_in_range(idx.data(), count, dst_rows, "index", "dst");
  checks::index_distinct(idx.data(), count, dst_rows, "index");
  if (count == 0 || row_bytes == 0) return;
  require_device();
  DeviceGuard guard(same_device({{dst, "dst"}, {src, "src"}}, 1));
  int err;
  {
    py::gil_scoped_release nogil;
    err = cuda::scatter_rows(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                             idx.data(), count, row_bytes, as_stream(stream));
  }
  check_launch(err, "scatter_rows");
}

void guided_step(std::uintptr_t x, std::uintptr_t m_uncond, std::uintptr_t m_cond,
                 double guidance_scale, std::uintptr_t prev_x, std::uintptr_t prev_m, int64_t n,
                 py::handle coefs, const std::string& dtype, std::uintptr_t stream) {
  const DType dt = parse_dtype(dtype);
  const StepCoefs c = checks::step_coefs(coefs);
  if (n < 0) throw py::value_error("n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  require_device();
  DeviceGuard guard(same_device({{x, "x"},
                                 {m_uncond, "m_uncond"},
                                 {m_cond, "m_cond"},
                                 {prev_x, "prev_x"},
                                 {prev_m, "prev_m"}},
                                itemsize(dt)));
  int err;
  {
    py::gil_scoped_release nogil;
    err = cuda::guided_step(reinterpret_cast<void*>(x), reinterpret_cast<const void*>(m_uncond),
                            reinterpret_cast<const void*>(m_cond), reinterpret_cast<void*>(prev_x),
                            reinterpret_cast<void*>(prev_m), n, static_cast<float>(guidance_scale),
                            c, dt, as_stream(stream));
  }
  check_launch(err, "guided_step");
}

void cfg_input(std::uintptr_t out, std::uintptr_t x, int64_t n, double scale,
               const std::string& dtype, std::uintptr_t stream) {
  const DType dt = parse_dtype(dtype);
  if (n < 0) throw py::value_error("n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  require_device();
  DeviceGuard guard(same_device({{out, "out"}, {x, "x"}}, itemsize(dt)));
  int err;
  {
    py::gil_scoped_release nogil;
    err = cuda::cfg_input(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x), n,
                          static_cast<float>(scale), dt, as_stream(stream));
  }
  check_launch(err, "cfg_input");
}

}  // namespace api_cuda
}  // namespace aptp
