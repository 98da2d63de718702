// Device maths shared by the CUDA BatchNorm-family kernels: accumulate-type arithmetic
// (fma, inverse std, rounded ops that are never contracted), the per-channel affine
// (BnParams -> ChannelAffine: xhat and y = xhat*w + b, as forward and backward both
// compute them), the activation and its derivative (act.h, with the ReLU mask rule),
// Welford / Chan merges and the block reductions.
//
// Reductions are deterministic: no atomics. Each block reduces its range in a fixed order
// (per-thread sequential, warp shuffles, shared memory across warps) and writes one
// partial per channel to a [C][splits] buffer; a second kernel (one block per channel)
// merges the partials in a fixed order and writes the per-channel results.
//
// Statistics are numerically robust: each thread folds U*VEC values at a time into its
// running (count, mean, M2) by a two-pass over registers relative to the running mean,
// then Chan's merge, keeping its mean as a compensated (hi + lo) pair; threads, warps,
// blocks and partials are combined with Chan's merge in double (partials are double).
// Never sum(x^2) - sum(x)^2/m. Arithmetic is in at::opmath_type (fp32; fp64 for fp64 input),
// results are rounded once to the input dtype on store.
#pragma once

#include <cstdint>

#include "act.h"
#include "cuda/bn_launch.cuh"

namespace resnet_fused {

// ---------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float fma_acc(float a, float b, float c) {
  return __fmaf_rn(a, b, c);
}
__device__ __forceinline__ double fma_acc(double a, double b, double c) {
  return __fma_rn(a, b, c);
}
__device__ __forceinline__ float inv_std(float var, float eps) {
  return 1.0f / sqrtf(var + eps);
}
__device__ __forceinline__ double inv_std(double var, double eps) {
  return 1.0 / sqrt(var + eps);
}

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int offset) {
  return __shfl_down_sync(0xffffffffu, v, offset);
}
__device__ __forceinline__ int64_t shfl_down(int64_t v, int offset) {
  return static_cast<int64_t>(
      __shfl_down_sync(0xffffffffu, static_cast<long long>(v), offset));
}

// Per-channel tensors (contiguous, acc dtype); weight/bias may be null (1 / 0). mean and
// var may be null in the forward kernels only (mean 0, invstd 1: xhat = x exactly), which
// is how bias_act runs them.
template <typename acc_t>
struct BnParams {
  const acc_t* mean;
  const acc_t* var;
  const acc_t* weight;
  const acc_t* bias;
  acc_t eps;
};

template <typename acc_t>
struct ChannelAffine {
  acc_t mean, invstd, w, b;
  __device__ __forceinline__ acc_t xhat(acc_t x) const { return (x - mean) * invstd; }
  // y = xhat*w + b, one rounding. Forward and the backward mask recompute share it, so
  // the recomputed ReLU mask is bit-consistent with the forward's output.
  __device__ __forceinline__ acc_t y(acc_t xh) const { return fma_acc(xh, w, b); }
};

template <typename acc_t>
__device__ __forceinline__ ChannelAffine<acc_t> load_affine(const BnParams<acc_t>& p,
                                                            int64_t c) {
  ChannelAffine<acc_t> a;
  a.mean = p.mean != nullptr ? p.mean[c] : acc_t(0);
  a.invstd = p.var != nullptr ? inv_std(p.var[c], p.eps) : acc_t(1);
  a.w = p.weight != nullptr ? p.weight[c] : acc_t(1);
  a.b = p.bias != nullptr ? p.bias[c] : acc_t(0);
  return a;
}

// True where the ReLU of y, stored in scalar_t, has zero gradient (torch's
// threshold_backward: out <= 0; NaN lets the gradient through).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool relu_blocks(acc_t y) {
  return static_cast<acc_t>(static_cast<scalar_t>(y)) <= acc_t(0);
}

// The activation of a kernel (act.h: an ActKind code, checked on the host, and
// LeakyReLU's slope in acc_t). The kind is uniform across the grid, so the switches below
// do not diverge; identity and ReLU are tested first and stay as cheap as a bool flag.
template <typename acc_t>
struct ActArg {
  int kind;
  acc_t param;
};

template <typename acc_t>
ActArg<acc_t> make_act_arg(int64_t act, double act_param) {
  return ActArg<acc_t>{static_cast<int>(act), static_cast<acc_t>(act_param)};
}

// act(y) in acc_t.
template <typename acc_t>
__device__ __forceinline__ acc_t act_forward(const ActArg<acc_t>& act, acc_t y) {
  if (act.kind == kActIdentity) {
    return y;
  }
  if (act.kind == kActReLU) {
    return y < acc_t(0) ? acc_t(0) : y;  // NaN propagates
  }
  return act_apply<acc_t>(act.kind, act.param, y);
}

// g * act'(y) at the pre-activation y recomputed in acc_t from the input. ReLU masks by
// relu_blocks (y rounded to scalar_t, as the forward stored it), so the recomputed mask
// agrees with the stored output; the others take the derivative at y itself.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t act_grad_pre(const ActArg<acc_t>& act, acc_t y, acc_t g) {
  if (act.kind == kActIdentity) {
    return g;
  }
  if (act.kind == kActReLU) {
    return relu_blocks<scalar_t, acc_t>(y) ? acc_t(0) : g;
  }
  return act_grad_from_pre<acc_t>(act.kind, act.param, y, g);
}

// g * act'(.) from the stored output o (act_from_output holds, checked on the host).
template <typename acc_t>
__device__ __forceinline__ acc_t act_grad_out(const ActArg<acc_t>& act, acc_t o, acc_t g) {
  if (act.kind == kActReLU) {
    return o <= acc_t(0) ? acc_t(0) : g;
  }
  return act_grad_from_out<acc_t>(act.kind, act.param, o, g);
}

// Chan's merge of (nb, mean_b, m2_b) into (n, mean, m2). Empty sides are skipped, so
// count-0 states (idle threads, empty channels) are harmless.
template <typename acc_t>
__device__ __forceinline__ void welford_merge(int64_t& n, acc_t& mean, acc_t& m2, int64_t nb,
                                              acc_t mean_b, acc_t m2_b) {
  if (nb == 0) {
    return;
  }
  if (n == 0) {
    n = nb;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const int64_t nn = n + nb;
  const acc_t delta = mean_b - mean;
  const acc_t ratio = static_cast<acc_t>(nb) / static_cast<acc_t>(nn);
  m2 = m2 + m2_b + delta * delta * static_cast<acc_t>(n) * ratio;
  mean = mean + delta * ratio;
  n = nn;
}

// Rounded add/sub/mul that the compiler may not contract into an FMA or reassociate.
__device__ __forceinline__ float add_rn(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ double add_rn(double a, double b) {
  return __dadd_rn(a, b);
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  return __fsub_rn(a, b);
}
__device__ __forceinline__ double sub_rn(double a, double b) {
  return __dsub_rn(a, b);
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}

// Per-thread running statistics of one channel. The mean is kept as an unevaluated sum
// hi + lo (|lo| <= ulp(hi)/2): with |mean| >> std (e.g. 1e4 + N(0,1)) a plain fp32 mean
// would lose the small late updates and limit the variance to ~ulp(mean)/std accuracy.
template <typename acc_t>
struct ThreadStats {
  acc_t hi = acc_t(0);
  acc_t lo = acc_t(0);
  acc_t m2 = acc_t(0);

  // Before the first group: centre on one of its values, so that the first group's sums
  // are of deviations (O(std)) rather than of raw values (O(|mean|)).
  __device__ __forceinline__ void start(acc_t x0) {
    hi = x0;
    lo = acc_t(0);
  }

  // x - mean, for the next group.
  __device__ __forceinline__ acc_t offset(acc_t x) const { return sub_rn(sub_rn(x, hi), lo); }

  // Folds a group of cnt > 0 values in: d[i] = offset(x_i) for i < cnt (taken before this
  // call). The group's mean and M2 come two-pass from registers relative to the running
  // mean, then Chan's merge: ratio = cnt / (n + cnt), n_ratio = n * ratio.
  template <int G>
  __device__ __forceinline__ void add_group(const acc_t (&d)[G], int cnt, acc_t inv_cnt,
                                            acc_t ratio, acc_t n_ratio) {
    acc_t sum = acc_t(0);
#pragma unroll
    for (int i = 0; i < G; ++i) {
      if (i < cnt) {
        sum += d[i];
      }
    }
    const acc_t ld = sum * inv_cnt;  // group mean - running mean
    acc_t lm2 = acc_t(0);
#pragma unroll
    for (int i = 0; i < G; ++i) {
      if (i < cnt) {
        const acc_t e = d[i] - ld;
        lm2 += e * e;
      }
    }
    m2 = m2 + lm2 + ld * ld * n_ratio;
    // hi + lo += ld * ratio: TwoSum, then Fast2Sum renormalisation.
    const acc_t inc = mul_rn(ld, ratio);
    const acc_t s = add_rn(hi, inc);
    const acc_t bb = sub_rn(s, hi);
    const acc_t err = add_rn(sub_rn(hi, sub_rn(s, bb)), sub_rn(inc, bb));
    const acc_t l = add_rn(lo, err);
    hi = add_rn(s, l);
    lo = sub_rn(l, sub_rn(hi, s));
  }

  __device__ __forceinline__ double mean() const {
    return static_cast<double>(hi) + static_cast<double>(lo);
  }
};

// Block-wide Chan merge (1-D blocks of kThreads); the result is valid in thread 0.
// Called at most once per kernel (static shared memory).
template <typename acc_t>
__device__ __forceinline__ void block_welford(int64_t& n, acc_t& mean, acc_t& m2) {
  __shared__ long long s_n[kWarps];
  __shared__ acc_t s_mean[kWarps];
  __shared__ acc_t s_m2[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int64_t nb = shfl_down(n, offset);
    const acc_t mb = shfl_down(mean, offset);
    const acc_t m2b = shfl_down(m2, offset);
    welford_merge(n, mean, m2, nb, mb, m2b);
  }
  if (lane == 0) {
    s_n[warp] = n;
    s_mean[warp] = mean;
    s_m2[warp] = m2;
  }
  __syncthreads();
  if (warp == 0) {
    n = lane < kWarps ? static_cast<int64_t>(s_n[lane]) : 0;
    mean = lane < kWarps ? s_mean[lane] : acc_t(0);
    m2 = lane < kWarps ? s_m2[lane] : acc_t(0);
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      const int64_t nb = shfl_down(n, offset);
      const acc_t mb = shfl_down(mean, offset);
      const acc_t m2b = shfl_down(m2, offset);
      welford_merge(n, mean, m2, nb, mb, m2b);
    }
  }
}

// Block-wide sums of two values (1-D blocks of kThreads), fixed order; valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t s_a[kWarps];
  __shared__ acc_t s_b[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += shfl_down(a, offset);
    b += shfl_down(b, offset);
  }
  if (lane == 0) {
    s_a[warp] = a;
    s_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? s_a[lane] : acc_t(0);
    b = lane < kWarps ? s_b[lane] : acc_t(0);
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      a += shfl_down(a, offset);
      b += shfl_down(b, offset);
    }
  }
}

}  // namespace resnet_fused
