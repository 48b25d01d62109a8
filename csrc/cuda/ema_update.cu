// ema_update_ on CUDA: ema = m * ema + (1 - m) * src over lists of tensors, multi-tensor-apply
// style: tensors are grouped by dtype and each group runs in one launch. The group's pointers,
// sizes and cumulative block counts travel in the kernel arguments (no host-to-device copy, so the
// op can be captured in a CUDA graph); each block finds its tensor by binary search over the block
// counts and handles one chunk of 16 KiB of it with 128-bit loads when both pointers are aligned.
// Half types are computed in float. Integer and bool tensors (BatchNorm num_batches_tracked) are
// copied, all dtypes together as bytes, in one more launch.
//
// Kernel arguments may be up to 32 KiB since CUDA 12.1 on sm_70+; a small batch type (under the
// classic 4 KiB) is used when a group has few tensors, since argument size adds launch latency.
#include "../ops.h"
#include "common.cuh"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <vector>

namespace advfast {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                                // packs per thread per chunk
constexpr int64_t kChunkBytes = kThreads * 16 * kUnroll;  // bytes of one tensor per block
constexpr int kSmallBatch = 110;                          // sizeof(EmaBatch<110>) < 4 KiB
constexpr int kLargeBatch = 1000;                         // sizeof(EmaBatch<1000>) < 32 KiB

template <int MAXT>
struct EmaBatch {
  int64_t first_block[MAXT + 1];  // tensor t owns blocks [first_block[t], first_block[t + 1])
  void* ema[MAXT];
  const void* src[MAXT];
  int64_t numel[MAXT];
  int count;
};
static_assert(sizeof(EmaBatch<kSmallBatch>) <= 4096, "small batch must fit the classic 4 KiB limit");
static_assert(sizeof(EmaBatch<kLargeBatch>) <= 32764, "large batch must fit the 32 KiB limit");

template <typename T, bool COPY>
__device__ __forceinline__ T ema_value(T e, T s, at::opmath_type<T> m, at::opmath_type<T> w) {
  if constexpr (COPY) {
    return s;
  } else {
    using op_t = at::opmath_type<T>;
    return static_cast<T>(static_cast<op_t>(e) * m + static_cast<op_t>(s) * w);
  }
}

template <typename T, bool COPY, int MAXT>
__global__ void __launch_bounds__(kThreads)
    ema_kernel(const __grid_constant__ EmaBatch<MAXT> batch, double momentum, double weight) {
  using op_t = at::opmath_type<T>;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int64_t kChunk = kChunkBytes / sizeof(T);  // == kThreads * kUnroll * VEC elements
  const op_t m = static_cast<op_t>(momentum), w = static_cast<op_t>(weight);

  // The tensor of this block: the last t with first_block[t] <= blockIdx.x (counts are strictly
  // increasing: every listed tensor has at least one block).
  const int64_t blk = blockIdx.x;
  int lo = 0, hi = batch.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (batch.first_block[mid] <= blk) lo = mid;
    else hi = mid - 1;
  }
  const int64_t begin = (blk - batch.first_block[lo]) * kChunk;
  const int64_t count = min64(kChunk, batch.numel[lo] - begin);
  T* e = static_cast<T*>(batch.ema[lo]) + begin;
  const T* s = static_cast<const T*>(batch.src[lo]) + begin;

  int64_t done = 0;
  if (is_aligned(e, 16) && is_aligned(s, 16)) {
    const int64_t packs = count / VEC;  // <= kThreads * kUnroll
    Pack<T, VEC> pe[kUnroll], ps[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = threadIdx.x + int64_t(u) * kThreads;
      if (i < packs) {
        if constexpr (!COPY) pe[u] = load_pack<VEC>(e, i);
        ps[u] = load_pack<VEC>(s, i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = threadIdx.x + int64_t(u) * kThreads;
      if (i < packs) {
        Pack<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = ema_value<T, COPY>(pe[u].v[k], ps[u].v[k], m, w);
        store_pack<VEC>(e, i, out);
      }
    }
    done = packs * VEC;
  }
  for (int64_t i = done + threadIdx.x; i < count; i += kThreads) e[i] = ema_value<T, COPY>(e[i], s[i], m, w);
}

// Launches ema_kernel over `pairs` (numel counted in T), MAXT tensors per launch.
template <typename T, bool COPY, int MAXT>
void launch_batches(const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs, double momentum,
                    cudaStream_t stream) {
  constexpr int64_t kChunk = kChunkBytes / sizeof(T);
  EmaBatch<MAXT> batch;
  batch.count = 0;
  batch.first_block[0] = 0;
  auto flush = [&] {
    if (batch.count == 0) return;
    const int64_t blocks = batch.first_block[batch.count];
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ema_update_: tensors too large for one launch");
    ema_kernel<T, COPY, MAXT><<<blocks, kThreads, 0, stream>>>(batch, momentum, 1.0 - momentum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    batch.count = 0;
    batch.first_block[0] = 0;
  };
  for (const auto& [e, s] : pairs) {
    const int64_t n = COPY ? e.numel() * int64_t(e.element_size()) : e.numel();
    const int t = batch.count;
    batch.ema[t] = e.data_ptr();
    batch.src[t] = s.const_data_ptr();
    batch.numel[t] = n;
    batch.first_block[t + 1] = batch.first_block[t] + (n + kChunk - 1) / kChunk;
    batch.count = t + 1;
    if (batch.count == MAXT) flush();
  }
  flush();
}

template <typename T, bool COPY>
void launch_group(const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs, double momentum,
                  cudaStream_t stream) {
  if (pairs.empty()) return;
  if (pairs.size() <= size_t(kSmallBatch))
    launch_batches<T, COPY, kSmallBatch>(pairs, momentum, stream);
  else
    launch_batches<T, COPY, kLargeBatch>(pairs, momentum, stream);
}

}  // namespace

void ema_update_cuda(at::TensorList ema, at::TensorList src, double momentum) {
  check_ema_update_args(ema, src, momentum);
  if (ema.empty()) return;
  const c10::cuda::CUDAGuard guard(ema[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Work pairs share one dense layout; other pairs run on contiguous copies copied back after.
  std::vector<std::pair<at::Tensor, at::Tensor>> f32, f64, f16, bf16, copies;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (ema, its contiguous work copy)
  for (size_t i = 0; i < ema.size(); ++i) {
    if (ema[i].numel() == 0) continue;
    at::Tensor e = ema[i], s = src[i];
    if (!same_dense_layout(e, s)) {
      e = ema[i].contiguous();
      s = src[i].contiguous();
      if (!e.is_same(ema[i])) copy_back.emplace_back(ema[i], e);
    }
    switch (e.scalar_type()) {
      case at::kFloat: f32.emplace_back(e, s); break;
      case at::kDouble: f64.emplace_back(e, s); break;
      case at::kHalf: f16.emplace_back(e, s); break;
      case at::kBFloat16: bf16.emplace_back(e, s); break;
      default: copies.emplace_back(e, s); break;  // integer / bool (the checks allow nothing else)
    }
  }
  launch_group<float, false>(f32, momentum, stream);
  launch_group<double, false>(f64, momentum, stream);
  launch_group<at::Half, false>(f16, momentum, stream);
  launch_group<at::BFloat16, false>(bf16, momentum, stream);
  launch_group<uint8_t, true>(copies, momentum, stream);
  for (auto& [dst, tmp] : copy_back) dst.copy_(tmp);
}

}  // namespace advfast
