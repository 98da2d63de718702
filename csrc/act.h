// The activations the fused ops apply after BatchNorm (+ residual), as scalar functions of
// the arithmetic type (float or double) that the CPU kernels (scalar tails) and the CUDA
// kernels share. resnet_fused/activations.py holds the same table in Python (codes, names,
// the torch functions they match) and resnet_fused/reference.py the maths in torch ops.
//
// Each op takes `int act, float act_param`: act is one of ActKind below; act_param is
// LeakyReLU's negative slope and is ignored by the others. Forward and derivative follow
// torch's own kernels (aten/src/ATen/native/Activation.cpp), including their conventions
// at kinks: ReLU's derivative is 0 at 0 (threshold_backward: out <= 0), ReLU6's is 0 at 0
// and 6 (hardtanh_backward: x <= 0 || x >= 6), LeakyReLU's is the slope at 0 (x > 0 ? 1 :
// slope), Hardswish's is 0 up to -3 inclusive, x/3 + 1/2 inside, 1 from 3 on.
//
// The derivative comes from the output where the activation allows it exactly
// (act_from_output): identity, ReLU, ReLU6 and LeakyReLU with a positive slope are
// monotone and piecewise linear, with a derivative that is a function of the output.
// SiLU, Hardswish and GELU are not; their backward recomputes the pre-activation from the
// saved BatchNorm input and statistics. So does Sigmoid's: s*(1 - s) from an output
// rounded to half precision loses most of 1 - s's digits where s nears 1.
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/util/Exception.h>

#if defined(__CUDACC__)
#define RF_ACT_FN __host__ __device__ __forceinline__
#else
#define RF_ACT_FN inline
#endif

namespace resnet_fused {

enum ActKind : int64_t {
  kActIdentity = 0,
  kActReLU = 1,
  kActReLU6 = 2,
  kActLeakyReLU = 3,
  kActSiLU = 4,
  kActHardswish = 5,
  kActGELU = 6,      // exact: x * Phi(x)
  kActGELUTanh = 7,  // approximate="tanh"
  kActSigmoid = 8,
  kActCount = 9,
};

inline const char* act_name(int64_t act) {
  switch (act) {
    case kActIdentity: return "identity";
    case kActReLU: return "relu";
    case kActReLU6: return "relu6";
    case kActLeakyReLU: return "leaky_relu";
    case kActSiLU: return "silu";
    case kActHardswish: return "hardswish";
    case kActGELU: return "gelu";
    case kActGELUTanh: return "gelu_tanh";
    case kActSigmoid: return "sigmoid";
    default: return "unknown";
  }
}

inline void check_act(int64_t act, const char* name = "act") {
  TORCH_CHECK(act >= 0 && act < kActCount, name,
              " must be an activation code in [0, 9) (identity, relu, relu6, leaky_relu, silu, "
              "hardswish, gelu, gelu_tanh, sigmoid; see resnet_fused.activations), got ", act);
}

// True where the derivative is a function of the output (see above).
inline bool act_from_output(int64_t act, double param) {
  return act == kActIdentity || act == kActReLU || act == kActReLU6 ||
         (act == kActLeakyReLU && param > 0);
}

namespace act_math {

RF_ACT_FN float exp_(float v) { return ::expf(v); }
RF_ACT_FN double exp_(double v) { return ::exp(v); }
RF_ACT_FN float erf_(float v) { return ::erff(v); }
RF_ACT_FN double erf_(double v) { return ::erf(v); }
RF_ACT_FN float tanh_(float v) { return ::tanhf(v); }
RF_ACT_FN double tanh_(double v) { return ::tanh(v); }

constexpr double kSqrt1_2 = 0.70710678118654752440;   // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1/sqrt(2*pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588; // sqrt(2/pi)
constexpr double kGeluTanhK = 0.044715;

}  // namespace act_math

// act(v). NaN propagates through every activation (as in torch).
template <typename T>
RF_ACT_FN T act_apply(int64_t act, T param, T v) {
  using namespace act_math;
  switch (act) {
    case kActReLU:
      return v < T(0) ? T(0) : v;
    case kActReLU6:
      return v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
    case kActLeakyReLU:
      return v > T(0) ? v : v * param;
    case kActSiLU:
      return v / (T(1) + exp_(-v));
    case kActHardswish: {
      T t = v + T(3);
      t = t < T(0) ? T(0) : (t > T(6) ? T(6) : t);
      return v * t / T(6);
    }
    case kActGELU:
      return v * T(0.5) * (T(1) + erf_(v * T(kSqrt1_2)));
    case kActGELUTanh: {
      const T inner = T(kSqrt2OverPi) * (v + T(kGeluTanhK) * v * v * v);
      return T(0.5) * v * (T(1) + tanh_(inner));
    }
    case kActSigmoid:
      return T(1) / (T(1) + exp_(-v));
    default:
      return v;
  }
}

// g * act'(pre): the derivative at the pre-activation `pre`.
template <typename T>
RF_ACT_FN T act_grad_from_pre(int64_t act, T param, T pre, T g) {
  using namespace act_math;
  switch (act) {
    case kActReLU:
      return pre <= T(0) ? T(0) : g;
    case kActReLU6:
      return (pre <= T(0) || pre >= T(6)) ? T(0) : g;
    case kActLeakyReLU:
      return pre > T(0) ? g : g * param;
    case kActSiLU: {
      const T s = T(1) / (T(1) + exp_(-pre));
      return g * s * (T(1) + pre * (T(1) - s));
    }
    case kActHardswish:
      return pre <= T(-3) ? T(0) : (pre < T(3) ? g * (pre / T(3) + T(0.5)) : g);
    case kActGELU: {
      const T cdf = T(0.5) * (T(1) + erf_(pre * T(kSqrt1_2)));
      const T pdf = exp_(T(-0.5) * pre * pre) * T(kInvSqrt2Pi);
      return g * (cdf + pre * pdf);
    }
    case kActGELUTanh: {
      const T x2 = pre * pre;
      const T inner = T(kSqrt2OverPi) * (pre + T(kGeluTanhK) * x2 * pre);
      const T t = tanh_(inner);
      const T d_inner = T(kSqrt2OverPi) * (T(1) + T(3) * T(kGeluTanhK) * x2);
      return g * (T(0.5) * (T(1) + t) + T(0.5) * pre * (T(1) - t * t) * d_inner);
    }
    case kActSigmoid: {  // (1 - s as e*s where s > 1/2, where 1 - s would cancel)
      const T e = exp_(-pre);
      const T s = T(1) / (T(1) + e);
      return g * (s > T(0.5) ? e * s : T(1) - s) * s;
    }
    default:
      return g;
  }
}

// g * act'(.) from the output `out` (act_from_output(act, param) must hold).
template <typename T>
RF_ACT_FN T act_grad_from_out(int64_t act, T param, T out, T g) {
  switch (act) {
    case kActReLU:
      return out <= T(0) ? T(0) : g;
    case kActReLU6:
      return (out <= T(0) || out >= T(6)) ? T(0) : g;
    case kActLeakyReLU:
      return out > T(0) ? g : g * param;
    default:
      return g;
  }
}

}  // namespace resnet_fused
