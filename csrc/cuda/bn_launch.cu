// Launch planning of the CUDA BatchNorm-family kernels: the split count (make_plan) from
// the SM count and each kernel's occupancy, both queried once and cached. Declarations,
// geometry and the layout the plans describe: bn_launch.cuh.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <mutex>
#include <vector>

#include "cuda/bn_launch.cuh"

namespace resnet_fused {
namespace {

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Multiprocessor count of `device`, queried once per device.
int sm_count(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      return cached;
    }
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  count = std::max(count, 1);
  if (cacheable) {
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Number of splits per channel group: enough blocks to fill every resident slot
// (capacity = SMs x blocks per SM), with whole waves (groups*splits close to a multiple of
// the capacity: the first k from capacity/groups up whose wave efficiency is >= 90%, else
// the best of 16 tries), and at most max_splits.
int64_t choose_splits(int64_t groups, int64_t capacity, int64_t max_splits) {
  const int64_t k0 = std::max<int64_t>(1, capacity / groups);
  if (k0 >= max_splits) {
    return max_splits;
  }
  int64_t best = k0;
  double best_eff = -1.0;
  for (int64_t k = k0; k <= std::min(max_splits, k0 + 16); ++k) {
    const int64_t blocks = groups * k;
    const double eff =
        static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, capacity) * capacity);
    if (eff > best_eff) {
      best = k;
      best_eff = eff;
    }
    if (eff >= 0.9) {
      break;
    }
  }
  return best;
}

}  // namespace

// Resident blocks of kThreads per SM for `kernel` on `device` (the current device),
// queried once per (kernel, device).
int blocks_per_sm(const void* kernel, c10::DeviceIndex device) {
  struct Entry {
    const void* kernel;
    c10::DeviceIndex device;
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache) {
    if (e.kernel == kernel && e.device == device) {
      return e.blocks;
    }
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  blocks = std::max(blocks, 1);
  cache.push_back(Entry{kernel, device, blocks});
  return blocks;
}

Plan make_plan(int64_t N, int64_t C, int64_t HW, bool channels_last, int vec,
               c10::DeviceIndex device, int blocks_per_sm) {
  Plan plan;
  int64_t groups = 0;     // gridDim.x
  int64_t total = 0;      // items per channel
  int64_t min_items = 0;  // per block
  if (!channels_last) {
    const int64_t hw = HW / vec;
    total = N * hw;
    groups = C;
    min_items = kThreads * kMinItemsPerThread;
    plan.block = dim3(kThreads);
    plan.nchw.hw = hw;
    plan.nchw.total = total;
    plan.nchw.plane_stride = C * hw;
    plan.nchw.step_hw = kThreads % hw;
    plan.nchw.step_off = (kThreads / hw) * plan.nchw.plane_stride + plan.nchw.step_hw;
    plan.nchw.wrap_off = plan.nchw.plane_stride - hw;
  } else {
    const int64_t cv = C / vec;
    int bx = 1;
    while (bx < 32 && bx < cv) {
      bx *= 2;
    }
    const int by = kThreads / bx;
    total = N * HW;
    groups = ceil_div(cv, bx);
    min_items = static_cast<int64_t>(by) * kMinItemsPerThread;
    plan.block = dim3(bx, by);
    plan.nhwc.cv = cv;
    plan.nhwc.rows = total;
  }
  TORCH_CHECK(groups <= INT_MAX, "resnet_fused batch norm: too many channels (", C, ")");
  const int64_t capacity = static_cast<int64_t>(sm_count(device)) * std::max(blocks_per_sm, 1);
  const int64_t max_splits = std::clamp<int64_t>(ceil_div(total, min_items), 1, kMaxSplits);
  int64_t splits = choose_splits(groups, capacity, max_splits);
  const int64_t chunk = ceil_div(total, splits);
  splits = ceil_div(total, chunk);
  plan.grid = dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits));
  plan.splits = splits;
  if (!channels_last) {
    plan.nchw.chunk = chunk;
    plan.nchw.splits = splits;
    plan.chunk_values = chunk * vec;
  } else {
    plan.nhwc.chunk = chunk;
    plan.nhwc.splits = splits;
    plan.chunk_values = chunk;
  }
  return plan;
}

}  // namespace resnet_fused
