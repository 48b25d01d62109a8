// pgd_step_ on CPU: one PGD ascent step, projection onto the per-sample eps-ball around x_nat,
// clamp to [lower, upper], in place on x_adv.
//
// Samples are contiguous memory blocks (dim 0 outermost; channels_last qualifies), so the work is
// split into (sample, span) units run with at::parallel_for (OpenMP). Each span is streamed through
// small stack buffers in the compute type (float, or double for float64 x) so that the inner loops
// are plain arrays the compiler vectorises whatever the storage dtypes of x and grad.
//
// l2 needs three per-sample sums: |g|^2, <d0, g>, |d0|^2 with d0 = x_adv - x_nat. With
// s = alpha / |g| (0 when |g| = 0: no step, no NaN) the stepped delta is d0 + s*g and
// |d0 + s*g|^2 = |d0|^2 + 2 s <d0, g> + s^2 |g|^2, so one read pass gives both norms.
#include "../ops.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace advfast {
namespace {

constexpr int64_t kBuf = 512;        // elements per stack buffer (fits L1 with three of them)
constexpr int64_t kSpan = 1 << 16;   // elements of one sample handled by one parallel unit
constexpr int64_t kGrain = 1 << 15;  // aim for at least this many elements per thread

// Pointer to n elements of `src` in type O: `src` itself when no conversion is needed.
template <typename O, typename S>
inline const O* load_as(const S* src, O* buf, int64_t n) {
  if constexpr (std::is_same_v<O, S>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

template <typename T>
inline T clamp_nan(T v, T lo, T hi) {  // propagates NaN like torch.clamp
  return v < lo ? lo : (v > hi ? hi : v);
}

struct L2Sums {
  double gg = 0, dg = 0, dd = 0;
};

template <typename x_t, typename g_t>
L2Sums l2_sums(const x_t* xa, const x_t* xn, const g_t* g, int64_t n) {
  using op_t = at::opmath_type<x_t>;
  op_t ba[kBuf], bn[kBuf], bg[kBuf];
  L2Sums out;
  for (int64_t off = 0; off < n; off += kBuf) {
    const int64_t m = std::min(kBuf, n - off);
    const op_t* a = load_as<op_t>(xa + off, ba, m);
    const op_t* na = load_as<op_t>(xn + off, bn, m);
    const op_t* gv = load_as<op_t>(g + off, bg, m);
    // Products and sums in double: a float32 g of ~1e-23 squares below float's subnormal range, and
    // its step direction must survive (the Triton kernel and the torch reference do the same).
    double gg = 0, dg = 0, dd = 0;
#pragma omp simd reduction(+ : gg, dg, dd)
    for (int64_t i = 0; i < m; ++i) {
      const double gi = static_cast<double>(gv[i]);
      const double d = static_cast<double>(a[i]) - static_cast<double>(na[i]);
      gg += gi * gi;
      dg += d * gi;
      dd += d * d;
    }
    out.gg += gg;
    out.dg += dg;
    out.dd += dd;
  }
  return out;
}

// Per-sample factors of the l2 step: x = x_nat + f * (d0 + s * g).
struct L2Factors {
  double s, f;
};

inline L2Factors l2_factors(const L2Sums& t, double eps, double alpha) {
  const double gnorm = std::sqrt(t.gg);
  const double s = gnorm > 0 ? alpha / gnorm : 0.0;
  const double dn2 = std::max(0.0, t.dd + 2.0 * s * t.dg + s * s * t.gg);
  const double dn = std::sqrt(dn2);
  return {s, dn > eps ? eps / dn : 1.0};
}

template <typename x_t, typename g_t, bool L2>
void apply_span(x_t* xa, const x_t* xn, const g_t* g, int64_t n, double p0, double p1, double lower,
                double upper) {
  using op_t = at::opmath_type<x_t>;
  // linf: p0 = alpha, p1 = eps; l2: p0 = s, p1 = f
  const op_t c0 = static_cast<op_t>(p0), c1 = static_cast<op_t>(p1);
  const op_t lo = static_cast<op_t>(lower), hi = static_cast<op_t>(upper);
  op_t ba[kBuf], bn[kBuf], bg[kBuf], bo[kBuf];
  for (int64_t off = 0; off < n; off += kBuf) {
    const int64_t m = std::min(kBuf, n - off);
    const op_t* a = load_as<op_t>(xa + off, ba, m);
    const op_t* na = load_as<op_t>(xn + off, bn, m);
    const op_t* gv = load_as<op_t>(g + off, bg, m);
    op_t* o = bo;
    if constexpr (std::is_same_v<op_t, x_t>) o = xa + off;  // write in place, same index as read
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      op_t d;
      if constexpr (L2) {
        d = c1 * ((a[i] - na[i]) + c0 * gv[i]);
      } else {
        const op_t sgn = static_cast<op_t>((gv[i] > op_t(0)) - (gv[i] < op_t(0)));
        d = clamp_nan<op_t>(a[i] + c0 * sgn - na[i], -c1, c1);
      }
      o[i] = clamp_nan<op_t>(na[i] + d, lo, hi);
    }
    if constexpr (!std::is_same_v<op_t, x_t>) at::vec::convert(bo, xa + off, m);
  }
}

template <typename x_t, typename g_t>
void pgd_step_kernel(x_t* xa, const x_t* xn, const g_t* g, const at::opmath_type<x_t>* eps,
                     const at::opmath_type<x_t>* alpha,
                     int64_t batch, int64_t sample, bool l2, double lower, double upper) {
  const int64_t spans = (sample + kSpan - 1) / kSpan;  // units per sample
  const int64_t units = batch * spans;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::min(sample, kSpan));
  auto span_of = [&](int64_t u, int64_t& b, int64_t& off, int64_t& n) {
    b = u / spans;
    off = (u % spans) * kSpan;
    n = std::min(kSpan, sample - off);
  };

  if (!l2) {
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        int64_t b, off, n;
        span_of(u, b, off, n);
        const int64_t base = b * sample + off;
        apply_span<x_t, g_t, false>(xa + base, xn + base, g + base, n, alpha[b], eps[b], lower, upper);
      }
    });
    return;
  }

  if (spans == 1) {  // the whole sample in one unit: sums and step while it is still in cache
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t base = b * sample;
        const L2Factors k = l2_factors(l2_sums(xa + base, xn + base, g + base, sample), eps[b], alpha[b]);
        apply_span<x_t, g_t, true>(xa + base, xn + base, g + base, sample, k.s, k.f, lower, upper);
      }
    });
    return;
  }

  // Large samples: partial sums per unit, combined per sample, then the elementwise pass.
  std::vector<L2Sums> partial(units);
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      int64_t b, off, n;
      span_of(u, b, off, n);
      const int64_t base = b * sample + off;
      partial[u] = l2_sums(xa + base, xn + base, g + base, n);
    }
  });
  std::vector<L2Factors> factors(batch);
  for (int64_t b = 0; b < batch; ++b) {
    L2Sums t;
    for (int64_t c = 0; c < spans; ++c) {
      t.gg += partial[b * spans + c].gg;
      t.dg += partial[b * spans + c].dg;
      t.dd += partial[b * spans + c].dd;
    }
    factors[b] = l2_factors(t, eps[b], alpha[b]);
  }
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      int64_t b, off, n;
      span_of(u, b, off, n);
      const int64_t base = b * sample + off;
      apply_span<x_t, g_t, true>(xa + base, xn + base, g + base, n, factors[b].s, factors[b].f, lower,
                                 upper);
    }
  });
}

template <typename x_t>
void dispatch_grad(const at::Tensor& xa, const at::Tensor& xn, const at::Tensor& g,
                   const at::opmath_type<x_t>* eps, const at::opmath_type<x_t>* alpha, bool l2, double lower,
                   double upper) {
  const int64_t batch = xa.size(0);
  const int64_t sample = xa.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pgd_step_cpu_grad", [&] {
    pgd_step_kernel<x_t, scalar_t>(xa.data_ptr<x_t>(), xn.const_data_ptr<x_t>(),
                                   g.const_data_ptr<scalar_t>(), eps, alpha, batch, sample, l2, lower,
                                   upper);
  });
}

}  // namespace

void pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x_nat, const at::Tensor& grad,
                  const at::Tensor& eps, const at::Tensor& alpha, int64_t norm, double lower,
                  double upper) {
  check_pgd_step_args(x_adv, x_nat, grad, eps, alpha, norm, lower, upper);
  if (x_adv.numel() == 0) return;
  const at::Tensor eps_c = eps.contiguous(), alpha_c = alpha.contiguous();

  // Run on the tensors' own memory when they share one dense per-sample layout; otherwise on
  // copies in one such layout, copied back into x_adv at the end.
  const bool direct = samples_are_blocks(x_adv) && same_dense_layout(x_adv, x_nat) &&
                      same_dense_layout(x_adv, grad);
  at::Tensor xa = x_adv, xn = x_nat, g = grad;
  if (!direct) {
    const auto fmt = per_sample_format(x_adv);
    xa = x_adv.contiguous(fmt);
    xn = x_nat.contiguous(fmt);
    g = grad.contiguous(fmt);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xa.scalar_type(), "pgd_step_cpu", [&] {
    using r_t = at::opmath_type<scalar_t>;  // the radius dtype check_pgd_step_args enforced
    dispatch_grad<scalar_t>(xa, xn, g, eps_c.const_data_ptr<r_t>(), alpha_c.const_data_ptr<r_t>(),
                            norm == kNormL2, lower, upper);
  });
  if (!xa.is_same(x_adv)) x_adv.copy_(xa);
}

}  // namespace advfast
