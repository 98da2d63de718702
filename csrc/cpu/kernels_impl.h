// The CPU kernels, written once over at::vec::Vectorized and compiled once per
// instruction set (see isa.h). Include only from kernels_<isa>.cpp, after choosing
// CPU_CAPABILITY, RF_KERNEL_TABLE (the table's name) and RF_USE_VEC.
//
// Without a wide instruction set (RF_USE_VEC == 0) the loops are plain scalar code that
// the compiler vectorises for the baseline target; at::vec's portable fallback is slower.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

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

}  // namespace

const Kernels RF_KERNEL_TABLE = {
    &add_relu_impl,
    &relu_backward_impl,
};

}  // namespace resnet_fused::cpu
