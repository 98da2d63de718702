// Chooses the CPU kernel table at run time (see isa.h).
#include "cpu/isa.h"

#include <ATen/Version.h>

#include <string>

namespace resnet_fused::cpu {
namespace {

// ATen's capability ("DEFAULT", "AVX2", "AVX512", or another architecture's name) already
// honours ATEN_CPU_CAPABILITY, so that variable selects these kernels too: "default" and
// "avx2" test the narrower tables on an AVX-512 machine. The CPU's own flags are checked
// as well, so a table never runs where its instructions are missing.
Isa detect() {
#if RESNET_FUSED_X86_KERNELS
  const std::string cap = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (cap == "AVX512" && avx512) {
    return Isa::kAVX512;
  }
  if ((cap == "AVX512" || cap == "AVX2") && avx2) {
    return Isa::kAVX2;
  }
#endif
  return Isa::kDefault;
}

}  // namespace

Isa active_isa() {
  static const Isa isa = detect();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAVX2:
      return "AVX2";
    case Isa::kAVX512:
      return "AVX512";
    default:
      return "DEFAULT";
  }
}

const Kernels& kernels() {
  switch (active_isa()) {
#if RESNET_FUSED_X86_KERNELS
    case Isa::kAVX2:
      return kernels_avx2;
    case Isa::kAVX512:
      return kernels_avx512;
#endif
    default:
      return kernels_default;
  }
}

}  // namespace resnet_fused::cpu
