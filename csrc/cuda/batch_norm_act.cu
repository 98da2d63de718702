// BatchNorm -> (residual add) -> ReLU on CUDA: the four kernels of the decomposition in
// resnet_fused/reference.py (bn_stats, bn_act_forward, bn_act_backward_reduce,
// bn_act_backward_elemt), which defines the maths.
//
// Layout. Full-size operands are walked in the input's bn layout (common.h:
// bn_memory_format), copied into it first when they are not already:
//  - NCHW: grid (C, splits) of 1-D blocks of kThreads. Block (c, s) owns the s-th
//    contiguous range of channel c's N*HW values, seen as N planes of HW; its threads
//    stride through the range kThreads vectors at a time with an incremental
//    (position in plane, offset) cursor, so there is no division per load.
//  - NHWC: grid (ceil(C / VEC / BX), splits) of (BX, BY) blocks, BX*BY = kThreads, BX a
//    power of two <= 32. Thread column tx owns VEC adjacent channels and walks rows
//    ty, ty + BY, ... of the block's row range: a warp reads whole runs of a row.
//  Loads and stores move VEC elements (16 bytes when the inner extent, HW or C, and every
//  pointer allow it, else 8 bytes, else scalars), U items per thread per iteration for
//  memory-level parallelism. The number of splits comes from the SM count and the
//  kernel's occupancy (make_plan): about one full wave of resident blocks (or whole waves
//  when there are more channel groups than slots), so that even C = 64 with a huge m
//  fills the GPU, while each thread still gets kMinItemsPerThread loads.
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
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

namespace resnet_fused {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Splitting: each thread gets at least kMinItemsPerThread loads; see make_plan.
constexpr int64_t kMinItemsPerThread = 8;
constexpr int64_t kMaxSplits = 65535;  // gridDim.y limit

// How the backward passes mask the gradient by the ReLU.
constexpr int kMaskNone = 0;       // no ReLU: g = grad
constexpr int kMaskFromOut = 1;    // g = 0 where out <= 0
constexpr int kMaskFromInput = 2;  // g = 0 where round(BN(x)) <= 0

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Items (VEC-wide loads) per thread per loop iteration: about 32 bytes in flight per
// operand and thread.
template <typename scalar_t, int VEC>
constexpr int items_per_iter() {
  constexpr int bytes = static_cast<int>(sizeof(scalar_t)) * VEC;
  return bytes >= 16 ? 2 : (bytes >= 8 ? 4 : 8);
}

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

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
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

// ---------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------

// NCHW, in units of VEC-wide vectors. Channel c's j-th vector (j < total) is at
// (j / hw) * plane_stride + c * hw + j % hw.
struct NchwGeom {
  int64_t hw;            // vectors per (n, c) plane: HW / VEC
  int64_t total;         // vectors per channel: N * hw
  int64_t chunk;         // vectors per split
  int64_t splits;        // gridDim.y
  int64_t plane_stride;  // C * hw
  int64_t step_hw;       // kThreads % hw
  int64_t step_off;      // (kThreads / hw) * plane_stride + step_hw
  int64_t wrap_off;      // plane_stride - hw
};

// Walks a channel's vectors kThreads at a time without dividing.
struct NchwCursor {
  int64_t off;  // vector offset in the tensor
  int64_t pos;  // position in the plane, < hw

  __device__ __forceinline__ void init(const NchwGeom& g, int64_t c, int64_t j) {
    const int64_t n = j / g.hw;
    pos = j - n * g.hw;
    off = n * g.plane_stride + c * g.hw + pos;
  }
  // j -> j + kThreads.
  __device__ __forceinline__ void advance(const NchwGeom& g) {
    pos += g.step_hw;
    off += g.step_off;
    if (pos >= g.hw) {
      pos -= g.hw;
      off += g.wrap_off;
    }
  }
};

// NHWC, in units of VEC-wide vectors: row r's channel vector v is at r * cv + v.
struct NhwcGeom {
  int64_t cv;      // vectors per row: C / VEC
  int64_t rows;    // N * H * W
  int64_t chunk;   // rows per split
  int64_t splits;  // gridDim.y
};

// Number of valid items (of at most U, stride `stride`) from position j when the range
// ends at `end` (j < end).
template <int U>
__device__ __forceinline__ int valid_items(int64_t j, int64_t end, int64_t stride) {
  const int64_t rem = end - j;
  return rem >= stride * U ? U : static_cast<int>((rem + stride - 1) / stride);
}

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
// 2. Forward: out = relu((x - mean)*invstd*w + b [+ residual])
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t forward_value(const ChannelAffine<acc_t>& a, scalar_t x,
                                                  const scalar_t* res, scalar_t r, bool relu) {
  acc_t y = a.y(a.xhat(static_cast<acc_t>(x)));
  if (res != nullptr) {
    y += static_cast<acc_t>(r);
  }
  if (relu) {
    y = y < acc_t(0) ? acc_t(0) : y;  // NaN propagates
  }
  return static_cast<scalar_t>(y);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_fwd_nchw_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                       scalar_t* __restrict__ out, const BnParams<at::opmath_type<scalar_t>> p,
                       const bool relu, const NchwGeom g) {
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
                                                  res != nullptr ? rs[u].v[k] : scalar_t(0), relu);
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
                       const bool relu, const NhwcGeom g) {
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
                                                  res != nullptr ? rs[u].v[k] : scalar_t(0), relu);
        }
        ov[(r + static_cast<int64_t>(u) * by) * g.cv + cv] = o;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// 3. Backward reduction: sum g, sum g*xhat (g = grad_out masked by the ReLU), and g
// ---------------------------------------------------------------------------------------

// Masked gradient of one element; sets xhat.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_grad_value(const ChannelAffine<acc_t>& a, scalar_t go,
                                                   scalar_t x, scalar_t o, int mask_mode,
                                                   acc_t& xhat) {
  xhat = a.xhat(static_cast<acc_t>(x));
  acc_t g = static_cast<acc_t>(go);
  if (mask_mode == kMaskFromOut) {
    if (static_cast<acc_t>(o) <= acc_t(0)) {
      g = acc_t(0);
    }
  } else if (mask_mode == kMaskFromInput) {
    if (relu_blocks<scalar_t, acc_t>(a.y(xhat))) {
      g = acc_t(0);
    }
  }
  return g;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_reduce_nchw_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ out, scalar_t* __restrict__ masked,
                              const BnParams<at::opmath_type<scalar_t>> p, const int mask_mode,
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
    const bool read_out = mask_mode == kMaskFromOut;
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
                a, gs[u].v[k], xs[u].v[k], read_out ? os[u].v[k] : scalar_t(0), mask_mode, xhat);
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
    const bool read_out = mask_mode == kMaskFromOut;
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
                xhat);
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
  bool mask_from_input;
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
                                                scalar_t x, bool mask_from_input,
                                                bool batch_stats) {
  const acc_t xhat = ch.a.xhat(static_cast<acc_t>(x));
  acc_t g = static_cast<acc_t>(grad);
  if (mask_from_input && relu_blocks<scalar_t, acc_t>(ch.a.y(xhat))) {
    g = acc_t(0);
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
          o.v[k] = elemt_value<scalar_t, acc_t>(ch, gs[u].v[k], xs[u].v[k], e.mask_from_input,
                                                batch_stats);
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
          o.v[k] = elemt_value<scalar_t, acc_t>(ch[k], gs[u].v[k], xs[u].v[k],
                                                e.mask_from_input, batch_stats);
        }
        ov[(r + static_cast<int64_t>(u) * by) * g.cv + cv] = o;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side: launch plans
// ---------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Multiprocessor count of `device`, queried once per device.
int sm_count(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      return cached;
    }
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  count = std::max(count, 1);
  if (cacheable) {
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Resident blocks of kThreads per SM for `kernel` on `device` (the current device),
// queried once per (kernel, device).
int blocks_per_sm(const void* kernel, c10::DeviceIndex device) {
  struct Entry {
    const void* kernel;
    c10::DeviceIndex device;
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache) {
    if (e.kernel == kernel && e.device == device) {
      return e.blocks;
    }
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  blocks = std::max(blocks, 1);
  cache.push_back(Entry{kernel, device, blocks});
  return blocks;
}

bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

// Elements per load: the widest of 16/sizeof, 8/sizeof bytes that divides `inner` (HW
// for NCHW, C for NHWC) and to which every pointer (null ones ignored) is aligned; else 1.
template <typename scalar_t>
int pick_vec(int64_t inner, std::initializer_list<const void*> ptrs) {
  constexpr int kMax = static_cast<int>(16 / sizeof(scalar_t));
  for (const int v : {kMax, kMax / 2}) {
    if (v <= 1 || inner % v != 0) {
      continue;
    }
    const int64_t bytes = static_cast<int64_t>(v) * static_cast<int64_t>(sizeof(scalar_t));
    bool ok = true;
    for (const void* p : ptrs) {
      ok = ok && aligned_to(p, bytes);
    }
    if (ok) {
      return v;
    }
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>) for the vec pick_vec chose.
template <typename scalar_t, typename F>
void with_vec(int vec, const F& f) {
  constexpr int kMax = static_cast<int>(16 / sizeof(scalar_t));
  if (vec == kMax) {
    f(std::integral_constant<int, kMax>{});
    return;
  }
  if constexpr (kMax >= 4) {
    if (vec == kMax / 2) {
      f(std::integral_constant<int, kMax / 2>{});
      return;
    }
  }
  f(std::integral_constant<int, 1>{});
}

// Number of splits per channel group: enough blocks to fill every resident slot
// (capacity = SMs x blocks per SM), with whole waves (groups*splits close to a multiple of
// the capacity: the first k from capacity/groups up whose wave efficiency is >= 90%, else
// the best of 16 tries), and at most max_splits.
int64_t choose_splits(int64_t groups, int64_t capacity, int64_t max_splits) {
  const int64_t k0 = std::max<int64_t>(1, capacity / groups);
  if (k0 >= max_splits) {
    return max_splits;
  }
  int64_t best = k0;
  double best_eff = -1.0;
  for (int64_t k = k0; k <= std::min(max_splits, k0 + 16); ++k) {
    const int64_t blocks = groups * k;
    const double eff =
        static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, capacity) * capacity);
    if (eff > best_eff) {
      best = k;
      best_eff = eff;
    }
    if (eff >= 0.9) {
      break;
    }
  }
  return best;
}

// Grid, block and geometry of a main kernel (with `blocks_per_sm` resident blocks per SM)
// for an (N, C, H*W) tensor with m = N*HW > 0 and C > 0. Every split is non-empty.
struct Plan {
  dim3 grid;
  dim3 block;
  NchwGeom nchw{};
  NhwcGeom nhwc{};
  int64_t splits = 0;
  int64_t chunk_values = 0;  // values per channel in one split (the last may hold fewer)
};

Plan make_plan(int64_t N, int64_t C, int64_t HW, bool channels_last, int vec,
               c10::DeviceIndex device, int blocks_per_sm) {
  Plan plan;
  int64_t groups = 0;     // gridDim.x
  int64_t total = 0;      // items per channel
  int64_t min_items = 0;  // per block
  if (!channels_last) {
    const int64_t hw = HW / vec;
    total = N * hw;
    groups = C;
    min_items = kThreads * kMinItemsPerThread;
    plan.block = dim3(kThreads);
    plan.nchw.hw = hw;
    plan.nchw.total = total;
    plan.nchw.plane_stride = C * hw;
    plan.nchw.step_hw = kThreads % hw;
    plan.nchw.step_off = (kThreads / hw) * plan.nchw.plane_stride + plan.nchw.step_hw;
    plan.nchw.wrap_off = plan.nchw.plane_stride - hw;
  } else {
    const int64_t cv = C / vec;
    int bx = 1;
    while (bx < 32 && bx < cv) {
      bx *= 2;
    }
    const int by = kThreads / bx;
    total = N * HW;
    groups = ceil_div(cv, bx);
    min_items = static_cast<int64_t>(by) * kMinItemsPerThread;
    plan.block = dim3(bx, by);
    plan.nhwc.cv = cv;
    plan.nhwc.rows = total;
  }
  TORCH_CHECK(groups <= INT_MAX, "resnet_fused batch norm: too many channels (", C, ")");
  const int64_t capacity = static_cast<int64_t>(sm_count(device)) * std::max(blocks_per_sm, 1);
  const int64_t max_splits = std::clamp<int64_t>(ceil_div(total, min_items), 1, kMaxSplits);
  int64_t splits = choose_splits(groups, capacity, max_splits);
  const int64_t chunk = ceil_div(total, splits);
  splits = ceil_div(total, chunk);
  plan.grid = dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits));
  plan.splits = splits;
  if (!channels_last) {
    plan.nchw.chunk = chunk;
    plan.nchw.splits = splits;
    plan.chunk_values = chunk * vec;
  } else {
    plan.nhwc.chunk = chunk;
    plan.nhwc.splits = splits;
    plan.chunk_values = chunk;
  }
  return plan;
}

// make_plan for `kernel`, with its occupancy on `device`.
template <typename... KArgs>
Plan plan_for(void (*kernel)(KArgs...), int64_t N, int64_t C, int64_t HW, bool channels_last,
              int vec, c10::DeviceIndex device) {
  return make_plan(N, C, HW, channels_last, vec, device,
                   blocks_per_sm(reinterpret_cast<const void*>(kernel), device));
}

at::ScalarType acc_type_of(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel tensor in the accumulation dtype, contiguous (itself when it already is).
at::Tensor per_channel_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

at::Tensor optional_per_channel_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (t.has_value() && t->defined()) {
    return per_channel_acc(*t, acc);
  }
  return at::Tensor();
}

bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

void check_channels(int64_t C) {
  TORCH_CHECK(C <= INT_MAX, "resnet_fused batch norm: too many channels (", C, ")");
}

// ---------------------------------------------------------------------------------------
// Ops
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
  const at::ScalarType acc = acc_type_of(input);
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

// The BN forward kernels (NHWC or NCHW, widest aligned vector) over x (+ residual) -> out;
// shared by bn_act_forward and bias_act.
template <typename scalar_t, typename acc_t>
void launch_bn_forward(const scalar_t* xp, const scalar_t* rp, scalar_t* op,
                       const BnParams<acc_t>& p, bool relu, bool channels_last, int64_t N,
                       int64_t C, int64_t HW, c10::DeviceIndex device, cudaStream_t stream) {
  const int vec = pick_vec<scalar_t>(channels_last ? C : HW, {xp, rp, op});
  with_vec<scalar_t>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    if (channels_last) {
      const auto kernel = bn_fwd_nhwc_kernel<scalar_t, VEC>;
      const Plan plan = plan_for(kernel, N, C, HW, true, VEC, device);
      kernel<<<plan.grid, plan.block, 0, stream>>>(xp, rp, op, p, relu, plan.nhwc);
    } else {
      const auto kernel = bn_fwd_nchw_kernel<scalar_t, VEC>;
      const Plan plan = plan_for(kernel, N, C, HW, false, VEC, device);
      kernel<<<plan.grid, plan.block, 0, stream>>>(xp, rp, op, p, relu, plan.nchw);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor bn_act_forward_cuda(const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& var, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, double eps, bool relu) {
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
  const at::ScalarType acc = acc_type_of(input);
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
    launch_bn_forward<scalar_t, acc_t>(xp, rp, op, p, relu, channels_last, N, C, HW, device,
                                       stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out, double eps,
    bool relu, bool write_masked_grad) {
  check_bn_backward_reduce_args(grad_out, input, mean, var, weight, bias, out);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = bn_memory_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const int64_t HW = input.size(2) * input.size(3);
  const int64_t m = N * HW;
  check_channels(C);
  const at::ScalarType acc = acc_type_of(input);
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor sum_dy = at::empty({C}, acc_opts);
  at::Tensor sum_dy_xhat = at::empty({C}, acc_opts);
  at::Tensor masked = write_masked_grad
                          ? at::empty(input.sizes(), input.options().memory_format(fmt))
                          : at::empty({0}, input.options());
  if (C == 0) {
    return {sum_dy, sum_dy_xhat, masked};
  }
  const int mask_mode = !relu ? kMaskNone : (present(out) ? kMaskFromOut : kMaskFromInput);
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
    }
    mean_a = per_channel_acc(mean, acc);
    var_a = per_channel_acc(var, acc);
    if (mask_mode == kMaskFromInput) {
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
          kernel<<<plan.grid, plan.block, 0, stream>>>(gp, xp, opp, mp, p, mask_mode, ps, psx,
                                                       plan.nhwc);
        } else {
          const auto kernel = bn_bwd_reduce_nchw_kernel<scalar_t, VEC>;
          const Plan plan = plan_for(kernel, N, C, HW, false, VEC, device);
          alloc_partials(plan);
          kernel<<<plan.grid, plan.block, 0, stream>>>(gp, xp, opp, mp, p, mask_mode, ps, psx,
                                                       plan.nchw);
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
                                      double eps, bool relu_mask_from_input, bool batch_stats) {
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
  const at::ScalarType acc = acc_type_of(input);
  const at::Tensor g = bn_in_format(grad, fmt);
  const at::Tensor x = bn_in_format(input, fmt);
  const at::Tensor mean_a = per_channel_acc(mean, acc);
  const at::Tensor var_a = per_channel_acc(var, acc);
  const at::Tensor w_a = optional_per_channel_acc(weight, acc);
  const at::Tensor b_a = relu_mask_from_input ? optional_per_channel_acc(bias, acc) : at::Tensor();
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
                               static_cast<acc_t>(m), relu_mask_from_input};
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

// ---------------------------------------------------------------------------------------
// bias_act: the eval-mode epilogue of a conv with BN folded into it,
// out = relu(x + bias [+ residual]). It runs the forward kernels with mean, var and weight
// absent: xhat = (x - 0)*1 = x and y = fma(x, 1, bias) = x + bias, one rounding, so the
// result is the composition in acc_t rounded once. One pass: reads x (+ residual), writes
// out (which may be x itself: every element is read, then written, by the same thread).
// ---------------------------------------------------------------------------------------

void bias_act_launch(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out,
                     at::MemoryFormat fmt) {
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  const int64_t HW = x.size(2) * x.size(3);
  check_channels(C);
  const at::Tensor r = present(residual) ? bn_in_format(*residual, fmt) : at::Tensor();
  const at::Tensor b_a = optional_per_channel_acc(bias, acc_type_of(x));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = x.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnParams<acc_t> p{nullptr, nullptr, nullptr, data_or_null<acc_t>(b_a), acc_t(0)};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = data_or_null<scalar_t>(r);
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    launch_bn_forward<scalar_t, acc_t>(xp, rp, op, p, relu, channels_last, N, C, HW, device,
                                       stream);
  });
}

at::Tensor bias_act_cuda(const at::Tensor& input, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, bool relu) {
  check_bias_act_args(input, bias, residual);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = bn_memory_format(input);
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(fmt));
  if (out.numel() == 0) {
    return out;
  }
  bias_act_launch(bn_in_format(input, fmt), bias, residual, relu, out, fmt);
  return out;
}

void bias_act_inplace_cuda(at::Tensor& input, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, bool relu) {
  check_bias_act_inplace_args(input, bias, residual);
  if (input.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(input.device());
  // Dense in NCHW or channels_last (checked): input is already in its bn layout.
  bias_act_launch(input, bias, residual, relu, input, bn_memory_format(input));
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_act_forward", &bn_act_forward_cuda);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cuda);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt_cuda);
  m.impl("bias_act", &bias_act_cuda);
  m.impl("bias_act_", &bias_act_inplace_cuda);
}

}  // namespace resnet_fused
