// Plain kernels of aptp._C / aptp._C_cuda: raw pointers and sizes, no Python, no checks.
//
// Every precondition (dtype, contiguity, shapes, index ranges) is checked once at the
// Python boundary (api_cpu.cpp, api_cuda.cpp); the kernels trust their arguments.
// This header needs no CUDA headers, so the CPU module compiles without a toolkit.
#pragma once

#include <cstddef>
#include <cstdint>

// Same declaration as cuda_runtime_api.h, so both headers can be included together.
typedef struct CUstream_st* cudaStream_t;

namespace aptp {

// Scheduler coefficients of one step: x_next = sample*x + model*m + prev_sample*prev_x
// + prev_model*prev_m. A coefficient that is exactly 0 drops its term (its buffer is
// not read), so history buffers may hold anything before the first multistep update.
struct StepCoefs {
  float sample;
  float model;
  float prev_sample;
  float prev_model;
};

// Element type of the CUDA elementwise kernels.
enum class DType : int { kFloat32 = 0, kFloat16 = 1 };

namespace cpu {

// Stable counting sort of `batch` codes, each in [0, num_codes).
// order[offsets[k]:offsets[k+1]] are the positions with code k, ascending.
// order has `batch` slots, offsets has num_codes + 1.
void group_by_code(const int64_t* codes, int64_t batch, int64_t num_codes, int64_t* order,
                   int64_t* offsets);

// dst row i <- src row index[i], for i < count; rows are row_bytes long.
void gather_rows(void* dst, const void* src, const int64_t* index, int64_t count,
                 int64_t row_bytes);

// dst row index[i] <- src row i, for i < count (indices distinct).
void scatter_rows(void* dst, const void* src, const int64_t* index, int64_t count,
                  int64_t row_bytes);

// Fused classifier-free guidance + scheduler update over n floats, in place:
//   m = m_uncond + guidance_scale * (m_cond - m_uncond)
//   x_next = coefs . (x, m, prev_x, prev_m);  prev_x <- x;  prev_m <- m;  x <- x_next
void guided_step(float* x, const float* m_uncond, const float* m_cond, float* prev_x,
                 float* prev_m, int64_t n, float guidance_scale, StepCoefs coefs);

// out[0:n] = out[n:2n] = scale * x[0:n]: the [uncond; cond] input of a guided batch.
void cfg_input(float* out, const float* x, int64_t n, float scale);

}  // namespace cpu

namespace cuda {

// Launches on `stream` and returns without synchronising. Row indices live on the host
// (the batch is a handful of rows) and travel as kernel arguments, kMaxRowsPerLaunch per
// launch, so no device buffer or host-to-device copy is needed.
constexpr int64_t kMaxRowsPerLaunch = 256;

// Each returns the cudaError_t of the launch (0 on success) as an int, so this header
// stays free of CUDA types other than the stream.
int gather_rows(void* dst, const void* src, const int64_t* index, int64_t count,
                int64_t row_bytes, cudaStream_t stream);
int scatter_rows(void* dst, const void* src, const int64_t* index, int64_t count,
                 int64_t row_bytes, cudaStream_t stream);
int guided_step(void* x, const void* m_uncond, const void* m_cond, void* prev_x, void* prev_m,
                int64_t n, float guidance_scale, StepCoefs coefs, DType dtype,
                cudaStream_t stream);
int cfg_input(void* out, const void* x, int64_t n, float scale, DType dtype,
              cudaStream_t stream);

}  // namespace cuda
}  // namespace aptp
