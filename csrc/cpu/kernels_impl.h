// The CPU kernels, written once over at::vec::Vectorized and compiled once per
// instruction set (see isa.h). Include only from kernels_<isa>.cpp, after choosing
// CPU_CAPABILITY, RF_KERNEL_TABLE (the table's name) and RF_USE_VEC.
//
// Without a wide instruction set (RF_USE_VEC == 0) the loops are plain scalar code that
// the compiler vectorises for the baseline target; at::vec's portable fallback is slower.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
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
//
// Types: op_t = at::opmath_type<scalar_t> (float for float, Half and BFloat16 input, double
// for double) and acc_t = at::acc_type<scalar_t, /*is_cuda=*/false> (bn_acc_t): double for
// float and double, float for Half and BFloat16, the type eager's CPU BatchNorm
// accumulates in. The forward computes each element in op_t, as eager's elementwise
// kernels do, from per-channel arrays in op_t (bn_host.h folds a double mean's low part
// into the bias). The reductions and the input gradient, whose terms can cancel, work in
// acc_t: the statistics' second pass (x - centre and its square), g*(x - mean), their sums,
// and the gradient from the acc_t statistics, each rounded once to scalar_t; the ReLU mask
// they recompute from the input uses the forward's op_t arithmetic (masked_grad_*). The
// first pass of the statistics (only a centre) runs in op_t. Float input thus costs two
// double vectors (cvtps2pd) per float vector in those loops.
// ---------------------------------------------------------------------------------------

template <typename T>
using bn_acc_t = at::acc_type<T, /*is_cuda=*/false>;
template <typename T>
using op_t = at::opmath_type<T>;

constexpr int64_t kChunkElems = 32768;  // channels_last tile: about this many values

inline int64_t chunk_rows(int64_t C) {
  return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
}

// The channels_last backward loops take a tile's rows in groups of about kGroupBytes of
// each tensor, and at least kMinGroupRows rows: in a group, blocks of channels outside
// and the group's rows inside, so that a block's parameters (and sums) stay in registers
// down the rows while the group's lines, once the first blocks have brought them in, stay
// in L1 for the others.
constexpr int64_t kGroupBytes = 4096;
constexpr int64_t kMinGroupRows = 16;

template <typename scalar_t>
inline int64_t group_rows(int64_t C) {
  return std::max<int64_t>(
      kMinGroupRows,
      kGroupBytes / std::max<int64_t>(C * static_cast<int64_t>(sizeof(scalar_t)), 1));
}

#if RF_USE_VEC
// A software prefetch stream kGroupsAhead groups ahead of the rows being worked on. A
// block walks its group's rows at stride C, which the hardware prefetchers follow poorly
// once the tensors are not in cache (the loops ran at 2-3x the time of the NCHW loops);
// the lines of the group kGroupsAhead ahead are instead requested in address order, a
// block's width per step, so that they are covered when every block has walked its group
// (one step per row and block). Addresses are kept as integers: they run past the tensor's
// end, where a prefetch is harmless (it never faults) but a pointer may not point. Streams
// the loop writes (dx) are requested for writing.
constexpr int64_t kGroupsAhead = 2;

template <typename scalar_t, bool kWrite = false>
struct PrefetchStream {
  std::uintptr_t addr;
  PrefetchStream(const scalar_t* base, int64_t first_row, int64_t C)
      : addr(reinterpret_cast<std::uintptr_t>(base) +
             static_cast<std::uintptr_t>(first_row * C) * sizeof(scalar_t)) {}
  C10_ALWAYS_INLINE void step(int64_t values) {
    if constexpr (kWrite) {
      __builtin_prefetch(reinterpret_cast<const void*>(addr), 1, 3);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(addr), _MM_HINT_T0);
    }
    addr += static_cast<std::uintptr_t>(values) * sizeof(scalar_t);
  }
};
#endif

// The largest value that rounds to zero in scalar_t (round to nearest even): the ReLU
// mask recomputed in fp32 must agree with the mask of the rounded output.
template <typename scalar_t>
constexpr op_t<scalar_t> zero_threshold() {
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
// The values p[off], ..., p[n - 1] (at most a vector's worth) as a vector: all lanes for
// n - off >= size, none (zero) for n <= off, lanes past the count zero; store_part writes
// the same lanes. p + off is formed only where a value is read or written there.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> load_part(const T* p, int64_t off, int64_t n) {
  using V = Vectorized<T>;
  const int64_t cnt = n - off;
  if (cnt >= V::size()) {
    return V::loadu(p + off);
  }
  return cnt > 0 ? V::loadu(p + off, cnt) : V(T(0));
}

template <typename T>
C10_ALWAYS_INLINE void store_part(const Vectorized<T>& v, T* p, int64_t off, int64_t n) {
  const int64_t cnt = n - off;
  if (cnt >= Vectorized<T>::size()) {
    v.store(p + off);
  } else if (cnt > 0) {
    v.store(p + off, static_cast<int>(cnt));
  }
}

// kStep values of scalar_t as two Vectorized<op_t>.
template <typename scalar_t>
struct AccVec {
  using acc_t = op_t<scalar_t>;
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
  // The first n (0 < n < kStep) values: lanes past n read as zero, and store_n writes the
  // first n lanes only. The loops' last, partial step goes through the same vector
  // arithmetic as the full ones (a scalar tail ran libm's exp per element: with
  // AVX-512's 32-value steps, C = 144 left 16 channels of every row to it).
  static inline void load_n(const scalar_t* p, int64_t n, aVec& a, aVec& b) {
    if constexpr (kReduced<scalar_t>) {
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, n));
    } else {
      a = load_part(p, 0, n);
      b = load_part(p, aVec::size(), n);
    }
  }
  static inline void store_n(scalar_t* p, int64_t n, const aVec& a, const aVec& b) {
    if constexpr (kReduced<scalar_t>) {
      at::vec::convert_from_float<scalar_t>(a, b).store(p, static_cast<int>(n));
    } else {
      store_part(a, p, 0, n);
      store_part(b, p, aVec::size(), n);
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

// Widening of op_t vectors into acc_t: the two halves of a float vector as doubles (AVX2's
// cvtps2pd: at::vec has no vectorised float -> double conversion; RF_USE_VEC is set for the
// AVX2 table only), or the vector itself.
template <typename o_t, typename a_t>
constexpr int64_t kWidenParts = sizeof(a_t) / sizeof(o_t);

template <typename o_t, typename a_t>
inline Vectorized<a_t> widen(const Vectorized<o_t>& v, int part) {
  if constexpr (std::is_same_v<o_t, a_t>) {
    return v;
  } else {
    static_assert(std::is_same_v<o_t, float> && std::is_same_v<a_t, double>);
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 f = v;
    return Vectorized<double>(_mm512_cvtps_pd(
        part == 0 ? _mm512_castps512_ps256(f)
                  : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))));
#else
    const __m256 f = v;
    return Vectorized<double>(_mm256_cvtps_pd(part == 0 ? _mm256_castps256_ps128(f)
                                                        : _mm256_extractf128_ps(f, 1)));
#endif
  }
}

// kStep values of scalar_t as 2 * kWidenParts acc_t vectors, loaded straight from memory
// (float -> double: cvtps2pd with a memory operand, no shuffles).
template <typename scalar_t>
inline void load_acc(const scalar_t* p, Vectorized<bn_acc_t<scalar_t>>* out) {
  using o_t = op_t<scalar_t>;
  using a_t = bn_acc_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<a_t, double>) {
    for (int q = 0; q < 4; ++q) {
#if defined(CPU_CAPABILITY_AVX512)
      out[q] = Vectorized<double>(_mm512_cvtps_pd(_mm256_loadu_ps(p + 8 * q)));
#else
      out[q] = Vectorized<double>(_mm256_cvtps_pd(_mm_loadu_ps(p + 4 * q)));
#endif
    }
  } else {
    static_assert(std::is_same_v<o_t, a_t>);
    AccVec<scalar_t>::load(p, out[0], out[1]);
  }
}
#endif


#if RF_USE_VEC
// exp for float vectors, inline (no call): at::vec's exp() is a call into Sleef, across
// which every vector register of the loops around it is spilled (all are caller-saved);
// in the fused loops that spilling was a large part of SiLU's and GELU's cost per
// element. exp(x) = 2^n * e^r with
// n = round(x*log2(e)), r = x - n*ln2 (two-part ln2, exact to float precision) and a
// degree-7 polynomial for e^r on |r| <= ln2/2 (the Cephes expf coefficients); about
// 1 ulp, like Sleef's u10. 2^n is applied with one rounding (times_pow2), so that results
// in the subnormal range round gradually and x > ~88.72 overflows to inf; NaN propagates.

// y * 2^n for a whole number n in [-150, 128] (exp_inline's), rounded once. AVX-512: one
// vscalefps. AVX2: two factors 2^(n/2) made in the exponent bits, each exact but for the
// last product's one rounding into the subnormal range or to inf: the same values.
C10_ALWAYS_INLINE Vectorized<float> times_pow2(const Vectorized<float>& y,
                                               const Vectorized<float>& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(y, n);
#else
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
#endif
}

C10_ALWAYS_INLINE Vectorized<float> exp_inline(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V xc = at::vec::clamp(x, V(-104.0f), V(89.0f));
  const V n = (xc * V(1.44269504088896341f)).round();  // to nearest, ties to even
  V r = at::vec::fmadd(n.neg(), V(0.693359375f), xc);
  r = at::vec::fmadd(n.neg(), V(-2.12194440e-4f), r);
  V p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, V(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, V(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, V(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, V(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, V(5.0000001201e-1f));
  const V y = at::vec::fmadd(p, r * r, r) + V(1.0f);
  return V::blendv(times_pow2(y, n), x, x.isnan());
}

// exp: inline for float, at::vec's (Sleef) for double input's arithmetic.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> exp_vec(const Vectorized<T>& v) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_inline(v);
  } else {
    return v.exp();
  }
}

// erf(z) and exp(-z*z) together (GELU's backward needs both). Float: Abramowitz and
// Stegun 7.1.26, the formula at::vec's float erf uses (|error| <= 1.5e-7), with the inline
// exp; double: at::vec's erf and exp.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> erf_vec(const Vectorized<T>& z, Vectorized<T>* exp_neg_z2) {
  using V = Vectorized<T>;
  if constexpr (!std::is_same_v<T, float>) {  // double input: at::vec's (Sleef) erf and exp
    if (exp_neg_z2 != nullptr) {
      *exp_neg_z2 = (z * z).neg().exp();
    }
    return z.erf();
  } else {
    const V t = V(T(1)) / at::vec::fmadd(V(T(0.3275911)), z.abs(), V(T(1)));
    V poly = at::vec::fmadd(V(T(1.061405429)), t, V(T(-1.453152027)));
    poly = at::vec::fmadd(poly, t, V(T(1.421413741)));
    poly = at::vec::fmadd(poly, t, V(T(-0.284496736)));
    poly = at::vec::fmadd(poly, t, V(T(0.254829592)));
    const V e = exp_inline((z * z).neg());
    if (exp_neg_z2 != nullptr) {
      *exp_neg_z2 = e;
    }
    const V mag = V(T(1)) - poly * t * e;
    // sign(z) * mag, NaN propagating through mag.
    return V::blendv(mag, mag.neg(), z < V(T(0)));
  }
}

// The activations of csrc/act.h on vectors of the arithmetic type. SiLU and GELU use the
// formulas of torch's vectorised kernels (x / (1 + exp(-x)); erf by the formula at::vec
// uses) with the inline exp above; GELU's tanh form as x * sigmoid(2u), the same function
// (0.5 * (1 + tanh(u)) = sigmoid(2u)) without tanh, finite for every finite input. ReLU is
// handled by the callers (clamp_min and the rounded mask).
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> act_vec(int64_t act, const Vectorized<T>& v, T param) {
  using V = Vectorized<T>;
  const V zero(T(0)), one(T(1)), half(T(0.5)), six(T(6)), three(T(3));
  switch (act) {
    case kActReLU:
      return at::vec::clamp_min(v, zero);
    case kActReLU6:
      return at::vec::clamp(v, zero, six);
    case kActLeakyReLU:
      return V::blendv(v * V(param), v, v > zero);
    case kActSiLU:
      return v / (one + exp_vec<T>(v.neg()));
    case kActHardswish:
      return v * at::vec::clamp(v + three, zero, six) / six;
    case kActGELU:
      return v * half * (one + erf_vec<T>(v * V(T(act_math::kSqrt1_2)), nullptr));
    case kActGELUTanh: {
      const V inner = V(T(act_math::kSqrt2OverPi)) * (v + V(T(act_math::kGeluTanhK)) * v * v * v);
      return v / (one + exp_vec<T>(inner * V(T(-2))));
    }
    case kActSigmoid:
      return one / (one + exp_vec<T>(v.neg()));
    default:
      return v;
  }
}

// 1 - s for s = 1/(1 + e): as e*s where s > 1/2, to rounding there, where 1 - s cancels
// (SiLU's and GELU-tanh's derivatives multiply it by about pre, resp. 2*pre*d_inner: the
// cancelled bits of s cost GELU-tanh's derivative 2e-6 at pre = 5, twice eager's error);
// as 1 - s elsewhere, where e may be inf.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> one_minus_sigmoid(const Vectorized<T>& s, const Vectorized<T>& e) {
  using V = Vectorized<T>;
  return V::blendv(V(T(1)) - s, e * s, s > V(T(0.5)));
}

// g * act'(pre).
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> act_grad_pre_vec(int64_t act, const Vectorized<T>& pre,
                                      const Vectorized<T>& g, T param) {
  using V = Vectorized<T>;
  const V zero(T(0)), one(T(1)), half(T(0.5)), six(T(6)), three(T(3));
  switch (act) {
    case kActReLU:
      return V::blendv(g, zero, pre <= zero);
    case kActReLU6:
      return V::blendv(g, zero, (pre <= zero) | (pre >= six));
    case kActLeakyReLU:
      return V::blendv(g * V(param), g, pre > zero);
    case kActSiLU: {
      const V e = exp_vec<T>(pre.neg());
      const V s = one / (one + e);
      return g * s * (one + pre * one_minus_sigmoid(s, e));
    }
    case kActHardswish: {
      const V mid = g * (pre / three + half);
      return V::blendv(V::blendv(mid, g, pre >= three), zero, pre <= three.neg());
    }
    case kActGELU: {
      // exp(-z^2) with z = pre/sqrt(2) is the density's exp(-pre^2/2): computed once.
      V e;
      const V cdf = half * (one + erf_vec<T>(pre * V(T(act_math::kSqrt1_2)), &e));
      return g * (cdf + pre * e * V(T(act_math::kInvSqrt2Pi)));
    }
    case kActGELUTanh: {
      // 0.5*(1 + tanh(u)) = s = sigmoid(2u) and 0.5*(1 - tanh(u)^2) = 2*s*(1 - s).
      const V x2 = pre * pre;
      const V kb(T(act_math::kSqrt2OverPi)), kk(T(act_math::kGeluTanhK));
      const V e = exp_vec<T>(kb * (pre + kk * x2 * pre) * V(T(-2)));
      const V s = one / (one + e);
      const V d_inner = kb * (one + V(T(3)) * kk * x2);
      return g * (s + V(T(2)) * pre * s * one_minus_sigmoid(s, e) * d_inner);
    }
    case kActSigmoid: {
      const V e = exp_vec<T>(pre.neg());
      const V s = one / (one + e);
      return g * one_minus_sigmoid(s, e) * s;
    }
    default:
      return g;
  }
}

// g * act' read from the output (act_from_output holds).
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> act_grad_out_vec(int64_t act, const Vectorized<T>& out,
                                      const Vectorized<T>& g, T param) {
  using V = Vectorized<T>;
  const V zero(T(0)), six(T(6));
  switch (act) {
    case kActReLU:
      return V::blendv(g, zero, out <= zero);
    case kActReLU6:
      return V::blendv(g, zero, (out <= zero) | (out >= six));
    case kActLeakyReLU:
      return V::blendv(g * V(param), g, out > zero);
    default:
      return g;
  }
}
#endif

// Mean (of x - shift) and M2 of `len` contiguous values: the corrected two-pass
// algorithm (the second pass reads from cache). Pass one gives an approximate centre mu;
// pass two sums d = x - mu and d*d, and mu + sum(d)/len is the mean to working
// precision even when mu's rounding error is large against the spread (the first pass's
// sum of x - shift grows with |mean - shift|); M2 = sum(d*d) - sum(d)^2/len. The per-channel
// shift (one of the channel's values) keeps tile means exact when |mean| >> std, e.g.
// 1e4 + N(0, 1), so that the merged partials do not cancel. Pass one (only a centre) runs in
// op_t; pass two in acc_t (float input: d, d*d and their sums in double).
template <typename scalar_t>
void contiguous_moments(const scalar_t* x, int64_t len, op_t<scalar_t> shift,
                        bn_acc_t<scalar_t>& mean, bn_acc_t<scalar_t>& m2) {
  using o_t = op_t<scalar_t>;
  using a_t = bn_acc_t<scalar_t>;
  if (len == 0) {
    mean = 0;
    m2 = 0;
    return;
  }
  int64_t i = 0;
  a_t sum = 0;
#if RF_USE_VEC
  using V = AccVec<scalar_t>;
  using oVec = typename V::aVec;
  using aVec = Vectorized<a_t>;
  constexpr int64_t kParts = kWidenParts<o_t, a_t>;
  {
    const oVec shv(shift);
    oVec s0(0), s1(0), a, b;
    for (; i + V::kStep <= len; i += V::kStep) {
      V::load(x + i, a, b);
      s0 += a - shv;
      s1 += b - shv;
    }
    sum = V::hsum(s0 + s1);
  }
#endif
  for (; i < len; ++i) {
    sum += static_cast<o_t>(x[i]) - shift;
  }
  const a_t center = static_cast<a_t>(shift) + sum / static_cast<a_t>(len);
  a_t sq = 0, sd = 0;
  i = 0;
#if RF_USE_VEC
  {
    const aVec cv(center);
    aVec vsd[2 * kParts], vsq[2 * kParts];
    for (int q = 0; q < 2 * kParts; ++q) {
      vsd[q] = aVec(a_t(0));
      vsq[q] = aVec(a_t(0));
    }
    aVec v[2 * kParts];
    for (; i + V::kStep <= len; i += V::kStep) {
      load_acc<scalar_t>(x + i, v);
      for (int q = 0; q < 2 * kParts; ++q) {
        const aVec d = v[q] - cv;
        vsd[q] += d;
        vsq[q] = at::vec::fmadd(d, d, vsq[q]);
      }
    }
    for (int q = 1; q < 2 * kParts; ++q) {
      vsd[0] += vsd[q];
      vsq[0] += vsq[q];
    }
    __at_align__ a_t buf[2][aVec::size()];
    vsd[0].store(buf[0]);
    vsq[0].store(buf[1]);
    for (int64_t l = 0; l < aVec::size(); ++l) {
      sd += buf[0][l];
      sq += buf[1][l];
    }
  }
#endif
  for (; i < len; ++i) {
    const a_t d = static_cast<a_t>(x[i]) - center;
    sd += d;
    sq += d * d;
  }
  const a_t corr = sd / static_cast<a_t>(len);
  mean = (center - static_cast<a_t>(shift)) + corr;
  m2 = std::max(sq - sd * corr, a_t(0));
}

// Per-channel mean (of x - shift[c]) and M2 of `rows` rows of C channels (a
// channels_last tile), corrected two-pass as in contiguous_moments. Pass one: rows
// outside, channels inside, streaming the tile sequentially, the per-channel sums in a
// small array (L1). Pass two (the tile is in L2 by then): a block of kStep channels at a
// time down the rows, its acc_t sums in registers. Per channel the rows are summed in
// order, as a channel-outer loop would.
template <typename scalar_t>
void rows_moments(const scalar_t* x, int64_t rows, int64_t C, const op_t<scalar_t>* shift,
                  bn_acc_t<scalar_t>* mean, bn_acc_t<scalar_t>* m2) {
  using o_t = op_t<scalar_t>;
  using a_t = bn_acc_t<scalar_t>;
  const a_t inv_rows = a_t(1) / static_cast<a_t>(rows);
  // Pass one: even and odd rows into two arrays of sums (two chains of dependent adds
  // through memory instead of one); only a centre comes of them.
  std::vector<o_t> sum(2 * C, o_t(0));
  std::vector<a_t> center(C), sd(C, a_t(0)), sq(C, a_t(0));
  // sum.data() read once: the vector stores below may alias the std::vector's pointer.
  o_t* const sum_p = sum.data();
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xr = x + r * C;
    o_t* const sr = sum_p + (r & 1) * C;
    int64_t c = 0;
#if RF_USE_VEC
    using V = AccVec<scalar_t>;
    using oVec = typename V::aVec;
    constexpr int64_t h = oVec::size();
    for (; c + V::kStep <= C; c += V::kStep) {
      oVec a, b;
      V::load(xr + c, a, b);
      (oVec::loadu(sr + c) + (a - oVec::loadu(shift + c))).store(sr + c);
      (oVec::loadu(sr + c + h) + (b - oVec::loadu(shift + c + h))).store(sr + c + h);
    }
#endif
    for (; c < C; ++c) {
      sr[c] += static_cast<o_t>(xr[c]) - shift[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    center[c] = static_cast<a_t>(shift[c]) +
                (static_cast<a_t>(sum_p[c]) + static_cast<a_t>(sum_p[C + c])) * inv_rows;
  }
  int64_t c0 = 0;
#if RF_USE_VEC
  {
    using V = AccVec<scalar_t>;
    using aVec = Vectorized<a_t>;
    constexpr int64_t kParts = kWidenParts<o_t, a_t>;
    if constexpr (kParts > 1) {
      // Float input: blocks of one float vector, whose double centres, sums and values
      // fit the registers (a kStep block's 16 did not: its sums were spilled).
      using oVec = Vectorized<o_t>;
      // Even and odd rows go to separate sums (added at the end): one chain of
      // dependent adds per sum made the loop wait on their latency.
      for (; c0 + oVec::size() <= C; c0 += oVec::size()) {
        aVec cv[kParts], vsd[2][kParts], vsq[2][kParts];
        for (int q = 0; q < kParts; ++q) {
          cv[q] = aVec::loadu(center.data() + c0 + q * aVec::size());
          vsd[0][q] = vsd[1][q] = vsq[0][q] = vsq[1][q] = aVec(a_t(0));
        }
        int64_t r = 0;
        for (; r + 2 <= rows; r += 2) {
          const scalar_t* const xc = x + r * C + c0;
          const oVec xv0 = oVec::loadu(xc), xv1 = oVec::loadu(xc + C);
          for (int q = 0; q < kParts; ++q) {
            const aVec d0 = widen<o_t, a_t>(xv0, q) - cv[q];
            const aVec d1 = widen<o_t, a_t>(xv1, q) - cv[q];
            vsd[0][q] += d0;
            vsd[1][q] += d1;
            vsq[0][q] = at::vec::fmadd(d0, d0, vsq[0][q]);
            vsq[1][q] = at::vec::fmadd(d1, d1, vsq[1][q]);
          }
        }
        if (r < rows) {
          const oVec xv0 = oVec::loadu(x + r * C + c0);
          for (int q = 0; q < kParts; ++q) {
            const aVec d0 = widen<o_t, a_t>(xv0, q) - cv[q];
            vsd[0][q] += d0;
            vsq[0][q] = at::vec::fmadd(d0, d0, vsq[0][q]);
          }
        }
        for (int q = 0; q < kParts; ++q) {
          (vsd[0][q] + vsd[1][q]).store(sd.data() + c0 + q * aVec::size());
          (vsq[0][q] + vsq[1][q]).store(sq.data() + c0 + q * aVec::size());
        }
      }
    }
    for (; c0 + V::kStep <= C; c0 += V::kStep) {
      aVec cv[2 * kParts], vsd[2 * kParts], vsq[2 * kParts], v[2 * kParts];
      for (int q = 0; q < 2 * kParts; ++q) {
        cv[q] = aVec::loadu(center.data() + c0 + q * aVec::size());
        vsd[q] = aVec(a_t(0));
        vsq[q] = aVec(a_t(0));
      }
      for (int64_t r = 0; r < rows; ++r) {
        load_acc<scalar_t>(x + r * C + c0, v);
        for (int q = 0; q < 2 * kParts; ++q) {
          const aVec d = v[q] - cv[q];
          vsd[q] += d;
          vsq[q] = at::vec::fmadd(d, d, vsq[q]);
        }
      }
      for (int q = 0; q < 2 * kParts; ++q) {
        vsd[q].store(sd.data() + c0 + q * aVec::size());
        vsq[q].store(sq.data() + c0 + q * aVec::size());
      }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xr = x + r * C;
    for (int64_t c = c0; c < C; ++c) {
      const a_t d = static_cast<a_t>(xr[c]) - center[c];
      sd[c] += d;
      sq[c] += d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const a_t corr = sd[c] * inv_rows;
    mean[c] = (center[c] - static_cast<a_t>(shift[c])) + corr;
    m2[c] = std::max(sq[c] - sd[c] * corr, a_t(0));
  }
}

template <typename scalar_t>
void bn_stats_typed(const scalar_t* x, const BnGeometry& g, bn_acc_t<scalar_t>* mean,
                    bn_acc_t<scalar_t>* var) {
  using o_t = op_t<scalar_t>;
  using acc_t = bn_acc_t<scalar_t>;
  const int64_t C = g.C;
  // One (count, mean, M2) partial per tile and channel.
  const int64_t rows_per_tile = g.channels_last ? chunk_rows(C) : g.HW;
  const int64_t M = g.N * g.HW;
  const int64_t tiles = g.channels_last ? (M + rows_per_tile - 1) / rows_per_tile : g.N;
  std::vector<acc_t> p_mean(tiles * C), p_m2(tiles * C);
  // Per-channel shift: the channel's first value (image 0, position 0).
  std::vector<o_t> shift(C);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<o_t>(x[g.channels_last ? c : c * g.HW]);
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
    mean[c] = n > 0 ? static_cast<acc_t>(shift[c]) + mu[c] : std::numeric_limits<acc_t>::quiet_NaN();
    var[c] = n > 0 ? m2[c] / static_cast<acc_t>(n) : std::numeric_limits<acc_t>::quiet_NaN();
  }
}

// Applies `body(x_ptr, ..., len, channel-parameter lookup)` over the tensor: for NCHW
// planes the parameters are scalars of channel c; for channels_last rows they vary along
// the row. Both loops are written out in each kernel below for clarity and speed.

// kGeneric: the loops for an activation other than identity and ReLU, instantiated per
// activation (kKind, see with_act_loops); identity and ReLU share loops without the
// activation code. The vector helpers they use are forced inline (C10_ALWAYS_INLINE and the
// lambdas' attribute): GCC otherwise outlined them once per-activation copies existed, and
// every vector then went through memory.
template <typename scalar_t, bool kGeneric, int kKind>
void bn_forward_typed(const scalar_t* x, const scalar_t* res, scalar_t* out, const BnGeometry& g,
                      const op_t<scalar_t>* mean, const op_t<scalar_t>* scale,
                      const op_t<scalar_t>* bias, ActSpec act_in) {
  using acc_t = op_t<scalar_t>;
  const int64_t C = g.C;
  const ActSpec act{kGeneric ? kKind : act_in.kind, act_in.param};
  const int64_t kind = act.kind;
  const acc_t param = static_cast<acc_t>(act.param);
  auto element = [&](acc_t xv, acc_t m, acc_t s, acc_t b, acc_t r) {
    const acc_t y = mul_add(xv - m, s, b) + r;
    if constexpr (kGeneric) {
      return act_apply<acc_t>(kind, param, y);
    } else {
      return kind == kActReLU ? relu_scalar(y) : y;
    }
  };
  if (g.channels_last) {
    const int64_t M = g.N * g.HW;
    at::parallel_for(0, M, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
#if RF_USE_VEC
      // Local copies: the vector stores may alias anything, so values read through the
      // reference captures would be reloaded on every step.
      const scalar_t* const xl = x;
      const scalar_t* const rl = res;
      scalar_t* const ol = out;
      const acc_t* const ml = mean;
      const acc_t* const sl = scale;
      const acc_t* const bl = bias;
      const int64_t kl = kind;
      const acc_t pl = param;
      using aVec0 = typename AccVec<scalar_t>::aVec;
      auto activate = [kl, pl](aVec0& a, aVec0& b) C10_ALWAYS_INLINE_ATTRIBUTE {
        if constexpr (kGeneric) {
          a = act_vec<acc_t>(kl, a, pl);
          b = act_vec<acc_t>(kl, b, pl);
        } else if (kl == kActReLU) {
          a = at::vec::clamp_min(a, aVec0(acc_t(0)));
          b = at::vec::clamp_min(b, aVec0(acc_t(0)));
        }
      };
#endif
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * C;
        int64_t c = 0;
#if RF_USE_VEC
        using V = AccVec<scalar_t>;
        using aVec = typename V::aVec;
        constexpr int64_t h = aVec::size();
        aVec a, b, ra, rb;
        // kStep channels from c (n = kStep), or the last n < kStep as one partial step
        // (AccVec::load_n, load_part: lanes past C are zero and not stored).
        auto step = [&](int64_t c, int64_t n, auto partial) C10_ALWAYS_INLINE_ATTRIBUTE {
          constexpr bool kPartial = decltype(partial)::value;
          auto par = [&](const acc_t* p, int64_t off) C10_ALWAYS_INLINE_ATTRIBUTE {
            return kPartial ? load_part(p + c, off, n) : aVec::loadu(p + c + off);
          };
          kPartial ? V::load_n(xl + base + c, n, a, b) : V::load(xl + base + c, a, b);
          a = at::vec::fmadd(a - par(ml, 0), par(sl, 0), par(bl, 0));
          b = at::vec::fmadd(b - par(ml, h), par(sl, h), par(bl, h));
          if (rl != nullptr) {
            kPartial ? V::load_n(rl + base + c, n, ra, rb) : V::load(rl + base + c, ra, rb);
            a += ra;
            b += rb;
          }
          activate(a, b);
          kPartial ? V::store_n(ol + base + c, n, a, b) : V::store(ol + base + c, a, b);
        };
        for (; c + V::kStep <= C; c += V::kStep) {
          step(c, V::kStep, std::false_type{});
        }
        if (c < C) {
          step(c, C - c, std::true_type{});
          c = C;
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
        // Local copies (see the channels_last loop).
        const scalar_t* const xl = x + base;
        const scalar_t* const rl = res != nullptr ? res + base : nullptr;
        scalar_t* const ol = out + base;
        const int64_t kl = kind;
        const acc_t pl = param;
        auto step = [&](int64_t i, int64_t n, auto partial) C10_ALWAYS_INLINE_ATTRIBUTE {
          constexpr bool kPartial = decltype(partial)::value;
          kPartial ? V::load_n(xl + i, n, a, b) : V::load(xl + i, a, b);
          a = at::vec::fmadd(a - mv, sv, bv);
          b = at::vec::fmadd(b - mv, sv, bv);
          if (rl != nullptr) {
            kPartial ? V::load_n(rl + i, n, ra, rb) : V::load(rl + i, ra, rb);
            a += ra;
            b += rb;
          }
          if constexpr (kGeneric) {
            a = act_vec<acc_t>(kl, a, pl);
            b = act_vec<acc_t>(kl, b, pl);
          } else if (kl == kActReLU) {
            a = at::vec::clamp_min(a, zero);
            b = at::vec::clamp_min(b, zero);
          }
          kPartial ? V::store_n(ol + i, n, a, b) : V::store(ol + i, a, b);
        };
        for (; i + V::kStep <= HW; i += V::kStep) {
          step(i, V::kStep, std::false_type{});
        }
        if (i < HW) {  // the last HW - i < kStep positions: one partial step
          step(i, HW - i, std::true_type{});
          i = HW;
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

// g for one element: grad * act' per `mask`. ReLU's mask from the input compares y with
// the largest value that rounds to zero, so that it agrees with the stored output's mask.
// `out`: the second stream (the output, or the residual: see BnMask).
template <typename scalar_t, bool kGeneric>
inline op_t<scalar_t> masked_grad_scalar(BnMask mask, const ActSpec& act, op_t<scalar_t> grad,
                                         op_t<scalar_t> xmu, op_t<scalar_t> s, op_t<scalar_t> b,
                                         const scalar_t* out, int64_t offset) {
  using acc_t = op_t<scalar_t>;
  const acc_t param = static_cast<acc_t>(act.param);
  if (mask == BnMask::kFromOut) {
    const acc_t o = static_cast<acc_t>(out[offset]);
    if constexpr (kGeneric) {
      return act_grad_from_out<acc_t>(act.kind, param, o, grad);
    } else {
      return o <= acc_t(0) ? acc_t(0) : grad;  // ReLU
    }
  }
  if (mask == BnMask::kFromInput || mask == BnMask::kFromInputResidual) {
    // (as bn_forward_typed: the affine, then + the residual, in the arithmetic type)
    const acc_t y = mask == BnMask::kFromInputResidual
                        ? mul_add(xmu, s, b) + static_cast<acc_t>(out[offset])
                        : mul_add(xmu, s, b);
    if constexpr (kGeneric) {
      return act_grad_from_pre<acc_t>(act.kind, param, y, grad);
    } else {
      return y <= zero_threshold<scalar_t>() ? acc_t(0) : grad;  // ReLU
    }
  }
  return grad;
}

#if RF_USE_VEC
template <typename scalar_t, bool kGeneric>
C10_ALWAYS_INLINE Vectorized<op_t<scalar_t>> masked_grad_vec(
    BnMask mask, const ActSpec& act, const Vectorized<op_t<scalar_t>>& grad,
    const Vectorized<op_t<scalar_t>>& xmu, const Vectorized<op_t<scalar_t>>& s,
    const Vectorized<op_t<scalar_t>>& b, const Vectorized<op_t<scalar_t>>& outv) {
  using acc_t = op_t<scalar_t>;
  using aVec = Vectorized<acc_t>;
  const aVec zero(0);
  const acc_t param = static_cast<acc_t>(act.param);
  if (mask == BnMask::kFromOut) {
    if constexpr (kGeneric) {
      return act_grad_out_vec<acc_t>(act.kind, outv, grad, param);
    } else {
      return aVec::blendv(grad, zero, outv <= zero);  // ReLU
    }
  }
  if (mask == BnMask::kFromInput || mask == BnMask::kFromInputResidual) {
    // (outv: the residual for kFromInputResidual, zero otherwise)
    const aVec y = mask == BnMask::kFromInputResidual ? at::vec::fmadd(xmu, s, b) + outv
                                                      : at::vec::fmadd(xmu, s, b);
    if constexpr (kGeneric) {
      return act_grad_pre_vec<acc_t>(act.kind, y, grad, param);
    } else {
      return aVec::blendv(grad, zero, y <= aVec(zero_threshold<scalar_t>()));  // ReLU
    }
  }
  return grad;
}
#endif

// Whether the backward reduction reads `out`, its second stream (see BnMask).
inline bool reads_second_stream(BnMask mask) {
  return mask == BnMask::kFromOut || mask == BnMask::kFromInputResidual;
}

template <typename scalar_t, bool kGeneric, int kKind>
void bn_backward_reduce_typed(const scalar_t* grad, const scalar_t* x, const scalar_t* out,
                              scalar_t* masked, const BnGeometry& g, const op_t<scalar_t>* mean,
                              const op_t<scalar_t>* scale, const op_t<scalar_t>* bias,
                              const bn_acc_t<scalar_t>* mean_acc, BnMask mask, ActSpec act_in,
                              bn_acc_t<scalar_t>* sum_dy, bn_acc_t<scalar_t>* sum_dy_xmu) {
  const ActSpec act{kGeneric ? kKind : act_in.kind, act_in.param};
  using o_t = op_t<scalar_t>;
  using a_t = bn_acc_t<scalar_t>;
  const int64_t C = g.C;
  const int64_t M = g.N * g.HW;
  const int64_t rows_per_tile = g.channels_last ? chunk_rows(C) : g.HW;
  const int64_t tiles = g.channels_last ? (M + rows_per_tile - 1) / rows_per_tile : g.N;
  std::vector<a_t> p_dy(tiles * C, a_t(0)), p_dyx(tiles * C, a_t(0));
  // g masked in op_t (the forward's arithmetic decides the ReLU mask); g and g*(x - mean)
  // summed in acc_t from the acc_t mean (float input: the products and sums in double,
  // exact but for the sums' roundings).
  auto element = [&](int64_t off, int64_t c, a_t& dy, a_t& dyx) {
    const o_t xv = static_cast<o_t>(x[off]);
    const o_t gv = masked_grad_scalar<scalar_t, kGeneric>(mask, act, static_cast<o_t>(grad[off]),
                                                xv - mean[c], scale[c], bias[c], out, off);
    if (masked != nullptr) {
      masked[off] = static_cast<scalar_t>(gv);
    }
    dy += static_cast<a_t>(gv);
    dyx += static_cast<a_t>(gv) * (static_cast<a_t>(xv) - mean_acc[c]);
  };
#if RF_USE_VEC
  using V = AccVec<scalar_t>;
  using oVec = typename V::aVec;
  using aVec = Vectorized<a_t>;
  constexpr int64_t kParts = kWidenParts<o_t, a_t>;
  // One op_t vector: the masked gradient (stored when asked), then its sums into dy[] and
  // dyx[] (kParts acc_t vectors each).
  auto vec_part = [=](const oVec& xv, oVec gv, const oVec& outv, const oVec& mv, const oVec& sv,
                      const oVec& bv, const aVec* ma, aVec* dy,
                      aVec* dyx) C10_ALWAYS_INLINE_ATTRIBUTE -> oVec {
    gv = masked_grad_vec<scalar_t, kGeneric>(mask, act, gv, xv - mv, sv, bv, outv);
    for (int p = 0; p < kParts; ++p) {
      const aVec gp = widen<o_t, a_t>(gv, p);
      dy[p] += gp;
      dyx[p] = at::vec::fmadd(gp, widen<o_t, a_t>(xv, p) - ma[p], dyx[p]);
    }
    return gv;
  };
#endif
  if (g.channels_last) {
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        a_t* dy = p_dy.data() + t * C;
        a_t* dyx = p_dyx.data() + t * C;
        const int64_t r0 = t * rows_per_tile;
        const int64_t r1 = std::min(M, r0 + rows_per_tile);
        // Groups of group_rows(C) rows in order, prefetched ahead (see PrefetchStream); in
        // a group, blocks of channels outside and the group's rows inside: a block's
        // parameters and acc_t sums stay in registers down the group's rows, and are
        // loaded from and stored to the tile's sums once per group. Per channel the rows
        // are still summed in order, so the sums are those of a channel-outer loop.
        const int64_t group = group_rows<scalar_t>(C);
        for (int64_t g0 = r0; g0 < r1; g0 += group) {
          const int64_t g1 = std::min(r1, g0 + group);
          int64_t c = 0;
#if RF_USE_VEC
          constexpr int64_t h = oVec::size();
          // Local copies: the loops' vector stores may alias anything, so values read
          // through the lambdas' reference captures would be reloaded on every row.
          const scalar_t* const xl = x;
          const scalar_t* const gl = grad;
          const scalar_t* const ol = reads_second_stream(mask) ? out : nullptr;
          scalar_t* const ml = masked;
          const int64_t Cl = C;
          const auto vp = vec_part;
          const int64_t ahead = g0 + kGroupsAhead * group;
          PrefetchStream<scalar_t> pfx(xl, ahead, Cl), pfg(gl, ahead, Cl), pfo(ol, ahead, Cl);
          PrefetchStream<scalar_t, /*kWrite=*/true> pfm(ml, ahead, Cl);
          auto prefetch_step = [&](int64_t values) C10_ALWAYS_INLINE_ATTRIBUTE {
            pfx.step(values);
            pfg.step(values);
            if (ol != nullptr) {
              pfo.step(values);
            }
            if (ml != nullptr) {
              pfm.step(values);
            }
          };
          if constexpr (kParts > 1) {
            // Float input: blocks of one float vector. A block of kStep channels would
            // keep 18 vectors live (its double sums, the double mean and the float
            // parameters of both halves): more than AVX2's 16 registers, and the sums
            // spilled to the stack made a dependency through memory on every row.
            for (; c + h <= C; c += h) {
              const oVec mv = oVec::loadu(mean + c), sv = oVec::loadu(scale + c);
              const oVec bv = oVec::loadu(bias + c);
              aVec ma[kParts], sdy[kParts], sdyx[kParts];
              for (int p = 0; p < kParts; ++p) {
                ma[p] = aVec::loadu(mean_acc + c + p * aVec::size());
                sdy[p] = aVec::loadu(dy + c + p * aVec::size());
                sdyx[p] = aVec::loadu(dyx + c + p * aVec::size());
              }
              for (int64_t row = g0; row < g1; ++row) {
                const int64_t off = row * Cl + c;
                prefetch_step(h);
                const oVec xv = oVec::loadu(xl + off);
                const oVec ov = ol != nullptr ? oVec::loadu(ol + off) : oVec(0);
                const oVec gv = vp(xv, oVec::loadu(gl + off), ov, mv, sv, bv, ma, sdy, sdyx);
                if (ml != nullptr) {
                  gv.store(ml + off);
                }
              }
              for (int p = 0; p < kParts; ++p) {
                sdy[p].store(dy + c + p * aVec::size());
                sdyx[p].store(dyx + c + p * aVec::size());
              }
            }
          }
          // Blocks of kStep channels; the last C - c < kStep channels as one partial block
          // (AccVec::load_n; lanes past C are zero, add zero to the sums and are not stored).
          auto block = [&](int64_t c, int64_t n, auto partial) C10_ALWAYS_INLINE_ATTRIBUTE {
            constexpr bool kPartial = decltype(partial)::value;
            const oVec mva = load_part(mean + c, 0, n), mvb = load_part(mean + c, h, n);
            const oVec sva = load_part(scale + c, 0, n), svb = load_part(scale + c, h, n);
            const oVec bva = load_part(bias + c, 0, n), bvb = load_part(bias + c, h, n);
            aVec maa[kParts], mab[kParts], sdya[kParts], sdyb[kParts], sdyxa[kParts], sdyxb[kParts];
            for (int p = 0; p < kParts; ++p) {
              const int64_t oa = p * aVec::size(), ob = h + p * aVec::size();
              maa[p] = load_part(mean_acc + c, oa, n);
              mab[p] = load_part(mean_acc + c, ob, n);
              sdya[p] = load_part(dy + c, oa, n);
              sdyb[p] = load_part(dy + c, ob, n);
              sdyxa[p] = load_part(dyx + c, oa, n);
              sdyxb[p] = load_part(dyx + c, ob, n);
            }
            for (int64_t row = g0; row < g1; ++row) {
              const int64_t off = row * Cl + c;
              prefetch_step(n);
              oVec ga, gb, xa, xb, oa(0), ob(0);
              if constexpr (kPartial) {
                V::load_n(gl + off, n, ga, gb);
                V::load_n(xl + off, n, xa, xb);
                if (ol != nullptr) {
                  V::load_n(ol + off, n, oa, ob);
                }
              } else {
                V::load(gl + off, ga, gb);
                V::load(xl + off, xa, xb);
                if (ol != nullptr) {
                  V::load(ol + off, oa, ob);
                }
              }
              ga = vp(xa, ga, oa, mva, sva, bva, maa, sdya, sdyxa);
              gb = vp(xb, gb, ob, mvb, svb, bvb, mab, sdyb, sdyxb);
              if (ml != nullptr) {
                kPartial ? V::store_n(ml + off, n, ga, gb) : V::store(ml + off, ga, gb);
              }
            }
            for (int p = 0; p < kParts; ++p) {
              const int64_t oa = p * aVec::size(), ob = h + p * aVec::size();
              store_part(sdya[p], dy + c, oa, n);
              store_part(sdyb[p], dy + c, ob, n);
              store_part(sdyxa[p], dyx + c, oa, n);
              store_part(sdyxb[p], dyx + c, ob, n);
            }
          };
          for (; c + V::kStep <= C; c += V::kStep) {
            block(c, V::kStep, std::false_type{});
          }
          if (c < C) {
            block(c, C - c, std::true_type{});
            c = C;
          }
#endif
          for (int64_t row = g0; row < g1; ++row) {
            for (int64_t cc = c; cc < C; ++cc) {
              element(row * C + cc, cc, dy[cc], dyx[cc]);
            }
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
        a_t dy = 0, dyx = 0;
        int64_t i = 0;
#if RF_USE_VEC
        const oVec mv(mean[c]), sv(scale[c]), bv(bias[c]);
        aVec ma[kParts], sdy[kParts], sdyx[kParts];
        for (int q = 0; q < kParts; ++q) {
          ma[q] = aVec(mean_acc[c]);
          sdy[q] = aVec(a_t(0));
          sdyx[q] = aVec(a_t(0));
        }
        oVec ga, gb, xa, xb, oa(0), ob(0);
        // Local copies (see the channels_last loop).
        const scalar_t* const gl = grad + base;
        const scalar_t* const xl = x + base;
        const scalar_t* const ol = reads_second_stream(mask) ? out + base : nullptr;
        scalar_t* const ml = masked != nullptr ? masked + base : nullptr;
        const auto vp = vec_part;
        for (; i + V::kStep <= HW; i += V::kStep) {
          V::load(gl + i, ga, gb);
          V::load(xl + i, xa, xb);
          if (ol != nullptr) {
            V::load(ol + i, oa, ob);
          }
          ga = vp(xa, ga, oa, mv, sv, bv, ma, sdy, sdyx);
          gb = vp(xb, gb, ob, mv, sv, bv, ma, sdy, sdyx);
          if (ml != nullptr) {
            V::store(ml + i, ga, gb);
          }
        }
        if (i < HW) {  // the last HW - i < kStep positions: one partial step
          // Lanes past n: grad 0 and x the channel's mean, so that their pre-activation is
          // the bias and their g = 0 * act'(bias) adds zero to the sums (x = 0 could put
          // the pre-activation far out, where act' overflows and 0 * inf is NaN).
          const int64_t n = HW - i;
          V::load_n(gl + i, n, ga, gb);
          V::load_n(xl + i, n, xa, xb);
          xa = oVec::set(mv, xa, std::min<int64_t>(n, oVec::size()));
          xb = oVec::set(mv, xb, std::max<int64_t>(n - oVec::size(), 0));
          if (ol != nullptr) {
            V::load_n(ol + i, n, oa, ob);
          }
          ga = vp(xa, ga, oa, mv, sv, bv, ma, sdy, sdyx);
          gb = vp(xb, gb, ob, mv, sv, bv, ma, sdy, sdyx);
          if (ml != nullptr) {
            V::store_n(ml + i, n, ga, gb);
          }
          i = HW;
        }
        for (int q = 1; q < kParts; ++q) {
          sdy[0] += sdy[q];
          sdyx[0] += sdyx[q];
        }
        __at_align__ a_t buf[2][aVec::size()];
        sdy[0].store(buf[0]);
        sdyx[0].store(buf[1]);
        for (int64_t l = 0; l < aVec::size(); ++l) {
          dy += buf[0][l];
          dyx += buf[1][l];
        }
#endif
        for (; i < HW; ++i) {
          element(base + i, c, dy, dyx);
        }
        p_dy[p] = dy;
        p_dyx[p] = dyx;
      }
    });
  }
  // Sum the tiles in order (channels inner).
  std::fill(sum_dy, sum_dy + C, a_t(0));
  std::fill(sum_dy_xmu, sum_dy_xmu + C, a_t(0));
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += p_dy[t * C + c];
      sum_dy_xmu[c] += p_dyx[t * C + c];
    }
  }
}

#if RF_USE_VEC
// The inverse of widen: kWidenParts acc_t vectors back into one op_t vector (cvtpd2ps).
template <typename o_t, typename a_t>
inline Vectorized<o_t> narrow(const Vectorized<a_t>* parts) {
  if constexpr (std::is_same_v<o_t, a_t>) {
    return parts[0];
  } else {
    static_assert(std::is_same_v<o_t, float> && std::is_same_v<a_t, double>);
#if defined(CPU_CAPABILITY_AVX512)
    const __m512d lo = parts[0], hi = parts[1];
    return Vectorized<float>(_mm512_castpd_ps(_mm512_insertf64x4(
        _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(lo))),
        _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1)));
#else
    const __m256d lo = parts[0], hi = parts[1];
    return Vectorized<float>(_mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)));
#endif
  }
}
#endif

// grad_input. The ReLU mask (BnMask::kFromInput) is recomputed with the forward's
// arithmetic (op_t: mean, scale, bias as bn_act_forward got them); the gradient itself is
// computed in acc_t from the accumulation-type statistics (mean_acc, scale_acc, k, cst):
// its terms cancel where BatchNorm's output does not depend on the input (a channel that is
// all padding but one value), so float input is computed in double, as the reference
// computes it, and rounded once.
template <typename scalar_t, bool kGeneric, int kKind>
void bn_backward_elemt_typed(const scalar_t* grad, const scalar_t* x, scalar_t* dx,
                             const BnGeometry& g, const op_t<scalar_t>* mean,
                             const op_t<scalar_t>* scale, const op_t<scalar_t>* bias,
                             const bn_acc_t<scalar_t>* mean_acc,
                             const bn_acc_t<scalar_t>* scale_acc, const bn_acc_t<scalar_t>* k,
                             const bn_acc_t<scalar_t>* cst, BnMask mask, ActSpec act_in) {
  const ActSpec act{kGeneric ? kKind : act_in.kind, act_in.param};
  using o_t = op_t<scalar_t>;
  using a_t = bn_acc_t<scalar_t>;
  const int64_t C = g.C;
  // Running statistics (k, cst null): dx = g*scale only. The batch-statistics term
  // (x - mean)*k + cst must not be evaluated there with k = cst = 0: an Inf or NaN input
  // would turn it into NaN where eager's gradient g*scale is finite.
  const bool batch = k != nullptr;
  auto element = [&](o_t xv, o_t gv, int64_t c) -> scalar_t {
    const o_t gm = masked_grad_scalar<scalar_t, kGeneric>(mask, act, gv, xv - mean[c], scale[c], bias[c],
                                                nullptr, 0);
    const a_t ga = static_cast<a_t>(gm);
    const a_t xmu = static_cast<a_t>(xv) - mean_acc[c];
    return static_cast<scalar_t>(batch ? mul_add(ga, scale_acc[c], mul_add(xmu, k[c], cst[c]))
                                       : ga * scale_acc[c]);
  };
#if RF_USE_VEC
  using V = AccVec<scalar_t>;
  using oVec = typename V::aVec;
  using aVec = Vectorized<a_t>;
  constexpr int64_t kParts = kWidenParts<o_t, a_t>;
  // One op_t vector of x and grad at channels c.. (NCHW: scalar parameters broadcast):
  // the masked gradient in op_t, then dx in acc_t.
  auto vec_part = [=](const oVec& xv, oVec gv, const oVec& mv, const oVec& sv, const oVec& bv,
                      const aVec* ma, const aVec* sa, const aVec* ka,
                      const aVec* ca) C10_ALWAYS_INLINE_ATTRIBUTE -> oVec {
    gv = masked_grad_vec<scalar_t, kGeneric>(mask, act, gv, xv - mv, sv, bv, oVec(0));
    aVec out[kParts];
    for (int p = 0; p < kParts; ++p) {
      const aVec gp = widen<o_t, a_t>(gv, p);
      if (batch) {
        const aVec xp = widen<o_t, a_t>(xv, p) - ma[p];
        out[p] = at::vec::fmadd(gp, sa[p], at::vec::fmadd(xp, ka[p], ca[p]));
      } else {
        out[p] = gp * sa[p];
      }
    }
    return narrow<o_t, a_t>(out);
  };
#endif
  if (g.channels_last) {
    const int64_t M = g.N * g.HW;
    at::parallel_for(0, M, std::max<int64_t>(1, kGrainSize / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      // Groups of group_rows(C) rows in order, prefetched ahead (see PrefetchStream); in
      // each, blocks of channels outside and the group's rows inside, the block's
      // parameters loaded once per group (rows outside reloaded 2*4*kParts acc_t vectors
      // per step).
      const int64_t sub = group_rows<scalar_t>(C);
      for (int64_t r0 = begin; r0 < end; r0 += sub) {
        const int64_t r1 = std::min(end, r0 + sub);
        int64_t c = 0;
#if RF_USE_VEC
        constexpr int64_t h = oVec::size();
        // Local copies (see bn_backward_reduce_typed).
        const scalar_t* const xl = x;
        const scalar_t* const gl = grad;
        scalar_t* const dxl = dx;
        const int64_t Cl = C;
        const auto vp = vec_part;
        const int64_t ahead = r0 + kGroupsAhead * sub;
        PrefetchStream<scalar_t> pfx(xl, ahead, Cl), pfg(gl, ahead, Cl);
        PrefetchStream<scalar_t, /*kWrite=*/true> pfd(dxl, ahead, Cl);
        auto prefetch_step = [&](int64_t values) C10_ALWAYS_INLINE_ATTRIBUTE {
          pfx.step(values);
          pfg.step(values);
          pfd.step(values);
        };
        if constexpr (kParts > 1) {
          // Float input: blocks of one float vector (see bn_backward_reduce_typed: the
          // double parameters of a kStep block would not fit the registers).
          for (; c + h <= C; c += h) {
            const oVec mv = oVec::loadu(mean + c), sv = oVec::loadu(scale + c);
            const oVec bv = oVec::loadu(bias + c);
            aVec ma[kParts], sa[kParts], ka[kParts], ca[kParts];
            for (int p = 0; p < kParts; ++p) {
              const int64_t o = c + p * aVec::size();
              ma[p] = aVec::loadu(mean_acc + o);
              sa[p] = aVec::loadu(scale_acc + o);
              ka[p] = batch ? aVec::loadu(k + o) : aVec(a_t(0));
              ca[p] = batch ? aVec::loadu(cst + o) : aVec(a_t(0));
            }
            for (int64_t row = r0; row < r1; ++row) {
              const int64_t off = row * Cl + c;
              prefetch_step(h);
              vp(oVec::loadu(xl + off), oVec::loadu(gl + off), mv, sv, bv, ma, sa, ka, ca)
                  .store(dxl + off);
            }
          }
        }
        // Blocks of kStep channels; the last C - c < kStep as one partial block.
        auto block = [&](int64_t c, int64_t n, auto partial) C10_ALWAYS_INLINE_ATTRIBUTE {
          constexpr bool kPartial = decltype(partial)::value;
          const oVec mva = load_part(mean + c, 0, n), mvb = load_part(mean + c, h, n);
          const oVec sva = load_part(scale + c, 0, n), svb = load_part(scale + c, h, n);
          const oVec bva = load_part(bias + c, 0, n), bvb = load_part(bias + c, h, n);
          aVec maa[kParts], saa[kParts], kaa[kParts], caa[kParts];
          aVec mab[kParts], sab[kParts], kab[kParts], cab[kParts];
          for (int p = 0; p < kParts; ++p) {
            const int64_t oa = p * aVec::size(), ob = h + p * aVec::size();
            maa[p] = load_part(mean_acc + c, oa, n);
            mab[p] = load_part(mean_acc + c, ob, n);
            saa[p] = load_part(scale_acc + c, oa, n);
            sab[p] = load_part(scale_acc + c, ob, n);
            kaa[p] = kab[p] = caa[p] = cab[p] = aVec(a_t(0));
            if (batch) {
              kaa[p] = load_part(k + c, oa, n);
              kab[p] = load_part(k + c, ob, n);
              caa[p] = load_part(cst + c, oa, n);
              cab[p] = load_part(cst + c, ob, n);
            }
          }
          for (int64_t row = r0; row < r1; ++row) {
            const int64_t off = row * Cl + c;
            prefetch_step(n);
            oVec ga, gb, xa, xb;
            if constexpr (kPartial) {
              V::load_n(gl + off, n, ga, gb);
              V::load_n(xl + off, n, xa, xb);
            } else {
              V::load(gl + off, ga, gb);
              V::load(xl + off, xa, xb);
            }
            const oVec ra = vp(xa, ga, mva, sva, bva, maa, saa, kaa, caa);
            const oVec rb = vp(xb, gb, mvb, svb, bvb, mab, sab, kab, cab);
            kPartial ? V::store_n(dxl + off, n, ra, rb) : V::store(dxl + off, ra, rb);
          }
        };
        for (; c + V::kStep <= C; c += V::kStep) {
          block(c, V::kStep, std::false_type{});
        }
        if (c < C) {
          block(c, C - c, std::true_type{});
          c = C;
        }
#endif
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t base = row * C;
          for (int64_t cc = c; cc < C; ++cc) {
            dx[base + cc] =
                element(static_cast<o_t>(x[base + cc]), static_cast<o_t>(grad[base + cc]), cc);
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
        int64_t i = 0;
#if RF_USE_VEC
        const oVec mv(mean[c]), sv(scale[c]), bv(bias[c]);
        aVec ma[kParts], sa[kParts], ka[kParts], ca[kParts];
        for (int q = 0; q < kParts; ++q) {
          ma[q] = aVec(mean_acc[c]);
          sa[q] = aVec(scale_acc[c]);
          ka[q] = aVec(batch ? k[c] : a_t(0));
          ca[q] = aVec(batch ? cst[c] : a_t(0));
        }
        oVec ga, gb, xa, xb;
        // Local copies (see the channels_last loop).
        const scalar_t* const gl = grad + base;
        const scalar_t* const xl = x + base;
        scalar_t* const dxl = dx + base;
        const auto vp = vec_part;
        for (; i + V::kStep <= HW; i += V::kStep) {
          V::load(gl + i, ga, gb);
          V::load(xl + i, xa, xb);
          V::store(dxl + i, vp(xa, ga, mv, sv, bv, ma, sa, ka, ca),
                   vp(xb, gb, mv, sv, bv, ma, sa, ka, ca));
        }
        if (i < HW) {  // the last HW - i < kStep positions: one partial step
          const int64_t n = HW - i;
          V::load_n(gl + i, n, ga, gb);
          V::load_n(xl + i, n, xa, xb);
          V::store_n(dxl + i, n, vp(xa, ga, mv, sv, bv, ma, sa, ka, ca),
                     vp(xb, gb, mv, sv, bv, ma, sa, ka, ca));
          i = HW;
        }
#endif
        for (; i < HW; ++i) {
          dx[base + i] = element(static_cast<o_t>(x[base + i]), static_cast<o_t>(grad[base + i]), c);
        }
      }
    });
  }
}

// f(std::bool_constant<kGeneric>, std::integral_constant<int, kKind>): the loops for
// identity and ReLU (kind read at run time: kGeneric false), or the instantiation for one
// of kKinds, its kind a compile-time constant so that the activation switch in the vector
// helpers folds away.
template <int... kKinds, typename F>
void dispatch_act_kind(int64_t kind, const F& f) {
  const bool generic =
      ((kind == kKinds && (f(std::true_type{}, std::integral_constant<int, kKinds>{}), true)) ||
       ...);
  if (!generic) {  // identity, ReLU (the op has checked the code)
    f(std::false_type{}, std::integral_constant<int, kActIdentity>{});
  }
}

template <typename F>
void with_act_loops(const ActSpec& act, const F& f) {
  dispatch_act_kind<kActReLU6, kActLeakyReLU, kActSiLU, kActHardswish, kActGELU, kActGELUTanh,
                    kActSigmoid>(act.kind, f);
}

template <typename scalar_t>
using acc_ptr = bn_acc_t<scalar_t>*;
template <typename scalar_t>
using cop_ptr = const op_t<scalar_t>*;

void bn_stats_impl(c10::ScalarType dtype, const void* x, const BnGeometry& g, void* mean,
                   void* var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_stats_cpu", [&] {
    bn_stats_typed<scalar_t>(static_cast<const scalar_t*>(x), g, static_cast<acc_ptr<scalar_t>>(mean),
                             static_cast<acc_ptr<scalar_t>>(var));
  });
}

void bn_forward_impl(c10::ScalarType dtype, const void* x, const void* residual, void* out,
                     const BnGeometry& g, const void* mean, const void* scale, const void* bias,
                     ActSpec act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_act_forward_cpu", [&] {
    with_act_loops(act, [&](auto generic, auto kind) {
      bn_forward_typed<scalar_t, decltype(generic)::value, decltype(kind)::value>(
          static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(residual),
          static_cast<scalar_t*>(out), g, static_cast<cop_ptr<scalar_t>>(mean),
          static_cast<cop_ptr<scalar_t>>(scale), static_cast<cop_ptr<scalar_t>>(bias), act);
    });
  });
}

void bn_backward_reduce_impl(c10::ScalarType dtype, const void* grad, const void* x,
                             const void* out, void* masked, const BnGeometry& g, const void* mean,
                             const void* scale, const void* bias, const void* mean_acc,
                             BnMask mask, ActSpec act, void* sum_dy, void* sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_act_backward_reduce_cpu", [&] {
    with_act_loops(act, [&](auto generic, auto kind) {
      bn_backward_reduce_typed<scalar_t, decltype(generic)::value, decltype(kind)::value>(
          static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(x),
          static_cast<const scalar_t*>(out), static_cast<scalar_t*>(masked), g,
          static_cast<cop_ptr<scalar_t>>(mean), static_cast<cop_ptr<scalar_t>>(scale),
          static_cast<cop_ptr<scalar_t>>(bias), static_cast<const bn_acc_t<scalar_t>*>(mean_acc),
          mask, act, static_cast<acc_ptr<scalar_t>>(sum_dy),
          static_cast<acc_ptr<scalar_t>>(sum_dy_xmu));
    });
  });
}

void bn_backward_elemt_impl(c10::ScalarType dtype, const void* grad, const void* x, void* dx,
                            const BnGeometry& g, const void* mean, const void* scale,
                            const void* bias, const void* mean_acc, const void* scale_acc,
                            const void* k, const void* c, BnMask mask, ActSpec act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_act_backward_elemt_cpu", [&] {
    using cacc_ptr = const bn_acc_t<scalar_t>*;
    with_act_loops(act, [&](auto generic, auto kind) {
      bn_backward_elemt_typed<scalar_t, decltype(generic)::value, decltype(kind)::value>(
          static_cast<const scalar_t*>(grad), static_cast<const scalar_t*>(x),
          static_cast<scalar_t*>(dx), g, static_cast<cop_ptr<scalar_t>>(mean),
          static_cast<cop_ptr<scalar_t>>(scale), static_cast<cop_ptr<scalar_t>>(bias),
          static_cast<cacc_ptr>(mean_acc), static_cast<cacc_ptr>(scale_acc),
          static_cast<cacc_ptr>(k), static_cast<cacc_ptr>(c), mask, act);
    });
  });
}

}  // namespace

const Kernels RF_KERNEL_TABLE = {
    &add_relu_impl,        &relu_backward_impl,          &bn_stats_impl,
    &bn_forward_impl,      &bn_backward_reduce_impl,     &bn_backward_elemt_impl,
};

}  // namespace resnet_fused::cpu
