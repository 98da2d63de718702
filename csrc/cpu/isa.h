// CPU instruction-set dispatch for the C++ CPU kernels.
//
// The kernels (csrc/cpu/kernels_impl.h) are written once with at::vec::Vectorized and
// compiled three times: for AVX-512 (F, BW, VL, DQ), for AVX2 (+FMA, F16C) and for the
// portable baseline, each in its own translation unit (kernels_avx512.cpp,
// kernels_avx2.cpp, kernels_default.cpp). At run time the table is the one of ATen's own
// CPU capability (at::get_cpu_capability(): what torch found this CPU to support, capped
// by ATEN_CPU_CAPABILITY), where the CPU has its instructions. The ReLU kernels are
// memory-bound and gain little from the wider vectors; SiLU's and GELU's exp and
// divisions are not (on a Zen 4 EPYC eager's AVX512 SiLU ran 1.8x its AVX2 one).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace resnet_fused::cpu {

enum class Isa { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

// Geometry of a BatchNorm input: N images, C channels, HW positions, in NCHW
// (offset (n*C + c)*HW + hw) or channels_last (offset (n*HW + hw)*C + c).
struct BnGeometry {
  int64_t N;
  int64_t C;
  int64_t HW;
  bool channels_last;
};

// Where the BN backward reads the activation's derivative: nowhere (identity, or the
// gradient is already taken through it), from the forward output (ReLU: out <= 0 -> 0;
// the activations of act_from_output), or at the pre-activation recomputed from the input
// (y = (x - mean)*scale + bias; for ReLU the mask of y rounded to the input dtype, so that
// it agrees with the stored output), plus the residual read from the second stream (BN +
// add + an activation whose derivative the output does not give: SiLU, GELU, ...).
enum class BnMask : int { kNone = 0, kFromOut = 1, kFromInput = 2, kFromInputResidual = 3 };

// The activation (csrc/act.h's ActKind) and its parameter (LeakyReLU's slope).
struct ActSpec {
  int64_t kind;
  double param;
};

// Type-erased kernels. Full-size buffers hold `dtype`. The reductions' per-channel outputs
// (mean, var, sums) hold the accumulation type, ATen's CPU acc_type (acc_dtype in
// common.h): double for float and double input, float for Half and BFloat16; so do
// mean_acc, scale_acc, k and c of the backward. The other per-channel inputs of the
// elementwise loops (mean, scale, bias) hold the arithmetic type at::opmath_type: double
// for double input, else float.
struct Kernels {
  // out = relu(x + r)
  void (*add_relu)(c10::ScalarType dtype, const void* x, const void* r, void* out, int64_t n);
  // grad_in = (out <= 0) ? 0 : grad
  void (*relu_backward)(c10::ScalarType dtype, const void* grad, const void* out, void* grad_in,
                        int64_t n);

  // Per-channel mean and biased variance (robust: per-tile two-pass, Chan merges in a
  // fixed order, so results do not depend on the thread count).
  void (*bn_stats)(c10::ScalarType dtype, const void* x, const BnGeometry& g, void* mean,
                   void* var);
  // out = act((x - mean)*scale + bias [+ residual]); residual may be null.
  void (*bn_forward)(c10::ScalarType dtype, const void* x, const void* residual, void* out,
                     const BnGeometry& g, const void* mean, const void* scale, const void* bias,
                     ActSpec act);
  // sum_dy = sum g, sum_dy_xmu = sum g*(x - mean_acc), with g = grad * act' read per `mask`
  // (from mean, scale and bias, as bn_forward computes y, or from `out`), the sums in the
  // accumulation type; writes g to `masked` when not null. `out` is the second stream: the
  // output for BnMask::kFromOut, the residual for kFromInputResidual, else unread.
  void (*bn_backward_reduce)(c10::ScalarType dtype, const void* grad, const void* x,
                             const void* out, void* masked, const BnGeometry& g, const void* mean,
                             const void* scale, const void* bias, const void* mean_acc,
                             BnMask mask, ActSpec act, void* sum_dy, void* sum_dy_xmu);
  // dx = g*scale + (x - mean)*k + c, with g = grad * act' per `mask` (kNone or kFromInput;
  // the pre-activation from mean, scale and bias in the arithmetic type, as bn_forward
  // computes y),
  // dx computed in the accumulation type from mean_acc, scale_acc, k and c (accumulation
  // type); k and c null (running statistics): dx = g*scale.
  void (*bn_backward_elemt)(c10::ScalarType dtype, const void* grad, const void* x, void* dx,
                            const BnGeometry& g, const void* mean, const void* scale,
                            const void* bias, const void* mean_acc, const void* scale_acc,
                            const void* k, const void* c, BnMask mask, ActSpec act);
};

extern const Kernels kernels_default;
#if defined(__x86_64__) && defined(__GNUC__)
#define RESNET_FUSED_X86_KERNELS 1
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
#else
#define RESNET_FUSED_X86_KERNELS 0
#endif

// The instruction set the kernels use on this machine.
Isa active_isa();
const char* isa_name(Isa isa);
// The kernel table for active_isa().
const Kernels& kernels();

}  // namespace resnet_fused::cpu
