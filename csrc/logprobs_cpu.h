// Streamed per-token log-probs and entropy on the CPU, without materializing [N, V] logits.
//
// Both passes walk the vocabulary in blocks of kVocabBlock rows (each thread owns a fixed range of
// blocks) and the tokens in chunks of kTokenChunk, so one logits tile [kVocabBlock, kTokenChunk]
// lives in a thread's L2 at a time. GEMM tiles run on the engine the caller chose (tile_engine.h),
// always with fp32 outputs (bf16 x bf16 -> fp32 for 16-bit inputs), so the logits keep fp32 accuracy.
//
// forward:  logits tile -> online max / sum-exp / sum p(z - max) per token -> logp, lse, entropy.
// backward: per vocab block, for every token chunk: recompute the tile, form dLoss/dlogits, then
//           dW_block += dZ^T H (fp32 tile, cast once) and dH^T += W_block^T dZ (fp32 per thread).
// one pass: for a loss whose dLoss/dlogp is known per token once that token's logp is (GRPO), token
//           chunks run chunk_forward (keeping exp(z - running max) per logit), the caller's coefficients,
//           then chunk_backward (dW and dH from what was kept): three GEMMs per token instead of four.
//
// Files: tile_engine.{h,cpp} (the GEMM engines behind one interface), common.h (tile sizes, budgets, the
// logit transform, checks), prologue.h (what forward and the two-pass backward unpack alike), packing.h (operand transposes / VNNI packing), tiles.h (per-logit math of a
// tile and the one-pass kept workspace), dw_accumulator.h (the compensated 16-bit dW), backward_loop.h
// (the vocab-group loop both backward schedules share), forward.cpp, backward.cpp (two passes),
// one_pass.cpp (the one-pass gradient step), bindings.cpp.
#pragma once

#include <torch/extension.h>

#include "tile_engine.h"

namespace grpo_kernels {

struct LogprobsOptions {
  double temperature = 1.0;
  double softcap = 0.0;         // 0: no soft-capping
  int64_t super_chunk = 0;      // tokens per super-chunk (a multiple of 256); 0: from the memory budget
  Engine engine = Engine::kBrgemm;  // the tile-GEMM engine (tile_engine.h)
};

// h [N, D], w [V, D] (same dtype: float32, bfloat16 or float16), b [V] or None, t [N] int64 in [0, V).
// Writes logp [N], lse [N] and, when given, entropy [N] (all float32).
void forward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
             const LogprobsOptions& opt, at::Tensor& logp, at::Tensor& lse, c10::optional<at::Tensor> entropy);

// Gradients of sum(g_logp * logp + g_ent * entropy) w.r.t. h, w and b, given the forward's lse (and
// entropy when g_ent is given). Writes the outputs that are given: dh [N, D] like h, dw [V, D] like w,
// db [V] like b.
void backward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
              const at::Tensor& lse, const c10::optional<at::Tensor>& entropy, const at::Tensor& g_logp,
              const c10::optional<at::Tensor>& g_ent, const LogprobsOptions& opt, c10::optional<at::Tensor> dh,
              c10::optional<at::Tensor> dw, c10::optional<at::Tensor> db);

// The one-pass schedule, one chunk of at most 256 tokens at a time. chunk_forward is forward() that also
// keeps what the gradient step needs of the chunk's logits in `kept` (uint8, kept_bytes(n, V, dtype)).
// chunk_backward then forms the gradients of sum(g_logp * logp + g_ent * entropy) for the chunk from them: writes dh
// [n, D] like h (a 16-bit dh with its int8 residual dh_lo [n, D] when given, so that scaling it later rounds it
// once), and writes (accumulate == false) or adds dw [V, D] like w, through its int8 residual dw_lo [V, D] when
// given (needed to add into a 16-bit dw), and adds db_acc [V] float32.
void chunk_forward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                   const LogprobsOptions& opt, at::Tensor& kept, at::Tensor& logp, at::Tensor& lse,
                   c10::optional<at::Tensor> entropy);
void chunk_backward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                    at::Tensor& kept, const at::Tensor& lse, const c10::optional<at::Tensor>& entropy,
                    const at::Tensor& g_logp, const c10::optional<at::Tensor>& g_ent, const LogprobsOptions& opt,
                    c10::optional<at::Tensor> dh, c10::optional<at::Tensor> dh_lo, c10::optional<at::Tensor> dw,
                    c10::optional<at::Tensor> dw_lo, c10::optional<at::Tensor> db_acc, bool accumulate);

// Tokens per one-pass chunk for n tokens and a [V, D] weight of a dtype: the kept logits, plus the dw
// residual when a 16-bit dw spans several chunks, stay within a fixed budget (224 MiB).
int64_t fused_chunk_tokens(int64_t n, int64_t v, int64_t d, at::ScalarType dtype);
// Tokens per super-chunk of the two-pass backward for n tokens on nthreads threads (N itself when one fits).
int64_t backward_tokens(int64_t n, int64_t v, int64_t d, at::ScalarType dtype, bool need_dw,
                        const LogprobsOptions& opt, int64_t nthreads);
// Bytes of the workspace chunk_forward keeps for chunk_backward, for a chunk of n tokens.
int64_t kept_bytes(int64_t n, int64_t v, at::ScalarType dtype);


}  // namespace grpo_kernels
