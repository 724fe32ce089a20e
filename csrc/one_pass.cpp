// The one-pass schedule's gradient step of one token chunk, from the exp-values its forward kept; the
// chunk sizing of that schedule; and the scaling of its gradients by grad_output once that is known
// (rounded once: a 16-bit gradient, dW and dH alike, keeps its int8 residual until then).
#include "backward_loop.h"
#include "common.h"
#include "dw_accumulator.h"
#include "packing.h"
#include "tiles.h"

namespace grpo_kernels {
namespace detail {

// Gradient step of the one-pass schedule for one chunk of N <= kTokenChunk tokens whose exp-values
// forward_impl kept in `kept`: per vocab block, dZ from the kept tile, dW_block = dZ^T H_chunk
// (dw_step: 16-bit through an fp32 tile flushed into dW and its residual at once, fp32 by the GEMM in place)
// and, per group of blocks, dH_chunk += dZ W_group. With the
// forward's logits GEMM that is three GEMMs per token; the price is that dW (V x D, plus its int8
// residual) is re-read and re-written once per chunk. Its GEMMs take row-major operands, except on the
// amx engine (vnni_chunk_gradients), where H_chunk and W_group are packed into VNNI pairs so that the
// GEMMs run our AMX kernel: the dH part of a 1024-token bf16 backward took 0.25 s with the packing
// against 0.30 s on ATen's plain brgemm (Intel Xeon with AMX, 2 threads).
template <typename T>
void chunk_backward_impl(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                         const at::Tensor& t, uint8_t* kept, const at::Tensor& lse_t,
                         const c10::optional<at::Tensor>& ent_t, const at::Tensor& gl_t,
                         const c10::optional<at::Tensor>& ge_t, const LogprobsOptions& opt,
                         c10::optional<at::Tensor> dh, c10::optional<at::Tensor> dh_lo, c10::optional<at::Tensor> dw,
                         c10::optional<at::Tensor> dw_lo, c10::optional<at::Tensor> db_acc, bool accumulate) {
  const int64_t N = h.size(0), D = h.size(1), V = w.size(0);
  const Engine eng = opt.engine;
  TORCH_INTERNAL_ASSERT(N <= kTokenChunk);
  const T* hp = h.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const int64_t* tp = t.data_ptr<int64_t>();
  const bool need_dh = dh.has_value(), need_dw = dw.has_value();
  T* dwp = need_dw ? dw->data_ptr<T>() : nullptr;
  int8_t* lop = dw_lo ? dw_lo->data_ptr<int8_t>() : nullptr;
  float* dbp = db_acc ? db_acc->data_ptr<float>() : nullptr;
  const Transform tr(opt);
  const Partition part{at::get_num_threads(), ceil_div(V, kVocabBlock)};
  const int64_t nthreads = part.nthreads;
  const KeptLayout kl(N, V, h.scalar_type());
  const float* z_t = kl.target_logits(kept);
  const int64_t ldg = kGroup * kVocabBlock + 32;  // rows of dZ [N, group]
  const float* ge = ge_t ? ge_t->data_ptr<float>() : nullptr;
  const RowStats stats(lse_t, ent_t, ge != nullptr, N);
  const GradInputs gin = stats.inputs(gl_t.data_ptr<float>(), ge);
  Scratch<float> dh_acc(need_dh ? static_cast<size_t>(nthreads * N * D) : 0, 0.f);
  // On the amx engine the gradient GEMMs take VNNI operands too: H_chunk in token pairs (packed once here,
  // the B operand of every block's dW GEMM) and, per group, W_group in vocab-row pairs (the dH GEMM's B).
  // Plain-operand calls would run ATen's brgemm, which packs B itself per call, slower at these shapes.
  const bool vnni = vnni_chunk_gradients<T>(eng, D);
  const int64_t kn = vnni ? round_up2(N) : N;  // K of the dW GEMM (an odd N pairs its last token with zero)
  Scratch<T> h_pairs(vnni && need_dw ? static_cast<size_t>(kn * D) : 0);
  if (!h_pairs.empty()) Packer<T>::interleave_rows(hp, N, D, D, D, h_pairs.data());

  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    // dZ^T [vb, N] of a block in fp32 (the A operand of the fp32 dW GEMM) and 16-bit, and dZ [N, gv] of a
    // group of blocks (the A operand of the dH GEMM)
    Scratch<float> tile(static_cast<size_t>(kVocabBlock * kLd));
    Scratch<T> dzt(std::is_same_v<T, float> ? 0 : static_cast<size_t>(kVocabBlock * kDzLd));
    Scratch<T> dz(need_dh ? static_cast<size_t>(N * ldg) : 0);
    Scratch<T> w_pairs(vnni && need_dh ? static_cast<size_t>((kGroup * kVocabBlock + 1) * D) : 0);
    // an fp32 dW needs no tile: dw_step forms it in place
    Scratch<float> dw_tile(need_dw && !std::is_same_v<T, float> ? static_cast<size_t>(kVocabBlock * D) : 0);
    std::vector<float> db_rows;
    for (int64_t tid = t0; tid < t1; ++tid) {
      float* my_dh = need_dh ? dh_acc.data() + tid * N * D : nullptr;
      for_each_vocab_group(
          part, tid, V, dbp, db_rows, [](const VocabGroup&) {},
          [&](const VocabGroup&, const VocabBlock& b) {
            const int64_t blk = b.index, bv0 = b.v0, vb = b.rows;
            float* z = tile.data();
            const KeptT<T>* e = kl.tile<KeptT<T>>(kept, blk);
            for (int64_t r = 0; r < vb; ++r) {
              if constexpr (std::is_same_v<KeptT<T>, float>)
                std::memcpy(z + r * kLd, e + r * kl.ld, N * sizeof(float));
              else
                at::vec::convert(e + r * kl.ld, z + r * kLd, N);
            }
            grad_tile_kept(z, vb, N, kLd, kl.max_row(kept, blk), z_t, bv0, tp, tr, gin, b.db_rows);
            // dZ^T [vb, N] in the GEMM dtype: fp32 tiles are the tile itself
            const T* a = reinterpret_cast<const T*>(z);
            int64_t lda = kLd;  // 16-bit rows of kLd would start every other row 32 bytes into a cache line
            if constexpr (!std::is_same_v<T, float>) {
              for (int64_t r = 0; r < vb; ++r) {
                at::vec::convert(z + r * kLd, dzt.data() + r * kDzLd, N);
                if (kn > N) dzt[r * kDzLd + N] = T(0.f);  // the VNNI K padding: zero, not a stale value
              }
              a = dzt.data();
              lda = kDzLd;
            }
            if (need_dw)
              dw_step<T>(eng, vb, D, vnni ? kn : N, lda, D, a, vnni ? h_pairs.data() : hp, vnni, dw_tile.data(),
                         dwp + bv0 * D, lop ? lop + bv0 * D : nullptr, !accumulate);
            if (need_dh) transpose_into(a, vb, N, lda, dz.data() + b.in_group * kVocabBlock, ldg);
          },
          [&](const VocabGroup& g) {
            if (!need_dh) return;
            if (vnni) {
              const int64_t kv = round_up2(g.rows);
              if (kv > g.rows)  // the VNNI K padding of an odd last group
                for (int64_t n = 0; n < N; ++n) dz[n * ldg + g.rows] = T(0.f);
              Packer<T>::interleave_rows(wp + g.v0 * D, g.rows, D, D, D, w_pairs.data());
              tile_gemm<T>(eng, N, D, kv, ldg, D, D, true, dz.data(), w_pairs.data(), my_dh, true);
            } else {
              tile_gemm<T>(eng, N, D, g.rows, ldg, D, D, true, dz.data(), wp + g.v0 * D, my_dh, false);
            }
          });
    }
    release(eng);
  });

  if (need_dh) {
    T* out = dh->data_ptr<T>();
    // a 16-bit dH keeps the fp32 sum's next 8 bits in its int8 residual until grad_output scales it
    // (scale_rounded_once): one rounding of g * dH, as the two-pass schedule's
    int8_t* dh_lop = dh_lo ? dh_lo->data_ptr<int8_t>() : nullptr;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      std::vector<float> row(static_cast<size_t>(D));
      for (int64_t n = n0; n < n1; ++n) {
        std::memcpy(row.data(), dh_acc.data() + n * D, D * sizeof(float));
        for (int64_t tid = 1; tid < nthreads; ++tid) {
          const float* src = dh_acc.data() + (tid * N + n) * D;
          for (int64_t k = 0; k < D; ++k) row[k] += src[k];
        }
        if constexpr (std::is_same_v<T, float>)
          std::memcpy(out + n * D, row.data(), D * sizeof(float));
        else if (dh_lop)
          flush_dw<T>(row.data(), D, out + n * D, dh_lop + n * D, true);
        else
          at::vec::convert(row.data(), out + n * D, D);
      }
    });
  }
}

}  // namespace detail

using namespace detail;

int64_t fused_chunk_tokens(int64_t n, int64_t v, int64_t d, at::ScalarType dtype) {
  for (int64_t mc = std::min(kTokenChunk, ceil_div(n, 16) * 16); mc > 16; mc -= 16) {
    // a 16-bit dW keeps its int8 residual until grad_output is known, even when one chunk forms it
    const bool residual = dtype != at::kFloat;
    if (kept_bytes(mc, v, dtype) + (residual ? v * d : 0) <= kFusedBudgetBytes) return mc;
  }
  return 16;
}

int64_t kept_bytes(int64_t n, int64_t v, at::ScalarType dtype) { return KeptLayout(n, v, dtype).bytes(); }

void chunk_backward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                    at::Tensor& kept, const at::Tensor& lse, const c10::optional<at::Tensor>& entropy,
                    const at::Tensor& g_logp, const c10::optional<at::Tensor>& g_ent, const LogprobsOptions& opt,
                    c10::optional<at::Tensor> dh, c10::optional<at::Tensor> dh_lo, c10::optional<at::Tensor> dw,
                    c10::optional<at::Tensor> dw_lo, c10::optional<at::Tensor> db_acc, bool accumulate) {
  check_inputs(h, w, b, t);
  check_lse(lse, h.size(0));
  check_engine(opt.engine, h.scalar_type());
  check_kept(h, w, kept);
  TORCH_CHECK(!g_ent || entropy, "grpo_kernels._C: the entropy gradient needs the forward's entropy");
  TORCH_CHECK(!dw_lo || (dw && dw_lo->scalar_type() == at::kChar && dw_lo->numel() == dw->numel()),
              "grpo_kernels._C: dw_lo must be int8 like dw");
  TORCH_CHECK(!dh_lo || (dh && dh_lo->scalar_type() == at::kChar && dh_lo->numel() == dh->numel() &&
                         dh_lo->is_contiguous() && dh->scalar_type() != at::kFloat),
              "grpo_kernels._C: dh_lo must be a contiguous int8 tensor like a 16-bit dh");
  TORCH_CHECK(!accumulate || !dw || dw_lo || h.scalar_type() == at::kFloat,
              "grpo_kernels._C: accumulating a 16-bit dw needs dw_lo");
  TORCH_CHECK(!db_acc || db_acc->scalar_type() == at::kFloat, "grpo_kernels._C: db_acc must be float32");
  if (h.size(0) == 0) return;
  GRPO_DISPATCH(h.scalar_type(), [&] {
    chunk_backward_impl<scalar_t>(h, w, b, t, kept.data_ptr<uint8_t>(), lse, entropy, g_logp, g_ent, opt, dh, dh_lo, dw,
                                  dw_lo, db_acc, accumulate);
  });
}

void scale_rounded_once(at::Tensor& out, const c10::optional<at::Tensor>& lo, const at::Tensor& scale) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "grpo_kernels._C: out must be a contiguous CPU tensor");
  TORCH_CHECK(scale.numel() == 1 && scale.device().is_cpu(), "grpo_kernels._C: scale must be one CPU value");
  TORCH_CHECK(!lo || (lo->scalar_type() == at::kChar && lo->numel() == out.numel() && lo->is_contiguous()),
              "grpo_kernels._C: lo must be a contiguous int8 tensor like out");
  const float g = scale.to(at::kFloat).item<float>();  // a CPU value: reading it syncs nothing
  GRPO_DISPATCH(out.scalar_type(), [&] {
    detail::scale_rounded_once<scalar_t>(out.data_ptr<scalar_t>(), lo ? lo->data_ptr<int8_t>() : nullptr, out.numel(), g);
  });
}

}  // namespace grpo_kernels
