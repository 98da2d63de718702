// Chooses the CPU kernel table at run time (see isa.h).
#include "cpu/isa.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

namespace resnet_fused::cpu {
namespace {

Isa detect() {
  Isa best = Isa::kDefault;
#if RESNET_FUSED_X86_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = Isa::kAVX2;
  }
#endif
  // Honour ATen's cap, so ATEN_CPU_CAPABILITY=default tests the portable kernels.
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    std::string cap(env);
    std::transform(cap.begin(), cap.end(), cap.begin(), ::tolower);
    if (cap == "default") {
      best = Isa::kDefault;
    }
  }
  return best;
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
    default:
      return "DEFAULT";
  }
}

const Kernels& kernels() {
  switch (active_isa()) {
#if RESNET_FUSED_X86_KERNELS
    case Isa::kAVX2:
      return kernels_avx2;
#endif
    default:
      return kernels_default;
  }
}

}  // namespace resnet_fused::cpu
