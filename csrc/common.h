// Shared input checks and layout helpers for the resnet_fused C++ kernels.
//
// Every public op checks its arguments here (TORCH_CHECK with the argument's name),
// so a direct torch.ops.resnet_fused.* call never reaches a kernel with bad input.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

namespace resnet_fused {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// `t` must match `ref` (named `ref_name`) in shape, device and dtype.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_floating(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// True when `t` has exactly the strides of `ref` (so both can be walked as one flat
// buffer once `ref` is dense).
inline bool same_strides(const at::Tensor& t, const at::Tensor& ref) {
  return t.strides() == ref.strides();
}

// `t` itself when it already has the (dense) layout of `ref`, otherwise a copy of `t`
// in that layout. Lets elementwise kernels walk all operands as flat buffers.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& ref) {
  if (same_strides(t, ref)) {
    return t;
  }
  at::Tensor copy = at::empty_strided(ref.sizes(), ref.strides(), t.options());
  copy.copy_(t);
  return copy;
}

}  // namespace resnet_fused
