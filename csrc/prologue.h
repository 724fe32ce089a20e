// The prologue the forward (forward.cpp) and the two-pass backward (backward.cpp) share: the public
// entries' checks, the sizes and typed pointers of their arguments, the engine and the operand layout it
// takes, the logit transform, the vocab partition across threads, and the packing of a super-chunk's
// H^T into the B operand of the logits GEMM.
#pragma once

#include "common.h"
#include "packing.h"

namespace grpo_kernels::detail {

// What a public entry checks before any kernel runs.
inline void check_call(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       const at::Tensor& t, const LogprobsOptions& opt) {
  check_inputs(h, w, b, t);
  check_engine(opt.engine, h.scalar_type());
}

template <typename T>
struct Problem {
  int64_t N, D, V;
  const T* hp;
  const T* wp;
  const T* bp;  // nullptr: no bias
  const int64_t* tp;
  Engine eng;
  bool vnni;  // whether the logits GEMM takes a VNNI-packed H^T (tile_engine.h)
  Transform tr;
  Partition part;

  Problem(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
          const LogprobsOptions& opt)
      : N(h.size(0)),
        D(h.size(1)),
        V(w.size(0)),
        hp(h.data_ptr<T>()),
        wp(w.data_ptr<T>()),
        bp(b ? b->data_ptr<T>() : nullptr),
        tp(t.data_ptr<int64_t>()),
        eng(opt.engine),
        vnni(use_vnni<T>(opt.engine, h.size(1))),
        tr(opt),
        part{at::get_num_threads(), ceil_div(w.size(0), kVocabBlock)} {}

  // Packs H^T of tokens [s0, s0 + sn), chunk by chunk in parallel, into `packed` (chunk c at c * D * kLd),
  // calling also(c, h_chunk, mc) after each chunk for what else a schedule derives from it.
  template <class Also>
  void pack_ht(int64_t s0, int64_t sn, T* packed, Also&& also) const {
    at::parallel_for(0, ceil_div(sn, kTokenChunk), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t mc = std::min(kTokenChunk, sn - c * kTokenChunk);
        const T* hc = hp + (s0 + c * kTokenChunk) * D;
        Packer<T>::h_transposed(hc, mc, D, vnni, packed + c * D * kLd);
        also(c, hc, mc);
      }
    });
  }
  void pack_ht(int64_t s0, int64_t sn, T* packed) const {
    pack_ht(s0, sn, packed, [](int64_t, const T*, int64_t) {});
  }
};

}  // namespace grpo_kernels::detail
