// Entry points of the advfast ops, one per device, plus the argument checks they share.
// Schemas live in registration.cpp; semantics are documented in docs/ARCHITECTURE.md.
#pragma once

#include <ATen/ATen.h>

namespace advfast {

// norm argument of pgd_step_
constexpr int64_t kNormLinf = 0;
constexpr int64_t kNormL2 = 1;

// Raise ValueError/TypeError (via TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) on bad arguments.
// Value checks that need the data (eps >= 0, alpha >= 0) are left to the Python wrapper: on CUDA
// they would force a device sync.
void check_pgd_step_args(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                         const at::Tensor& eps, const at::Tensor& alpha, int64_t norm,
                         double lower, double upper);
void check_ema_update_args(at::TensorList ema, at::TensorList src, double momentum);

// True when every tensor is non-overlapping and dense with the strides of `ref`: elementwise
// work can then run over raw memory, the same offset meaning the same element in each.
bool same_dense_layout(const at::Tensor& ref, const at::Tensor& other);
// The memory format a fallback copy should use so that sample b stays one contiguous block.
at::MemoryFormat per_sample_format(const at::Tensor& x);
// True when dim 0 is the outermost stride of a dense tensor (sample b is one memory block).
bool samples_are_blocks(const at::Tensor& x);

void pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                  const at::Tensor& eps, const at::Tensor& alpha, int64_t norm, double lower,
                  double upper);
void ema_update_cpu(at::TensorList ema, at::TensorList src, double momentum);

#ifdef ADVFAST_WITH_CUDA
void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                   const at::Tensor& eps, const at::Tensor& alpha, int64_t norm, double lower,
                   double upper);
void ema_update_cuda(at::TensorList ema, at::TensorList src, double momentum);
#endif

}  // namespace advfast
