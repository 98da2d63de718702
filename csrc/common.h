// Shared input checks and layout helpers for the resnet_fused C++ kernels.
//
// Every public op checks its arguments here (TORCH_CHECK with the argument's name),
// so a direct torch.ops.resnet_fused.* call never reaches a kernel with bad input.
// Included by the CPU (.cpp) and the CUDA (.cu, nvcc) translation units alike, so it stays
// host-only and light: ATen tensor headers, no CUDA and no torch/library.h.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <optional>

namespace resnet_fused {

inline void check_floating(const at::Tensor& t, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
              " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ", s);
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

namespace resnet_fused {

// ---------------------------------------------------------------------------------------
// BatchNorm family: the layout the kernels work in, and argument checks.
// ---------------------------------------------------------------------------------------

// BN kernels work on NCHW-contiguous or channels_last (NHWC) tensors. A 4-D input that is
// channels_last-contiguous (and not also NCHW-contiguous, as when H=W=1) works and
// returns channels_last; so does a strided one (a slice) whose strides are channels_last's
// order, as eager's BatchNorm returns it (suggest_memory_format), after a copy; anything
// else works (after a copy if needed) in NCHW.
inline at::MemoryFormat bn_memory_format(const at::Tensor& input) {
  if (input.dim() == 4 && !input.is_contiguous() &&
      (input.is_contiguous(at::MemoryFormat::ChannelsLast) ||
       input.suggest_memory_format() == at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// `t` in memory format `fmt` (itself when it already is).
inline at::Tensor bn_in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

inline void check_bn_input(const at::Tensor& input) {
  check_floating(input, "input");
  TORCH_CHECK(input.dim() == 4, "input must be a 4-D tensor (N, C, H, W), got ", input.dim(),
              "-D with shape ", input.sizes());
}

// A per-channel tensor (weight, bias, running stats, saved statistics): shape (C,), on
// input's device, floating (its dtype may differ from input's: fp32 stats/params with
// fp16/bf16 input are the mixed precision autocast produces).
inline void check_per_channel(const at::Tensor& t, const char* name, const at::Tensor& input) {
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), name,
              " must have shape (C,) = (", input.size(1), ",) for input with C = ", input.size(1),
              " channels, got ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), name, " must be on the device of input (",
              input.device(), "), got ", t.device());
}

inline void check_per_channel(const std::optional<at::Tensor>& t, const char* name,
                              const at::Tensor& input) {
  if (t.has_value() && t->defined()) {
    check_per_channel(*t, name, input);
  }
}

inline void check_like(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  if (t.has_value() && t->defined()) {
    check_like(*t, name, ref, ref_name);
  }
}

// Argument checks of the four BN ops, shared by every backend (names as in the schemas).
inline void check_bn_stats_args(const at::Tensor& input,
                                const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_var) {
  check_bn_input(input);
  check_per_channel(running_mean, "running_mean", input);
  check_per_channel(running_var, "running_var", input);
}

inline void check_bn_affine_args(const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias) {
  check_bn_input(input);
  check_per_channel(mean, "mean", input);
  check_per_channel(var, "var", input);
  check_per_channel(weight, "weight", input);
  check_per_channel(bias, "bias", input);
}

inline void check_bn_forward_args(const at::Tensor& input, const at::Tensor& mean,
                                  const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& residual) {
  check_bn_affine_args(input, mean, var, weight, bias);
  check_like(residual, "residual", input, "input");
}

inline void check_bn_backward_reduce_args(const at::Tensor& grad_out, const at::Tensor& input,
                                          const at::Tensor& mean, const at::Tensor& var,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& out,
                                          const std::optional<at::Tensor>& residual) {
  check_bn_input(input);
  check_like(grad_out, "grad_out", input, "input");
  check_bn_affine_args(input, mean, var, weight, bias);
  check_like(out, "out", input, "input");
  check_like(residual, "residual", input, "input");
  TORCH_CHECK(!(out.has_value() && out->defined() && residual.has_value() && residual->defined()),
              "bn_act_backward_reduce: out and residual were both given: act' comes from out, "
              "or from the pre-activation recomputed with the residual, not both");
}

inline void check_bn_backward_elemt_args(const at::Tensor& grad, const at::Tensor& input,
                                         const at::Tensor& mean, const at::Tensor& var,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat) {
  check_bn_input(input);
  check_like(grad, "grad", input, "input");
  check_bn_affine_args(input, mean, var, weight, bias);
  check_per_channel(sum_dy, "sum_dy", input);
  check_per_channel(sum_dy_xhat, "sum_dy_xhat", input);
}

// ---------------------------------------------------------------------------------------
// BatchNorm family: per-channel operands in the accumulation type (both backends).
// ---------------------------------------------------------------------------------------

inline bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The accumulation dtype of the BN family for `input`, ATen's acc_type<T, is_cuda> on
// input's device (at::toAccumulateType), as eager's BatchNorm there: fp64 for fp64 input,
// fp32 for fp16/bf16; fp32 input: fp32 on CUDA, fp64 on the CPU. The statistics and the
// backward's sums are accumulated and returned in it (the Triton ops: fp32 on any device,
// the CUDA rule; resnet_fused/_layout.py's stats_dtype states the same rule in Python).
inline at::ScalarType acc_dtype(const at::Tensor& input) {
  return at::toAccumulateType(input.scalar_type(), input.device().type());
}

// The arithmetic dtype of elementwise ops (at::opmath_type): fp64 for fp64 input, else
// fp32 (bias_act: the arithmetic of eager's adds).
inline at::ScalarType opmath_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel tensor in the accumulation dtype, contiguous (itself when it already is).
inline at::Tensor per_channel_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

// per_channel_acc of an optional tensor; undefined when absent.
inline at::Tensor optional_per_channel_acc(const std::optional<at::Tensor>& t,
                                           at::ScalarType acc) {
  if (present(t)) {
    return per_channel_acc(*t, acc);
  }
  return at::Tensor();
}

// ---------------------------------------------------------------------------------------
// bias_act (folded-BN epilogue): out = act(input + bias[c] [+ residual]).
// ---------------------------------------------------------------------------------------

inline void check_bias_act_args(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual) {
  check_bn_input(input);
  check_per_channel(bias, "bias", input);
  check_like(residual, "residual", input, "input");
}

// The in-place variant walks input's own memory as the kernels' flat buffer, so input must
// be dense in NCHW or channels_last; residual may be input itself, but not overlap it
// partially.
inline void check_bias_act_inplace_args(const at::Tensor& input,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& residual) {
  check_bias_act_args(input, bias, residual);
  TORCH_CHECK(input.is_contiguous() || input.is_contiguous(at::MemoryFormat::ChannelsLast),
              "input of bias_act_ (in place) must be dense in NCHW (contiguous) or channels_last "
              "layout, got shape ", input.sizes(), " with strides ", input.strides());
  if (residual.has_value() && residual->defined()) {
    at::assert_no_partial_overlap(input, *residual);
  }
}

}  // namespace resnet_fused
