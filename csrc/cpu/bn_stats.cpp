// bn_stats on the CPU: per-channel batch mean and biased variance of the BatchNorm ->
// (residual add) -> ReLU decomposition (maths in resnet_fused/reference.py), and the
// running-statistics update. The entry point checks arguments, brings the input into the
// working layout (NCHW or channels_last, see bn_memory_format) and calls the vectorised,
// threaded loop of cpu/kernels_impl.h (robust per-tile two-pass, Chan merges in a fixed
// order). Traffic: reads the input once.
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
    running_mean->copy_(running_mean->to(acc) * (1 - momentum) + mean * momentum);
  }
  if (running_var.has_value() && running_var->defined()) {
    const double unbias = m > 1 ? static_cast<double>(m) / static_cast<double>(m - 1)
                                : std::numeric_limits<double>::quiet_NaN();
    running_var->copy_(running_var->to(acc) * (1 - momentum) + var * (momentum * unbias));
  }
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
}

}  // namespace resnet_fused
