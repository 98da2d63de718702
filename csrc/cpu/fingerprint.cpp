// fingerprint on the CPU: a 64-bit hash of the bytes of a list of tensors, for caches that
// must notice every write to their inputs. The modules' eval fold cache (W', b' of a
// Conv+BN pair, resnet_fused/modules.py) is keyed on version counters, and writes through
// `.data`, `.detach()`, numpy or another alias bump no counter of the parameter itself:
// the cache compares this fingerprint too, at every call, so it must cost about one read
// of the tensors (what `w.sum()` costs) and next to nothing for small ones.
//
// The hash. Each tensor's bytes are read where they lie when its elements fill one block
// of memory (contiguous, channels_last, any dense permutation of dimensions: its bytes in
// memory order, no copy; a channels_last conv weight copied to logical order cost more
// than the fold it guards, at every call), else in logical order from a contiguous copy
// (other strided views). Equal values need equal bytes in that order: the callers key on
// the strides as well. The bytes are read as 32-bit words w (the last one zero-padded) in blocks of 64 words. Each
// word is multiplied by its position's constant T_k (64 distinct odd 32-bit constants) into
// an exact 64-bit product x, whose high half is folded into its low half (x ^ x >> 32: the
// product's high half depends on every bit of w, so a change of w's high bits, such as a
// sign, reaches the low bits too), and the block sums these mod 2^64. Blocks are combined
// by Horner's rule, h <- h * P + mix(S), within chunks of a fixed size (not depending on
// the thread count, so neither does the result); the chunks' values are combined the same
// way, starting from the byte count, and so are the tensors'.
//
// What it guarantees: a change of any one word changes the result: w -> w * T is
// injective (T odd, exact product), x -> x ^ x >> 32 and mix are bijections and every
// multiplier after them is odd. So does any single-element edit of a tensor of 1, 2 or
// 4-byte elements (fp32, fp16, bf16): one element lies in one word. Any other change (an
// fp64 element, whose two words change; a swap; scaling; zeroing) gives the same value
// only by coincidence, about 2^-64 for changes not made to collide (it is not a
// cryptographic hash). Equal bytes give equal values, whatever the thread count.
//
// Speed: the inner loop is 32 x 32 -> 64-bit multiplies, a shift, a xor and an add per
// word, which the compiler vectorises (an AVX2 clone is chosen at load time on x86-64);
// chunks are spread over threads with at::parallel_for. Measured on one thread of an AMD
// EPYC: ResNet-50's conv weights (23.5M fp32, 94 MB, from memory) in 4.3-5.2 ms where
// `w.sum()` takes 3.9-4.2 ms; data in cache at ~22 GB/s, a third of sum's speed (the
// multiplies); a call on a handful of small tensors costs ~2 us, mostly the dispatcher.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

namespace resnet_fused {
namespace {

constexpr int64_t kBlockWords = 64;
constexpr int64_t kBlockBytes = kBlockWords * 4;
constexpr int64_t kChunkBlocks = 1024;  // 256 KiB per chunk
constexpr int64_t kChunkBytes = kChunkBlocks * kBlockBytes;
constexpr uint64_t kBlockMul = 0x9E3779B97F4A7C15ull;  // P: odd
constexpr uint64_t kChunkMul = 0xC2B2AE3D27D4EB4Full;  // odd
constexpr uint64_t kTensorMul = 0x165667B19E3779F9ull;  // odd

constexpr uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr std::array<uint32_t, kBlockWords> make_multipliers() {
  std::array<uint32_t, kBlockWords> t{};
  uint64_t state = 0x5EED;
  for (auto& v : t) {
    v = static_cast<uint32_t>(splitmix64(state) >> 32) | 1u;
  }
  return t;
}

constexpr std::array<uint32_t, kBlockWords> kWordMul = make_multipliers();

constexpr bool distinct(const std::array<uint32_t, kBlockWords>& t) {
  for (size_t i = 0; i < t.size(); ++i) {
    for (size_t j = i + 1; j < t.size(); ++j) {
      if (t[i] == t[j]) {
        return false;
      }
    }
  }
  return true;
}
static_assert(distinct(kWordMul), "the word multipliers must be distinct");

// A bijection of 64-bit values (xor-shifts and an odd multiplier are each invertible).
inline uint64_t mix(uint64_t x) {
  x ^= x >> 32;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 29;
  return x;
}

// The Horner value of `nblocks` whole blocks at p (any alignment), starting from h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
uint64_t hash_blocks(const unsigned char* p, int64_t nblocks, uint64_t h) {
  for (int64_t b = 0; b < nblocks; ++b) {
    const unsigned char* q = p + b * kBlockBytes;
    uint64_t s = 0;
    for (int64_t k = 0; k < kBlockWords; ++k) {
      uint32_t w;
      std::memcpy(&w, q + 4 * k, 4);
      const uint64_t x = static_cast<uint64_t>(w) * static_cast<uint64_t>(kWordMul[k]);
      s += x ^ (x >> 32);
    }
    h = h * kBlockMul + mix(s);
  }
  return h;
}

// The Horner value of one chunk: whole blocks, then the partial block at the end (its
// missing words are zero: the byte count, hashed in by the caller, tells the lengths
// apart).
uint64_t hash_chunk(const unsigned char* p, int64_t nbytes) {
  const int64_t whole = nbytes / kBlockBytes;
  uint64_t h = hash_blocks(p, whole, 0);
  const int64_t rest = nbytes - whole * kBlockBytes;
  if (rest > 0) {
    unsigned char tail[kBlockBytes] = {};
    std::memcpy(tail, p + whole * kBlockBytes, rest);
    h = hash_blocks(tail, 1, h);
  }
  return h;
}

uint64_t hash_tensor(const at::Tensor& tensor) {
  TORCH_CHECK(tensor.layout() == at::kStrided, "fingerprint: tensors must be strided, got ",
              tensor.layout());
  TORCH_CHECK(tensor.device().is_cpu(), "fingerprint: tensors must be on the CPU, got ",
              tensor.device());
  at::Tensor t = tensor;
  if (t.is_conj() || t.is_neg()) {
    t = t.resolve_conj().resolve_neg();
  }
  if (!t.is_contiguous() && !t.is_non_overlapping_and_dense()) {
    t = t.contiguous();
  }
  // (a dense tensor's elements occupy [data_ptr, data_ptr + nbytes): strides are >= 0)
  const int64_t nbytes = static_cast<int64_t>(t.nbytes());
  uint64_t h = static_cast<uint64_t>(nbytes);
  if (nbytes == 0) {
    return h;
  }
  const auto* p = static_cast<const unsigned char*>(t.const_data_ptr());
  // (a wrapper subclass's storage holds no data: refused, never read at address 0)
  TORCH_CHECK(p != nullptr, "fingerprint: a tensor without data (a wrapper subclass?)");
  const int64_t nchunks = (nbytes + kChunkBytes - 1) / kChunkBytes;
  auto chunk_bytes = [&](int64_t c) { return std::min(kChunkBytes, nbytes - c * kChunkBytes); };
  if (nchunks == 1) {
    return h * kChunkMul + hash_chunk(p, nbytes);
  }
  std::vector<uint64_t> partial(nchunks);
  // Four chunks (1 MiB) or more per thread: smaller pieces cost more to start than to read.
  at::parallel_for(0, nchunks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      partial[c] = hash_chunk(p + c * kChunkBytes, chunk_bytes(c));
    }
  });
  for (const uint64_t v : partial) {
    h = h * kChunkMul + v;
  }
  return h;
}

int64_t fingerprint_cpu(at::TensorList tensors) {
  uint64_t f = 0;
  for (const at::Tensor& t : tensors) {
    f = f * kTensorMul + mix(hash_tensor(t));
  }
  int64_t out;
  std::memcpy(&out, &f, sizeof(out));
  return out;
}

}  // namespace

// (for fold_key.cpp's check, which calls it without the dispatcher)
int64_t fingerprint_tensors(at::TensorList tensors) {
  return fingerprint_cpu(tensors);
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("fingerprint", &fingerprint_cpu);
}

}  // namespace resnet_fused
