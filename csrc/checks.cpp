// Argument checks shared by the CPU, CUDA and Meta kernels, so every path rejects the same inputs
// with the same one-line message (ValueError for shapes/devices/values, TypeError for dtypes).
#include "ops.h"

#include <ATen/OpMathType.h>

#include <sstream>

namespace advfast {
namespace {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_per_sample(const char* name, const at::Tensor& v, const at::Tensor& x_adv) {
  // radii come in the kernels' compute dtype (at::opmath_type of x: float64 for float64 images,
  // float32 otherwise), so 8/255 is not rounded to float32 for a float64 x_adv
  const at::ScalarType want = at::toOpMathType(x_adv.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == want, "pgd_step_: ", name, " must be a ", dtype_name(want),
                   " tensor of shape (B,) for ", dtype_name(x_adv.scalar_type()), " x_adv, got dtype ",
                   dtype_name(v.scalar_type()), "; pass torch.full((B,), value, dtype=",
                   dtype_name(want), ")");
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x_adv.size(0), "pgd_step_: ", name,
                    " must have shape (B,) = (", x_adv.size(0), ",) to match x_adv, got ",
                    shape_str(v.sizes()));
  TORCH_CHECK_VALUE(v.device() == x_adv.device(), "pgd_step_: ", name, " is on ", v.device(),
                    " but x_adv is on ", x_adv.device(), "; move it to x_adv's device");
}

}  // namespace

void check_pgd_step_args(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                         const at::Tensor& eps, const at::Tensor& alpha, int64_t norm,
                         double lower, double upper) {
  TORCH_CHECK_VALUE(norm == kNormLinf || norm == kNormL2,
                    "pgd_step_: norm must be 0 (linf) or 1 (l2), got ", norm);
  TORCH_CHECK_VALUE(lower <= upper, "pgd_step_: lower must be <= upper, got lower=", lower,
                    " upper=", upper);
  TORCH_CHECK_VALUE(x_adv.dim() >= 1,
                    "pgd_step_: x_adv needs a batch dimension (dim 0 = samples), got a 0-d tensor");
  TORCH_CHECK_TYPE(is_supported_float(x_adv.scalar_type()),
                   "pgd_step_: x_adv must be float32, float64, float16 or bfloat16, got ",
                   dtype_name(x_adv.scalar_type()));
  TORCH_CHECK_TYPE(x_nat.scalar_type() == x_adv.scalar_type(), "pgd_step_: x_nat has dtype ",
                   dtype_name(x_nat.scalar_type()), " but x_adv has ",
                   dtype_name(x_adv.scalar_type()), "; cast x_nat to x_adv's dtype");
  TORCH_CHECK_TYPE(is_supported_float(grad.scalar_type()),
                   "pgd_step_: grad must be float32, float64, float16 or bfloat16, got ",
                   dtype_name(grad.scalar_type()));
  TORCH_CHECK_VALUE(x_nat.sizes() == x_adv.sizes(), "pgd_step_: x_nat has shape ",
                    shape_str(x_nat.sizes()), " but x_adv has ", shape_str(x_adv.sizes()),
                    "; they must match");
  TORCH_CHECK_VALUE(grad.sizes() == x_adv.sizes(), "pgd_step_: grad has shape ",
                    shape_str(grad.sizes()), " but x_adv has ", shape_str(x_adv.sizes()),
                    "; they must match");
  TORCH_CHECK_VALUE(x_nat.device() == x_adv.device(), "pgd_step_: x_nat is on ", x_nat.device(),
                    " but x_adv is on ", x_adv.device(), "; move it to x_adv's device");
  TORCH_CHECK_VALUE(grad.device() == x_adv.device(), "pgd_step_: grad is on ", grad.device(),
                    " but x_adv is on ", x_adv.device(), "; move it to x_adv's device");
  check_per_sample("eps", eps, x_adv);
  check_per_sample("alpha", alpha, x_adv);
}

void check_ema_update_args(at::TensorList ema, at::TensorList src, double momentum) {
  TORCH_CHECK_VALUE(ema.size() == src.size(), "ema_update_: ema and src must have the same length, got ",
                    ema.size(), " and ", src.size());
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0,
                    "ema_update_: momentum must be in [0, 1], got ", momentum);
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& s = src[i];
    TORCH_CHECK_TYPE(is_supported_float(e.scalar_type()) ||
                         at::isIntegralType(e.scalar_type(), /*includeBool=*/true),
                     "ema_update_: ema[", i, "] has dtype ", dtype_name(e.scalar_type()),
                     "; supported are float32, float64, float16, bfloat16 (averaged) and integer or "
                     "bool tensors (copied)");
    TORCH_CHECK_TYPE(e.scalar_type() == s.scalar_type(), "ema_update_: ema[", i, "] has dtype ",
                     dtype_name(e.scalar_type()), " but src[", i, "] has ",
                     dtype_name(s.scalar_type()), "; cast src to the ema dtype");
    TORCH_CHECK_VALUE(e.sizes() == s.sizes(), "ema_update_: ema[", i, "] has shape ",
                      shape_str(e.sizes()), " but src[", i, "] has ", shape_str(s.sizes()));
    TORCH_CHECK_VALUE(e.device() == ema[0].device() && s.device() == ema[0].device(),
                      "ema_update_: all tensors must be on one device; ema[0] is on ", ema[0].device(),
                      ", ema[", i, "] on ", e.device(), ", src[", i, "] on ", s.device());
  }
}

bool same_dense_layout(const at::Tensor& ref, const at::Tensor& other) {
  return ref.is_non_overlapping_and_dense() && other.is_non_overlapping_and_dense() &&
         ref.sizes() == other.sizes() && ref.strides() == other.strides();
}

bool samples_are_blocks(const at::Tensor& x) {
  if (!x.is_non_overlapping_and_dense()) return false;
  const int64_t batch = x.size(0);
  return batch <= 1 || x.stride(0) * batch == x.numel();
}

at::MemoryFormat per_sample_format(const at::Tensor& x) {
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

}  // namespace advfast
