// Host-side helpers of the CPU BatchNorm-family ops (cpu/bn_stats.cpp,
// cpu/bn_act_forward.cpp, cpu/bn_act_backward.cpp): the kernels' geometry and the
// per-channel parameters folded into host arrays (acc_dtype and opmath_dtype come from
// common.h, shared with the CUDA ops).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/isa.h"

namespace resnet_fused {

// The loops' view of `input` in layout `fmt` (NCHW or channels_last).
inline cpu::BnGeometry geometry(const at::Tensor& input, at::MemoryFormat fmt) {
  return {input.size(0), input.size(1), input.size(2) * input.size(3),
          fmt == at::MemoryFormat::ChannelsLast};
}

// One per-channel array of an Affine (C values of its type, in the Affine's own buffers):
// what the ops read of it, as they would read a tensor's.
struct Channels {
  const void* p = nullptr;
  const void* const_data_ptr() const {
    return p;
  }
  template <typename T>
  const T* const_data_ptr() const {
    return static_cast<const T*>(p);
  }
};

// The one of two host buffers that holds T.
template <typename T>
inline std::vector<T>& of_type(std::vector<double>& doubles, std::vector<float>& floats) {
  if constexpr (std::is_same_v<T, double>) {
    return doubles;
  } else {
    static_assert(std::is_same_v<T, float>);
    return floats;
  }
}

// The per-channel arrays of the elementwise loops, in the arithmetic type (opmath_dtype):
// mean, scale = weight * invstd (weight = 1 when absent) and bias (0 when absent); and, in
// the accumulation type (acc_dtype), invstd and scale_acc for the backward's per-channel
// coefficients, and mean_acc, the mean in the accumulation type. Float input has double
// statistics: its mean is split into the float `mean` and the double remainder mean_lo
// (undefined when the two types agree), which is folded into the bias,
// bias - mean_lo * scale (rounded once), so that the loops' (x - mean) * scale + bias is
// (x - mean_hi - mean_lo) * scale + bias: a mean that float cannot hold (two close values
// per channel) costs no more than one rounding of the bias.
struct Affine {
  Channels mean, mean_lo, mean_acc, invstd, scale_acc, scale, bias;
  // The arrays' memory, by type (moving an Affine keeps the arrays where they are).
  std::vector<double> doubles;
  std::vector<float> floats;

  Affine() = default;
  Affine(const Affine&) = delete;  // (a copy's arrays would point into the original)
  Affine& operator=(const Affine&) = delete;
  Affine(Affine&&) = default;
  Affine& operator=(Affine&&) = default;

  // Room for `n` arrays of C values of type T; the k-th at arrays<T>() + k * C.
  template <typename T>
  T* arrays(int64_t n, int64_t C) {
    std::vector<T>& v = of_type<T>(doubles, floats);
    v.resize(static_cast<size_t>(n * C));
    return v.data();
  }
};

// dst[c] = t[c] converted to T, for a per-channel tensor t of any floating dtype and
// stride: what `t.to(T).contiguous()` holds (each value converted once, round to nearest).
template <typename T>
inline void read_channels(const at::Tensor& t, int64_t C, T* dst) {
  const at::Tensor u = t.is_neg() ? t.resolve_neg() : t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(),
                                  "resnet_fused_read_channels", [&] {
    const scalar_t* src = u.const_data_ptr<scalar_t>();
    const int64_t stride = u.dim() == 0 ? 0 : u.stride(0);
    for (int64_t c = 0; c < C; ++c) {
      dst[c] = static_cast<T>(src[c * stride]);
    }
  });
}

// One loop over the channels in the accumulation type with the arithmetic of the aten
// expressions `(var + eps).rsqrt()` and `invstd * weight` (eps converted to the
// accumulation type first, 1 / sqrt rounded twice, as aten's rsqrt), then rounded to the
// arithmetic type. The arrays live in one host buffer: a handful of aten calls (or even
// of small tensor allocations: ~5 us for the seven arrays) here cost more than the
// BatchNorm of a small input.
template <typename acc_t, typename op_t>
inline void fill_affine(Affine& a, const at::Tensor& mean, const at::Tensor& var,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, double eps, int64_t C) {
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  constexpr bool kSplit = !std::is_same_v<acc_t, op_t>;  // float input: double statistics
  // acc_t arrays: mean, invstd, scale (with a weight), var, weight (then the bias, split);
  // mean_lo (split); op_t arrays: mean, scale, bias (split), or the bias alone.
  acc_t* A = a.arrays<acc_t>(6, C);
  acc_t* m = A;
  acc_t* inv = A + C;
  acc_t* sc = has_w ? A + 2 * C : inv;
  acc_t* v = A + 3 * C;
  acc_t* w = A + 4 * C;
  read_channels(mean, C, m);
  read_channels(var, C, v);
  if (has_w) {
    read_channels(*weight, C, w);
  }
  const acc_t e = static_cast<acc_t>(eps);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t i = acc_t(1) / std::sqrt(v[c] + e);
    inv[c] = i;
    if (has_w) {
      sc[c] = i * w[c];
    }
  }
  a.mean_acc.p = m;
  a.invstd.p = inv;
  a.scale_acc.p = sc;
  if constexpr (!kSplit) {
    op_t* b = A + 5 * C;  // (op_t is acc_t here)
    a.mean.p = m;
    a.scale.p = sc;
    if (has_b) {
      read_channels(*bias, C, b);
    } else {
      std::fill(b, b + C, op_t(0));
    }
    a.bias.p = b;
  } else {
    static_assert(std::is_same_v<acc_t, double> && std::is_same_v<op_t, float>);
    double* bacc = w;  // (the weight is read: its array holds the bias now)
    double* lo = A + 5 * C;
    if (has_b) {
      read_channels(*bias, C, bacc);
    }
    float* F = a.arrays<float>(3, C);
    float* hi = F;
    float* so = F + C;
    float* b = F + 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      hi[c] = static_cast<float>(m[c]);
      lo[c] = m[c] - static_cast<double>(hi[c]);
      so[c] = static_cast<float>(sc[c]);
      b[c] = static_cast<float>((has_b ? bacc[c] : 0.0) - lo[c] * static_cast<double>(so[c]));
    }
    a.mean.p = hi;
    a.mean_lo.p = lo;
    a.scale.p = so;
    a.bias.p = b;
  }
}

inline Affine fold_affine(const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& var, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps) {
  const at::ScalarType acc = acc_dtype(input);
  const at::ScalarType op = opmath_dtype(input);
  const int64_t C = input.size(1);
  Affine a;
  if (acc == at::kDouble && op == at::kDouble) {
    fill_affine<double, double>(a, mean, var, weight, bias, eps, C);
  } else if (acc == at::kFloat && op == at::kFloat) {
    fill_affine<float, float>(a, mean, var, weight, bias, eps, C);
  } else {
    TORCH_INTERNAL_ASSERT(acc == at::kDouble && op == at::kFloat);
    fill_affine<double, float>(a, mean, var, weight, bias, eps, C);
  }
  return a;
}

// An uninitialised tensor of input's shape in layout `fmt`.
inline at::Tensor empty_in_format(const at::Tensor& input, at::MemoryFormat fmt) {
  return at::empty(input.sizes(), input.options().memory_format(fmt));
}

}  // namespace resnet_fused
