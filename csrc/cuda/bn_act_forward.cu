// bn_act_forward on CUDA: out = act((x - mean) * rsqrt(var + eps) * weight + bias
// [+ residual]), the forward of the BatchNorm -> (residual add) -> activation decomposition in
// resnet_fused/reference.py (which defines the maths); and bias_act / bias_act_, the
// eval-mode epilogue of a conv with BN folded into it, which runs the same kernels through
// the same launcher (launch_bn_forward). Geometry and plans: bn_launch.cuh; per-channel
// affine and activation (act.h, a runtime switch on the uniform act code): bn_stats_math.cuh.
// Traffic: reads x (+ residual), writes out, one pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"
#include "cuda/bn_launch.cuh"
#include "cuda/bn_stats_math.cuh"

namespace resnet_fused {
namespace {

// ---------------------------------------------------------------------------------------
// 2. Forward: out = act((x - mean)*invstd*w + b [+ residual])
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t forward_value(const ChannelAffine<acc_t>& a, scalar_t x,
                                                  const scalar_t* res, scalar_t r,
                                                  const ActArg<acc_t>& act) {
  acc_t y = a.y(a.xhat(static_cast<acc_t>(x)));
  if (res != nullptr) {
    y += static_cast<acc_t>(r);
  }
  return static_cast<scalar_t>(act_forward(act, y));
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_fwd_nchw_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                       scalar_t* __restrict__ out, const BnParams<at::opmath_type<scalar_t>> p,
                       const ActArg<at::opmath_type<scalar_t>> act, const NchwGeom g) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  constexpr int U = items_per_iter<scalar_t, VEC>();
  const int64_t c = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * g.chunk;
  const int64_t end = min64(g.total, begin + g.chunk);
  int64_t j = begin + threadIdx.x;
  if (j >= end) {
    return;
  }
  const ChannelAffine<acc_t> a = load_affine(p, c);
  const P* xv = reinterpret_cast<const P*>(x);
  const P* rv = reinterpret_cast<const P*>(res);
  P* ov = reinterpret_cast<P*>(out);
  NchwCursor cur;
  cur.init(g, c, j);
  for (; j < end; j += static_cast<int64_t>(kThreads) * U) {
    const int cnt = valid_items<U>(j, end, kThreads);
    int64_t off[U];
    P xs[U];
    P rs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      off[u] = cur.off;
      if (u < cnt) {
        xs[u] = xv[off[u]];
        if (res != nullptr) {
          rs[u] = rv[off[u]];
        }
      }
      cur.advance(g);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < cnt) {
        P o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          o.v[k] = forward_value<scalar_t, acc_t>(a, xs[u].v[k], res,
                                                  res != nullptr ? rs[u].v[k] : scalar_t(0), act);
        }
        ov[off[u]] = o;
      }
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_fwd_nhwc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                       scalar_t* __restrict__ out, const BnParams<at::opmath_type<scalar_t>> p,
                       const ActArg<at::opmath_type<scalar_t>> act, const NhwcGeom g) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  constexpr int U = items_per_iter<scalar_t, VEC>();
  const int by = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * g.chunk;
  const int64_t end = min64(g.rows, begin + g.chunk);
  if (cv >= g.cv || begin + threadIdx.y >= end) {
    return;
  }
  ChannelAffine<acc_t> a[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    a[k] = load_affine(p, cv * VEC + k);
  }
  const P* xv = reinterpret_cast<const P*>(x);
  const P* rv = reinterpret_cast<const P*>(res);
  P* ov = reinterpret_cast<P*>(out);
  const int64_t step = static_cast<int64_t>(by) * U;
  for (int64_t r = begin + threadIdx.y; r < end; r += step) {
    const int cnt = valid_items<U>(r, end, by);
    P xs[U];
    P rs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < cnt) {
        const int64_t off = (r + static_cast<int64_t>(u) * by) * g.cv + cv;
        xs[u] = xv[off];
        if (res != nullptr) {
          rs[u] = rv[off];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < cnt) {
        P o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          o.v[k] = forward_value<scalar_t, acc_t>(a[k], xs[u].v[k], res,
                                                  res != nullptr ? rs[u].v[k] : scalar_t(0), act);
        }
        ov[(r + static_cast<int64_t>(u) * by) * g.cv + cv] = o;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Launcher and ops
// ---------------------------------------------------------------------------------------

// The BN forward kernels (NHWC or NCHW, widest aligned vector) over x (+ residual) -> out;
// shared by bn_act_forward and bias_act.
template <typename scalar_t, typename acc_t>
void launch_bn_forward(const scalar_t* xp, const scalar_t* rp, scalar_t* op,
                       const BnParams<acc_t>& p, const ActArg<acc_t>& act, bool channels_last,
                       int64_t N, int64_t C, int64_t HW, c10::DeviceIndex device,
                       cudaStream_t stream) {
  const int vec = pick_vec<scalar_t>(channels_last ? C : HW, {xp, rp, op});
  with_vec<scalar_t>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    if (channels_last) {
      const auto kernel = bn_fwd_nhwc_kernel<scalar_t, VEC>;
      const Plan plan = plan_for(kernel, N, C, HW, true, VEC, device);
      kernel<<<plan.grid, plan.block, 0, stream>>>(xp, rp, op, p, act, plan.nhwc);
    } else {
      const auto kernel = bn_fwd_nchw_kernel<scalar_t, VEC>;
      const Plan plan = plan_for(kernel, N, C, HW, false, VEC, device);
      kernel<<<plan.grid, plan.block, 0, stream>>>(xp, rp, op, p, act, plan.nchw);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor bn_act_forward_cuda(const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& var, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, double eps, int64_t act,
                               double act_param) {
  check_act(act);
  check_bn_forward_args(input, mean, var, weight, bias, residual);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = bn_memory_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(fmt));
  if (out.numel() == 0) {
    return out;
  }
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const int64_t HW = input.size(2) * input.size(3);
  check_channels(C);
  const at::ScalarType acc = acc_dtype(input);
  const at::Tensor x = bn_in_format(input, fmt);
  const at::Tensor r = present(residual) ? bn_in_format(*residual, fmt) : at::Tensor();
  const at::Tensor mean_a = per_channel_acc(mean, acc);
  const at::Tensor var_a = per_channel_acc(var, acc);
  const at::Tensor w_a = optional_per_channel_acc(weight, acc);
  const at::Tensor b_a = optional_per_channel_acc(bias, acc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = input.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnParams<acc_t> p{mean_a.const_data_ptr<acc_t>(), var_a.const_data_ptr<acc_t>(),
                            data_or_null<acc_t>(w_a), data_or_null<acc_t>(b_a),
                            static_cast<acc_t>(eps)};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = data_or_null<scalar_t>(r);
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    launch_bn_forward<scalar_t, acc_t>(xp, rp, op, p, make_act_arg<acc_t>(act, act_param),
                                       channels_last, N, C, HW, device, stream);
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// bias_act: the eval-mode epilogue of a conv with BN folded into it,
// out = act(x + bias [+ residual]). It runs the forward kernels with mean, var and weight
// absent: xhat = (x - 0)*1 = x and y = fma(x, 1, bias) = x + bias, one rounding, so the
// result is the composition in acc_t rounded once. One pass: reads x (+ residual), writes
// out (which may be x itself: every element is read, then written, by the same thread).
// ---------------------------------------------------------------------------------------

void bias_act_launch(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, int64_t act, double act_param,
                     const at::Tensor& out, at::MemoryFormat fmt) {
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  const int64_t HW = x.size(2) * x.size(3);
  check_channels(C);
  const at::Tensor r = present(residual) ? bn_in_format(*residual, fmt) : at::Tensor();
  const at::Tensor b_a = optional_per_channel_acc(bias, acc_dtype(x));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = x.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnParams<acc_t> p{nullptr, nullptr, nullptr, data_or_null<acc_t>(b_a), acc_t(0)};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = data_or_null<scalar_t>(r);
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    launch_bn_forward<scalar_t, acc_t>(xp, rp, op, p, make_act_arg<acc_t>(act, act_param),
                                       channels_last, N, C, HW, device, stream);
  });
}

at::Tensor bias_act_cuda(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, int64_t act,
                         double act_param) {
  check_act(act);
  check_bias_act_args(input, bias, residual);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = bn_memory_format(input);
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(fmt));
  if (out.numel() == 0) {
    return out;
  }
  bias_act_launch(bn_in_format(input, fmt), bias, residual, act, act_param, out, fmt);
  return out;
}

void bias_act_inplace_cuda(at::Tensor& input, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, int64_t act,
                           double act_param) {
  check_act(act);
  check_bias_act_inplace_args(input, bias, residual);
  if (input.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(input.device());
  // Dense in NCHW or channels_last (checked): input is already in its bn layout.
  bias_act_launch(input, bias, residual, act, act_param, input, bn_memory_format(input));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_act_forward", &bn_act_forward_cuda);
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_", &bias_act_inplace_cuda);
}

}  // namespace resnet_fused
