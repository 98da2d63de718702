// Host-side helpers of the CPU BatchNorm-family ops (cpu/bn_stats.cpp,
// cpu/bn_act_forward.cpp, cpu/bn_act_backward.cpp): the kernels' geometry and the
// per-channel parameters folded into arrays (acc_dtype, opmath_dtype and per_channel_acc
// come from common.h, shared with the CUDA ops).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <optional>

#include "common.h"
#include "cpu/isa.h"

namespace resnet_fused {

// The loops' view of `input` in layout `fmt` (NCHW or channels_last).
inline cpu::BnGeometry geometry(const at::Tensor& input, at::MemoryFormat fmt) {
  return {input.size(0), input.size(1), input.size(2) * input.size(3),
          fmt == at::MemoryFormat::ChannelsLast};
}

// The per-channel arrays of the elementwise loops, in the arithmetic type (opmath_dtype):
// mean, scale = weight * invstd (weight = 1 when absent) and bias (0 when absent); and, in
// the accumulation type (acc_dtype), invstd and scale_acc for the backward's per-channel
// coefficients, and mean_acc, the mean in the accumulation type. Float input has double
// statistics: its mean is split into the float `mean` and the double remainder mean_lo
// (undefined when the two types agree), which is folded into the bias,
// bias - mean_lo * scale (rounded once), so that the loops' (x - mean) * scale + bias is
// (x - mean_hi - mean_lo) * scale + bias: a mean that float cannot hold (two close values
// per channel) costs no more than one rounding of the bias.
struct Affine {
  at::Tensor mean, mean_lo, mean_acc, invstd, scale_acc, scale, bias;
};

// One loop over the channels in the accumulation type with the arithmetic of the aten
// expressions `(var + eps).rsqrt()` and `invstd * weight` (eps converted to the
// accumulation type first, 1 / sqrt rounded twice, as aten's rsqrt), then rounded to the
// arithmetic type: a handful of aten calls here cost more than the BatchNorm of a small
// input.
inline Affine fold_affine(const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& var, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps) {
  const at::ScalarType acc = acc_dtype(input);
  const at::ScalarType op = opmath_dtype(input);
  const int64_t C = input.size(1);
  const auto acc_opts = input.options().dtype(acc);
  const auto op_opts = input.options().dtype(op);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  Affine a;
  const at::Tensor m = per_channel_acc(mean, acc);
  a.mean_acc = m;
  const at::Tensor v = per_channel_acc(var, acc);
  const at::Tensor w = has_w ? per_channel_acc(*weight, acc) : at::Tensor();
  a.invstd = at::empty({C}, acc_opts);
  a.scale_acc = has_w ? at::empty({C}, acc_opts) : a.invstd;
  AT_DISPATCH_FLOATING_TYPES(acc, "resnet_fused_fold_affine", [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* wp = has_w ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* ip = a.invstd.mutable_data_ptr<scalar_t>();
    scalar_t* sp = a.scale_acc.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t inv = scalar_t(1) / std::sqrt(vp[c] + e);
      ip[c] = inv;
      if (has_w) {
        sp[c] = inv * wp[c];
      }
    }
  });
  if (op == acc) {
    a.mean = m;
    a.scale = a.scale_acc;
    a.bias = has_b ? per_channel_acc(*bias, op) : at::zeros({C}, op_opts);
    return a;
  }
  TORCH_INTERNAL_ASSERT(acc == at::kDouble && op == at::kFloat);
  const at::Tensor b = has_b ? per_channel_acc(*bias, acc) : at::Tensor();
  a.mean = at::empty({C}, op_opts);
  a.mean_lo = at::empty({C}, acc_opts);
  a.scale = at::empty({C}, op_opts);
  a.bias = at::empty({C}, op_opts);
  const double* mp = m.const_data_ptr<double>();
  const double* sp = a.scale_acc.const_data_ptr<double>();
  const double* bp = has_b ? b.const_data_ptr<double>() : nullptr;
  float* hi = a.mean.mutable_data_ptr<float>();
  double* lo = a.mean_lo.mutable_data_ptr<double>();
  float* so = a.scale.mutable_data_ptr<float>();
  float* bo = a.bias.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    hi[c] = static_cast<float>(mp[c]);
    lo[c] = mp[c] - static_cast<double>(hi[c]);
    so[c] = static_cast<float>(sp[c]);
    bo[c] = static_cast<float>((bp != nullptr ? bp[c] : 0.0) - lo[c] * static_cast<double>(so[c]));
  }
  return a;
}

// An uninitialised tensor of input's shape in layout `fmt`.
inline at::Tensor empty_in_format(const at::Tensor& input, at::MemoryFormat fmt) {
  return at::empty(input.sizes(), input.options().memory_format(fmt));
}

}  // namespace resnet_fused
