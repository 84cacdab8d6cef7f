// CPU kernels of aptp._C: single pass over memory, no allocation, no checks (see header).
#include <cstring>

#include "aptp_kernels.h"

namespace aptp {
namespace cpu {

void group_by_code(const int64_t* codes, int64_t batch, int64_t num_codes, int64_t* order,
                   int64_t* offsets) {
  // Counting sort: histogram, exclusive prefix sum, then a forward pass that keeps the
  // original order inside every code (stable).
  for (int64_t k = 0; k <= num_codes; ++k) offsets[k] = 0;
  for (int64_t i = 0; i < batch; ++i) ++offsets[codes[i] + 1];
  for (int64_t k = 0; k < num_codes; ++k) offsets[k + 1] += offsets[k];
  // offsets[k] doubles as the write cursor of code k; undone below.
  for (int64_t i = 0; i < batch; ++i) order[offsets[codes[i]]++] = i;
  for (int64_t k = num_codes; k > 0; --k) offsets[k] = offsets[k - 1];
  offsets[0] = 0;
}

void gather_rows(void* dst, const void* src, const int64_t* index, int64_t count,
                 int64_t row_bytes) {
  auto* out = static_cast<char*>(dst);
  const auto* in = static_cast<const char*>(src);
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(out + i * row_bytes, in + index[i] * row_bytes, static_cast<size_t>(row_bytes));
  }
}

void scatter_rows(void* dst, const void* src, const int64_t* index, int64_t count,
                  int64_t row_bytes) {
  auto* out = static_cast<char*>(dst);
  const auto* in = static_cast<const char*>(src);
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(out + index[i] * row_bytes, in + i * row_bytes, static_cast<size_t>(row_bytes));
  }
}

namespace {

// The history terms are compile-time switches so that the common loop bodies carry no
// branch and vectorise; a zero coefficient also skips reading its buffer.
template <bool kPrevSample, bool kPrevModel>
void guided_step_impl(float* x, const float* m_uncond, const float* m_cond, float* prev_x,
                      float* prev_m, int64_t n, float scale, StepCoefs c) {
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float mu = m_uncond[i];
    const float m = mu + scale * (m_cond[i] - mu);
    float next = c.sample * xi + c.model * m;
    if (kPrevSample) next += c.prev_sample * prev_x[i];
    if (kPrevModel) next += c.prev_model * prev_m[i];
    prev_x[i] = xi;
    prev_m[i] = m;
    x[i] = next;
  }
}

}  // namespace

void guided_step(float* x, const float* m_uncond, const float* m_cond, float* prev_x,
                 float* prev_m, int64_t n, float guidance_scale, StepCoefs coefs) {
  const bool use_px = coefs.prev_sample != 0.0f;
  const bool use_pm = coefs.prev_model != 0.0f;
  if (use_px && use_pm) {
    guided_step_impl<true, true>(x, m_uncond, m_cond, prev_x, prev_m, n, guidance_scale, coefs);
  } else if (use_px) {
    guided_step_impl<true, false>(x, m_uncond, m_cond, prev_x, prev_m, n, guidance_scale, coefs);
  } else if (use_pm) {
    guided_step_impl<false, true>(x, m_uncond, m_cond, prev_x, prev_m, n, guidance_scale, coefs);
  } else {
    guided_step_impl<false, false>(x, m_uncond, m_cond, prev_x, prev_m, n, guidance_scale, coefs);
  }
}

void cfg_input(float* out, const float* x, int64_t n, float scale) {
  float* cond = out + n;
  for (int64_t i = 0; i < n; ++i) {
    const float v = scale * x[i];
    out[i] = v;
    cond[i] = v;
  }
}

}  // namespace cpu
}  // namespace aptp
