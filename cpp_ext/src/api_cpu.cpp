// Entry points of aptp._C: argument checks at the boundary, then the plain CPU kernels
// with the GIL released.
#include <string>

#include "aptp_api.h"
#include "aptp_checks.h"
#include "aptp_kernels.h"

namespace aptp {
namespace api {

using checks::Access;

std::pair<py::array_t<int64_t>, py::array_t<int64_t>> group_by_code(py::handle codes,
                                                                  int64_t num_codes) {
  if (num_codes < 0) {
    throw py::value_error("num_codes must be >= 0, got " + std::to_string(num_codes));
  }
  auto c = checks::int_vector(codes, "codes");
  const int64_t batch = c.size();
  const int64_t* v = c.data();
  for (int64_t i = 0; i < batch; ++i) {
    if (v[i] < 0 || v[i] >= num_codes) {
      throw py::value_error("codes[" + std::to_string(i) + "] = " + std::to_string(v[i]) +
                            " is outside [0, " + std::to_string(num_codes) +
                            "): every code must name one of the num_codes experts");
    }
  }
  py::array_t<int64_t> order(batch);
  py::array_t<int64_t> offsets(num_codes + 1);
  int64_t* o = order.mutable_data();
  int64_t* off = offsets.mutable_data();
  {
    py::gil_scoped_release nogil;
    cpu::group_by_code(v, batch, num_codes, o, off);
  }
  return {order, offsets};
}

py::array gather_rows(py::handle src, py::handle index, py::object out) {
  auto s = checks::float_array(src, "src", /*allow_half=*/true, Access::kRead);
  checks::batched(s, "src");
  auto idx = checks::int_vector(index, "index");
  const int64_t count = idx.size();
  py::array o;
  if (out.is_none()) {
    std::vector<py::ssize_t> shape(s.shape(), s.shape() + s.ndim());
    shape[0] = count;
    o = py::array(s.dtype(), shape);
  } else {
    o = checks::float_array(out, "out", /*allow_half=*/true, Access::kWrite);
    checks::same_dtype(o, "out", s, "src");
    checks::same_row_shape(o, "out", s, "src");
    if (o.shape(0) != count) {
      throw py::value_error("out has " + std::to_string(o.shape(0)) + " rows but index has " +
                            std::to_string(count) + " entries; they must match");
    }
  }
  checks::index_in_range(idx.data(), count, s.shape(0), "index", "src");
  const int64_t rb = checks::row_bytes(s);
  const void* sp = s.data();
  void* op = o.mutable_data();
  {
    py::gil_scoped_release nogil;
    cpu::gather_rows(op, sp, idx.data(), count, rb);
  }
  return o;
}

void scatter_rows(py::handle src, py::handle index, py::handle dst) {
  auto s = checks::float_array(src, "src", /*allow_half=*/true, Access::kRead);
  auto d = checks::float_array(dst, "dst", /*allow_half=*/true, Access::kWrite);
  checks::batched(s, "src");
  checks::batched(d, "dst");
  checks::same_dtype(d, "dst", s, "src");
  checks::same_row_shape(d, "dst", s, "src");
  auto idx = checks::int_vector(index, "index");
  const int64_t count = idx.size();
  if (s.shape(0) != count) {
    throw py::value_error("src has " + std::to_string(s.shape(0)) + " rows but index has " +
                          std::to_string(count) + " entries; they must match");
  }
  checks::index_in_range(idx.data(), count, d.shape(0), "index", "dst");
  checks::index_distinct(idx.data(), count, d.shape(0), "index");
  const int64_t rb = checks::row_bytes(s);
  const void* sp = s.data();
  void* dp = d.mutable_data();
  {
    py::gil_scoped_release nogil;
    cpu::scatter_rows(dp, sp, idx.data(), count, rb);
  }
}

void guided_step(py::handle x, py::handle m_uncond, py::handle m_cond, double guidance_scale,
                 py::handle prev_x, py::handle prev_m, py::handle coefs) {
  auto xa = checks::float_array(x, "x", /*allow_half=*/false, Access::kWrite);
  auto mu = checks::float_array(m_uncond, "m_uncond", false, Access::kRead);
  auto mc = checks::float_array(m_cond, "m_cond", false, Access::kRead);
  auto px = checks::float_array(prev_x, "prev_x", false, Access::kWrite);
  auto pm = checks::float_array(prev_m, "prev_m", false, Access::kWrite);
  checks::same_shape(mu, "m_uncond", xa, "x");
  checks::same_shape(mc, "m_cond", xa, "x");
  checks::same_shape(px, "prev_x", xa, "x");
  checks::same_shape(pm, "prev_m", xa, "x");
  const StepCoefs c = checks::step_coefs(coefs);
  const int64_t n = xa.size();
  float* xp = static_cast<float*>(xa.mutable_data());
  const float* mup = static_cast<const float*>(mu.data());
  const float* mcp = static_cast<const float*>(mc.data());
  float* pxp = static_cast<float*>(px.mutable_data());
  float* pmp = static_cast<float*>(pm.mutable_data());
  {
    py::gil_scoped_release nogil;
    cpu::guided_step(xp, mup, mcp, pxp, pmp, n, static_cast<float>(guidance_scale), c);
  }
}

py::array cfg_input(py::handle x, double scale, py::object out) {
  auto xa = checks::float_array(x, "x", /*allow_half=*/false, Access::kRead);
  checks::batched(xa, "x");
  py::array o;
  if (out.is_none()) {
    std::vector<py::ssize_t> shape(xa.shape(), xa.shape() + xa.ndim());
    shape[0] *= 2;
    o = py::array(xa.dtype(), shape);
  } else {
    o = checks::float_array(out, "out", false, Access::kWrite);
    checks::same_row_shape(o, "out", xa, "x");
    if (o.ndim() != xa.ndim() || o.shape(0) != 2 * xa.shape(0)) {
      throw py::value_error("out has shape " + checks::shape_str(o) + " but x has shape " +
                            checks::shape_str(xa) + "; out needs twice x's rows ([x; x])");
    }
  }
  const int64_t n = xa.size();
  const float* xp = static_cast<const float*>(xa.data());
  float* op = static_cast<float*>(o.mutable_data());
  {
    py::gil_scoped_release nogil;
    cpu::cfg_input(op, xp, n, static_cast<float>(scale));
  }
  return o;
}

}  // namespace api
}  // namespace aptp
