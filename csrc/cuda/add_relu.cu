// Residual add + ReLU on CUDA: out = relu(x + residual), and its backward
// grad_in = grad_out where out > 0 (0 where out <= 0, torch's threshold_backward rule).
//
// One pass, 3 tensor passes of traffic instead of eager's 5. Operands are walked as flat
// buffers in the output's layout; when all three pointers are 16-byte aligned each thread
// moves 16 bytes per load/store (float4 / 8 halves), with a scalar tail. Arithmetic is in
// at::opmath_type (fp32 for fp16/bf16), rounding once on store as eager does.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace resnet_fused {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct AddReLUOp {
  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(acc_t x, acc_t r) const {
    const acc_t s = x + r;
    return s < acc_t(0) ? acc_t(0) : s;  // NaN propagates, as torch.relu does
  }
};

struct ReLUBackwardOp {
  template <typename acc_t>
  __device__ __forceinline__ acc_t operator()(acc_t grad, acc_t out) const {
    return out <= acc_t(0) ? acc_t(0) : grad;
  }
};

// out[i] = op(a[i], b[i]) over n elements; VEC elements per load when VEC > 1.
template <typename scalar_t, int VEC, typename Op>
__global__ void binary_flat_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                   scalar_t* __restrict__ out, int64_t n, Op op) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t n_vec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i < n_vec; i += stride) {
    const P pa = reinterpret_cast<const P*>(a)[i];
    const P pb = reinterpret_cast<const P*>(b)[i];
    P po;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      po.v[k] = static_cast<scalar_t>(op(static_cast<acc_t>(pa.v[k]), static_cast<acc_t>(pb.v[k])));
    }
    reinterpret_cast<P*>(out)[i] = po;
  }
  // Tail (fewer than VEC elements): the first threads of the grid.
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j = n_vec * VEC + t;
  if (t < VEC && j < n) {
    out[j] = static_cast<scalar_t>(op(static_cast<acc_t>(a[j]), static_cast<acc_t>(b[j])));
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

template <typename scalar_t, typename Op>
void launch_binary_flat(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, Op op) {
  constexpr int kVec = 16 / sizeof(scalar_t) > 0 ? 16 / sizeof(scalar_t) : 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = aligned16(a) && aligned16(b) && aligned16(out);
  const int64_t work = vec ? (n + kVec - 1) / kVec : n;
  const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t{1} << 20);
  if (vec) {
    binary_flat_kernel<scalar_t, kVec, Op><<<blocks, kThreads, 0, stream>>>(a, b, out, n, op);
  } else {
    binary_flat_kernel<scalar_t, 1, Op><<<blocks, kThreads, 0, stream>>>(a, b, out, n, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& residual) {
  check_floating(x, "x");
  check_like(residual, "residual", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor x_ = in_layout_of(x, out);
  const at::Tensor r_ = in_layout_of(residual, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cuda", [&] {
    launch_binary_flat<scalar_t>(x_.const_data_ptr<scalar_t>(), r_.const_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(), out.numel(), AddReLUOp{});
  });
  return out;
}

void add_relu_inplace_cuda(at::Tensor& x, const at::Tensor& residual) {
  check_floating(x, "x");
  check_like(residual, "residual", x, "x");
  if (x.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::assert_no_internal_overlap(x);
  at::assert_no_partial_overlap(x, residual);
  if (!x.is_non_overlapping_and_dense()) {
    x.copy_(add_relu_cuda(x, residual));
    return;
  }
  const at::Tensor r_ = in_layout_of(residual, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cuda_", [&] {
    // a and out alias here (in place): each element is read before it is written by the
    // same thread, so the __restrict__ promise holds per element.
    launch_binary_flat<scalar_t>(x.const_data_ptr<scalar_t>(), r_.const_data_ptr<scalar_t>(),
                                 x.mutable_data_ptr<scalar_t>(), x.numel(), AddReLUOp{});
  });
}

at::Tensor relu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out) {
  check_floating(out, "out");
  check_like(grad_out, "grad_out", out, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor grad_in = at::empty_like(out);
  if (grad_in.numel() == 0) {
    return grad_in;
  }
  const at::Tensor g_ = in_layout_of(grad_out, grad_in);
  const at::Tensor o_ = in_layout_of(out, grad_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "relu_backward_cuda", [&] {
    launch_binary_flat<scalar_t>(g_.const_data_ptr<scalar_t>(), o_.const_data_ptr<scalar_t>(),
                                 grad_in.mutable_data_ptr<scalar_t>(), grad_in.numel(),
                                 ReLUBackwardOp{});
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("add_relu", &add_relu_cuda);
  m.impl("add_relu_", &add_relu_inplace_cuda);
  m.impl("relu_backward", &relu_backward_cuda);
}

}  // namespace resnet_fused
