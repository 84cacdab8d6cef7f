// aptp._C_cuda: CUDA kernels on raw device pointers. Use them through
// aptp.runtime.kernels, which reads pointers and shapes from __cuda_array_interface__.
#include "aptp_api.h"

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() =
      "aptp CUDA kernels on raw device pointers (ints) and stream handles (ints, 0 = default "
      "stream). Kernels are enqueued on the stream and not synchronised. Private: call "
      "aptp.runtime.kernels.";

  m.def("device_count", &aptp::api_cuda::device_count,
        "Number of visible CUDA devices; 0 when the driver is missing or reports an error.");

  m.def("driver_status", &aptp::api_cuda::driver_status,
        "A line on the CUDA driver: device count and versions, or the error that hides them.");

  m.def("gather_rows", &aptp::api_cuda::gather_rows, "dst"_a, "src"_a, "index"_a, "src_rows"_a,
        "row_bytes"_a, "stream"_a = 0,
        "dst row i <- src row index[i]. index: host integers in [0, src_rows); rows are "
        "row_bytes long; dst holds len(index) rows.");

  m.def("scatter_rows", &aptp::api_cuda::scatter_rows, "dst"_a, "src"_a, "index"_a, "dst_rows"_a,
        "row_bytes"_a, "stream"_a = 0,
        "dst row index[i] <- src row i. index: distinct host integers in [0, dst_rows).");

  m.def("guided_step", &aptp::api_cuda::guided_step, "x"_a, "m_uncond"_a, "m_cond"_a,
        "guidance_scale"_a, "prev_x"_a, "prev_m"_a, "n"_a, "coefs"_a, "dtype"_a = "float32",
        "stream"_a = 0,
        "Fused guidance + scheduler update over n elements, in place (see aptp._C.guided_step). "
        "dtype: 'float32' or 'float16' (float32 arithmetic).");

  m.def("cfg_input", &aptp::api_cuda::cfg_input, "out"_a, "x"_a, "n"_a, "scale"_a,
        "dtype"_a = "float32", "stream"_a = 0,
        "out[0:n] = out[n:2n] = scale * x[0:n].");
}
