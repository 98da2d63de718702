// Host-side helpers of the CPU BatchNorm-family ops (cpu/bn_stats.cpp,
// cpu/bn_act_forward.cpp, cpu/bn_act_backward.cpp): the kernels' geometry and the
// per-channel parameters folded into arrays in the accumulation type (acc_dtype and
// per_channel_acc come from common.h, shared with the CUDA ops).
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

// scale = weight * rsqrt(var + eps) (weight = 1 when absent) and bias (0 when absent).
struct Affine {
  at::Tensor mean, invstd, scale, bias;
};

// The per-channel arrays, one loop over the channels in the accumulation type with the
// arithmetic of the aten expressions `(var + eps).rsqrt()` and `invstd * weight` (eps
// converted to the accumulation type first, 1 / sqrt rounded twice, as aten's rsqrt):
// a handful of aten calls here cost more than the BatchNorm of a small input.
inline Affine fold_affine(const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& var, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps) {
  const at::ScalarType acc = acc_dtype(input);
  const int64_t C = input.size(1);
  const auto acc_opts = input.options().dtype(acc);
  const bool has_w = weight.has_value() && weight->defined();
  Affine a;
  a.mean = per_channel_acc(mean, acc);
  const at::Tensor v = per_channel_acc(var, acc);
  const at::Tensor w = has_w ? per_channel_acc(*weight, acc) : at::Tensor();
  a.invstd = at::empty({C}, acc_opts);
  a.scale = has_w ? at::empty({C}, acc_opts) : a.invstd;
  AT_DISPATCH_FLOATING_TYPES(acc, "resnet_fused_fold_affine", [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* wp = has_w ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* ip = a.invstd.mutable_data_ptr<scalar_t>();
    scalar_t* sp = a.scale.mutable_data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t inv = scalar_t(1) / std::sqrt(vp[c] + e);
      ip[c] = inv;
      if (has_w) {
        sp[c] = inv * wp[c];
      }
    }
  });
  a.bias = bias.has_value() && bias->defined() ? per_channel_acc(*bias, acc)
                                               : at::zeros({C}, acc_opts);
  return a;
}

// An uninitialised tensor of input's shape in layout `fmt`.
inline at::Tensor empty_in_format(const at::Tensor& input, at::MemoryFormat fmt) {
  return at::empty(input.sizes(), input.options().memory_format(fmt));
}

}  // namespace resnet_fused
