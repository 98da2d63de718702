// bn_act_forward on the CPU: out = act((input - mean) * rsqrt(var + eps) * weight + bias
// [+ residual]), the forward of the BatchNorm -> (residual add) -> activation decomposition (maths
// in resnet_fused/reference.py). The entry point checks arguments, brings operands into the
// working layout (NCHW or channels_last, see bn_memory_format), folds the per-channel
// parameters into arrays in the arithmetic type (cpu/bn_host.h) and calls the vectorised,
// threaded loop of cpu/kernels_impl.h. Traffic: reads input (+ residual), writes out.
//
// Also bias_act / bias_act_ (the eval-mode epilogue of a conv with BN folded into it):
// out = act(input + bias [+ residual]), which is the forward loop with mean = 0 and
// scale = 1; reads input (+ residual), writes out (or input, in place), one pass.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "act.h"
#include "common.h"
#include "cpu/bn_host.h"
#include "cpu/isa.h"

namespace resnet_fused {
namespace {

at::Tensor bn_act_forward_cpu(const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& var, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, double eps, int64_t act,
                              double act_param) {
  check_bn_forward_args(input, mean, var, weight, bias, residual);
  check_act(act);
  const bool has_res = residual.has_value() && residual->defined();
  const at::MemoryFormat fmt = bn_memory_format(input);
  at::Tensor out = empty_in_format(input, fmt);
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor x = bn_in_format(input, fmt);
  const at::Tensor res = has_res ? bn_in_format(*residual, fmt) : at::Tensor();
  const Affine a = fold_affine(input, mean, var, weight, bias, eps);
  cpu::kernels().bn_forward(input.scalar_type(), x.const_data_ptr(),
                            has_res ? res.const_data_ptr() : nullptr, out.mutable_data_ptr(),
                            geometry(x, fmt), a.mean.const_data_ptr(), a.scale.const_data_ptr(),
                            a.bias.const_data_ptr(), cpu::ActSpec{act, act_param});
  return out;
}

// out = act(x + bias [+ residual]) with x, out (which may be x itself) in layout `fmt`.
// It runs the BN forward loop with mean = 0 and scale = 1: (x - 0)*1 + b is exactly x + b
// (fmadd(x, 1, b) rounds once, as the plain add does), so the result is the composition
// input + bias (+ residual) in at::opmath_type (fp32 for fp32 input, as eager's adds),
// rounded once to input's dtype.
void bias_act_into(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& residual, int64_t act, double act_param,
                   at::Tensor& out, at::MemoryFormat fmt) {
  const int64_t C = x.size(1);
  const at::Tensor res = residual.has_value() && residual->defined()
                             ? bn_in_format(*residual, fmt)
                             : at::Tensor();
  // mean 0, scale 1 and the bias in the arithmetic type, as host arrays (three small
  // tensors cost more than this pass over a small input)
  auto run = [&](auto zero) {
    using op_t = decltype(zero);
    std::vector<op_t> arrays(static_cast<size_t>(3 * C));
    op_t* mean = arrays.data();
    op_t* scale = mean + C;
    op_t* b = scale + C;
    std::fill(mean, mean + C, op_t(0));
    std::fill(scale, scale + C, op_t(1));
    if (bias.has_value() && bias->defined()) {
      read_channels(*bias, C, b);
    } else {
      std::fill(b, b + C, op_t(0));
    }
    cpu::kernels().bn_forward(x.scalar_type(), x.const_data_ptr(),
                              res.defined() ? res.const_data_ptr() : nullptr,
                              out.mutable_data_ptr(), geometry(x, fmt), mean, scale, b,
                              cpu::ActSpec{act, act_param});
  };
  if (opmath_dtype(x) == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
}

at::Tensor bias_act_cpu(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual, int64_t act,
                        double act_param) {
  check_bias_act_args(input, bias, residual);
  check_act(act);
  const at::MemoryFormat fmt = bn_memory_format(input);
  at::Tensor out = empty_in_format(input, fmt);
  if (out.numel() == 0) {
    return out;
  }
  bias_act_into(bn_in_format(input, fmt), bias, residual, act, act_param, out, fmt);
  return out;
}

void bias_act_inplace_cpu(at::Tensor& input, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, int64_t act,
                          double act_param) {
  check_bias_act_inplace_args(input, bias, residual);
  check_act(act);
  if (input.numel() == 0) {
    return;
  }
  // Dense in NCHW or channels_last (checked), so input is already in its bn layout. Each
  // element is read before it is written, by the same thread: x and out may alias.
  bias_act_into(input, bias, residual, act, act_param, input, bn_memory_format(input));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward_cpu);
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_act_", &bias_act_inplace_cpu);
}

}  // namespace resnet_fused
