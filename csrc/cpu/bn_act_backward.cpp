// bn_act_backward_reduce and bn_act_backward_elemt on the CPU: the backward of the
// BatchNorm -> (residual add) -> activation decomposition (maths in resnet_fused/reference.py).
// The entry points check arguments, bring operands into the working layout (NCHW or
// channels_last, see bn_memory_format), fold the per-channel parameters into arrays
// (cpu/bn_host.h) and call the vectorised, threaded loops of cpu/kernels_impl.h; the sums
// come back in the accumulation type (fp64 for fp32 input, as eager's CPU BatchNorm).
// Traffic: backward_reduce reads grad_out and input (+ out or residual) and optionally writes the
// masked gradient; backward_elemt reads grad and input and writes grad_input.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "act.h"
#include "common.h"
#include "cpu/bn_host.h"
#include "cpu/isa.h"

namespace resnet_fused {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out, double eps,
    int64_t act, double act_param, bool write_masked_grad,
    const std::optional<at::Tensor>& residual) {
  check_bn_backward_reduce_args(grad_out, input, mean, var, weight, bias, out, residual);
  check_act(act);
  const bool has_out = out.has_value() && out->defined();
  const bool has_residual = residual.has_value() && residual->defined();
  const bool apply = act != kActIdentity;
  TORCH_CHECK(!(apply && has_out) || act_from_output(act, act_param),
              "bn_act_backward_reduce: out must be None for ", act_name(act),
              " (its derivative is not a function of the output; it is recomputed from input)");
  const at::ScalarType acc = acc_dtype(input);
  const int64_t C = input.size(1);
  const at::MemoryFormat fmt = bn_memory_format(input);
  at::Tensor masked = write_masked_grad ? empty_in_format(input, fmt) : input.new_empty({0});
  if (input.numel() == 0) {
    return {at::zeros({C}, input.options().dtype(acc)), at::zeros({C}, input.options().dtype(acc)),
            masked};
  }
  // (the loops write every channel's sums)
  at::Tensor sum_dy = at::empty({C}, input.options().dtype(acc));
  at::Tensor sum_dy_xhat = at::empty({C}, input.options().dtype(acc));
  std::vector<double> xmu_double;
  std::vector<float> xmu_float;
  void* sum_dy_xmu = nullptr;
  if (acc == at::kDouble) {
    xmu_double.resize(static_cast<size_t>(C));
    sum_dy_xmu = xmu_double.data();
  } else {
    xmu_float.resize(static_cast<size_t>(C));
    sum_dy_xmu = xmu_float.data();
  }
  const at::Tensor x = bn_in_format(input, fmt);
  const at::Tensor g = bn_in_format(grad_out, fmt);
  // The second stream: the output (kFromOut) or the residual (kFromInputResidual).
  const at::Tensor o = !apply       ? at::Tensor()
                       : has_out      ? bn_in_format(*out, fmt)
                       : has_residual ? bn_in_format(*residual, fmt)
                                      : at::Tensor();
  const cpu::BnMask mask = !apply         ? cpu::BnMask::kNone
                           : has_out      ? cpu::BnMask::kFromOut
                           : has_residual ? cpu::BnMask::kFromInputResidual
                                          : cpu::BnMask::kFromInput;
  const Affine a = fold_affine(input, mean, var, weight, bias, eps);
  cpu::kernels().bn_backward_reduce(
      input.scalar_type(), g.const_data_ptr(), x.const_data_ptr(),
      o.defined() ? o.const_data_ptr() : nullptr,
      write_masked_grad ? masked.mutable_data_ptr() : nullptr, geometry(x, fmt),
      a.mean.const_data_ptr(), a.scale.const_data_ptr(), a.bias.const_data_ptr(),
      a.mean_acc.const_data_ptr(), mask, cpu::ActSpec{act, act_param}, sum_dy.mutable_data_ptr(),
      sum_dy_xmu);
  // sum_dy_xhat = sum_dy_xmu * invstd, per channel (as the aten product would).
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_act_backward_reduce_xhat", [&] {
    const scalar_t* s = static_cast<const scalar_t*>(sum_dy_xmu);
    const scalar_t* inv = a.invstd.const_data_ptr<scalar_t>();
    scalar_t* out = sum_dy_xhat.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      out[c] = s[c] * inv[c];
    }
  });
  return {sum_dy, sum_dy_xhat, masked};
}

at::Tensor bn_act_backward_elemt_cpu(const at::Tensor& grad, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& var,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                     double eps, int64_t act, double act_param,
                                     bool batch_stats) {
  check_bn_backward_elemt_args(grad, input, mean, var, weight, bias, sum_dy, sum_dy_xhat);
  check_act(act);
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
  // Per channel in the accumulation type, with the arithmetic of the aten expressions
  // k = -(scale * invstd) * sum_dy_xhat / m and c = -scale * sum_dy / m (m converted to
  // the accumulation type first).
  // (host arrays: sums converted as `.to(acc)` would, then k and c; small tensors here
  // would cost more than this pass over a small input)
  std::vector<double> kc_double;
  std::vector<float> kc_float;
  const void* k = nullptr;
  const void* c = nullptr;
  if (batch_stats) {
    const double m = static_cast<double>(input.numel() / input.size(1));
    const int64_t C = input.size(1);
    AT_DISPATCH_FLOATING_TYPES(acc, "bn_act_backward_elemt_coefficients", [&] {
      std::vector<scalar_t>& store = of_type<scalar_t>(kc_double, kc_float);
      store.resize(static_cast<size_t>(4 * C));
      scalar_t* sx = store.data();
      scalar_t* sd = sx + C;
      scalar_t* kp = sd + C;
      scalar_t* cp = kp + C;
      read_channels(sum_dy_xhat, C, sx);
      read_channels(sum_dy, C, sd);
      const scalar_t* scale = a.scale_acc.const_data_ptr<scalar_t>();
      const scalar_t* invstd = a.invstd.const_data_ptr<scalar_t>();
      const scalar_t mm = static_cast<scalar_t>(m);
      for (int64_t i = 0; i < C; ++i) {
        const scalar_t si = scale[i] * invstd[i];
        kp[i] = (-si * sx[i]) / mm;
        cp[i] = (-scale[i] * sd[i]) / mm;
      }
      k = kp;
      c = cp;
    });
  }
  cpu::kernels().bn_backward_elemt(
      input.scalar_type(), g.const_data_ptr(), x.const_data_ptr(), dx.mutable_data_ptr(),
      geometry(x, fmt), a.mean.const_data_ptr(), a.scale.const_data_ptr(),
      a.bias.const_data_ptr(), a.mean_acc.const_data_ptr(), a.scale_acc.const_data_ptr(), k, c,
      act != kActIdentity ? cpu::BnMask::kFromInput : cpu::BnMask::kNone,
      cpu::ActSpec{act, act_param});
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt_cpu);
}

}  // namespace resnet_fused
