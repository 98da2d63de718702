// BatchNorm -> (residual add) -> ReLU on the CPU: the four ops of the BN family
// (bn_stats, bn_act_forward, bn_act_backward_reduce, bn_act_backward_elemt; maths in
// resnet_fused/reference.py). These entry points check arguments, bring operands into the
// working layout (NCHW or channels_last, see bn_memory_format), fold the per-channel
// parameters into a few arrays in the accumulation type, and call the vectorised,
// threaded loops of cpu/kernels_impl.h.
//
// Traffic per op: stats reads the input once; forward reads input (+ residual) and
// writes out; backward_reduce reads grad_out and input (+ out) and optionally writes the
// masked gradient; backward_elemt reads grad and input and writes grad_input.
//
// Also bias_act / bias_act_ (the eval-mode epilogue of a conv with BN folded into it):
// out = act(input + bias [+ residual]), which is the forward loop with mean = 0 and
// scale = 1; reads input (+ residual), writes out (or input, in place), one pass.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "common.h"
#include "cpu/isa.h"

namespace resnet_fused {
namespace {

at::ScalarType acc_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

cpu::BnGeometry geometry(const at::Tensor& input, at::MemoryFormat fmt) {
  return {input.size(0), input.size(1), input.size(2) * input.size(3),
          fmt == at::MemoryFormat::ChannelsLast};
}

// A per-channel tensor as a contiguous array in the accumulation type.
at::Tensor per_channel_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

// scale = weight * rsqrt(var + eps) (weight = 1 when absent) and bias (0 when absent).
struct Affine {
  at::Tensor mean, invstd, scale, bias;
};

Affine fold_affine(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   double eps) {
  const at::ScalarType acc = acc_dtype(input);
  Affine a;
  a.mean = per_channel_acc(mean, acc);
  a.invstd = (per_channel_acc(var, acc) + eps).rsqrt();
  a.scale = weight.has_value() && weight->defined() ? a.invstd * per_channel_acc(*weight, acc)
                                                     : a.invstd;
  a.scale = a.scale.contiguous();
  a.bias = bias.has_value() && bias->defined()
               ? per_channel_acc(*bias, acc)
               : at::zeros({input.size(1)}, input.options().dtype(acc));
  return a;
}

at::Tensor empty_in_format(const at::Tensor& input, at::MemoryFormat fmt) {
  return at::empty(input.sizes(), input.options().memory_format(fmt));
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
    running_mean->copy_(running_mean->to(acc) * (1 - momentum) + mean * momentum);
  }
  if (running_var.has_value() && running_var->defined()) {
    const double unbias = m > 1 ? static_cast<double>(m) / static_cast<double>(m - 1)
                                : std::numeric_limits<double>::quiet_NaN();
    running_var->copy_(running_var->to(acc) * (1 - momentum) + var * (momentum * unbias));
  }
  return {mean, var};
}

at::Tensor bn_act_forward_cpu(const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& var, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, double eps, bool relu) {
  check_bn_forward_args(input, mean, var, weight, bias, residual);
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
                            a.bias.const_data_ptr(), relu);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out, double eps,
    bool relu, bool write_masked_grad) {
  check_bn_backward_reduce_args(grad_out, input, mean, var, weight, bias, out);
  const bool has_out = out.has_value() && out->defined();
  const at::ScalarType acc = acc_dtype(input);
  const int64_t C = input.size(1);
  const at::MemoryFormat fmt = bn_memory_format(input);
  at::Tensor sum_dy = at::zeros({C}, input.options().dtype(acc));
  at::Tensor sum_dy_xmu = at::zeros({C}, input.options().dtype(acc));
  at::Tensor masked = write_masked_grad ? empty_in_format(input, fmt) : input.new_empty({0});
  if (input.numel() == 0) {
    return {sum_dy, sum_dy_xmu, masked};
  }
  const at::Tensor x = bn_in_format(input, fmt);
  const at::Tensor g = bn_in_format(grad_out, fmt);
  const at::Tensor o = relu && has_out ? bn_in_format(*out, fmt) : at::Tensor();
  const cpu::BnMask mask =
      !relu ? cpu::BnMask::kNone : (has_out ? cpu::BnMask::kFromOut : cpu::BnMask::kFromInput);
  const Affine a = fold_affine(input, mean, var, weight, bias, eps);
  cpu::kernels().bn_backward_reduce(
      input.scalar_type(), g.const_data_ptr(), x.const_data_ptr(),
      o.defined() ? o.const_data_ptr() : nullptr,
      write_masked_grad ? masked.mutable_data_ptr() : nullptr, geometry(x, fmt),
      a.mean.const_data_ptr(), a.scale.const_data_ptr(), a.bias.const_data_ptr(), mask,
      sum_dy.mutable_data_ptr(), sum_dy_xmu.mutable_data_ptr());
  return {sum_dy, sum_dy_xmu * a.invstd, masked};
}

at::Tensor bn_act_backward_elemt_cpu(const at::Tensor& grad, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& var,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                     double eps, bool relu_mask_from_input, bool batch_stats) {
  check_bn_backward_elemt_args(grad, input, mean, var, weight, bias, sum_dy, sum_dy_xhat);
  const at::MemoryFormat fmt = bn_memory_format(input);
  at::Tensor dx = empty_in_format(input, fmt);
  if (input.numel() == 0) {
    return dx;
  }
  const at::ScalarType acc = acc_dtype(input);
  const at::Tensor x = bn_in_format(input, fmt);
  const at::Tensor g = bn_in_format(grad, fmt);
  const Affine a = fold_affine(input, mean, var, weight, bias, eps);
  // Batch statistics: dx = scale*(g - sum_dy/m - xhat*sum_dy_xhat/m)
  // = g*scale + (x - mean)*k + c. Running statistics: dx = g*scale (k and c null, so that
  // an Inf or NaN input does not give (x - mean)*0 = NaN).
  at::Tensor k, c;
  if (batch_stats) {
    const double m = static_cast<double>(input.numel() / input.size(1));
    k = (-(a.scale * a.invstd) * per_channel_acc(sum_dy_xhat, acc) / m).contiguous();
    c = (-a.scale * per_channel_acc(sum_dy, acc) / m).contiguous();
  }
  cpu::kernels().bn_backward_elemt(
      input.scalar_type(), g.const_data_ptr(), x.const_data_ptr(), dx.mutable_data_ptr(),
      geometry(x, fmt), a.mean.const_data_ptr(), a.scale.const_data_ptr(),
      a.bias.const_data_ptr(), batch_stats ? k.const_data_ptr() : nullptr,
      batch_stats ? c.const_data_ptr() : nullptr,
      relu_mask_from_input ? cpu::BnMask::kFromInput : cpu::BnMask::kNone);
  return dx;
}

// out = act(x + bias [+ residual]) with x, out (which may be x itself) in layout `fmt`.
// It runs the BN forward loop with mean = 0 and scale = 1: (x - 0)*1 + b is exactly x + b
// (fmadd(x, 1, b) rounds once, as the plain add does), so the result is the composition
// input + bias (+ residual) in the accumulation type, rounded once to input's dtype.
void bias_act_into(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out,
                   at::MemoryFormat fmt) {
  const at::ScalarType acc = acc_dtype(x);
  const auto acc_opts = x.options().dtype(acc);
  const int64_t C = x.size(1);
  const at::Tensor mean = at::zeros({C}, acc_opts);
  const at::Tensor scale = at::ones({C}, acc_opts);
  const at::Tensor b = bias.has_value() && bias->defined() ? per_channel_acc(*bias, acc) : mean;
  const at::Tensor res = residual.has_value() && residual->defined()
                             ? bn_in_format(*residual, fmt)
                             : at::Tensor();
  cpu::kernels().bn_forward(x.scalar_type(), x.const_data_ptr(),
                            res.defined() ? res.const_data_ptr() : nullptr, out.mutable_data_ptr(),
                            geometry(x, fmt), mean.const_data_ptr(), scale.const_data_ptr(),
                            b.const_data_ptr(), relu);
}

at::Tensor bias_act_cpu(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual, bool relu) {
  check_bias_act_args(input, bias, residual);
  const at::MemoryFormat fmt = bn_memory_format(input);
  at::Tensor out = empty_in_format(input, fmt);
  if (out.numel() == 0) {
    return out;
  }
  bias_act_into(bn_in_format(input, fmt), bias, residual, relu, out, fmt);
  return out;
}

void bias_act_inplace_cpu(at::Tensor& input, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, bool relu) {
  check_bias_act_inplace_args(input, bias, residual);
  if (input.numel() == 0) {
    return;
  }
  // Dense in NCHW or channels_last (checked), so input is already in its bn layout. Each
  // element is read before it is written, by the same thread: x and out may alias.
  bias_act_into(input, bias, residual, relu, input, bn_memory_format(input));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_act_forward", &bn_act_forward_cpu);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt_cpu);
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_act_", &bias_act_inplace_cpu);
}

}  // namespace resnet_fused
