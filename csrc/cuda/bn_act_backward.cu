// bn_act_backward_reduce and bn_act_backward_elemt on CUDA: the backward of the
// BatchNorm -> (residual add) -> activation decomposition in resnet_fused/reference.py
// (which defines the maths). The reduction computes sum g and sum g*xhat per channel
// (g = grad_out * act'(.), optionally written out) as deterministic per-block partials and
// a per-channel sum; the elementwise pass writes grad_input. Geometry and plans:
// bn_launch.cuh; per-channel affine, activation derivative (act.h, a runtime switch on the
// uniform act code) and block sums: bn_stats_math.cuh.
// Traffic: reduce reads grad_out and input (+ out or residual) and optionally writes the masked
// gradient; elemt reads grad and input and writes grad_input.
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
#include <tuple>

#include "common.h"
#include "cuda/bn_launch.cuh"
#include "cuda/bn_stats_math.cuh"

namespace resnet_fused {
namespace {

// How the backward passes apply the activation's derivative to the gradient.
constexpr int kMaskNone = 0;       // identity: g = grad
constexpr int kMaskFromOut = 1;    // g = act_grad_from_out(out, grad) (ReLU: 0 where out <= 0)
constexpr int kMaskFromInput = 2;  // g = act_grad_from_pre(BN(x), grad) (ReLU: 0 where
                                   // round(BN(x)) <= 0, see act_grad_pre)
constexpr int kMaskFromInputResidual = 3;  // g = act_grad_from_pre(BN(x) + r, grad), the
                                           // residual r read where `out` is otherwise

// Whether the reduction reads its second stream `out` (the output, or the residual).
__host__ __device__ __forceinline__ bool reads_second_stream(int mask_mode) {
  return mask_mode == kMaskFromOut || mask_mode == kMaskFromInputResidual;
}

// ---------------------------------------------------------------------------------------
// 3. Backward reduction: sum g, sum g*xhat (g = grad_out * act'(.)), and g
// ---------------------------------------------------------------------------------------

// Gradient at the pre-activation of one element; sets xhat. `o`: the output or the residual
// (see the mask modes), else 0.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_grad_value(const ChannelAffine<acc_t>& a, scalar_t go,
                                                   scalar_t x, scalar_t o, int mask_mode,
                                                   const ActArg<acc_t>& act, acc_t& xhat) {
  xhat = a.xhat(static_cast<acc_t>(x));
  const acc_t g = static_cast<acc_t>(go);
  if (mask_mode == kMaskFromOut) {
    return act_grad_out(act, static_cast<acc_t>(o), g);
  }
  if (mask_mode == kMaskFromInput) {
    return act_grad_pre<scalar_t, acc_t>(act, a.y(xhat), g);
  }
  if (mask_mode == kMaskFromInputResidual) {  // (as forward_value: y + r in acc_t)
    return act_grad_pre<scalar_t, acc_t>(act, a.y(xhat) + static_cast<acc_t>(o), g);
  }
  return g;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_reduce_nchw_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ out, scalar_t* __restrict__ masked,
                              const BnParams<at::opmath_type<scalar_t>> p, const int mask_mode,
                              const ActArg<at::opmath_type<scalar_t>> act,
                              at::opmath_type<scalar_t>* __restrict__ psum,
                              at::opmath_type<scalar_t>* __restrict__ psum_xhat, const NchwGeom g) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  constexpr int U = items_per_iter<scalar_t, VEC>();
  const int64_t c = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t begin = s * g.chunk;
  const int64_t end = min64(g.total, begin + g.chunk);
  acc_t sum_dy = acc_t(0);
  acc_t sum_dy_xhat = acc_t(0);
  int64_t j = begin + threadIdx.x;
  if (j < end) {
    const ChannelAffine<acc_t> a = load_affine(p, c);
    const P* gv = reinterpret_cast<const P*>(grad_out);
    const P* xv = reinterpret_cast<const P*>(x);
    const P* ovp = reinterpret_cast<const P*>(out);
    P* mv = reinterpret_cast<P*>(masked);
    const bool read_out = reads_second_stream(mask_mode);
    NchwCursor cur;
    cur.init(g, c, j);
    for (; j < end; j += static_cast<int64_t>(kThreads) * U) {
      const int cnt = valid_items<U>(j, end, kThreads);
      int64_t off[U];
      P gs[U];
      P xs[U];
      P os[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        off[u] = cur.off;
        if (u < cnt) {
          gs[u] = gv[off[u]];
          xs[u] = xv[off[u]];
          if (read_out) {
            os[u] = ovp[off[u]];
          }
        }
        cur.advance(g);
      }
      // This iteration's U*VEC values are summed first, then added to the running sums
      // (shorter sequential chains).
      acc_t it_dy = acc_t(0);
      acc_t it_dy_xhat = acc_t(0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < cnt) {
          P mg;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            acc_t xhat;
            const acc_t gk = masked_grad_value<scalar_t, acc_t>(
                a, gs[u].v[k], xs[u].v[k], read_out ? os[u].v[k] : scalar_t(0), mask_mode, act,
                xhat);
            it_dy += gk;
            it_dy_xhat += gk * xhat;
            mg.v[k] = static_cast<scalar_t>(gk);
          }
          if (masked != nullptr) {
            mv[off[u]] = mg;
          }
        }
      }
      sum_dy += it_dy;
      sum_dy_xhat += it_dy_xhat;
    }
  }
  block_sum2(sum_dy, sum_dy_xhat);
  if (threadIdx.x == 0) {
    psum[c * g.splits + s] = sum_dy;
    psum_xhat[c * g.splits + s] = sum_dy_xhat;
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_reduce_nhwc_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ out, scalar_t* __restrict__ masked,
                              const BnParams<at::opmath_type<scalar_t>> p, const int mask_mode,
                              const ActArg<at::opmath_type<scalar_t>> act,
                              at::opmath_type<scalar_t>* __restrict__ psum,
                              at::opmath_type<scalar_t>* __restrict__ psum_xhat, const NhwcGeom g) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  constexpr int U = items_per_iter<scalar_t, VEC>();
  const int bx = blockDim.x;
  const int by = blockDim.y;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * bx + tx;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * bx + tx;
  const int64_t s = blockIdx.y;
  const int64_t begin = s * g.chunk;
  const int64_t end = min64(g.rows, begin + g.chunk);

  acc_t sum_dy[VEC];
  acc_t sum_dy_xhat[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sum_dy[k] = acc_t(0);
    sum_dy_xhat[k] = acc_t(0);
  }
  if (cv < g.cv) {
    ChannelAffine<acc_t> a[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      a[k] = load_affine(p, cv * VEC + k);
    }
    const P* gv = reinterpret_cast<const P*>(grad_out);
    const P* xv = reinterpret_cast<const P*>(x);
    const P* ovp = reinterpret_cast<const P*>(out);
    P* mv = reinterpret_cast<P*>(masked);
    const bool read_out = reads_second_stream(mask_mode);
    const int64_t step = static_cast<int64_t>(by) * U;
    for (int64_t r = begin + ty; r < end; r += step) {
      const int cnt = valid_items<U>(r, end, by);
      P gs[U];
      P xs[U];
      P os[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < cnt) {
          const int64_t off = (r + static_cast<int64_t>(u) * by) * g.cv + cv;
          gs[u] = gv[off];
          xs[u] = xv[off];
          if (read_out) {
            os[u] = ovp[off];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < cnt) {
          P mg;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            acc_t xhat;
            const acc_t gk = masked_grad_value<scalar_t, acc_t>(
                a[k], gs[u].v[k], xs[u].v[k], read_out ? os[u].v[k] : scalar_t(0), mask_mode,
                act, xhat);
            sum_dy[k] += gk;
            sum_dy_xhat[k] += gk * xhat;
            mg.v[k] = static_cast<scalar_t>(gk);
          }
          if (masked != nullptr) {
            mv[(r + static_cast<int64_t>(u) * by) * g.cv + cv] = mg;
          }
        }
      }
    }
  }

  for (int offset = 16; offset >= bx; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      sum_dy[k] += shfl_down(sum_dy[k], offset);
      sum_dy_xhat[k] += shfl_down(sum_dy_xhat[k], offset);
    }
  }
  __shared__ acc_t s_a[kWarps][32][VEC];
  __shared__ acc_t s_b[kWarps][32][VEC];
  const int lane = tid & 31;
  const int warp = tid >> 5;
  if (lane < bx) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s_a[warp][lane][k] = sum_dy[k];
      s_b[warp][lane][k] = sum_dy_xhat[k];
    }
  }
  __syncthreads();
  if (tid < bx * VEC) {
    const int col = tid / VEC;
    const int k = tid % VEC;
    acc_t fa = acc_t(0);
    acc_t fb = acc_t(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      fa += s_a[w][col][k];
      fb += s_b[w][col][k];
    }
    const int64_t cvf = static_cast<int64_t>(blockIdx.x) * bx + col;
    if (cvf < g.cv) {
      const int64_t c = cvf * VEC + k;
      psum[c * g.splits + s] = fa;
      psum_xhat[c * g.splits + s] = fb;
    }
  }
}

// One block per channel: sums the channel's `splits` partials in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_sums_finalize_kernel(const acc_t* __restrict__ psum, const acc_t* __restrict__ psum_xhat,
                            int64_t splits, acc_t* __restrict__ sum_dy,
                            acc_t* __restrict__ sum_dy_xhat) {
  const int64_t c = blockIdx.x;
  acc_t a = acc_t(0);
  acc_t b = acc_t(0);
  for (int64_t s = threadIdx.x; s < splits; s += kThreads) {
    a += psum[c * splits + s];
    b += psum_xhat[c * splits + s];
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    sum_dy[c] = a;
    sum_dy_xhat[c] = b;
  }
}

// ---------------------------------------------------------------------------------------
// 4. Backward elementwise: grad_input
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct ElemtParams {
  const acc_t* sum_dy;       // null unless batch_stats
  const acc_t* sum_dy_xhat;  // null unless batch_stats
  acc_t m;                   // values per channel
  ActArg<acc_t> act;         // applied to grad at BN(x) (identity: grad is final)
};

// Per-channel coefficients of grad_input = scale * (g - mean_dy - xhat * mean_dy_xhat).
template <typename acc_t>
struct ElemtChannel {
  ChannelAffine<acc_t> a;
  acc_t scale, mean_dy, mean_dy_xhat;
};

template <typename acc_t>
__device__ __forceinline__ ElemtChannel<acc_t> load_elemt(const BnParams<acc_t>& p,
                                                          const ElemtParams<acc_t>& e, int64_t c) {
  ElemtChannel<acc_t> ch;
  ch.a = load_affine(p, c);
  ch.scale = p.weight != nullptr ? ch.a.invstd * p.weight[c] : ch.a.invstd;
  ch.mean_dy = e.sum_dy != nullptr ? e.sum_dy[c] / e.m : acc_t(0);
  ch.mean_dy_xhat = e.sum_dy_xhat != nullptr ? e.sum_dy_xhat[c] / e.m : acc_t(0);
  return ch;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t elemt_value(const ElemtChannel<acc_t>& ch, scalar_t grad,
                                                scalar_t x, const ActArg<acc_t>& act,
                                                bool batch_stats) {
  const acc_t xhat = ch.a.xhat(static_cast<acc_t>(x));
  acc_t g = static_cast<acc_t>(grad);
  if (act.kind != kActIdentity) {
    g = act_grad_pre<scalar_t, acc_t>(act, ch.a.y(xhat), g);
  }
  if (batch_stats) {
    g = g - ch.mean_dy - xhat * ch.mean_dy_xhat;
  }
  return static_cast<scalar_t>(g * ch.scale);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_elemt_nchw_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                             scalar_t* __restrict__ grad_input,
                             const BnParams<at::opmath_type<scalar_t>> p,
                             const ElemtParams<at::opmath_type<scalar_t>> e, const NchwGeom g) {
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
  const ElemtChannel<acc_t> ch = load_elemt(p, e, c);
  const bool batch_stats = e.sum_dy != nullptr;
  const P* gv = reinterpret_cast<const P*>(grad);
  const P* xv = reinterpret_cast<const P*>(x);
  P* ov = reinterpret_cast<P*>(grad_input);
  NchwCursor cur;
  cur.init(g, c, j);
  for (; j < end; j += static_cast<int64_t>(kThreads) * U) {
    const int cnt = valid_items<U>(j, end, kThreads);
    int64_t off[U];
    P gs[U];
    P xs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      off[u] = cur.off;
      if (u < cnt) {
        gs[u] = gv[off[u]];
        xs[u] = xv[off[u]];
      }
      cur.advance(g);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < cnt) {
        P o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          o.v[k] = elemt_value<scalar_t, acc_t>(ch, gs[u].v[k], xs[u].v[k], e.act, batch_stats);
        }
        ov[off[u]] = o;
      }
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_elemt_nhwc_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                             scalar_t* __restrict__ grad_input,
                             const BnParams<at::opmath_type<scalar_t>> p,
                             const ElemtParams<at::opmath_type<scalar_t>> e, const NhwcGeom g) {
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
  ElemtChannel<acc_t> ch[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    ch[k] = load_elemt(p, e, cv * VEC + k);
  }
  const bool batch_stats = e.sum_dy != nullptr;
  const P* gv = reinterpret_cast<const P*>(grad);
  const P* xv = reinterpret_cast<const P*>(x);
  P* ov = reinterpret_cast<P*>(grad_input);
  const int64_t step = static_cast<int64_t>(by) * U;
  for (int64_t r = begin + threadIdx.y; r < end; r += step) {
    const int cnt = valid_items<U>(r, end, by);
    P gs[U];
    P xs[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < cnt) {
        const int64_t off = (r + static_cast<int64_t>(u) * by) * g.cv + cv;
        gs[u] = gv[off];
        xs[u] = xv[off];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < cnt) {
        P o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          o.v[k] = elemt_value<scalar_t, acc_t>(ch[k], gs[u].v[k], xs[u].v[k], e.act,
                                                batch_stats);
        }
        ov[(r + static_cast<int64_t>(u) * by) * g.cv + cv] = o;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out, double eps,
    int64_t act, double act_param, bool write_masked_grad,
    const std::optional<at::Tensor>& residual) {
  check_act(act);
  check_bn_backward_reduce_args(grad_out, input, mean, var, weight, bias, out, residual);
  TORCH_CHECK(!present(out) || act_from_output(act, act_param),
              "bn_act_backward_reduce: `out` was given, but the derivative of ", act_name(act),
              " (act_param ", act_param, ") is not a function of its output; pass out=None to "
              "recompute the pre-activation from the input");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = bn_memory_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const int64_t HW = input.size(2) * input.size(3);
  const int64_t m = N * HW;
  check_channels(C);
  const at::ScalarType acc = acc_dtype(input);
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor sum_dy = at::empty({C}, acc_opts);
  at::Tensor sum_dy_xhat = at::empty({C}, acc_opts);
  at::Tensor masked = write_masked_grad
                          ? at::empty(input.sizes(), input.options().memory_format(fmt))
                          : at::empty({0}, input.options());
  if (C == 0) {
    return {sum_dy, sum_dy_xhat, masked};
  }
  const int mask_mode = act == kActIdentity ? kMaskNone
                        : present(out)       ? kMaskFromOut
                        : present(residual)  ? kMaskFromInputResidual
                                             : kMaskFromInput;
  at::Tensor go;
  at::Tensor x;
  at::Tensor o;
  at::Tensor mean_a;
  at::Tensor var_a;
  at::Tensor w_a;
  at::Tensor b_a;
  if (m > 0) {
    go = bn_in_format(grad_out, fmt);
    x = bn_in_format(input, fmt);
    if (mask_mode == kMaskFromOut) {
      o = bn_in_format(*out, fmt);
    } else if (mask_mode == kMaskFromInputResidual) {
      o = bn_in_format(*residual, fmt);
    }
    mean_a = per_channel_acc(mean, acc);
    var_a = per_channel_acc(var, acc);
    if (mask_mode == kMaskFromInput || mask_mode == kMaskFromInputResidual) {
      w_a = optional_per_channel_acc(weight, acc);
      b_a = optional_per_channel_acc(bias, acc);
    }
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = input.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int64_t splits = 0;
    at::Tensor partials;
    if (m > 0) {
      const BnParams<acc_t> p{mean_a.const_data_ptr<acc_t>(), var_a.const_data_ptr<acc_t>(),
                              data_or_null<acc_t>(w_a), data_or_null<acc_t>(b_a),
                              static_cast<acc_t>(eps)};
      const ActArg<acc_t> act_a = make_act_arg<acc_t>(act, act_param);
      const scalar_t* gp = go.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* opp = data_or_null<scalar_t>(o);
      scalar_t* mp = write_masked_grad ? masked.mutable_data_ptr<scalar_t>() : nullptr;
      const int vec = pick_vec<scalar_t>(channels_last ? C : HW, {gp, xp, opp, mp});
      acc_t* ps = nullptr;
      acc_t* psx = nullptr;
      // Partials for the plan's splits: [sum_dy | sum_dy_xhat], each [C][splits].
      const auto alloc_partials = [&](const Plan& plan) {
        splits = plan.splits;
        partials = at::empty({2, C * splits}, acc_opts);
        ps = partials.mutable_data_ptr<acc_t>();
        psx = ps + C * splits;
      };
      with_vec<scalar_t>(vec, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        if (channels_last) {
          const auto kernel = bn_bwd_reduce_nhwc_kernel<scalar_t, VEC>;
          const Plan plan = plan_for(kernel, N, C, HW, true, VEC, device);
          alloc_partials(plan);
          kernel<<<plan.grid, plan.block, 0, stream>>>(gp, xp, opp, mp, p, mask_mode, act_a, ps,
                                                       psx, plan.nhwc);
        } else {
          const auto kernel = bn_bwd_reduce_nchw_kernel<scalar_t, VEC>;
          const Plan plan = plan_for(kernel, N, C, HW, false, VEC, device);
          alloc_partials(plan);
          kernel<<<plan.grid, plan.block, 0, stream>>>(gp, xp, opp, mp, p, mask_mode, act_a, ps,
                                                       psx, plan.nchw);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    const acc_t* ps = splits > 0 ? partials.const_data_ptr<acc_t>() : nullptr;
    const acc_t* psx = splits > 0 ? ps + C * splits : nullptr;
    bn_sums_finalize_kernel<acc_t><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        ps, psx, splits, sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xhat.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xhat, masked};
}

at::Tensor bn_act_backward_elemt_cuda(const at::Tensor& grad, const at::Tensor& input,
                                      const at::Tensor& mean, const at::Tensor& var,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                      double eps, int64_t act, double act_param,
                                      bool batch_stats) {
  check_act(act);
  check_bn_backward_elemt_args(grad, input, mean, var, weight, bias, sum_dy, sum_dy_xhat);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = bn_memory_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(fmt));
  if (grad_input.numel() == 0) {
    return grad_input;
  }
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const int64_t HW = input.size(2) * input.size(3);
  const int64_t m = N * HW;
  check_channels(C);
  const at::ScalarType acc = acc_dtype(input);
  const at::Tensor g = bn_in_format(grad, fmt);
  const at::Tensor x = bn_in_format(input, fmt);
  const at::Tensor mean_a = per_channel_acc(mean, acc);
  const at::Tensor var_a = per_channel_acc(var, acc);
  const at::Tensor w_a = optional_per_channel_acc(weight, acc);
  const at::Tensor b_a =
      act != kActIdentity ? optional_per_channel_acc(bias, acc) : at::Tensor();
  const at::Tensor sdy_a = batch_stats ? per_channel_acc(sum_dy, acc) : at::Tensor();
  const at::Tensor sdyx_a = batch_stats ? per_channel_acc(sum_dy_xhat, acc) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = input.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_act_backward_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnParams<acc_t> p{mean_a.const_data_ptr<acc_t>(), var_a.const_data_ptr<acc_t>(),
                            data_or_null<acc_t>(w_a), data_or_null<acc_t>(b_a),
                            static_cast<acc_t>(eps)};
    const ElemtParams<acc_t> e{data_or_null<acc_t>(sdy_a), data_or_null<acc_t>(sdyx_a),
                               static_cast<acc_t>(m), make_act_arg<acc_t>(act, act_param)};
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = grad_input.mutable_data_ptr<scalar_t>();
    const int vec = pick_vec<scalar_t>(channels_last ? C : HW, {gp, xp, op});
    with_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      if (channels_last) {
        const auto kernel = bn_bwd_elemt_nhwc_kernel<scalar_t, VEC>;
        const Plan plan = plan_for(kernel, N, C, HW, true, VEC, device);
        kernel<<<plan.grid, plan.block, 0, stream>>>(gp, xp, op, p, e, plan.nhwc);
      } else {
        const auto kernel = bn_bwd_elemt_nchw_kernel<scalar_t, VEC>;
        const Plan plan = plan_for(kernel, N, C, HW, false, VEC, device);
        kernel<<<plan.grid, plan.block, 0, stream>>>(gp, xp, op, p, e, plan.nchw);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cuda);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt_cuda);
}

}  // namespace resnet_fused
