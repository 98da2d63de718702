// Residual add + ReLU on the CPU: out = relu(x + residual), and its backward
// grad_in = grad_out where out > 0 (torch's threshold_backward rule: 0 where out <= 0).
//
// One pass reads x and residual and writes out (eager: add, then relu = 5 tensor passes
// instead of 3). The backward reads grad_out and out and writes one gradient that serves
// both x and residual. The loops (cpu/kernels_impl.h) are vectorised with at::vec for the
// CPU's instruction set and threaded with at::parallel_for; operands are walked as flat
// buffers in the layout of the output (copied first only when their strides differ).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/isa.h"

namespace resnet_fused {
namespace {

at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& residual) {
  check_floating(x, "x");
  check_like(residual, "residual", x, "x");
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor x_ = in_layout_of(x, out);
  const at::Tensor r_ = in_layout_of(residual, out);
  cpu::kernels().add_relu(x.scalar_type(), x_.const_data_ptr(), r_.const_data_ptr(),
                          out.mutable_data_ptr(), out.numel());
  return out;
}

void add_relu_inplace_cpu(at::Tensor& x, const at::Tensor& residual) {
  check_floating(x, "x");
  check_like(residual, "residual", x, "x");
  if (x.numel() == 0) {
    return;
  }
  at::assert_no_internal_overlap(x);
  at::assert_no_partial_overlap(x, residual);
  if (!x.is_non_overlapping_and_dense()) {
    x.copy_(add_relu_cpu(x, residual));
    return;
  }
  const at::Tensor r_ = in_layout_of(residual, x);
  cpu::kernels().add_relu(x.scalar_type(), x.const_data_ptr(), r_.const_data_ptr(),
                          x.mutable_data_ptr(), x.numel());
}

at::Tensor relu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out) {
  check_floating(out, "out");
  check_like(grad_out, "grad_out", out, "out");
  at::Tensor grad_in = at::empty_like(out);
  if (grad_in.numel() == 0) {
    return grad_in;
  }
  const at::Tensor g_ = in_layout_of(grad_out, grad_in);
  const at::Tensor o_ = in_layout_of(out, grad_in);
  cpu::kernels().relu_backward(out.scalar_type(), g_.const_data_ptr(), o_.const_data_ptr(),
                               grad_in.mutable_data_ptr(), grad_in.numel());
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("add_relu", &add_relu_cpu);
  m.impl("add_relu_", &add_relu_inplace_cpu);
  m.impl("relu_backward", &relu_backward_cpu);
}

}  // namespace resnet_fused
