// bn_stats on the CPU: per-channel batch mean and biased variance of the BatchNorm ->
// (residual add) -> ReLU decomposition (maths in resnet_fused/reference.py), and the
// running-statistics update. The entry point checks arguments, brings the input into the
// working layout (NCHW or channels_last, see bn_memory_format) and calls the vectorised,
// threaded loop of cpu/kernels_impl.h (robust per-tile two-pass, Chan merges in a fixed
// order). Traffic: reads the input once.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "common.h"
#include "cpu/bn_host.h"
#include "cpu/isa.h"

namespace resnet_fused {
namespace {

// running <- running * keep + stat * factor, channel by channel: the arithmetic of
// `running.to(acc) * keep + stat * factor` followed by `running.copy_(...)` (each product
// and the sum rounded to the accumulation type, the scalars converted to it first, the
// result rounded to running's dtype), without the five aten calls that cost more than
// the statistics of a small input. `stat` is contiguous in the accumulation type;
// `running` is any floating dtype, any stride.
void update_running(const at::Tensor& running, const at::Tensor& stat, double keep, double factor) {
  const int64_t C = stat.numel();
  const int64_t stride = running.stride(0);
  AT_DISPATCH_FLOATING_TYPES(stat.scalar_type(), "bn_stats_update_running", [&] {
    using acc_t = scalar_t;
    const acc_t* s = stat.const_data_ptr<acc_t>();
    const acc_t k = static_cast<acc_t>(keep);
    const acc_t f = static_cast<acc_t>(factor);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(),
                                    "bn_stats_update_running", [&] {
      scalar_t* r = running.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        const acc_t kept = static_cast<acc_t>(r[c * stride]) * k;
        const acc_t taken = s[c] * f;
        r[c * stride] = static_cast<scalar_t>(kept + taken);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input,
                                                 const std::optional<at::Tensor>& running_mean,
                                                 const std::optional<at::Tensor>& running_var,
                                                 double momentum) {
  check_bn_stats_args(input, running_mean, running_var);
  const at::ScalarType acc = acc_dtype(input);
  const int64_t C = input.size(1);
  at::Tensor mean = at::empty({C}, input.options().dtype(acc));
  at::Tensor var = at::empty({C}, input.options().dtype(acc));
  const int64_t m = input.numel() / std::max<int64_t>(C, 1);
  if (m == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const at::MemoryFormat fmt = bn_memory_format(input);
  const at::Tensor x = bn_in_format(input, fmt);
  cpu::kernels().bn_stats(input.scalar_type(), x.const_data_ptr(), geometry(x, fmt),
                          mean.mutable_data_ptr(), var.mutable_data_ptr());
  if (running_mean.has_value() && running_mean->defined()) {
    update_running(*running_mean, mean, 1 - momentum, momentum);
  }
  if (running_var.has_value() && running_var->defined()) {
    const double unbias = m > 1 ? static_cast<double>(m) / static_cast<double>(m - 1)
                                : std::numeric_limits<double>::quiet_NaN();
    update_running(*running_var, var, 1 - momentum, momentum * unbias);
  }
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
}

}  // namespace resnet_fused
