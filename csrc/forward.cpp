// The forward: streamed logits tiles folded into per-token log-probs, lse (max, log-sum) and entropy; with a `kept`
// workspace, also the one-pass schedule's forward of one token chunk.
#include "prologue.h"
#include "tiles.h"

namespace grpo_kernels {
namespace detail {

template <typename T>
void forward_impl(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                  const LogprobsOptions& opt, at::Tensor& logp_out, at::Tensor& lse_out,
                  c10::optional<at::Tensor> ent_out, uint8_t* kept = nullptr) {
  const Problem<T> pr(h, w, b, t, opt);
  const int64_t N = pr.N, D = pr.D, V = pr.V;
  const T *wp = pr.wp, *bp = pr.bp;
  const int64_t* tp = pr.tp;
  const Engine eng = pr.eng;
  const bool vnni = pr.vnni;
  const Transform& tr = pr.tr;
  const Partition& part = pr.part;
  const bool want_q = ent_out.has_value();
  const int64_t nthreads = part.nthreads;

  // super-chunks bound the packed H^T and the per-thread stats; kept logits hold one token chunk
  TORCH_INTERNAL_ASSERT(kept == nullptr || N <= kTokenChunk);
  const int64_t S = kept ? N : super_chunk_tokens(N, opt, nthreads * D * 4, kDhBudgetBytes);
  const KeptLayout kl(N, V, h.scalar_type());
  const int64_t nchunks_max = ceil_div(S, kTokenChunk);
  Scratch<T> packed(static_cast<size_t>(nchunks_max * D * kLd));
  std::vector<float> stats(static_cast<size_t>(nthreads * 3 * S));
  std::vector<float> zt(static_cast<size_t>(S));

  for (int64_t s0 = 0; s0 < N; s0 += S) {
    const int64_t sn = std::min(S, N - s0);
    const int64_t nchunks = ceil_div(sn, kTokenChunk);
    pr.pack_ht(s0, sn, packed.data());
    std::fill(stats.begin(), stats.end(), 0.f);
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      Scratch<float> tile(static_cast<size_t>(kVocabBlock * kLd));
      for (int64_t tid = t0; tid < t1; ++tid) {
        float* base = stats.data() + tid * 3 * S;
        std::fill(base, base + S, kNegInf);
        for (int64_t blk = part.begin(tid); blk < part.end(tid); ++blk) {
          const int64_t v0 = blk * kVocabBlock, vb = std::min(kVocabBlock, V - v0);
          for (int64_t c = 0; c < nchunks; ++c) {
            const int64_t n0 = c * kTokenChunk, mc = std::min(kTokenChunk, sn - n0);
            tile_gemm<T>(eng, vb, mc, D, D, kLd, kLd, false, wp + v0 * D, packed.data() + c * D * kLd, tile.data(), vnni);
            for (int64_t n = 0; n < mc; ++n) {
              const int64_t tg = tp[s0 + n0 + n], r = tg - v0;
              if (r >= 0 && r < vb) zt[n0 + n] = tr.apply(tile[r * kLd + n] + bias_at(bp, tg));
            }
            const Stats st{base + n0, base + S + n0, base + 2 * S + n0};
            forward_tile<T>(tile.data(), vb, mc, kLd, bp, v0, tr, st, want_q, kept != nullptr);
            if (kept) {
              KeptT<T>* out = kl.tile<KeptT<T>>(kept, blk);
              for (int64_t r = 0; r < vb; ++r) copy_row(tile.data() + r * kLd, out + r * kl.ld, mc);
              std::memcpy(kl.max_row(kept, blk), st.m, mc * sizeof(float));  // the max each e is relative to
            }
          }
        }
      }
      release(eng);
    });
    if (kept) std::memcpy(kl.target_logits(kept), zt.data(), sn * sizeof(float));
    float* logp = logp_out.data_ptr<float>() + s0;
    float* lse = lse_out.data_ptr<float>() + 2 * s0;  // [N, 2]: (max, log-sum) per token
    float* ent = want_q ? ent_out->data_ptr<float>() + s0 : nullptr;
    for (int64_t n = 0; n < sn; ++n) {
      float m = kNegInf;
      for (int64_t tid = 0; tid < nthreads; ++tid) m = std::max(m, stats[tid * 3 * S + n]);
      double s = 0, q = 0;
      for (int64_t tid = 0; tid < nthreads; ++tid) {
        const float mt = stats[tid * 3 * S + n];
        if (mt == kNegInf) continue;
        const double sc = std::exp(double(mt) - m);
        const double st = stats[tid * 3 * S + S + n];
        s += sc * st;
        if (want_q) q += sc * (stats[tid * 3 * S + 2 * S + n] + st * (double(mt) - m));
      }
      // lse stays the pair (m, log s): m + log s in one fp32 would round log s to the ulp of m
      const double ls = std::log(s);
      lse[2 * n] = m;
      lse[2 * n + 1] = static_cast<float>(ls);
      logp[n] = static_cast<float>((double(zt[n]) - m) - ls);
      if (want_q) ent[n] = static_cast<float>(ls - q / s);
    }
  }
}

}  // namespace detail

using namespace detail;

void forward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
             const LogprobsOptions& opt, at::Tensor& logp, at::Tensor& lse, c10::optional<at::Tensor> entropy) {
  check_call(h, w, b, t, opt);
  check_lse(lse, h.size(0));
  if (h.size(0) == 0) return;
  GRPO_DISPATCH(h.scalar_type(), [&] { forward_impl<scalar_t>(h, w, b, t, opt, logp, lse, entropy); });
}

void chunk_forward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                   const LogprobsOptions& opt, at::Tensor& kept, at::Tensor& logp, at::Tensor& lse,
                   c10::optional<at::Tensor> entropy) {
  check_call(h, w, b, t, opt);
  check_lse(lse, h.size(0));
  check_kept(h, w, kept);
  GRPO_DISPATCH(h.scalar_type(),
                [&] { forward_impl<scalar_t>(h, w, b, t, opt, logp, lse, entropy, kept.data_ptr<uint8_t>()); });
}

}  // namespace grpo_kernels
