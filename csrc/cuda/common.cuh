// Small device helpers shared by the advfast CUDA kernels.
#pragma once

#include <cstdint>

namespace advfast {
namespace cuda_detail {

// N elements moved by one vector instruction (16 bytes for 4 x float32) when the address is aligned.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// p[i] as a Pack, i counted in packs.
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p, int64_t i) {
  return reinterpret_cast<const Pack<T, N>*>(p)[i];
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, N>& v) {
  reinterpret_cast<Pack<T, N>*>(p)[i] = v;
}

__host__ __device__ __forceinline__ bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// torch.clamp semantics: a NaN input stays NaN.
template <typename T>
__device__ __forceinline__ T clamp_nan(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums a, b, c over the block; the totals are valid in thread 0 only. Every thread must call it,
// blockDim.x must be a multiple of 32, and it may be called once per kernel (one shared buffer).
template <typename T>
__device__ __forceinline__ void block_sum3(T& a, T& b, T& c) {
  __shared__ T partial[3][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
    partial[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < warps ? partial[0][lane] : T(0);
    b = lane < warps ? partial[1][lane] : T(0);
    c = lane < warps ? partial[2][lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
  }
}

}  // namespace cuda_detail
}  // namespace advfast
