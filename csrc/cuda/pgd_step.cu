// pgd_step_ on CUDA: one PGD ascent step, projection onto the per-sample eps-ball around x_nat,
// clamp to [lower, upper], in place on x_adv. Samples are contiguous memory blocks (dim 0 outermost;
// channels_last qualifies); arithmetic runs in float (double for float64 x).
//
// linf is elementwise: one kernel over the flat memory, 128-bit loads of x (4 elements per pack)
// when every base pointer is aligned and the sample size is a multiple of 4 (a pack then never
// straddles two samples), scalar accesses otherwise.
//
// l2 needs per-sample |g|^2, <d0, g>, |d0|^2 (d0 = x_adv - x_nat). With s = alpha / |g| (0 when
// |g| = 0: no step, no NaN), |d0 + s g|^2 = |d0|^2 + 2 s <d0, g> + s^2 |g|^2, so one read pass
// gives both norms. Samples up to kL2FusedMax elements: one block per sample sums and then steps
// (one launch; the second read hits L1/L2). Larger samples: a partial-sum kernel over chunks of
// kL2Chunk, then an apply kernel whose blocks combine their sample's partials (fixed order, no
// atomics: deterministic). No host sync anywhere, so the op can be captured in a CUDA graph.
#include "../ops.h"
#include "common.cuh"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

namespace advfast {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kVec = 4;                 // elements per pack (16 bytes of float32 x)
constexpr int kUnroll = 4;              // packs per thread in the linf kernel (loads in flight)
constexpr int64_t kL2Chunk = 8192;      // elements of one sample per block, split l2 path
constexpr int64_t kL2FusedMax = 16384;  // samples up to this size take the one-launch l2 path

template <typename op_t>
__device__ __forceinline__ op_t linf_update(op_t a, op_t n, op_t g, op_t alpha, op_t eps, op_t lo,
                                            op_t hi) {
  const op_t sgn = static_cast<op_t>((g > op_t(0)) - (g < op_t(0)));  // sign(0) = 0
  const op_t d = clamp_nan<op_t>(a + alpha * sgn - n, -eps, eps);
  return clamp_nan<op_t>(n + d, lo, hi);
}

template <typename op_t>
__device__ __forceinline__ op_t l2_update(op_t a, op_t n, op_t g, op_t s, op_t f, op_t lo, op_t hi) {
  return clamp_nan<op_t>(n + f * ((a - n) + s * g), lo, hi);
}

// Sample index of flat element e; 32-bit division when everything fits (64-bit division is slow).
__device__ __forceinline__ int64_t sample_of(int64_t e, int64_t sample, bool small) {
  return small ? int64_t(uint32_t(e) / uint32_t(sample)) : e / sample;
}

template <typename x_t, typename g_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    pgd_linf_kernel(x_t* xa, const x_t* xn, const g_t* g, const at::opmath_type<x_t>* eps,
                    const at::opmath_type<x_t>* alpha,
                    int64_t sample, int64_t packs, bool small, at::opmath_type<x_t> lo,
                    at::opmath_type<x_t> hi) {
  using op_t = at::opmath_type<x_t>;
  const int64_t first = int64_t(blockIdx.x) * (kThreads * kUnroll) + threadIdx.x;
  Pack<x_t, VEC> a[kUnroll], n[kUnroll];
  Pack<g_t, VEC> gv[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first + int64_t(u) * kThreads;
    if (p < packs) {
      a[u] = load_pack<VEC>(xa, p);
      n[u] = load_pack<VEC>(xn, p);
      gv[u] = load_pack<VEC>(g, p);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first + int64_t(u) * kThreads;
    if (p < packs) {
      const int64_t b = sample_of(p * VEC, sample, small);  // whole pack lies in sample b
      const op_t al = static_cast<op_t>(alpha[b]), ep = static_cast<op_t>(eps[b]);
      Pack<x_t, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        out.v[k] = static_cast<x_t>(linf_update<op_t>(static_cast<op_t>(a[u].v[k]), static_cast<op_t>(n[u].v[k]),
                                                      static_cast<op_t>(gv[u].v[k]), al, ep, lo, hi));
      store_pack<VEC>(xa, p, out);
    }
  }
}

// This thread's share of |g|^2, <d0, g>, |d0|^2 over elements [base, base + count) (both multiples
// of VEC).
template <int VEC, typename x_t, typename g_t, typename op_t>
__device__ __forceinline__ void l2_sums(const x_t* xa, const x_t* xn, const g_t* g, int64_t base,
                                        int64_t count, op_t& gg, op_t& dg, op_t& dd) {
  const int64_t p0 = base / VEC, np = count / VEC;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < np; i += blockDim.x) {
    const Pack<x_t, VEC> a = load_pack<VEC>(xa, p0 + i);
    const Pack<x_t, VEC> n = load_pack<VEC>(xn, p0 + i);
    const Pack<g_t, VEC> gv = load_pack<VEC>(g, p0 + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const op_t d = static_cast<op_t>(a.v[k]) - static_cast<op_t>(n.v[k]);
      const op_t gk = static_cast<op_t>(gv.v[k]);
      gg += gk * gk;
      dg += d * gk;
      dd += d * d;
    }
  }
}

// One block per (sample, chunk): partial[blockIdx.x] = sums over the chunk.
template <typename x_t, typename g_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    pgd_l2_partial_kernel(const x_t* xa, const x_t* xn, const g_t* g, int64_t sample, int64_t chunks,
                          at::opmath_type<x_t>* partial) {
  using op_t = at::opmath_type<x_t>;
  const int64_t b = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t begin = c * kL2Chunk;
  const int64_t count = min64(kL2Chunk, sample - begin);
  op_t gg = 0, dg = 0, dd = 0;
  l2_sums<VEC>(xa, xn, g, b * sample + begin, count, gg, dg, dd);
  block_sum3(gg, dg, dd);
  if (threadIdx.x == 0) {
    partial[3 * int64_t(blockIdx.x) + 0] = gg;
    partial[3 * int64_t(blockIdx.x) + 1] = dg;
    partial[3 * int64_t(blockIdx.x) + 2] = dd;
  }
}

// One block per (sample, chunk) of chunk_len elements. FUSED: chunks == 1 and the block computes
// its sample's sums itself; otherwise it adds the sample's partials from pgd_l2_partial_kernel.
template <typename x_t, typename g_t, int VEC, bool FUSED>
__global__ void __launch_bounds__(kThreads)
    pgd_l2_apply_kernel(x_t* xa, const x_t* xn, const g_t* g, const at::opmath_type<x_t>* eps,
                        const at::opmath_type<x_t>* alpha,
                        int64_t sample, int64_t chunks, int64_t chunk_len,
                        const at::opmath_type<x_t>* partial, at::opmath_type<x_t> lo,
                        at::opmath_type<x_t> hi) {
  using op_t = at::opmath_type<x_t>;
  __shared__ op_t step_scale, ball_scale;
  const int64_t b = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t begin = c * chunk_len;
  const int64_t count = min64(chunk_len, sample - begin);
  const int64_t base = b * sample + begin;

  op_t gg = 0, dg = 0, dd = 0;
  if constexpr (FUSED) {
    l2_sums<VEC>(xa, xn, g, base, count, gg, dg, dd);
    block_sum3(gg, dg, dd);
  } else if (threadIdx.x < 32) {
    for (int64_t k = threadIdx.x; k < chunks; k += 32) {
      const op_t* p = partial + 3 * (b * chunks + k);
      gg += p[0];
      dg += p[1];
      dd += p[2];
    }
    gg = warp_sum(gg);
    dg = warp_sum(dg);
    dd = warp_sum(dd);
  }
  if (threadIdx.x == 0) {  // same double-precision formulas as the CPU kernel
    const double gnorm = sqrt(double(gg));
    const double s = gnorm > 0 ? double(alpha[b]) / gnorm : 0.0;
    const double dn = sqrt(fmax(0.0, double(dd) + 2.0 * s * double(dg) + s * s * double(gg)));
    const double e = double(eps[b]);
    step_scale = static_cast<op_t>(s);
    ball_scale = static_cast<op_t>(dn > e ? e / dn : 1.0);
  }
  __syncthreads();
  const op_t s = step_scale, f = ball_scale;

  const int64_t p0 = base / VEC, np = count / VEC;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < np; i += blockDim.x) {
    const Pack<x_t, VEC> a = load_pack<VEC>(xa, p0 + i);
    const Pack<x_t, VEC> n = load_pack<VEC>(xn, p0 + i);
    const Pack<g_t, VEC> gv = load_pack<VEC>(g, p0 + i);
    Pack<x_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      out.v[k] = static_cast<x_t>(l2_update<op_t>(static_cast<op_t>(a.v[k]), static_cast<op_t>(n.v[k]),
                                                  static_cast<op_t>(gv.v[k]), s, f, lo, hi));
    store_pack<VEC>(xa, p0 + i, out);
  }
}

template <typename x_t, typename g_t, int VEC>
void launch(x_t* xa, const x_t* xn, const g_t* g, const at::opmath_type<x_t>* eps,
            const at::opmath_type<x_t>* alpha,
            int64_t batch, int64_t sample, bool l2, double lower, double upper,
            const at::TensorOptions& opts) {
  using op_t = at::opmath_type<x_t>;
  const op_t lo = static_cast<op_t>(lower), hi = static_cast<op_t>(upper);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = batch * sample;
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();

  if (!l2) {
    const int64_t packs = total / VEC;
    const int64_t blocks = (packs + kThreads * kUnroll - 1) / (kThreads * kUnroll);
    TORCH_CHECK(blocks <= kMaxBlocks, "pgd_step_: tensor too large for one launch (", total, " elements)");
    const bool small = total <= int64_t(std::numeric_limits<uint32_t>::max());
    pgd_linf_kernel<x_t, g_t, VEC><<<blocks, kThreads, 0, stream>>>(xa, xn, g, eps, alpha, sample,
                                                                    packs, small, lo, hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  if (sample <= kL2FusedMax) {
    TORCH_CHECK(batch <= kMaxBlocks, "pgd_step_: batch too large for one launch (", batch, ")");
    pgd_l2_apply_kernel<x_t, g_t, VEC, true><<<batch, kThreads, 0, stream>>>(
        xa, xn, g, eps, alpha, sample, /*chunks=*/1, /*chunk_len=*/sample, nullptr, lo, hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  const int64_t chunks = (sample + kL2Chunk - 1) / kL2Chunk;
  const int64_t blocks = batch * chunks;
  TORCH_CHECK(blocks <= kMaxBlocks, "pgd_step_: tensor too large for one launch (", total, " elements)");
  // The caching allocator hands out stream-ordered memory (graph-capture safe); no zeroing needed:
  // every slot is written by the partial kernel before the apply kernel reads it.
  at::Tensor partial = at::empty({blocks * 3}, opts.dtype(c10::CppTypeToScalarType<op_t>::value));
  op_t* pp = partial.data_ptr<op_t>();
  pgd_l2_partial_kernel<x_t, g_t, VEC><<<blocks, kThreads, 0, stream>>>(xa, xn, g, sample, chunks, pp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  pgd_l2_apply_kernel<x_t, g_t, VEC, false><<<blocks, kThreads, 0, stream>>>(
      xa, xn, g, eps, alpha, sample, chunks, kL2Chunk, pp, lo, hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename x_t, typename g_t>
void run(const at::Tensor& xa, const at::Tensor& xn, const at::Tensor& g, const at::Tensor& eps,
         const at::Tensor& alpha, bool l2, double lower, double upper) {
  const int64_t batch = xa.size(0);
  const int64_t sample = xa.numel() / batch;
  x_t* pa = xa.data_ptr<x_t>();
  const x_t* pn = xn.const_data_ptr<x_t>();
  const g_t* pg = g.const_data_ptr<g_t>();
  const bool vec = sample % kVec == 0 && is_aligned(pa, sizeof(Pack<x_t, kVec>)) &&
                   is_aligned(pn, sizeof(Pack<x_t, kVec>)) &&
                   is_aligned(pg, sizeof(Pack<g_t, kVec>));
  using r_t = at::opmath_type<x_t>;  // the radius dtype check_pgd_step_args enforced
  const r_t* pe = eps.const_data_ptr<r_t>();
  const r_t* pal = alpha.const_data_ptr<r_t>();
  if (vec)
    launch<x_t, g_t, kVec>(pa, pn, pg, pe, pal, batch, sample, l2, lower, upper, xa.options());
  else
    launch<x_t, g_t, 1>(pa, pn, pg, pe, pal, batch, sample, l2, lower, upper, xa.options());
}

template <typename x_t>
void run_grad(const at::Tensor& xa, const at::Tensor& xn, const at::Tensor& g, const at::Tensor& eps,
              const at::Tensor& alpha, bool l2, double lower, double upper) {
  switch (g.scalar_type()) {
    case at::kFloat: return run<x_t, float>(xa, xn, g, eps, alpha, l2, lower, upper);
    case at::kHalf: return run<x_t, at::Half>(xa, xn, g, eps, alpha, l2, lower, upper);
    case at::kBFloat16: return run<x_t, at::BFloat16>(xa, xn, g, eps, alpha, l2, lower, upper);
    default: TORCH_CHECK(false, "pgd_step_: internal error, unexpected grad dtype ", g.scalar_type());
  }
}

}  // namespace

void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                   const at::Tensor& eps, const at::Tensor& alpha, int64_t norm, double lower,
                   double upper) {
  check_pgd_step_args(x_adv, x_nat, grad, eps, alpha, norm, lower, upper);
  if (x_adv.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const at::Tensor eps_c = eps.contiguous(), alpha_c = alpha.contiguous();

  // Kernels exist for float64 x with float64 grad, and for {f32, f16, bf16} x with {f32, f16, bf16}
  // grad; a float64 grad for a narrower x (rare) is cast to float32 first (strides preserved).
  at::Tensor g = grad;
  if (x_adv.scalar_type() == at::kDouble && g.scalar_type() != at::kDouble) g = g.to(at::kDouble);
  if (x_adv.scalar_type() != at::kDouble && g.scalar_type() == at::kDouble) g = g.to(at::kFloat);

  const bool direct = samples_are_blocks(x_adv) && same_dense_layout(x_adv, x_nat) &&
                      same_dense_layout(x_adv, g);
  at::Tensor xa = x_adv, xn = x_nat;
  if (!direct) {
    const auto fmt = per_sample_format(x_adv);
    xa = x_adv.contiguous(fmt);
    xn = x_nat.contiguous(fmt);
    g = g.contiguous(fmt);
  }
  const bool l2 = norm == kNormL2;
  switch (xa.scalar_type()) {
    case at::kFloat: run_grad<float>(xa, xn, g, eps_c, alpha_c, l2, lower, upper); break;
    case at::kHalf: run_grad<at::Half>(xa, xn, g, eps_c, alpha_c, l2, lower, upper); break;
    case at::kBFloat16: run_grad<at::BFloat16>(xa, xn, g, eps_c, alpha_c, l2, lower, upper); break;
    case at::kDouble: run<double, double>(xa, xn, g, eps_c, alpha_c, l2, lower, upper); break;
    default: TORCH_CHECK(false, "pgd_step_: internal error, unexpected x dtype ", xa.scalar_type());
  }
  if (!xa.is_same(x_adv)) x_adv.copy_(xa);
}

}  // namespace advfast
