// aptp._C: CPU kernels of the runtime. Use them through aptp.runtime.kernels.
#include "aptp_api.h"

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "aptp CPU kernels: grouping a batch by expert code, row gather/scatter of latents and the "
      "fused classifier-free guidance + scheduler update. Private: call aptp.runtime.kernels.";

  m.def("group_by_code", &aptp::api::group_by_code, "codes"_a, "num_codes"_a,
        "Stable counting sort of a batch by code.\n\n"
        "codes: 1-d integers in [0, num_codes). Returns (order, offsets), both int64: "
        "order[offsets[k]:offsets[k+1]] are the batch positions with code k, ascending.\n"
        "Raises ValueError naming the first code out of range.");

  m.def("gather_rows", &aptp::api::gather_rows, "src"_a, "index"_a, "out"_a = py::none(),
        "out[i] = src[index[i]] for every row i.\n\n"
        "src: C-contiguous float32/float16 (B, ...); index: 1-d integers in [0, B); out: "
        "optional (len(index), ...) array of src's dtype, not overlapping src. Returns out.");

  m.def("scatter_rows", &aptp::api::scatter_rows, "src"_a, "index"_a, "dst"_a,
        "dst[index[i]] = src[i] for every row i, in place.\n\n"
        "src: C-contiguous float32/float16 (n, ...); index: n distinct integers in [0, B); "
        "dst: (B, ...) of src's dtype.");

  m.def("guided_step", &aptp::api::guided_step, "x"_a, "m_uncond"_a, "m_cond"_a,
        "guidance_scale"_a, "prev_x"_a, "prev_m"_a, "coefs"_a,
        "Fused classifier-free guidance + linear scheduler update, in place, one pass.\n\n"
        "m = m_uncond + guidance_scale * (m_cond - m_uncond)\n"
        "x_next = coefs[0]*x + coefs[1]*m + coefs[2]*prev_x + coefs[3]*prev_m\n"
        "then prev_x <- x, prev_m <- m, x <- x_next. A coefficient of exactly 0 skips its "
        "term. All arrays: C-contiguous float32 of one shape.");

  m.def("cfg_input", &aptp::api::cfg_input, "x"_a, "scale"_a, "out"_a = py::none(),
        "The [uncond; cond] model input: out = [scale * x; scale * x] with 2B rows.\n\n"
        "x: C-contiguous float32 (B, ...); out: optional (2B, ...) float32. Returns out.");
}
