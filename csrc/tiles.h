// The per-logit math of a tile: online softmax statistics (forward), dLoss/dlogits from recomputed logits
// (two-pass backward) or from kept exp-values (one-pass), and what the one-pass schedule keeps.
#pragma once

#include "common.h"

namespace grpo_kernels::detail {

// Online softmax statistics of one token: running max m, s = sum exp(z - m), q = sum exp(z - m) (z - m).
// Keeping q relative to the running max avoids the cancellation of lse - sum(p z) for peaked rows.
struct Stats {
  float* m;
  float* s;
  float* q;
};

// Rescales running stats to a new max and folds in a block's exp-sums, kW tokens at a time. delta(r, m_new)
// gives row r's transformed logits minus the new max. With keep_e the tile's rows are replaced by their
// exp(z - new max), which the one-pass schedule keeps.
template <class Delta>
inline void fold_block(float* z, int64_t rows, int64_t ldz, int64_t n0, int64_t width, Vec bmax, const Stats& st,
                       bool want_q, bool keep_e, Delta&& delta) {
  Vec m_old = Vec::loadu(st.m + n0, width);
  Vec m_new = at::vec::maximum(m_old, bmax);
  // m_old = -inf (first block): exp(-inf) = 0 and the q update must not form 0 * -inf.
  Vec first = m_old == Vec(kNegInf);
  Vec scale = Vec::blendv((m_old - m_new).exp_u20(), Vec(0.f), first);
  Vec s = Vec::loadu(st.s + n0, width) * scale;
  Vec q(0.f);
  if (want_q) {
    Vec shift = Vec::blendv(m_old - m_new, Vec(0.f), first);
    q = scale * (Vec::loadu(st.q + n0, width) + Vec::loadu(st.s + n0, width) * shift);
  }
  // The block's sums start from zero and join the running ones once: one fp32 accumulator over a
  // whole vocabulary (~75k terms per thread) cost ~8e-6 nats of logp at V = 151936.
  Vec bs(0.f), bq(0.f);
  for (int64_t r = 0; r < rows; ++r) {
    Vec d = delta(r, m_new);
    Vec e = d.exp_u20();
    if (keep_e) e.store(z + r * ldz + n0, width);
    bs = bs + e;
    if (want_q) bq = at::vec::fmadd(e, d, bq);
  }
  s = s + bs;
  if (want_q) q = q + bq;
  m_new.store(st.m + n0, width);
  s.store(st.s + n0, width);
  if (want_q) q.store(st.q + n0, width);
}

// Folds a raw tile (rows ldz apart) into the running stats through the logit transform (leaving exp(z - max)
// in the tile with keep_e).
template <typename T>
void forward_tile(float* z, int64_t vb, int64_t mc, int64_t ldz, const T* bias, int64_t v0, const Transform& tr,
                  const Stats& st, bool want_q, bool keep_e) {
  for (int64_t n0 = 0; n0 < mc; n0 += kW) {
    const int64_t width = std::min(kW, mc - n0);
    Vec bmax(kNegInf);
    // lanes past `width` hold garbage; they are never stored back
    if (tr.cap > 0) {
      // soft-capping is not monotone-linear: transform the tile in place, then fold the stored logits
      for (int64_t r = 0; r < vb; ++r) {
        float* p = z + r * ldz + n0;
        Vec v = tr.apply(Vec::loadu(p, width) + Vec(bias_at(bias, v0 + r)));
        v.store(p, width);
        bmax = at::vec::maximum(bmax, v);
      }
      fold_block(z, vb, ldz, n0, width, bmax, st, want_q, keep_e,
                 [&](int64_t r, Vec m_new) { return Vec::loadu(z + r * ldz + n0, width) - m_new; });
    } else {
      // z = (raw + b) / T is increasing in raw + b, so max z = (max of raw + b) / T exactly (rounding is
      // monotone too): one read of the tile for the max and one for the exp-sums, with no transformed copy
      // written in between (the forward's epilogue was ~10 % of its time on AMD Zen 5 with the copy).
      // z - m is formed from the rounded z = fl(fl(raw + b) / T), the logit the backward and the target
      // see, not fused into one fmsub: at temperature 0.01 the unrounded product put the max's
      // exp(z - m) half an ulp of m (~1e-5) off 1, so the log-sum came out negative, and every p of
      // the backward (which sees the rounded logit) was 1e-5 off: dW at 20x the materializing path's error
      for (int64_t r = 0; r < vb; ++r)
        bmax = at::vec::maximum(bmax, Vec::loadu(z + r * ldz + n0, width) + Vec(bias_at(bias, v0 + r)));
      const Vec inv_t(tr.inv_t);
      fold_block(z, vb, ldz, n0, width, bmax * inv_t, st, want_q, keep_e, [&](int64_t r, Vec m_new) {
        return (Vec::loadu(z + r * ldz + n0, width) + Vec(bias_at(bias, v0 + r))) * inv_t - m_new;
      });
    }
  }
}

// Per-token inputs of the backward for one super-chunk, as contiguous float arrays. The forward's lse is
// kept as the pair (row max m, log-sum ls = log sum exp(z - m)): p = exp((z - m) - ls) is then exact
// where it matters, since z - m is exact near the max, whereas z - lse with one fp32 lse loses the
// log-sum to the ulp of the max logit (4.9e-4 at logits of 4000) in every p.
struct GradInputs {
  const float* m;
  const float* ls;
  const float* g_logp;
  const float* g_ent;  // nullptr: no entropy gradient
  const float* mean_y;  // sum_j p_j (z_j - m) = ls - entropy (only with g_ent)

  // the same inputs for tokens n0.. of these
  GradInputs at(int64_t n0) const {
    return {m + n0, ls + n0, g_logp + n0, g_ent ? g_ent + n0 : nullptr, g_ent ? mean_y + n0 : nullptr};
  }
};

// The backward's per-token arrays from the forward's lse [N, 2] and entropy: m, ls and (with the
// entropy gradient) ls - entropy, de-interleaved once so that the tiles load kW tokens at a time.
struct RowStats {
  std::vector<float> m, ls, mean_y;

  RowStats(const at::Tensor& lse, const c10::optional<at::Tensor>& ent_t, bool need_ent, int64_t n)
      : m(static_cast<size_t>(n)), ls(static_cast<size_t>(n)) {
    const float* p = lse.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      m[i] = p[2 * i];
      ls[i] = p[2 * i + 1];
    }
    if (!need_ent) return;
    const float* ent = ent_t->data_ptr<float>();
    mean_y.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) mean_y[i] = ls[i] - ent[i];  // both O(log V): no cancellation
  }

  GradInputs inputs(const float* g_logp, const float* g_ent) const {
    return {m.data(), ls.data(), g_logp, g_ent, g_ent ? mean_y.data() : nullptr};
  }
};

// What every dLoss/draw tile ends with: the exact value at each token's target (z_t: the transformed target
// logit of each token), then the tile's per-row sums into db_rows when given. At the target the tile holds
// -p_t (g_logp + g_ent (y_t - ybar)) slope with the vector exp's p_t (exp_u20: ~1e-6 relative), against
// which onehot - p_t cancels for a peaked row. So the target's value is formed again in double, with
// 1 - p_t = -expm1(y_t - ls) exact (argmax targets at temperature 1: the median dH error against the
// materializing path's went from 1.20x to 1.00x).
inline void finish_grad_tile(float* d, int64_t vb, int64_t mc, int64_t ldz, int64_t v0, const int64_t* tgt,
                             const float* z_t, const GradInputs& g, const Transform& tr, float* db_rows) {
  for (int64_t n = 0; n < mc; ++n) {
    const int64_t r = tgt[n] - v0;
    if (r < 0 || r >= vb) continue;
    const double y_t = z_t[n] - g.m[n];  // exact near the max
    const double lp = y_t - g.ls[n];     // log p_t
    double dt = -double(g.g_logp[n]) * std::expm1(lp);
    const double p = std::exp(lp);
    if (g.g_ent && p > 0) dt -= double(g.g_ent[n]) * p * (y_t - g.mean_y[n]);
    d[r * ldz + n] = static_cast<float>(dt * tr.slope(z_t[n]));
  }
  if (db_rows) {
    for (int64_t r = 0; r < vb; ++r) {
      Vec acc(0.f);
      const float* p = d + r * ldz;
      int64_t n = 0;
      for (; n + kW <= mc; n += kW) acc = acc + Vec::loadu(p + n);
      if (n < mc) acc = acc + Vec::loadu(p + n, mc - n);  // loadu with a count zero-fills the rest
      float lanes[kW];
      acc.store(lanes);
      float sum = 0.f;
      for (int64_t j = 0; j < kW; ++j) sum += lanes[j];
      db_rows[r] += sum;
    }
  }
}

// Turns a raw logits tile (rows ldz apart) into dLoss/draw in place (fp32).
template <typename T>
void grad_tile(float* z, int64_t vb, int64_t mc, int64_t ldz, const T* bias, int64_t v0, const int64_t* tgt,
               const Transform& tr, const GradInputs& g, float* db_rows) {
  // target logits, saved before the tile is overwritten
  float z_t[kTokenChunk];
  for (int64_t n = 0; n < mc; ++n) {
    const int64_t r = tgt[n] - v0;
    if (r >= 0 && r < vb) z_t[n] = tr.apply(z[r * ldz + n] + bias_at(bias, tgt[n]));
  }
  for (int64_t n0 = 0; n0 < mc; n0 += kW) {
    const int64_t width = std::min(kW, mc - n0);
    Vec m = Vec::loadu(g.m + n0, width);
    Vec ls = Vec::loadu(g.ls + n0, width);
    Vec gl = Vec::loadu(g.g_logp + n0, width);
    Vec ge = g.g_ent ? Vec::loadu(g.g_ent + n0, width) : Vec(0.f);
    Vec my = g.g_ent ? Vec::loadu(g.mean_y + n0, width) : Vec(0.f);
    for (int64_t r = 0; r < vb; ++r) {
      float* p = z + r * ldz + n0;
      Vec zz = tr.apply(Vec::loadu(p, width) + Vec(bias_at(bias, v0 + r)));
      Vec y = zz - m;
      Vec prob = (y - ls).exp_u20();
      Vec d = Vec(0.f) - gl * prob;
      if (g.g_ent) d = d - ge * prob * (y - my);
      (d * tr.slope(zz)).store(p, width);
    }
  }
  finish_grad_tile(z, vb, mc, ldz, v0, tgt, z_t, g, tr, db_rows);
}

// Turns a tile of kept e = exp(z - m) into dLoss/draw in place (fp32), where m_blk holds each token's
// running max when the forward folded this block: p = e exp((m_blk - m) - ls) costs one exp per token, not
// per logit. Only the entropy gradient and soft-capping need z itself: z - m = (m_blk - m) + log(e) (e = 0
// has p = 0).
inline void grad_tile_kept(float* e, int64_t vb, int64_t mc, int64_t ldz, const float* m_blk, const float* z_t,
                           int64_t v0, const int64_t* tgt, const Transform& tr, const GradInputs& g, float* db_rows) {
  const bool need_z = g.g_ent != nullptr || tr.cap > 0;
  for (int64_t n0 = 0; n0 < mc; n0 += kW) {
    const int64_t width = std::min(kW, mc - n0);
    Vec mb = Vec::loadu(m_blk + n0, width);
    Vec m = Vec::loadu(g.m + n0, width);
    Vec shift = mb - m;  // <= 0, exact when the block's running max is near the row's
    Vec scale = (shift - Vec::loadu(g.ls + n0, width)).exp_u20();
    Vec gl = Vec::loadu(g.g_logp + n0, width);
    Vec ge = g.g_ent ? Vec::loadu(g.g_ent + n0, width) : Vec(0.f);
    Vec my = g.g_ent ? Vec::loadu(g.mean_y + n0, width) : Vec(0.f);
    for (int64_t r = 0; r < vb; ++r) {
      float* p = e + r * ldz + n0;
      Vec ev = Vec::loadu(p, width);
      Vec prob = ev * scale;
      Vec d = Vec(0.f) - gl * prob;
      if (need_z) {
        Vec y = shift + at::vec::maximum(ev, Vec(std::numeric_limits<float>::min())).log();  // z - m
        if (g.g_ent) d = d - ge * prob * (y - my);
        d = d * tr.slope(y + m);
      } else {
        d = d * Vec(tr.inv_t);
      }
      d.store(p, width);
    }
  }
  finish_grad_tile(e, vb, mc, ldz, v0, tgt, z_t, g, tr, db_rows);
}

// What the one-pass schedule keeps of a chunk of n tokens between its forward and its gradient step, in
// one byte workspace: per vocab block, a tile [kVocabBlock, ld] of e = exp(z - m) (fp32 for fp32 inputs;
// bf16 otherwise, whose 8 fraction bits match the bf16 dZ the GEMMs take anyway, at half the bytes of
// fp32 logits, so twice the tokens fit per chunk), then per block the running max m [ld] each e is
// relative to, then the transformed target logits [ld].
template <typename T>
using KeptT = std::conditional_t<std::is_same_v<T, float>, float, at::BFloat16>;

struct KeptLayout {
  int64_t ld, nblocks, elem_bytes;
  KeptLayout(int64_t n, int64_t v, at::ScalarType dtype)
      : ld(ceil_div(n, 16) * 16 + 16), nblocks(ceil_div(v, kVocabBlock)), elem_bytes(dtype == at::kFloat ? 4 : 2) {}
  int64_t tiles_bytes() const { return ceil_div(nblocks * kVocabBlock * ld * elem_bytes, 64) * 64; }
  int64_t bytes() const { return tiles_bytes() + (nblocks + 1) * ld * int64_t(sizeof(float)); }
  template <typename K>
  K* tile(uint8_t* base, int64_t blk) const { return reinterpret_cast<K*>(base) + blk * kVocabBlock * ld; }
  float* max_row(uint8_t* base, int64_t blk) const { return reinterpret_cast<float*>(base + tiles_bytes()) + blk * ld; }
  float* target_logits(uint8_t* base) const { return max_row(base, nblocks); }
};

template <typename K>
void copy_row(const float* src, K* dst, int64_t n) {
  if constexpr (std::is_same_v<K, float>)
    std::memcpy(dst, src, n * sizeof(float));
  else
    at::vec::convert(src, dst, n);
}
inline void check_kept(const at::Tensor& h, const at::Tensor& w, const at::Tensor& kept) {
  TORCH_CHECK(h.size(0) <= kTokenChunk, "grpo_kernels._C: a one-pass chunk holds at most ", kTokenChunk, " tokens");
  TORCH_CHECK(kept.scalar_type() == at::kByte && kept.is_contiguous() &&
                  kept.numel() >= KeptLayout(h.size(0), w.size(0), h.scalar_type()).bytes(),
              "grpo_kernels._C: kept must be a uint8 workspace of kept_bytes(n, V, dtype) bytes");
}

}  // namespace grpo_kernels::detail
