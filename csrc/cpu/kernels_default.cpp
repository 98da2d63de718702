// CPU kernels for any CPU (baseline target). See isa.h.
#include "cpu/isa_prelude.h"

#define CPU_CAPABILITY DEFAULT
#define RF_KERNEL_TABLE kernels_default
#define RF_USE_VEC 0
#include "cpu/kernels_impl.h"
