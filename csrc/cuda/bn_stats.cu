// bn_stats on CUDA: per-channel batch mean and biased variance of the BatchNorm ->
// (residual add) -> ReLU decomposition in resnet_fused/reference.py (which defines the
// maths), and the running-statistics update. Two kernels: per-block Welford partials
// (NCHW or NHWC, planned by bn_launch.cuh) and a per-channel merge. The statistics maths
// (robust per-thread folds, Chan merges in double, deterministic order) is in
// bn_stats_math.cuh. Traffic: the input is read once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common.h"
#include "cuda/bn_launch.cuh"
#include "cuda/bn_stats_math.cuh"

namespace resnet_fused {
namespace {

// ---------------------------------------------------------------------------------------
// 1. Statistics: per-block Welford partials, then a per-channel merge
// ---------------------------------------------------------------------------------------

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_stats_nchw_kernel(const scalar_t* __restrict__ x, double* __restrict__ pmean,
                         double* __restrict__ pm2, const NchwGeom g) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  constexpr int U = items_per_iter<scalar_t, VEC>();
  constexpr int G = U * VEC;
  const int64_t c = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t begin = s * g.chunk;
  const int64_t end = min64(g.total, begin + g.chunk);
  const P* xv = reinterpret_cast<const P*>(x);

  int64_t n = 0;
  ThreadStats<acc_t> ts;
  int64_t j = begin + threadIdx.x;
  if (j < end) {
    NchwCursor cur;
    cur.init(g, c, j);
    for (; j < end; j += static_cast<int64_t>(kThreads) * U) {
      const int cnt = valid_items<U>(j, end, kThreads);
      P v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < cnt) {
          v[u] = xv[cur.off];
        }
        cur.advance(g);
      }
      if (n == 0) {
        ts.start(static_cast<acc_t>(v[0].v[0]));  // cnt >= 1
      }
      acc_t d[G];
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          d[u * VEC + k] = u < cnt ? ts.offset(static_cast<acc_t>(v[u].v[k])) : acc_t(0);
        }
      }
      const int gcnt = cnt * VEC;
      const int64_t nn = n + gcnt;
      const acc_t inv_cnt = cnt == U ? acc_t(1) / acc_t(G) : acc_t(1) / static_cast<acc_t>(gcnt);
      const acc_t ratio = static_cast<acc_t>(gcnt) / static_cast<acc_t>(nn);
      ts.add_group(d, gcnt, inv_cnt, ratio, static_cast<acc_t>(n) * ratio);
      n = nn;
    }
  }
  // Threads, warps and blocks merge in double.
  double mean = ts.mean();
  double m2 = static_cast<double>(ts.m2);
  block_welford(n, mean, m2);
  if (threadIdx.x == 0) {
    pmean[c * g.splits + s] = mean;
    pm2[c * g.splits + s] = m2;
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_stats_nhwc_kernel(const scalar_t* __restrict__ x, double* __restrict__ pmean,
                         double* __restrict__ pm2, const NhwcGeom g) {
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

  int64_t n = 0;
  ThreadStats<acc_t> ts[VEC];
  if (cv < g.cv) {
    const P* xv = reinterpret_cast<const P*>(x);
    const int64_t step = static_cast<int64_t>(by) * U;
    for (int64_t r = begin + ty; r < end; r += step) {
      const int cnt = valid_items<U>(r, end, by);
      P v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < cnt) {
          v[u] = xv[(r + static_cast<int64_t>(u) * by) * g.cv + cv];
        }
      }
      const int64_t nn = n + cnt;
      const acc_t inv_cnt = cnt == U ? acc_t(1) / acc_t(U) : acc_t(1) / static_cast<acc_t>(cnt);
      const acc_t ratio = static_cast<acc_t>(cnt) / static_cast<acc_t>(nn);
      const acc_t n_ratio = static_cast<acc_t>(n) * ratio;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (n == 0) {
          ts[k].start(static_cast<acc_t>(v[0].v[k]));  // cnt >= 1
        }
        acc_t d[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          d[u] = u < cnt ? ts[k].offset(static_cast<acc_t>(v[u].v[k])) : acc_t(0);
        }
        ts[k].add_group(d, cnt, inv_cnt, ratio, n_ratio);
      }
      n = nn;
    }
  }

  // Threads, warps and blocks merge in double.
  double mean[VEC];
  double m2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    mean[k] = ts[k].mean();
    m2[k] = static_cast<double>(ts[k].m2);
  }
  // Rows within a warp: lanes l and l + offset (offset a multiple of bx) hold the same
  // channels. After this, lanes < bx hold their warp's merge for column tx = lane.
  // (Channel by channel, to keep few values live.)
  for (int offset = 16; offset >= bx; offset >>= 1) {
    const int64_t nb = shfl_down(n, offset);
    const int64_t nn = n + nb;
    const double ratio = nb > 0 ? static_cast<double>(nb) / static_cast<double>(nn) : 0.0;
    const double n_ratio = static_cast<double>(n) * ratio;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const double mb = shfl_down(mean[k], offset);
      const double m2b = shfl_down(m2[k], offset);
      if (nb > 0) {
        if (n == 0) {
          mean[k] = mb;
          m2[k] = m2b;
        } else {
          const double delta = mb - mean[k];
          m2[k] = m2[k] + m2b + delta * delta * n_ratio;
          mean[k] = mean[k] + delta * ratio;
        }
      }
    }
    n = nn;
  }
  __shared__ long long s_n[kWarps][32];
  __shared__ double s_mean[kWarps][32][VEC];
  __shared__ double s_m2[kWarps][32][VEC];
  const int lane = tid & 31;
  const int warp = tid >> 5;
  if (lane < bx) {
    s_n[warp][lane] = n;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s_mean[warp][lane][k] = mean[k];
      s_m2[warp][lane][k] = m2[k];
    }
  }
  __syncthreads();
  if (tid < bx * VEC) {
    const int col = tid / VEC;
    const int k = tid % VEC;
    int64_t fn = 0;
    double fmean = 0.0;
    double fm2 = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      welford_merge(fn, fmean, fm2, static_cast<int64_t>(s_n[w][col]), s_mean[w][col][k],
                    s_m2[w][col][k]);
    }
    const int64_t cvf = static_cast<int64_t>(blockIdx.x) * bx + col;
    if (cvf < g.cv) {
      const int64_t c = cvf * VEC + k;
      pmean[c * g.splits + s] = fmean;
      pm2[c * g.splits + s] = fm2;
    }
  }
}

// One block per channel: merges the channel's `splits` partials (partial s holds
// min(m, (s+1)*chunk_values) - s*chunk_values values) in a fixed order, in double, writes
// mean and biased var (acc dtype), and updates the running statistics (acc dtype,
// contiguous) when given. splits == 0 (empty channel): mean = var = NaN.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bn_stats_finalize_kernel(const double* __restrict__ pmean, const double* __restrict__ pm2,
                             int64_t splits, int64_t chunk_values, int64_t m,
                             acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out,
                             acc_t* __restrict__ running_mean, acc_t* __restrict__ running_var,
                             acc_t keep, acc_t mean_factor, acc_t var_factor, acc_t nan) {
  const int64_t c = blockIdx.x;
  int64_t n = 0;
  double mean = 0.0;
  double m2 = 0.0;
  for (int64_t s = threadIdx.x; s < splits; s += kThreads) {
    const int64_t lo = s * chunk_values;
    const int64_t cnt = min64(m, lo + chunk_values) - lo;
    welford_merge(n, mean, m2, cnt, pmean[c * splits + s], pm2[c * splits + s]);
  }
  block_welford(n, mean, m2);
  if (threadIdx.x == 0) {
    acc_t mu = nan;
    acc_t var = nan;
    if (n > 0) {
      mu = static_cast<acc_t>(mean);
      var = static_cast<acc_t>(m2 / static_cast<double>(n));
    }
    mean_out[c] = mu;
    var_out[c] = var;
    if (running_mean != nullptr) {
      running_mean[c] = running_mean[c] * keep + mu * mean_factor;
    }
    if (running_var != nullptr) {
      running_var[c] = running_var[c] * keep + var * var_factor;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Op
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input,
                                                 const std::optional<at::Tensor>& running_mean,
                                                 const std::optional<at::Tensor>& running_var,
                                                 double momentum) {
  check_bn_stats_args(input, running_mean, running_var);
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
  at::Tensor mean = at::empty({C}, acc_opts);
  at::Tensor var = at::empty({C}, acc_opts);
  if (C == 0) {
    return {mean, var};
  }
  const at::Tensor x = bn_in_format(input, fmt);
  const at::Tensor rm = optional_per_channel_acc(running_mean, acc);
  const at::Tensor rv = optional_per_channel_acc(running_var, acc);
  // The reference's scalars: (1 - momentum), momentum, momentum * m / (m - 1), in double.
  const double keep = 1.0 - momentum;
  const double var_factor = momentum * static_cast<double>(m) / static_cast<double>(m - 1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = input.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int64_t splits = 0;
    int64_t chunk_values = 0;
    at::Tensor partials;
    if (m > 0) {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const int vec = pick_vec<scalar_t>(channels_last ? C : HW, {xp});
      double* pmean = nullptr;
      double* pm2 = nullptr;
      // Partials (double) for the plan's splits: [mean | m2], each [C][splits].
      const auto alloc_partials = [&](const Plan& plan) {
        splits = plan.splits;
        chunk_values = plan.chunk_values;
        partials = at::empty({2, C * splits}, input.options().dtype(at::kDouble));
        pmean = partials.mutable_data_ptr<double>();
        pm2 = pmean + C * splits;
      };
      with_vec<scalar_t>(vec, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        if (channels_last) {
          const auto kernel = bn_stats_nhwc_kernel<scalar_t, VEC>;
          const Plan plan = plan_for(kernel, N, C, HW, true, VEC, device);
          alloc_partials(plan);
          kernel<<<plan.grid, plan.block, 0, stream>>>(xp, pmean, pm2, plan.nhwc);
        } else {
          const auto kernel = bn_stats_nchw_kernel<scalar_t, VEC>;
          const Plan plan = plan_for(kernel, N, C, HW, false, VEC, device);
          alloc_partials(plan);
          kernel<<<plan.grid, plan.block, 0, stream>>>(xp, pmean, pm2, plan.nchw);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    const double* pmean = splits > 0 ? partials.const_data_ptr<double>() : nullptr;
    const double* pm2 = splits > 0 ? pmean + C * splits : nullptr;
    bn_stats_finalize_kernel<acc_t><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        pmean, pm2, splits, chunk_values, m, mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>(), mutable_data_or_null<acc_t>(rm),
        mutable_data_or_null<acc_t>(rv), static_cast<acc_t>(keep), static_cast<acc_t>(momentum),
        static_cast<acc_t>(var_factor), std::numeric_limits<acc_t>::quiet_NaN());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Running statistics in another dtype or layout were updated in an acc copy.
  if (rm.defined() && !rm.is_same(*running_mean)) {
    running_mean->copy_(rm);
  }
  if (rv.defined() && !rv.is_same(*running_var)) {
    running_var->copy_(rv);
  }
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
}

}  // namespace resnet_fused
