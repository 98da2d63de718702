// CPU kernels for AVX2 + FMA + F16C (the same flags ATen uses for its AVX2 kernels).
#include "cpu/isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// g++ does not announce a pragma's instruction sets to the preprocessor; the vec headers
// (and sleef.h) select their AVX2 code by these macros, so state them here. Everything
// compiled under them lives in this translation unit (see isa_prelude.h).
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define RF_KERNEL_TABLE kernels_avx2
#define RF_USE_VEC 1
#include "cpu/kernels_impl.h"
#pragma GCC pop_options
#endif  // other CPUs use kernels_default only (isa.cpp)
