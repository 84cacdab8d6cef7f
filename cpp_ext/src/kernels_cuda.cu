// CUDA kernels of aptp._C_cuda: memory-bound elementwise and row-copy kernels on raw
// device pointers. No checks here (see api_cuda.cpp); every function only enqueues work
// on `stream` and returns the launch status.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "aptp_kernels.h"

namespace aptp {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any size; more blocks than this only add scheduling cost.
constexpr int64_t kMaxBlocks = 65535;

int blocks_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// ---- row gather / scatter ---------------------------------------------------------------

// Host indices of one launch, passed by value as a kernel argument (2 KiB, well under the
// 4 KiB parameter limit of every supported architecture).
struct RowMap {
  int64_t row[kMaxRowsPerLaunch];
};

// blockIdx.y picks the row; Unit is the widest copy unit that the row size and both base
// pointers allow (16 bytes for latents).
template <typename Unit, bool kGather>
__global__ void copy_rows_kernel(void* dst, const void* src, RowMap map, int64_t units_per_row) {
  const int64_t row = blockIdx.y;
  const int64_t src_row = kGather ? map.row[row] : row;
  const int64_t dst_row = kGather ? row : map.row[row];
  const Unit* s = static_cast<const Unit*>(src) + src_row * units_per_row;
  Unit* d = static_cast<Unit*>(dst) + dst_row * units_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < units_per_row;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    d[i] = s[i];
  }
}

template <typename Unit, bool kGather>
int copy_rows_unit(char* dst, const char* src, const int64_t* index, int64_t count,
                   int64_t row_bytes, cudaStream_t stream) {
  const int64_t units = row_bytes / static_cast<int64_t>(sizeof(Unit));
  for (int64_t start = 0; start < count; start += kMaxRowsPerLaunch) {
    const int64_t rows = std::min(kMaxRowsPerLaunch, count - start);
    RowMap map;
    for (int64_t r = 0; r < rows; ++r) map.row[r] = index[start + r];
    // The row of the launch is relative to this chunk on the contiguous side.
    char* d = kGather ? dst + start * row_bytes : dst;
    const char* s = kGather ? src : src + start * row_bytes;
    const dim3 grid(blocks_for(units), static_cast<unsigned>(rows));
    copy_rows_kernel<Unit, kGather><<<grid, kThreads, 0, stream>>>(d, s, map, units);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

template <bool kGather>
int copy_rows(void* dst, const void* src, const int64_t* index, int64_t count, int64_t row_bytes,
              cudaStream_t stream) {
  if (count == 0 || row_bytes == 0) return 0;
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  auto fits = [&](size_t unit) {
    return row_bytes % static_cast<int64_t>(unit) == 0 && aligned(d, unit) && aligned(s, unit);
  };
  if (fits(16)) return copy_rows_unit<uint4, kGather>(d, s, index, count, row_bytes, stream);
  if (fits(8)) return copy_rows_unit<uint2, kGather>(d, s, index, count, row_bytes, stream);
  if (fits(4)) return copy_rows_unit<unsigned int, kGather>(d, s, index, count, row_bytes, stream);
  if (fits(2)) return copy_rows_unit<unsigned short, kGather>(d, s, index, count, row_bytes, stream);
  return copy_rows_unit<unsigned char, kGather>(d, s, index, count, row_bytes, stream);
}

// ---- elementwise: float32 and float16 storage, float32 arithmetic ----------------------

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T store(float v);
template <>
__device__ __forceinline__ float store<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half store<__half>(float v) { return __float2half_rn(v); }

// P consecutive elements moved as one aligned vector load/store.
template <typename T, int P>
struct alignas(sizeof(T) * P) Pack {
  T v[P];
};

template <typename T, int P>
__global__ void guided_step_kernel(T* x, const T* m_uncond, const T* m_cond, T* prev_x, T* prev_m,
                                   int64_t packs, float scale, StepCoefs c, bool use_px,
                                   bool use_pm) {
  using V = Pack<T, P>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const V xv = reinterpret_cast<const V*>(x)[i];
    const V mu = reinterpret_cast<const V*>(m_uncond)[i];
    const V mc = reinterpret_cast<const V*>(m_cond)[i];
    V px, pm;  // read only when their coefficient is non-zero (uniform branch)
    if (use_px) px = reinterpret_cast<const V*>(prev_x)[i];
    if (use_pm) pm = reinterpret_cast<const V*>(prev_m)[i];
    V next, m_out;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const float u = load(mu.v[k]);
      const float m = u + scale * (load(mc.v[k]) - u);
      float acc = c.sample * load(xv.v[k]) + c.model * m;
      if (use_px) acc += c.prev_sample * load(px.v[k]);
      if (use_pm) acc += c.prev_model * load(pm.v[k]);
      m_out.v[k] = store<T>(m);
      next.v[k] = store<T>(acc);
    }
    reinterpret_cast<V*>(prev_x)[i] = xv;
    reinterpret_cast<V*>(prev_m)[i] = m_out;
    reinterpret_cast<V*>(x)[i] = next;
  }
}

template <typename T, int P>
__global__ void cfg_input_kernel(T* out, const T* x, int64_t n_packs, float scale) {
  using V = Pack<T, P>;
  V* uncond = reinterpret_cast<V*>(out);
  V* cond = uncond + n_packs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const V xv = reinterpret_cast<const V*>(x)[i];
    V y;
#pragma unroll
    for (int k = 0; k < P; ++k) y.v[k] = store<T>(scale * load(xv.v[k]));
    uncond[i] = y;
    cond[i] = y;
  }
}

template <typename T>
int guided_step_typed(T* x, const T* mu, const T* mc, T* px, T* pm, int64_t n, float scale,
                      StepCoefs c, cudaStream_t stream) {
  constexpr int P = 16 / sizeof(T);
  const bool use_px = c.prev_sample != 0.0f;
  const bool use_pm = c.prev_model != 0.0f;
  const bool vec = n % P == 0 && aligned(x, 16) && aligned(mu, 16) && aligned(mc, 16) &&
                   aligned(px, 16) && aligned(pm, 16);
  if (vec) {
    guided_step_kernel<T, P><<<blocks_for(n / P), kThreads, 0, stream>>>(
        x, mu, mc, px, pm, n / P, scale, c, use_px, use_pm);
  } else {
    guided_step_kernel<T, 1><<<blocks_for(n), kThreads, 0, stream>>>(x, mu, mc, px, pm, n, scale,
                                                                      c, use_px, use_pm);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int cfg_input_typed(T* out, const T* x, int64_t n, float scale, cudaStream_t stream) {
  constexpr int P = 16 / sizeof(T);
  // out + n must be aligned too, hence n % P.
  if (n % P == 0 && aligned(out, 16) && aligned(x, 16)) {
    cfg_input_kernel<T, P><<<blocks_for(n / P), kThreads, 0, stream>>>(out, x, n / P, scale);
  } else {
    cfg_input_kernel<T, 1><<<blocks_for(n), kThreads, 0, stream>>>(out, x, n, scale);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int gather_rows(void* dst, const void* src, const int64_t* index, int64_t count,
                int64_t row_bytes, cudaStream_t stream) {
  return copy_rows<true>(dst, src, index, count, row_bytes, stream);
}

int scatter_rows(void* dst, const void* src, const int64_t* index, int64_t count,
                 int64_t row_bytes, cudaStream_t stream) {
  return copy_rows<false>(dst, src, index, count, row_bytes, stream);
}

int guided_step(void* x, const void* m_uncond, const void* m_cond, void* prev_x, void* prev_m,
                int64_t n, float guidance_scale, StepCoefs coefs, DType dtype,
                cudaStream_t stream) {
  if (n == 0) return 0;
  if (dtype == DType::kFloat16) {
    return guided_step_typed(static_cast<__half*>(x), static_cast<const __half*>(m_uncond),
                             static_cast<const __half*>(m_cond), static_cast<__half*>(prev_x),
                             static_cast<__half*>(prev_m), n, guidance_scale, coefs, stream);
  }
  return guided_step_typed(static_cast<float*>(x), static_cast<const float*>(m_uncond),
                           static_cast<const float*>(m_cond), static_cast<float*>(prev_x),
                           static_cast<float*>(prev_m), n, guidance_scale, coefs, stream);
}

int cfg_input(void* out, const void* x, int64_t n, float scale, DType dtype,
              cudaStream_t stream) {
  if (n == 0) return 0;
  if (dtype == DType::kFloat16) {
    return cfg_input_typed(static_cast<__half*>(out), static_cast<const __half*>(x), n, scale,
                           stream);
  }
  return cfg_input_typed(static_cast<float*>(out), static_cast<const float*>(x), n, scale, stream);
}

}  // namespace cuda
}  // namespace aptp
