// CPU kernels for AVX-512 (F, BW, VL, DQ + FMA: the flags ATen builds its AVX512 kernels
// with). Chosen where ATen itself runs its AVX512 kernels (see isa.cpp).
#include "cpu/isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#include "cpu/target_avx2_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define RF_KERNEL_TABLE kernels_avx512
#define RF_USE_VEC 1
#include "cpu/kernels_impl.h"
#pragma GCC pop_options
#endif  // other CPUs use kernels_default only (isa.cpp)
