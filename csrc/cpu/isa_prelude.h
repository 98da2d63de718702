// Headers every CPU kernel translation unit includes *before* it selects an instruction
// set. Inline functions from these headers are then compiled for the portable target in
// every translation unit, so the linker can never pick an AVX2/AVX-512 copy of one for
// code that runs on any CPU. Only at::vec (whose symbols live in a per-instruction-set
// namespace) and the kernels themselves are compiled for the wider target.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "act.h"
#include "cpu/isa.h"
