// CPU instruction-set dispatch for the C++ CPU kernels.
//
// The kernels (csrc/cpu/kernels_impl.h) are written once with at::vec::Vectorized and
// compiled twice: for AVX2 (+FMA, F16C) and for the portable baseline, each in its own
// translation unit (kernels_avx2.cpp, kernels_default.cpp). At run time the AVX2 set is
// used where the CPU has it, unless ATEN_CPU_CAPABILITY=default asks for the baseline.
// (The kernels are memory-bound: AVX-512 would add a third build for no measurable gain.)
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace resnet_fused::cpu {

enum class Isa { kDefault = 0, kAVX2 = 1 };

// Type-erased kernels over flat buffers of `n` elements of dtype `dtype`.
struct Kernels {
  // out = relu(x + r)
  void (*add_relu)(c10::ScalarType dtype, const void* x, const void* r, void* out, int64_t n);
  // grad_in = (out <= 0) ? 0 : grad
  void (*relu_backward)(c10::ScalarType dtype, const void* grad, const void* out, void* grad_in,
                        int64_t n);
};

extern const Kernels kernels_default;
#if defined(__x86_64__) && defined(__GNUC__)
#define RESNET_FUSED_X86_KERNELS 1
extern const Kernels kernels_avx2;
#else
#define RESNET_FUSED_X86_KERNELS 0
#endif

// The instruction set the kernels use on this machine.
Isa active_isa();
const char* isa_name(Isa isa);
// The kernel table for active_isa().
const Kernels& kernels();

}  // namespace resnet_fused::cpu
