// What every kernel file shares: the vector type, tile sizes and memory budgets, the logit transform, the
// vocab partition across threads, input checks and the dtype dispatch. Include first (see kernel_isa.h).
#pragma once

#include "kernel_isa.h"

#include "logprobs_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <limits>
#include <type_traits>
#include <vector>

namespace grpo_kernels::detail {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kVocabBlock = 256;  // rows of W per tile (the brgemm M of the logits GEMM)
constexpr int64_t kTokenChunk = 256;  // tokens per tile: below ~192 the tile GEMM becomes W-bandwidth bound
// Leading dimensions are padded off powers of two: rows 1 KiB apart alias in the same cache sets.
constexpr int64_t kLd = kTokenChunk + 16;       // fp32 tile rows, packed H^T rows, VNNI dZ pair rows
constexpr int64_t kDzLd = kTokenChunk + 32;     // 16-bit dZ^T rows
constexpr int64_t kWtLd = kVocabBlock + 32;     // 16-bit W_block^T rows
// All threads' per-token buffers of one super-chunk of tokens together stay below these, so the
// extra memory does not grow with N (dW then accumulates across super-chunks).
constexpr int64_t kDhBudgetBytes = int64_t(64) << 20;
constexpr int64_t kBackwardBudgetBytes = int64_t(96) << 20;
// When a 16-bit backward must split N into several super-chunks, its dW carries an int8 residual [V, D]
// across them (136 MB at the Qwen head): the residual and the super-chunk buffers together stay below
// this, so the extra memory stays flat in N past the split (the super-chunks shrink instead; each extra
// one costs a re-read of W and a read-modify-write of dW, ~1 % of a 16k-token backward).
constexpr int64_t kSplitBackwardBudgetBytes = int64_t(200) << 20;
// fp32 backward super-chunks are capped: since the fp32 tiles run on at::mm, 1024 and 4096 tokens took
// 26.4 s and 25.4 s (AMD Zen 3, D=896, N=4096, within noise) and the cap keeps the per-token buffers at
// a quarter. The 16-bit paths measured fastest with one super-chunk (bf16: 35.3 s vs 41.4 s at 1024).
constexpr int64_t kFloatBackwardTokens = 1024;
// The one-pass schedule's kept logits of one token chunk, plus the int8 dW residual when a 16-bit dW
// is accumulated over several chunks, stay below this.
constexpr int64_t kFusedBudgetBytes = int64_t(224) << 20;
// Vocab blocks whose dZ feed one dH GEMM: a longer K amortizes the GEMM's fp32 C traffic.
constexpr int64_t kGroup = 4;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Scratch that a tile GEMM reads or writes starts on a cache line. AMX tile rows are 64 bytes: from a base
// 16 bytes off a line (what glibc's malloc returns for the large, mmap-backed buffers here) every row spans
// two lines, and the AMX forward ran ~20 % slower (Intel Xeon with AMX, 1 thread, the forward's tile loop:
// 1,240 GFLOP/s aligned against 770-860 with both operands 16 bytes off). Rows stay aligned because every
// leading dimension of a GEMM operand is a multiple of 64 bytes.
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};
template <typename T>
using Scratch = std::vector<T, LineAllocator<T>>;

inline int64_t round_up2(int64_t x) { return (x + 1) & ~int64_t(1); }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elementwise transform of raw logits (fp32 GEMM output + bias): temperature, then soft-capping.
struct Transform {
  float inv_t;
  float cap;  // 0: off
  float inv_cap;

  explicit Transform(const LogprobsOptions& o)
      : inv_t(static_cast<float>(1.0 / o.temperature)),
        cap(static_cast<float>(o.softcap)),
        inv_cap(o.softcap > 0 ? static_cast<float>(1.0 / o.softcap) : 0.f) {}

  Vec apply(Vec raw) const {
    Vec z = raw * Vec(inv_t);
    return cap > 0 ? Vec(cap) * (z * Vec(inv_cap)).tanh() : z;
  }
  float apply(float raw) const {
    float z = raw * inv_t;
    return cap > 0 ? cap * std::tanh(z * inv_cap) : z;
  }
  // dz/draw
  Vec slope(Vec z) const {
    if (cap > 0) {
      Vec u = z * Vec(inv_cap);
      return (Vec(1.f) - u * u) * Vec(inv_t);
    }
    return Vec(inv_t);
  }
  float slope(float z) const {
    if (cap > 0) {
      float u = z * inv_cap;
      return (1.f - u * u) * inv_t;
    }
    return inv_t;
  }
};

template <typename T>
float bias_at(const T* b, int64_t v) {
  return b == nullptr ? 0.f : static_cast<float>(b[v]);
}
// Tokens per super-chunk: whole token chunks whose per-token buffers fit the budget, at most max_tokens
// (or the override, which tests use to force several super-chunks).
inline int64_t super_chunk_tokens(int64_t n, const LogprobsOptions& opt, int64_t bytes_per_token, int64_t budget,
                           int64_t max_tokens = std::numeric_limits<int64_t>::max()) {
  const int64_t chunks = opt.super_chunk > 0
                             ? ceil_div(opt.super_chunk, kTokenChunk)
                             : std::max<int64_t>(1, std::min(budget / (bytes_per_token * kTokenChunk),
                                                             max_tokens / kTokenChunk));
  return std::min(n, chunks * kTokenChunk);
}

// Tokens per super-chunk of the two-pass backward: one super-chunk when N fits kBackwardBudgetBytes;
// else, for a 16-bit dW (residual_bytes > 0), the fewest super-chunks k the split budget leaves room for
// beside the residual, each n / k tokens rounded up to whole token chunks.
// bytes_per_token sizes one super-chunk; split_bytes_per_token (>= it: with the engine's own copies) the split.
inline int64_t backward_super_chunk_tokens(int64_t n, const LogprobsOptions& opt, int64_t bytes_per_token,
                                           int64_t split_bytes_per_token, int64_t residual_bytes, int64_t max_tokens) {
  const int64_t s = super_chunk_tokens(n, opt, bytes_per_token, kBackwardBudgetBytes, max_tokens);
  if (opt.super_chunk > 0 || s >= n || residual_bytes == 0) return s;
  const int64_t budget = std::max(kSplitBackwardBudgetBytes - residual_bytes, split_bytes_per_token * kTokenChunk);
  const int64_t cap = super_chunk_tokens(n, opt, split_bytes_per_token, budget, std::min(s, max_tokens));
  return std::min(n, ceil_div(ceil_div(n, ceil_div(n, cap)), kTokenChunk) * kTokenChunk);
}

// Vocab blocks split evenly across threads; each thread owns a contiguous range.
struct Partition {
  int64_t nthreads, nblocks;
  int64_t begin(int64_t tid) const { return tid * nblocks / nthreads; }
  int64_t end(int64_t tid) const { return (tid + 1) * nblocks / nthreads; }
};
inline void check_inputs(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t) {
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), "grpo_kernels._C: expects h [N, D], w [V, D]");
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous() && t.is_contiguous(), "grpo_kernels._C: inputs must be contiguous");
  TORCH_CHECK(h.scalar_type() == w.scalar_type(), "grpo_kernels._C: h and w must share a dtype");
  TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == h.size(0), "grpo_kernels._C: t must be int64 [N]");
  TORCH_CHECK(!b || (b->is_contiguous() && b->scalar_type() == w.scalar_type() && b->numel() == w.size(0)),
              "grpo_kernels._C: b must be [V] with w's dtype");
}

// lse [N, 2] float32, contiguous: (row max, log-sum) per token (see tiles.h, GradInputs)
inline void check_lse(const at::Tensor& lse, int64_t n) {
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 2 && lse.size(0) == n &&
                  lse.size(1) == 2,
              "grpo_kernels._C: lse must be a contiguous float32 [N, 2] (max, log-sum); got ", lse.sizes());
}

#define GRPO_DISPATCH(dtype, ...)                                                    \
  switch (dtype) {                                                                   \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }              \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }    \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }            \
    default: TORCH_CHECK(false, "grpo_kernels._C: unsupported dtype ", dtype);       \
  }

}  // namespace grpo_kernels::detail
