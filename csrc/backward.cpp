// The two-pass backward: recomputes each logits tile from the forward's lse (max, log-sum), then dW and dH.
#include "backward_loop.h"
#include "dw_accumulator.h"
#include "prologue.h"
#include "tiles.h"

namespace grpo_kernels {
namespace detail {

template <typename T>
void backward_impl(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                   const at::Tensor& lse_t, const c10::optional<at::Tensor>& ent_t, const at::Tensor& gl_t,
                   const c10::optional<at::Tensor>& ge_t, const LogprobsOptions& opt, c10::optional<at::Tensor> dh,
                   c10::optional<at::Tensor> dw, c10::optional<at::Tensor> db) {
  const Problem<T> pr(h, w, b, t, opt);
  const int64_t N = pr.N, D = pr.D, V = pr.V;
  const T *hp = pr.hp, *wp = pr.wp, *bp = pr.bp;
  const int64_t* tp = pr.tp;
  const Engine eng = pr.eng;
  const bool vnni = pr.vnni;
  // whether dW and dH take VNNI operands too (dW: one GEMM per group over the super-chunk with H in token pairs;
  // dH: one per group and token chunk with dZ in vocab-row pairs), or run as whole-group GEMMs on plain operands
  const bool vnni_dz = vnni && vnni_gradients(eng);
  const Transform& tr = pr.tr;
  const Partition& part = pr.part;
  const bool need_dh = dh.has_value(), need_dw = dw.has_value(), need_db = db.has_value();
  const int64_t nthreads = part.nthreads;
  const float* gl = gl_t.data_ptr<float>();
  const float* ge = ge_t ? ge_t->data_ptr<float>() : nullptr;
  const RowStats stats(lse_t, ent_t, ge != nullptr, N);

  const int64_t S = backward_tokens(N, V, D, h.scalar_type(), need_dw, opt, nthreads);
  const int64_t nsuper = ceil_div(N, S);
  const int64_t nchunks_max = ceil_div(S, kTokenChunk);
  // rows of dZ^T and of dH^T: whole cache lines in 16 bits, off powers of two
  const int64_t s_ld = (S + 31) / 32 * 32 + 32;
  const int64_t wt_ld = kGroup * kVocabBlock + 32;
  Scratch<T> packed_ht(static_cast<size_t>(nchunks_max * D * kLd));
  // B operand of the VNNI dW GEMM: H of the super-chunk in token pairs [ceil(S / 2), D, 2] (the plain path reads
  // h directly)
  Scratch<T> h_pairs(vnni_dz && need_dw ? static_cast<size_t>(round_up2(S) * D) : 0);
  Scratch<float> dht(need_dh ? static_cast<size_t>(nthreads * D * s_ld) : 0);
  std::vector<float> db_acc(need_db ? static_cast<size_t>(V) : 0, 0.f);
  std::vector<int8_t> dw_lo;
  T* dwp = need_dw ? dw->data_ptr<T>() : nullptr;
  if (need_dw && nsuper > 1 && !std::is_same_v<T, float>) dw_lo.resize(static_cast<size_t>(V * D));

  for (int64_t si = 0; si < nsuper; ++si) {
    const int64_t s0 = si * S, sn = std::min(S, N - s0);
    const int64_t nchunks = ceil_div(sn, kTokenChunk);
    pr.pack_ht(s0, sn, packed_ht.data(), [&](int64_t c, const T* hc, int64_t mc) {
      // chunk c's pairs start at pair row c * kTokenChunk / 2 (an odd last chunk pairs its last token with zero)
      if (!h_pairs.empty()) Packer<T>::interleave_rows(hc, mc, D, D, D, h_pairs.data() + c * kTokenChunk * D);
    });
    if (need_dh) std::fill(dht.begin(), dht.end(), 0.f);
    const GradInputs gin_base = stats.inputs(gl, ge).at(s0);

    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      Scratch<float> tile(static_cast<size_t>(kVocabBlock * kLd));
      // dZ^T of a group of blocks for every token of the super-chunk, in the GEMM dtype
      Scratch<T> dzt(static_cast<size_t>(kGroup * kVocabBlock * s_ld), T(0.f));
      Scratch<T> dz_vnni(vnni_dz && need_dh ? static_cast<size_t>(kGroup * kVocabBlock * kLd) : 0);
      Scratch<T> wt(need_dh ? static_cast<size_t>(D * wt_ld) : 0);
      // an fp32 dW needs no tile: dw_step forms it in place (and fp32 never takes the VNNI dZ path)
      Scratch<float> dw_tile(need_dw && !std::is_same_v<T, float> ? static_cast<size_t>(kGroup * kVocabBlock * D) : 0);
      std::vector<float> db_rows;
      for (int64_t tid = t0; tid < t1; ++tid) {
        float* my_dht = need_dh ? dht.data() + tid * D * s_ld : nullptr;
        int64_t kv = 0;  // K of the group's dH GEMM
        for_each_vocab_group(
            part, tid, V, need_db ? db_acc.data() : nullptr, db_rows,
            [&](const VocabGroup& g) {
              kv = vnni_dz ? round_up2(g.rows) : g.rows;
              if (need_dh) Packer<T>::w_transposed(wp + g.v0 * D, g.rows, D, kv, wt_ld, wt.data());
            },
            [&](const VocabGroup&, const VocabBlock& blk) {
              const int64_t bv0 = blk.v0, vb = blk.rows;
              T* dzt_block = dzt.data() + blk.in_group * kVocabBlock * s_ld;
              for (int64_t c = 0; c < nchunks; ++c) {
                const int64_t n0 = c * kTokenChunk, mc = std::min(kTokenChunk, sn - n0);
                const GradInputs gin = gin_base.at(n0);
                tile_gemm<T>(eng, vb, mc, D, D, kLd, kLd, false, wp + bv0 * D, packed_ht.data() + c * D * kLd,
                             tile.data(), vnni);
                grad_tile<T>(tile.data(), vb, mc, kLd, bp, bv0, tp + s0 + n0, tr, gin, blk.db_rows);
                for (int64_t r = 0; r < vb; ++r) {
                  if constexpr (std::is_same_v<T, float>)
                    std::memcpy(dzt_block + r * s_ld + n0, tile.data() + r * kLd, mc * sizeof(float));
                  else
                    at::vec::convert(tile.data() + r * kLd, dzt_block + r * s_ld + n0, mc);
                }
              }
            },
            [&](const VocabGroup& g) {
              if (need_dw) {
                // dW_group [rows, D] = dZ^T_group [rows, sn] H_s [sn, D] in one GEMM over the whole super-chunk, so
                // dW's fp32 C is written once (per-chunk dW^T GEMMs, K = 256, re-read and re-wrote it 16 times at
                // N = 4096) and a plain GEMM packs its B operand (H of the super-chunk) once per group. On VNNI
                // engines B is H in token pairs, packed once per super-chunk, and K is padded to even
                const int64_t kd = vnni_dz ? round_up2(sn) : sn;
                if (kd > sn)  // the VNNI K padding: zero, not a value a longer super-chunk left there
                  for (int64_t r = 0; r < g.rows; ++r) dzt[r * s_ld + sn] = T(0.f);
                dw_step<T>(eng, g.rows, D, kd, s_ld, D, dzt.data(), vnni_dz ? h_pairs.data() : hp + s0 * D, vnni_dz,
                           dw_tile.data(), dwp + g.v0 * D, dw_lo.empty() ? nullptr : dw_lo.data() + g.v0 * D, si == 0);
              }
              if (need_dh && !vnni_dz) {
                // dH^T [D, sn] += W_group^T [D, rows] dZ^T_group [rows, sn]: one call per group, so the plain GEMM
                // packs W_group^T once, not once per token chunk
                tile_gemm<T>(eng, D, sn, kv, wt_ld, s_ld, s_ld, true, wt.data(), dzt.data(), my_dht, false);
              } else if (need_dh) {
                for (int64_t c = 0; c < nchunks; ++c) {
                  const int64_t n0 = c * kTokenChunk, mc = std::min(kTokenChunk, sn - n0);
                  const T* bz = dzt.data() + n0;
                  int64_t ldb = s_ld;
                  if (vnni_dz) {
                    Packer<T>::interleave_rows(bz, g.rows, mc, s_ld, kLd, dz_vnni.data());
                    bz = dz_vnni.data();
                    ldb = kLd;
                  }
                  tile_gemm<T>(eng, D, mc, kv, wt_ld, ldb, s_ld, true, wt.data(), bz, my_dht + n0, vnni_dz);
                }
              }
            });
      }
      release(eng);
    });

    if (need_dh) {
      // sum the threads' dH^T [D, sn] and transpose back to rows of dh, 16 tokens at a time
      T* out = dh->data_ptr<T>() + s0 * D;
      at::parallel_for(0, ceil_div(sn, 16), 1, [&](int64_t g0, int64_t g1) {
        std::vector<float> rows(static_cast<size_t>(16 * D));
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t n0 = g * 16, cnt = std::min<int64_t>(16, sn - n0);
          for (int64_t k = 0; k < D; ++k) {
            float acc[16] = {0.f};
            for (int64_t tid = 0; tid < nthreads; ++tid) {
              const float* src = dht.data() + (tid * D + k) * s_ld + n0;
              for (int64_t j = 0; j < cnt; ++j) acc[j] += src[j];
            }
            for (int64_t j = 0; j < cnt; ++j) rows[j * D + k] = acc[j];
          }
          for (int64_t j = 0; j < cnt; ++j) {
            if constexpr (std::is_same_v<T, float>)
              std::memcpy(out + (n0 + j) * D, rows.data() + j * D, D * sizeof(float));
            else
              at::vec::convert(rows.data() + j * D, out + (n0 + j) * D, D);
          }
        }
      });
    }
  }
  if (need_db) {
    T* out = db->data_ptr<T>();
    for (int64_t v = 0; v < V; ++v) out[v] = T(db_acc[v]);
  }
}

}  // namespace detail

using namespace detail;

int64_t backward_tokens(int64_t n, int64_t v, int64_t d, at::ScalarType dtype, bool need_dw,
                        const LogprobsOptions& opt, int64_t nthreads) {
  const bool fp32 = dtype == at::kFloat;
  // Per thread and token of a super-chunk: an fp32 dH^T column and kGroup * kVocabBlock dZ values.
  const int64_t own = nthreads * (d * 4 + kGroup * kVocabBlock * (fp32 ? 4 : 2));
  // Where the engine makes fp32 copies of a whole-group GEMM's token-long operands (dZ_g^T and H), those
  // too. One super-chunk is sized by the backward's own buffers (with the copies, N = 4096 measured +117 MB
  // in all on AMD Zen 3); once N is split, a 16-bit dW's int8 residual [V, D] (dw_lo) joins them, and the
  // copies count against the split budget (without them N = 16384 measured +297 MB there).
  const int64_t widened = widens_operands(opt.engine, dtype) ? nthreads * (kGroup * kVocabBlock + d) * 4 : 0;
  // Where dW takes VNNI operands (backward_impl's vnni_dz), its B operand is H of the whole super-chunk in token
  // pairs, one buffer for all threads (`h_pairs` above): counted like the copies, against
  // the split budget only (a single super-chunk of at most 8,704 tokens holds at most 15.6 MB of it at D = 896).
  const bool vnni_dz = use_vnni(opt.engine, dtype, d) && vnni_gradients(opt.engine);
  const int64_t packed_h = need_dw && vnni_dz ? d * 2 : 0;
  const int64_t residual = need_dw && !fp32 ? v * d : 0;
  return backward_super_chunk_tokens(n, opt, own, own + packed_h + widened, residual,
                                     fp32 ? kFloatBackwardTokens : std::numeric_limits<int64_t>::max());
}

void backward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
              const at::Tensor& lse, const c10::optional<at::Tensor>& entropy, const at::Tensor& g_logp,
              const c10::optional<at::Tensor>& g_ent, const LogprobsOptions& opt, c10::optional<at::Tensor> dh,
              c10::optional<at::Tensor> dw, c10::optional<at::Tensor> db) {
  check_call(h, w, b, t, opt);
  check_lse(lse, h.size(0));
  TORCH_CHECK(!g_ent || entropy, "grpo_kernels._C: the entropy gradient needs the forward's entropy");
  if (h.size(0) == 0) {
    if (dw) dw->zero_();
    if (db) db->zero_();
    return;
  }
  GRPO_DISPATCH(h.scalar_type(),
                [&] { backward_impl<scalar_t>(h, w, b, t, lse, entropy, g_logp, g_ent, opt, dh, dw, db); });
}

}  // namespace grpo_kernels
