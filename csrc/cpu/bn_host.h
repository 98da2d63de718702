// Host-side helpers of the CPU BatchNorm-family ops (cpu/bn_stats.cpp,
// cpu/bn_act_forward.cpp, cpu/bn_act_backward.cpp): the kernels' geometry and the
// per-channel parameters folded into arrays in the accumulation type (acc_dtype and
// per_channel_acc come from common.h, shared with the CUDA ops).
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

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

inline Affine fold_affine(const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& var, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps) {
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

// An uninitialised tensor of input's shape in layout `fmt`.
inline at::Tensor empty_in_format(const at::Tensor& input, at::MemoryFormat fmt) {
  return at::empty(input.sizes(), input.options().memory_format(fmt));
}

}  // namespace resnet_fused
