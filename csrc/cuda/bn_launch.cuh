// Launch planning of the CUDA BatchNorm-family kernels (bn_stats.cu, bn_act_forward.cu,
// bn_act_backward.cu): block size, vector loads, the NCHW / NHWC geometry the kernels walk,
// and the plan (grid, block, splits) with its per-device caches (bn_launch.cu). Every BN
// op launches through make_plan / plan_for, so all of them split work the same way.
//
// Layout. Full-size operands are walked in the input's bn layout (common.h:
// bn_memory_format), copied into it first when they are not already:
//  - NCHW: grid (C, splits) of 1-D blocks of kThreads. Block (c, s) owns the s-th
//    contiguous range of channel c's N*HW values, seen as N planes of HW; its threads
//    stride through the range kThreads vectors at a time with an incremental
//    (position in plane, offset) cursor, so there is no division per load.
//  - NHWC: grid (ceil(C / VEC / BX), splits) of (BX, BY) blocks, BX*BY = kThreads, BX a
//    power of two <= 32. Thread column tx owns VEC adjacent channels and walks rows
//    ty, ty + BY, ... of the block's row range: a warp reads whole runs of a row.
//  Loads and stores move VEC elements (16 bytes when the inner extent, HW or C, and every
//  pointer allow it, else 8 bytes, else scalars), U items per thread per iteration for
//  memory-level parallelism. The number of splits comes from the SM count and the
//  kernel's occupancy (make_plan): about one full wave of resident blocks (or whole waves
//  when there are more channel groups than slots), so that even C = 64 with a huge m
//  fills the GPU, while each thread still gets kMinItemsPerThread loads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace resnet_fused {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Splitting: each thread gets at least kMinItemsPerThread loads; see make_plan.
constexpr int64_t kMinItemsPerThread = 8;
constexpr int64_t kMaxSplits = 65535;  // gridDim.y limit

// VEC elements moved by one load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Items (VEC-wide loads) per thread per loop iteration: about 32 bytes in flight per
// operand and thread.
template <typename scalar_t, int VEC>
constexpr int items_per_iter() {
  constexpr int bytes = static_cast<int>(sizeof(scalar_t)) * VEC;
  return bytes >= 16 ? 2 : (bytes >= 8 ? 4 : 8);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// ---------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------

// NCHW, in units of VEC-wide vectors. Channel c's j-th vector (j < total) is at
// (j / hw) * plane_stride + c * hw + j % hw.
struct NchwGeom {
  int64_t hw;            // vectors per (n, c) plane: HW / VEC
  int64_t total;         // vectors per channel: N * hw
  int64_t chunk;         // vectors per split
  int64_t splits;        // gridDim.y
  int64_t plane_stride;  // C * hw
  int64_t step_hw;       // kThreads % hw
  int64_t step_off;      // (kThreads / hw) * plane_stride + step_hw
  int64_t wrap_off;      // plane_stride - hw
};

// Walks a channel's vectors kThreads at a time without dividing.
struct NchwCursor {
  int64_t off;  // vector offset in the tensor
  int64_t pos;  // position in the plane, < hw

  __device__ __forceinline__ void init(const NchwGeom& g, int64_t c, int64_t j) {
    const int64_t n = j / g.hw;
    pos = j - n * g.hw;
    off = n * g.plane_stride + c * g.hw + pos;
  }
  // j -> j + kThreads.
  __device__ __forceinline__ void advance(const NchwGeom& g) {
    pos += g.step_hw;
    off += g.step_off;
    if (pos >= g.hw) {
      pos -= g.hw;
      off += g.wrap_off;
    }
  }
};

// NHWC, in units of VEC-wide vectors: row r's channel vector v is at r * cv + v.
struct NhwcGeom {
  int64_t cv;      // vectors per row: C / VEC
  int64_t rows;    // N * H * W
  int64_t chunk;   // rows per split
  int64_t splits;  // gridDim.y
};

// Number of valid items (of at most U, stride `stride`) from position j when the range
// ends at `end` (j < end).
template <int U>
__device__ __forceinline__ int valid_items(int64_t j, int64_t end, int64_t stride) {
  const int64_t rem = end - j;
  return rem >= stride * U ? U : static_cast<int>((rem + stride - 1) / stride);
}

// ---------------------------------------------------------------------------------------
// Host side: launch plans (make_plan and the caches it reads are in bn_launch.cu)
// ---------------------------------------------------------------------------------------

inline bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

// Elements per load: the widest of 16/sizeof, 8/sizeof bytes that divides `inner` (HW
// for NCHW, C for NHWC) and to which every pointer (null ones ignored) is aligned; else 1.
template <typename scalar_t>
int pick_vec(int64_t inner, std::initializer_list<const void*> ptrs) {
  constexpr int kMax = static_cast<int>(16 / sizeof(scalar_t));
  for (const int v : {kMax, kMax / 2}) {
    if (v <= 1 || inner % v != 0) {
      continue;
    }
    const int64_t bytes = static_cast<int64_t>(v) * static_cast<int64_t>(sizeof(scalar_t));
    bool ok = true;
    for (const void* p : ptrs) {
      ok = ok && aligned_to(p, bytes);
    }
    if (ok) {
      return v;
    }
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>) for the vec pick_vec chose.
template <typename scalar_t, typename F>
void with_vec(int vec, const F& f) {
  constexpr int kMax = static_cast<int>(16 / sizeof(scalar_t));
  if (vec == kMax) {
    f(std::integral_constant<int, kMax>{});
    return;
  }
  if constexpr (kMax >= 4) {
    if (vec == kMax / 2) {
      f(std::integral_constant<int, kMax / 2>{});
      return;
    }
  }
  f(std::integral_constant<int, 1>{});
}

// Grid, block and geometry of a main kernel (with `blocks_per_sm` resident blocks per SM)
// for an (N, C, H*W) tensor with m = N*HW > 0 and C > 0. Every split is non-empty.
struct Plan {
  dim3 grid;
  dim3 block;
  NchwGeom nchw{};
  NhwcGeom nhwc{};
  int64_t splits = 0;
  int64_t chunk_values = 0;  // values per channel in one split (the last may hold fewer)
};

Plan make_plan(int64_t N, int64_t C, int64_t HW, bool channels_last, int vec,
               c10::DeviceIndex device, int blocks_per_sm);

// Resident blocks of kThreads per SM for `kernel` on `device` (the current device),
// queried once per (kernel, device).
int blocks_per_sm(const void* kernel, c10::DeviceIndex device);

// make_plan for `kernel`, with its occupancy on `device`.
template <typename... KArgs>
Plan plan_for(void (*kernel)(KArgs...), int64_t N, int64_t C, int64_t HW, bool channels_last,
              int vec, c10::DeviceIndex device) {
  return make_plan(N, C, HW, channels_last, vec, device,
                   blocks_per_sm(reinterpret_cast<const void*>(kernel), device));
}

// Host helpers of the ops' launchers.
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

inline void check_channels(int64_t C) {
  TORCH_CHECK(C <= INT_MAX, "resnet_fused batch norm: too many channels (", C, ")");
}

}  // namespace resnet_fused
