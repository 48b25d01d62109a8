// The advfast op library: schemas (TORCH_LIBRARY) and kernels per dispatch key.
//
// CPU and CUDA kernels live in cpu/ and cuda/. The Meta kernels only check their arguments: both
// ops mutate their inputs in place and return nothing, so there is no output to describe; that is
// all torch.compile's fake tensors need. The Autograd key gets the "not implemented" fallback: the
// ops are not differentiable, and this makes a backward through them fail loudly instead of
// silently ignoring the in-place update.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "ops.h"

namespace advfast {
namespace {

bool built_with_cuda() {
#ifdef ADVFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void pgd_step_meta(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                   const at::Tensor& eps, const at::Tensor& alpha, int64_t norm, double lower,
                   double upper) {
  check_pgd_step_args(x_adv, x_nat, grad, eps, alpha, norm, lower, upper);
}

void ema_update_meta(at::TensorList ema, at::TensorList src, double momentum) {
  check_ema_update_args(ema, src, momentum);
}

}  // namespace
}  // namespace advfast

TORCH_LIBRARY(advfast, m) {
  m.def("built_with_cuda() -> bool", &advfast::built_with_cuda);
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor x_nat, Tensor grad, Tensor eps, Tensor alpha, int norm, "
      "float lower, float upper) -> ()");
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] src, float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(advfast, CPU, m) {
  m.impl("pgd_step_", &advfast::pgd_step_cpu);
  m.impl("ema_update_", &advfast::ema_update_cpu);
}

TORCH_LIBRARY_IMPL(advfast, Meta, m) {
  m.impl("pgd_step_", &advfast::pgd_step_meta);
  m.impl("ema_update_", &advfast::ema_update_meta);
}

TORCH_LIBRARY_IMPL(advfast, Autograd, m) {
  m.impl("pgd_step_", torch::autograd::autogradNotImplementedFallback());
  m.impl("ema_update_", torch::autograd::autogradNotImplementedFallback());
}

#ifdef ADVFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(advfast, CUDA, m) {
  m.impl("pgd_step_", &advfast::pgd_step_cuda);
  m.impl("ema_update_", &advfast::ema_update_cuda);
}
#endif
