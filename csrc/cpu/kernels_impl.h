// The CPU kernels, written once over at::vec::Vectorized and compiled once per
// instruction set (see isa.h). Include only from kernels_<isa>.cpp, after choosing
// CPU_CAPABILITY, RF_KERNEL_TABLE (the table's name) and RF_USE_VEC.
//
// Without a wide instruction set (RF_USE_VEC == 0) the loops are plain scalar code that
// the compiler vectorises for the baseline target; at::vec's portable fallback is slower.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace resnet_fused::cpu {
namespace {

constexpr int64_t kGrainSize = 32768;

using at::vec::Vectorized;

template <typename T>
constexpr bool kReduced = at::is_reduced_floating_point_v<T>;

// relu(x + r) -- NaN propagates as in torch.relu.
struct AddReLUOp {
  template <typename T>
  T operator()(T x, T r) const {
    const T s = x + r;
    return s < T(0) ? T(0) : s;
  }
  template <typename T>
  Vectorized<T> operator()(const Vectorized<T>& x, const Vectorized<T>& r) const {
    return at::vec::clamp_min(x + r, Vectorized<T>(T(0)));
  }
};

// Gradient through a ReLU from its output (torch's threshold_backward: 0 where out <= 0).
struct ReLUBackwardOp {
  template <typename T>
  T operator()(T grad, T out) const {
    return out <= T(0) ? T(0) : grad;
  }
  template <typename T>
  Vectorized<T> operator()(const Vectorized<T>& grad, const Vectorized<T>& out) const {
    const Vectorized<T> zero(T(0));
    return Vectorized<T>::blendv(grad, zero, out <= zero);
  }
};

// out[i] = op(a[i], b[i]) in at::opmath_type (fp32 for fp16/bf16), threaded.
template <typename scalar_t, typename Op>
void binary_kernel(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, const Op& op) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#if RF_USE_VEC
    if constexpr (kReduced<scalar_t>) {
      using bVec = Vectorized<scalar_t>;
      for (; i + bVec::size() <= end; i += bVec::size()) {
        auto [a0, a1] = at::vec::convert_to_float<scalar_t>(bVec::loadu(a + i));
        auto [b0, b1] = at::vec::convert_to_float<scalar_t>(bVec::loadu(b + i));
        at::vec::convert_from_float<scalar_t>(op(a0, b0), op(a1, b1)).store(out + i);
      }
    } else {
      using Vec = Vectorized<scalar_t>;
      for (; i + Vec::size() <= end; i += Vec::size()) {
        op(Vec::loadu(a + i), Vec::loadu(b + i)).store(out + i);
      }
    }
#endif
    for (; i < end; ++i) {
      out[i] = static_cast<scalar_t>(op(static_cast<opmath_t>(a[i]), static_cast<opmath_t>(b[i])));
    }
  });
}

// Runs binary_kernel<scalar_t> with Op for the floating dtypes resnet_fused supports.
#define RF_BINARY_DISPATCH(OP, NAME, dtype, a, b, out, n)                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, NAME, [&] {             \
    binary_kernel<scalar_t>(static_cast<const scalar_t*>(a), static_cast<const scalar_t*>(b), \
                            static_cast<scalar_t*>(out), n, OP{});                         \
  })

void add_relu_impl(c10::ScalarType dtype, const void* x, const void* r, void* out, int64_t n) {
  RF_BINARY_DISPATCH(AddReLUOp, "add_relu_cpu", dtype, x, r, out, n);
}

void relu_backward_impl(c10::ScalarType dtype, const void* grad, const void* out, void* grad_in,
                        int64_t n) {
  RF_BINARY_DISPATCH(ReLUBackwardOp, "relu_backward_cpu", dtype, grad, out, grad_in, n);
}

#undef RF_BINARY_DISPATCH

// ---------------------------------------------------------------------------------------
// BatchNorm -> (residual add) -> ReLU. See resnet_fused/reference.py for the maths.
//
// Work is split into fixed tiles that do not depend on the thread count: NCHW planes
// (one image, one channel: HW contiguous values) or channels_last chunks of chunk_rows(C)
// rows of C channels. Reductions produce one partial per tile and per channel, merged in
// tile order (Chan's merge for the statistics), so results are bit-identical run to run
// and across thread counts.
// ---------------------------------------------------------------------------------------

constexpr int64_t kChunkElems = 32768;  // channels_last tile: about this many values

inline int64_t chunk_rows(int64_t C) {
  return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
}

// The largest value that rounds to zero in scalar_t (round to nearest even): the ReLU
// mask recomputed in fp32 must agree with the mask of the rounded output.
template <typename scalar_t>
constexpr at::opmath_type<scalar_t> zero_threshold() {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return 0x1p-25f;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return 0x1p-134f;
  } else {
    return 0;
  }
}

// a*b + c for the BatchNorm affine and backward in scalar code, rounded as the vector
// loops round it (at::vec::fmadd: one rounding) wherever those exist, so that the ReLU mask
// the backward recomputes from the input agrees bit for bit with the forward's output and
// scalar tails match the vector body; never left to the compiler's choice of contraction.
// Without vector loops (RF_USE_VEC == 0: the baseline target has no FMA instruction) the
// product and the sum are rounded separately, in the forward and the backward alike.
template <typename T>
inline T mul_add(T a, T b, T c) {
#if RF_USE_VEC
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

template <typename T>
inline T relu_scalar(T v) {
  return v < T(0) ? T(0) : v;
}

#if RF_USE_VEC
// kStep values of scalar_t as two Vectorized<acc_t>.
template <typename scalar_t>
struct AccVec {
  using acc_t = at::opmath_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * aVec::size();
  static inline void load(const scalar_t* p, aVec& a, aVec& b) {
    if constexpr (kReduced<scalar_t>) {
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    } else {
      a = aVec::loadu(p);
      b = aVec::loadu(p + aVec::size());
    }
  }
  static inline void store(scalar_t* p, const aVec& a, const aVec& b) {
    if constexpr (kReduced<scalar_t>) {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + aVec::size());
    }
  }
  static inline acc_t hsum(const aVec& v) {
    __at_align__ acc_t buf[aVec::size()];
    v.store(buf);
    acc_t s = 0;
    for (int64_t i = 0; i < aVec::size(); ++i) {
      s += buf[i];
    }
    return s;
  }
};
#endif

// Mean (of x - shift) and M2 of `len` contiguous values: the corrected two-pass
// algorithm (the second pass reads from cache). Pass one gives an approximate mean mu;
// pass two sums d = x - mu and d*d, and mu + sum(d)/len is the mean to working
// precision even when mu's rounding error is large against the spread (the first pass's
// sum of x - shift grows with |mean - shift|); M2 = sum(d*d) - sum(d)^2/len. The per-channel
// shift (one of the channel's values) keeps tile means exact when |mean| >> std, e.g.
// 1e4 + N(0, 1), so that the merged partials do not cancel.
template <typename scalar_t>
void contiguous_moments(const scalar_t* x, int64_t len, at::opmath_type<scalar_t> shift,
                        at::opmath_type<scalar_t>& mean, at::opmath_type<scalar_t>& m2) {
  using acc_t = at::opmath_type<scalar_t>;
  if (len == 0) {
    mean = 0;
    m2 = 0;
    return;
  }
  int64_t i = 0;
  acc_t sum = 0;
#if RF_USE_VEC
  using V = AccVec<scalar_t>;
  const typename V::aVec shv(shift);
  typename V::aVec s0(0), s1(0), a, b;
  for (; i + V::kStep <= len; i += V::kStep) {
    V::load(x + i, a, b);
    s0 += a - shv;
    s1 += b - shv;
  }
  sum = V::hsum(s0 + s1);
#endif
  for (; i < len; ++i) {
    sum += static_cast<acc_t>(x[i]) - shift;
  }
  const acc_t center = shift + sum / static_cast<acc_t>(len);
  acc_t sq = 0, sd = 0;
  i = 0;
#if RF_USE_VEC
  const typename V::aVec mv(center);
  s0 = typename V::aVec(0);
  s1 = typename V::aVec(0);
  typename V::aVec d0(0), d1(0);
  for (; i + V::kStep <= len; i += V::kStep) {
    V::load(x + i, a, b);
    a -= mv;
    b -= mv;
    d0 += a;
    d1 += b;
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
  }
  sq = V::hsum(s0 + s1);
  sd = V::hsum(d0 + d1);
#endif
  for (; i < len; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - center;
    sd += d;
    sq += d * d;
  }
  const acc_t corr = sd / static_cast<acc_t>(len);
  mean = (center - shift) + corr;
  m2 = std::max(sq - sd * corr, acc_t(0));
}

// Per-channel mean (of x - shift[c]) and M2 of `rows` rows of C channels (a
// channels_last tile), corrected two-pass as in contiguous_moments. Rows outside,
// channels inside: each pass streams the tile sequentially (it stays in L2 for the
// second pass) and the per-channel sums live in small arrays (L1). Per channel the rows
// are summed in order, as a channel-outer loop would.
template <typename scalar_t>
void rows_moments(const scalar_t* x, int64_t rows, int64_t C,
                  const at::opmath_type<scalar_t>* shift, at::opmath_type<scalar_t>* mean,
                  at::opmath_type<scalar_t>* m2) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
  std::vector<acc_t> sum(C, acc_t(0)), center(C), sd(C, acc_t(0)), sq(C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xr = x + r * C;
    int64_t c = 0;
#if RF_USE_VEC
    using V = AccVec<scalar_t>;
    using aVec = typename V::aVec;
    constexpr int64_t h = aVec::size();
    for (; c + V::kStep <= C; c += V::kStep) {
      aVec a, b;
      V::load(xr + c, a, b);
      (aVec::loadu(sum.data() + c) + (a - aVec::loadu(shift + c))).store(sum.data() + c);
      (aVec::loadu(sum.data() + c + h) + (b - aVec::loadu(shift + c + h))).store(sum.data() + c + h);
    }
#endif
    for (; c < C; ++c) {
      sum[c] += static_cast<acc_t>(xr[c]) - shift[c];
    }
  }
  int64_t c0 = 0;
#if RF_USE_VEC
  {
    using V = AccVec<scalar_t>;
    using aVec = typename V::aVec;
    constexpr int64_t h = aVec::size();
    for (; c0 + V::kStep <= C; c0 += V::kStep) {
      for (int64_t k : {int64_t(0), h}) {
        const aVec sh = aVec::loadu(shift + c0 + k);
        (sh + aVec::loadu(sum.data() + c0 + k) * aVec(inv_rows)).store(center.data() + c0 + k);
      }
    }
  }
#endif
  for (; c0 < C; ++c0) {
    center[c0] = shift[c0] + sum[c0] * inv_rows;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xr = x + r * C;
    int64_t c = 0;
#if RF_USE_VEC
    using V = AccVec<scalar_t>;
    using aVec = typename V::aVec;
    constexpr int64_t h = aVec::size();
    for (; c + V::kStep <= C; c += V::kStep) {
      aVec a, b;
      V::load(xr + c, a, b);
      a -= aVec::loadu(center.data() + c);
      b -= aVec::loadu(center.data() + c + h);
      (aVec::loadu(sd.data() + c) + a).store(sd.data() + c);
      (aVec::loadu(sd.data() + c + h) + b).store(sd.data() + c + h);
      at::vec::fmadd(a, a, aVec::loadu(sq.data() + c)).store(sq.data() + c);
      at::vec::fmadd(b, b, aVec::loadu(sq.data() + c + h)).store(sq.data() + c + h);
    }
#endif
    for (; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(xr[c]) - center[c];
      sd[c] += d;
      sq[c] += d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t corr = sd[c] * inv_rows;
    mean[c] = (center[c] - shift[c]) + corr;
    m2[c] = std::max(sq[c] - sd[c] * corr, acc_t(0));
  }
}

template <typename scalar_t>
void bn_stats_typed(const scalar_t* x, const BnGeometry& g, at::opmath_type<scalar_t>* mean,
                    at::opmath_type<scalar_t>* var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  // One (count, mean, M2) partial per tile and channel.
  const int64_t rows_per_tile = g.channels_last ? chunk_rows(C) : g.HW;
  const int64_t M = g.N * g.HW;
  const int64_t tiles = g.channels_last ? (M + rows_per_tile - 1) / rows_per_tile : g.N;
  std::vector<acc_t> p_mean(tiles * C), p_m2(tiles * C);
  // Per-channel shift: the channel's first value (image 0, position 0).
  std::vector<acc_t> shift(C);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<acc_t>(x[g.channels_last ? c : c * g.HW]);
  }
  if (g.channels_last) {
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = t * rows_per_tile;
        const int64_t rows = std::min(rows_per_tile, M - r0);
        rows_moments<scalar_t>(x + r0 * C, rows, C, shift.data(), p_mean.data() + t * C,
                               p_m2.data() + t * C);
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(g.HW, 1));
    at::parallel_for(0, g.N * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {  // p = n*C + c: tile n, channel c
        contiguous_moments<scalar_t>(x + p * g.HW, g.HW, shift[p % C], p_mean[p], p_m2[p]);
      }
    });
  }
  // Merge the tiles in order. Every channel of a tile has the same count, so the merge
  // runs over channels in the inner loop.
  std::vector<acc_t> mu(C, acc_t(0)), m2(C, acc_t(0));
  int64_t n = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n_b = g.channels_last ? std::min(rows_per_tile, M - t * rows_per_tile) : g.HW;
    if (n_b == 0) {
      continue;
    }
    const acc_t* mb = p_mean.data() + t * C;
    const acc_t* qb = p_m2.data() + t * C;
    if (n == 0) {
      std::copy(mb, mb + C, mu.begin());
      std::copy(qb, qb + C, m2.begin());
    } else {
      const acc_t frac_b = static_cast<acc_t>(n_b) / static_cast<acc_t>(n + n_b);
      const acc_t w = static_cast<acc_t>(n) * frac_b;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t delta = mb[c] - mu[c];
        mu[c] += delta * frac_b;
        m2[c] += qb[c] + delta * delta * w;
      }
    }
    n += n_b;
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = n > 0 ? shift[c] + mu[c] : std::numeric_limits<acc_t>::quiet_NaN();
    var[c] = n > 0 ? m2[c] / static_cast<acc_t>(n) : std::numeric_limits<acc_t>::quiet_NaN();
  }
}

// Applies `body(x_ptr, ..., len, channel-parameter lookup)` over the tensor: for NCHW
// planes the parameters are scalars of channel c; for channels_last rows they vary along
// the row. Both loops are written out in each kernel below for clarity and speed.

template <typename scalar_t>
void bn_forward_typed(const scalar_t* x, const scalar_t* res, scalar_t* out, const BnGeometry& g,
                      const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* scale,
                      const at::opmath_type<scalar_t>* bias, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  auto element = [&](acc_t xv, acc_t m, acc_t s, acc_t b, acc_t r) {
    const acc_t y = mul_add(xv - m, s, b) + r;
    return relu ? relu_scalar(y) : y;
  };
  if (g.channels_last) {
    const int64_t M = g.N * g.HW;
    at::parallel_for(0, M, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * C;
        int64_t c = 0;
#if RF_USE_VEC
        using V = AccVec<scalar_t>;
        using aVec = typename V::aVec;
        constexpr int64_t h = aVec::size();
        const aVec zero(0);
        aVec a, b, ra, rb;
        for (; c + V::kStep <= C; c += V::kStep) {
          V::load(x + base + c, a, b);
          a = at::vec::fmadd(a - aVec::loadu(mean + c), aVec::loadu(scale + c), aVec::loadu(bias + c));
          b = at::vec::fmadd(b - aVec::loadu(mean + c + h), aVec::loadu(scale + c + h),
                             aVec::loadu(bias + c + h));
          if (res != nullptr) {
            V::load(res + base + c, ra, rb);
            a += ra;
            b += rb;
          }
          if (relu) {
            a = at::vec::clamp_min(a, zero);
            b = at::vec::clamp_min(b, zero);
          }
          V::store(out + base + c, a, b);
        }
#endif
        for (; c < C; ++c) {
          const acc_t r = res != nullptr ? static_cast<acc_t>(res[base + c]) : acc_t(0);
          out[base + c] = static_cast<scalar_t>(
              element(static_cast<acc_t>(x[base + c]), mean[c], scale[c], bias[c], r));
        }
      }
    });
  } else {
    const int64_t HW = g.HW;
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(HW, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const int64_t base = p * HW;
        int64_t i = 0;
#if RF_USE_VEC
        using V = AccVec<scalar_t>;
        using aVec = typename V::aVec;
        const aVec zero(0), mv(mean[c]), sv(scale[c]), bv(bias[c]);
        aVec a, b, ra, rb;
        for (; i + V::kStep <= HW; i += V::kStep) {
          V::load(x + base + i, a, b);
          a = at::vec::fmadd(a - mv, sv, bv);
          b = at::vec::fmadd(b - mv, sv, bv);
          if (res != nullptr) {
            V::load(res + base + i, ra, rb);
            a += ra;
            b += rb;
          }
          if (relu) {
            a = at::vec::clamp_min(a, zero);
            b = at::vec::clamp_min(b, zero);
          }
          V::store(out + base + i, a, b);
        }
#endif
        for (; i < HW; ++i) {
          const acc_t r = res != nullptr ? static_cast<acc_t>(res[base + i]) : acc_t(0);
          out[base + i] = static_cast<scalar_t>(
              element(static_cast<acc_t>(x[base + i]), mean[c], scale[c], bias[c], r));
        }
      }
    });
  }
}

// g for one element: grad masked per `mask`.
template <typename scalar_t>
inline at::opmath_type<scalar_t> masked_grad_scalar(BnMask mask, at::opmath_type<scalar_t> grad,
                                                    at::opmath_type<scalar_t> xmu,
                                                    at::opmath_type<scalar_t> s,
                                                    at::opmath_type<scalar_t> b,
                                                    const scalar_t* out, int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  if (mask == BnMask::kFromOut) {
    return static_cast<acc_t>(out[offset]) <= acc_t(0) ? acc_t(0) : grad;
  }
  if (mask == BnMask::kFromInput) {
    return mul_add(xmu, s, b) <= zero_threshold<scalar_t>() ? acc_t(0) : grad;
  }
  return grad;
}

#if RF_USE_VEC
template <typename scalar_t>
inline Vectorized<at::opmath_type<scalar_t>> masked_grad_vec(
    BnMask mask, const Vectorized<at::opmath_type<scalar_t>>& grad,
    const Vectorized<at::opmath_type<scalar_t>>& xmu, const Vectorized<at::opmath_type<scalar_t>>& s,
    const Vectorized<at::opmath_type<scalar_t>>& b, const Vectorized<at::opmath_type<scalar_t>>& outv) {
  using aVec = Vectorized<at::opmath_type<scalar_t>>;
  const aVec zero(0);
  if (mask == BnMask::kFromOut) {
    return aVec::blendv(grad, zero, outv <= zero);
  }
  if (mask == BnMask::kFromInput) {
    return aVec::blendv(grad, zero, at::vec::fmadd(xmu, s, b) <= aVec(zero_threshold<scalar_t>()));
  }
  return grad;
}
#endif

template <typename scalar_t>
void bn_backward_reduce_typed(const scalar_t* grad, const scalar_t* x, const scalar_t* out,
                              scalar_t* masked, const BnGeometry& g,
                              const at::opmath_type<scalar_t>* mean,
                              const at::opmath_type<scalar_t>* scale,
                              const at::opmath_type<scalar_t>* bias, BnMask mask,
                              at::opmath_type<scalar_t>* sum_dy, at::opmath_type<scalar_t>* sum_dy_xmu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  const int64_t M = g.N * g.HW;
  const int64_t rows_per_tile = g.channels_last ? chunk_rows(C) : g.HW;
  const int64_t tiles = g.channels_last ? (M + rows_per_tile - 1) / rows_per_tile : g.N;
  std::vector<acc_t> p_dy(tiles * C, acc_t(0)), p_dyx(tiles * C, acc_t(0));
  if (g.channels_last) {
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        acc_t* dy = p_dy.data() + t * C;
        acc_t* dyx = p_dyx.data() + t * C;
        const int64_t r0 = t * rows_per_tile;
        const int64_t r1 = std::min(M, r0 + rows_per_tile);
        // Rows outside, channels inside: every tensor streams through once, in order;
        // the tile's per-channel sums live in dy/dyx (2*C values, L1). Per channel the
        // rows are summed in order, as a channel-outer loop would.
        for (int64_t row = r0; row < r1; ++row) {
          int64_t c = 0;
#if RF_USE_VEC
          using V = AccVec<scalar_t>;
          using aVec = typename V::aVec;
          constexpr int64_t h = aVec::size();
          for (; c + V::kStep <= C; c += V::kStep) {
            const int64_t off = row * C + c;
            aVec ga, gb, xa, xb, oa(0), ob(0);
            V::load(grad + off, ga, gb);
            V::load(x + off, xa, xb);
            if (mask == BnMask::kFromOut) {
              V::load(out + off, oa, ob);
            }
            xa -= aVec::loadu(mean + c);
            xb -= aVec::loadu(mean + c + h);
            ga = masked_grad_vec<scalar_t>(mask, ga, xa, aVec::loadu(scale + c),
                                           aVec::loadu(bias + c), oa);
            gb = masked_grad_vec<scalar_t>(mask, gb, xb, aVec::loadu(scale + c + h),
                                           aVec::loadu(bias + c + h), ob);
            if (masked != nullptr) {
              V::store(masked + off, ga, gb);
            }
            (aVec::loadu(dy + c) + ga).store(dy + c);
            (aVec::loadu(dy + c + h) + gb).store(dy + c + h);
            at::vec::fmadd(ga, xa, aVec::loadu(dyx + c)).store(dyx + c);
            at::vec::fmadd(gb, xb, aVec::loadu(dyx + c + h)).store(dyx + c + h);
          }
#endif
          for (; c < C; ++c) {
            const int64_t off = row * C + c;
            const acc_t xmu = static_cast<acc_t>(x[off]) - mean[c];
            const acc_t gv = masked_grad_scalar<scalar_t>(mask, static_cast<acc_t>(grad[off]), xmu,
                                                          scale[c], bias[c], out, off);
            if (masked != nullptr) {
              masked[off] = static_cast<scalar_t>(gv);
            }
            dy[c] += gv;
            dyx[c] += gv * xmu;
          }
        }
      }
    });
  } else {
    const int64_t HW = g.HW;
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(HW, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const int64_t base = p * HW;
        acc_t dy = 0, dyx = 0;
        int64_t i = 0;
#if RF_USE_VEC
        using V = AccVec<scalar_t>;
        using aVec = typename V::aVec;
        const aVec mv(mean[c]), sv(scale[c]), bv(bias[c]);
        aVec ga, gb, xa, xb, oa(0), ob(0), dy0(0), dy1(0), dyx0(0), dyx1(0);
        for (; i + V::kStep <= HW; i += V::kStep) {
          V::load(grad + base + i, ga, gb);
          V::load(x + base + i, xa, xb);
          if (mask == BnMask::kFromOut) {
            V::load(out + base + i, oa, ob);
          }
          xa -= mv;
          xb -= mv;
          ga = masked_grad_vec<scalar_t>(mask, ga, xa, sv, bv, oa);
          gb = masked_grad_vec<scalar_t>(mask, gb, xb, sv, bv, ob);
          if (masked != nullptr) {
            V::store(masked + base + i, ga, gb);
          }
          dy0 += ga;
          dy1 += gb;
          dyx0 = at::vec::fmadd(ga, xa, dyx0);
          dyx1 = at::vec::fmadd(gb, xb, dyx1);
        }
        dy = V::hsum(dy0 + dy1);
        dyx = V::hsum(dyx0 + dyx1);
#endif
        for (; i < HW; ++i) {
          const acc_t xmu = static_cast<acc_t>(x[base + i]) - mean[c];
          const acc_t gv = masked_grad_scalar<scalar_t>(mask, static_cast<acc_t>(grad[base + i]), xmu,
                                                        scale[c], bias[c], out, base + i);
          if (masked != nullptr) {
            masked[base + i] = static_cast<scalar_t>(gv);
          }
          dy += gv;
          dyx += gv * xmu;
        }
        p_dy[p] = dy;
        p_dyx[p] = dyx;
      }
    });
  }
  // Sum the tiles in order (channels inner).
  std::fill(sum_dy, sum_dy + C, acc_t(0));
  std::fill(sum_dy_xmu, sum_dy_xmu + C, acc_t(0));
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += p_dy[t * C + c];
      sum_dy_xmu[c] += p_dyx[t * C + c];
    }
  }
}

template <typename scalar_t>
void bn_backward_elemt_typed(const scalar_t* grad, const scalar_t* x, scalar_t* dx,
                             const BnGeometry& g, const at::opmath_type<scalar_t>* mean,
                             const at::opmath_type<scalar_t>* scale,
                             const at::opmath_type<scalar_t>* bias,
                             const at::opmath_type<scalar_t>* k, const at::opmath_type<scalar_t>* cst,
                             BnMask mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  // Running statistics (k, cst null): dx = g*scale only. The batch-statistics term
  // (x - mean)*k + cst must not be evaluated there with k = cst = 0: an Inf or NaN input
  // would turn it into NaN where eager's gradient g*scale is finite.
  const bool batch = k != nullptr;
  if (g.channels_last) {
    const int64_t M = g.N * g.HW;
    at::parallel_for(0, M, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * C;
        int64_t c = 0;
#if RF_USE_VEC
        using V = AccVec<scalar_t>;
        using aVec = typename V::aVec;
        constexpr int64_t h = aVec::size();
        const aVec none(0);
        aVec ga, gb, xa, xb;
        for (; c + V::kStep <= C; c += V::kStep) {
          V::load(grad + base + c, ga, gb);
          V::load(x + base + c, xa, xb);
          xa -= aVec::loadu(mean + c);
          xb -= aVec::loadu(mean + c + h);
          const aVec sa = aVec::loadu(scale + c), sb = aVec::loadu(scale + c + h);
          ga = masked_grad_vec<scalar_t>(mask, ga, xa, sa, aVec::loadu(bias + c), none);
          gb = masked_grad_vec<scalar_t>(mask, gb, xb, sb, aVec::loadu(bias + c + h), none);
          if (batch) {
            ga = at::vec::fmadd(ga, sa, at::vec::fmadd(xa, aVec::loadu(k + c), aVec::loadu(cst + c)));
            gb = at::vec::fmadd(gb, sb,
                                at::vec::fmadd(xb, aVec::loadu(k + c + h), aVec::loadu(cst + c + h)));
          } else {
            ga *= sa;
            gb *= sb;
          }
          V::store(dx + base + c, ga, gb);
        }
#endif
        for (; c < C; ++c) {
          const acc_t xmu = static_cast<acc_t>(x[base + c]) - mean[c];
          const acc_t gv = masked_grad_scalar<scalar_t>(mask, static_cast<acc_t>(grad[base + c]), xmu,
                                                        scale[c], bias[c], nullptr, 0);
          dx[base + c] = static_cast<scalar_t>(
              batch ? mul_add(gv, scale[c], mul_add(xmu, k[c], cst[c])) : gv * scale[c]);
        }
      }
    });
  } else {
    const int64_t HW = g.HW;
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(HW, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const int64_t base = p * HW;
        int64_t i = 0;
#if RF_USE_VEC
        using V = AccVec<scalar_t>;
        using aVec = typename V::aVec;
        const aVec mv(mean[c]), sv(scale[c]), bv(bias[c]), none(0);
        const aVec kv(batch ? k[c] : acc_t(0)), cv(batch ? cst[c] : acc_t(0));
        aVec ga, gb, xa, xb;
        for (; i + V::kStep <= HW; i += V::kStep) {
          V::load(grad + base + i, ga, gb);
          V::load(x + base + i, xa, xb);
          xa -= mv;
          xb -= mv;
          ga = masked_grad_vec<scalar_t>(mask, ga, xa, sv, bv, none);
          gb = masked_grad_vec<scalar_t>(mask, gb, xb, sv, bv, none);
          if (batch) {
            V::store(dx + base + i, at::vec::fmadd(ga, sv, at::vec::fmadd(xa, kv, cv)),
                     at::vec::fmadd(gb, sv, at::vec::fmadd(xb, kv, cv)));
          } else {
            V::store(dx + base + i, ga * sv, gb * sv);
          }
        }
#endif
        for (; i < HW; ++i) {
          const acc_t xmu = static_cast<acc_t>(x[base + i]) - mean[c];
          const acc_t gv = masked_grad_scalar<scalar_t>(mask, static_cast<acc_t>(grad[base + i]), xmu,
                                                        scale[c], bias[c], nullptr, 0);
          dx[base + i] = static_cast<scalar_t>(
              batch ? mul_add(gv, scale[c], mul_add(xmu, k[c], cst[c])) : gv * scale[c]);
        }
      }
    });
  }
}

template <typename scalar_t>
using acc_ptr = at::opmath_type<scalar_t>*;
template <typename scalar_t>
using cacc_ptr = const at::opmath_type<scalar_t>*;

void bn_stats_impl(c10::ScalarType dtype, const void* x, const BnGeometry& g, void* mean,
                   void* var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_stats_cpu", [&] {
    bn_stats_typed<scalar_t>(static_cast<const scalar_t*>(x), g, static_cast<acc_ptr<scalar_t>>(mean),
                             static_cast<acc_ptr<scalar_t>>(var));
  });
}

void bn_forward_impl(c10::ScalarType dtype, const void* x, const void* residual, void* out,
                     const BnGeometry& g, const void* mean, const void* scale, const void* bias,
                     bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_act_forward_cpu", [&] {
    bn_forward_typed<scalar_t>(static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(residual),
                               static_cast<scalar_t*>(out), g, static_cast<cacc_ptr<scalar_t>>(mean),
                               static_cast<cacc_ptr<scalar_t>>(scale),
                               static_cast<cacc_ptr<scalar_t>>(bias), relu);
  });
}

void bn_backward_reduce_impl(c10::ScalarType dtype, const void* grad, const void* x,
                             const void* out, void* masked, const BnGeometry& g, const void* mean,
                             const void* scale, const void* bias, BnMask mask, void* sum_dy,
                             void* sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_act_backward_reduce_cpu", [&] {
    bn_backward_reduce_typed<scalar_t>(
        static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(x),
        static_cast<const scalar_t*>(out), static_cast<scalar_t*>(masked), g,
        static_cast<cacc_ptr<scalar_t>>(mean), static_cast<cacc_ptr<scalar_t>>(scale),
        static_cast<cacc_ptr<scalar_t>>(bias), mask, static_cast<acc_ptr<scalar_t>>(sum_dy),
        static_cast<acc_ptr<scalar_t>>(sum_dy_xmu));
  });
}

void bn_backward_elemt_impl(c10::ScalarType dtype, const void* grad, const void* x, void* dx,
                            const BnGeometry& g, const void* mean, const void* scale,
                            const void* bias, const void* k, const void* c, BnMask mask) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_act_backward_elemt_cpu", [&] {
    bn_backward_elemt_typed<scalar_t>(
        static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(x),
        static_cast<scalar_t*>(dx), g, static_cast<cacc_ptr<scalar_t>>(mean),
        static_cast<cacc_ptr<scalar_t>>(scale), static_cast<cacc_ptr<scalar_t>>(bias),
        static_cast<cacc_ptr<scalar_t>>(k), static_cast<cacc_ptr<scalar_t>>(c), mask);
  });
}

}  // namespace

const Kernels RF_KERNEL_TABLE = {
    &add_relu_impl,        &relu_backward_impl,          &bn_stats_impl,
    &bn_forward_impl,      &bn_backward_reduce_impl,     &bn_backward_elemt_impl,
};

}  // namespace resnet_fused::cpu
