// CPU kernels for AVX2 + FMA + F16C (the same flags ATen uses for its AVX2 kernels).
#include "cpu/isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "cpu/target_avx2_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define RF_KERNEL_TABLE kernels_avx2
#define RF_USE_VEC 1
#include "cpu/kernels_impl.h"
#pragma GCC pop_options
#endif  // other CPUs use kernels_default only (isa.cpp)
