// ema_update_ on CPU: ema = m * ema + (1 - m) * src over lists of tensors; integer and bool
// tensors (BatchNorm's num_batches_tracked) are copied. All tensors of all dtypes are cut into
// fixed-size spans and run in one at::parallel_for (OpenMP), so many small tensors still spread
// over the threads. Half types are computed in float; float64 in float64.
#include "../ops.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace advfast {
namespace {

constexpr int64_t kSpan = 1 << 15;  // elements per parallel unit
constexpr int64_t kBuf = 512;       // elements per stack buffer

template <typename T>
void ema_span(T* e, const T* s, int64_t n, double momentum) {
  using op_t = at::opmath_type<T>;
  const op_t m = static_cast<op_t>(momentum);
  const op_t w = static_cast<op_t>(1.0 - momentum);  // exact 0 / 1 at the ends
  if constexpr (std::is_same_v<op_t, T>) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) e[i] = e[i] * m + s[i] * w;
  } else {
    op_t be[kBuf], bs[kBuf];
    for (int64_t off = 0; off < n; off += kBuf) {
      const int64_t k = std::min(kBuf, n - off);
      at::vec::convert(e + off, be, k);
      at::vec::convert(s + off, bs, k);
#pragma omp simd
      for (int64_t i = 0; i < k; ++i) be[i] = be[i] * m + bs[i] * w;
      at::vec::convert(be, e + off, k);
    }
  }
}

struct Unit {
  int64_t tensor, begin, count;  // element range of one tensor
};

}  // namespace

void ema_update_cpu(at::TensorList ema, at::TensorList src, double momentum) {
  check_ema_update_args(ema, src, momentum);

  // Work tensors share one dense layout with their pair; others run on contiguous copies.
  std::vector<at::Tensor> work_e, work_s;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (ema, its contiguous work copy)
  for (size_t i = 0; i < ema.size(); ++i) {
    if (ema[i].numel() == 0) continue;
    if (same_dense_layout(ema[i], src[i])) {
      work_e.push_back(ema[i]);
      work_s.push_back(src[i]);
    } else {
      at::Tensor e = ema[i].contiguous();
      work_e.push_back(e);
      work_s.push_back(src[i].contiguous());
      if (!e.is_same(ema[i])) copy_back.emplace_back(ema[i], e);
    }
  }

  std::vector<Unit> units;
  for (size_t t = 0; t < work_e.size(); ++t) {
    const int64_t n = work_e[t].numel();
    for (int64_t b = 0; b < n; b += kSpan) units.push_back({int64_t(t), b, std::min(kSpan, n - b)});
  }

  at::parallel_for(0, int64_t(units.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const Unit& w = units[u];
      const at::Tensor& e = work_e[w.tensor];
      const at::Tensor& s = work_s[w.tensor];
      if (at::isIntegralType(e.scalar_type(), /*includeBool=*/true)) {
        const int64_t item = e.element_size();
        std::memcpy(static_cast<char*>(e.data_ptr()) + w.begin * item,
                    static_cast<const char*>(s.const_data_ptr()) + w.begin * item, w.count * item);
        continue;
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "ema_update_cpu", [&] {
        ema_span<scalar_t>(e.data_ptr<scalar_t>() + w.begin, s.const_data_ptr<scalar_t>() + w.begin,
                           w.count, momentum);
      });
    }
  });

  for (auto& [dst, tmp] : copy_back) dst.copy_(tmp);
}

}  // namespace advfast
