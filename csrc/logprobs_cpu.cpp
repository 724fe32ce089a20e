// Must precede every ATen include: picks the at::vec implementation for the ISA this file is compiled for
// (setup.py builds with -march=native by default).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#endif

#include "logprobs_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include "tile_engine.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace grpo_kernels {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kVocabBlock = 256;  // rows of W per tile (the brgemm M of the logits GEMM)
constexpr int64_t kTokenChunk = 256;  // tokens per tile: below ~192 the tile GEMM becomes W-bandwidth bound
// Leading dimensions are padded off powers of two: rows 1 KiB apart alias in the same cache sets.
constexpr int64_t kLd = kTokenChunk + 16;       // fp32 tile rows, packed H^T rows, VNNI dZ pair rows
constexpr int64_t kDzLd = kTokenChunk + 32;     // 16-bit dZ^T rows
constexpr int64_t kWtLd = kVocabBlock + 32;     // 16-bit W_block^T rows
constexpr int64_t kPairLd = kVocabBlock + 16;   // VNNI dZ pair rows and fp32 dW^T rows
// All threads' per-token buffers of one super-chunk of tokens together stay below these, so the
// extra memory does not grow with N (dW then accumulates across super-chunks).
constexpr int64_t kDhBudgetBytes = int64_t(64) << 20;
constexpr int64_t kBackwardBudgetBytes = int64_t(96) << 20;
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

int64_t round_up2(int64_t x) { return (x + 1) & ~int64_t(1); }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Packs the operands a tile GEMM needs. VNNI layout for 16-bit types: element (k, n) of a [K, N]
// operand lives at [k / 2][n][k % 2], i.e. pairs of consecutive k share one 32-bit word.
template <typename T>
struct Packer {
  // B operand of the logits GEMM, H_chunk^T [D, Mc]: from rows h[0..mc) of length d.
  static void h_transposed(const T* h, int64_t mc, int64_t d, bool vnni, T* out) {
    if (vnni) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(h);
      uint32_t* dst = reinterpret_cast<uint32_t*>(out);
      const int64_t d2 = d / 2;
      for (int64_t n0 = 0; n0 < mc; n0 += 16)
        for (int64_t k = 0; k < d2; ++k)
          for (int64_t n = n0; n < std::min(mc, n0 + 16); ++n) dst[k * kLd + n] = src[n * d2 + k];
    } else {
      for (int64_t n0 = 0; n0 < mc; n0 += 16)
        for (int64_t k = 0; k < d; ++k)
          for (int64_t n = n0; n < std::min(mc, n0 + 16); ++n) out[k * kLd + n] = h[n * d + k];
    }
  }

  // Interleaves row pairs of a [rows, n] matrix (leading dim ld) into VNNI [ceil(rows/2), n, 2] whose
  // pair rows are ld_out 32-bit words apart; a missing last row reads as zeros.
  static void interleave_rows(const T* src, int64_t rows, int64_t n, int64_t ld, int64_t ld_out, T* dst) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint32_t* o = reinterpret_cast<uint32_t*>(dst);
    for (int64_t r = 0; r < rows; r += 2) {
      const uint16_t* a = s + r * ld;
      uint32_t* out = o + (r / 2) * ld_out;
      if (r + 1 < rows) {
        const uint16_t* b = a + ld;
        for (int64_t j = 0; j < n; ++j) out[j] = uint32_t(a[j]) | (uint32_t(b[j]) << 16);
      } else {
        for (int64_t j = 0; j < n; ++j) out[j] = uint32_t(a[j]);
      }
    }
  }

  // B operand of the dW^T GEMM, dZ [mc, vb] in VNNI form, from dZ^T rows src[0..vb) (leading dim ld):
  // 32-bit word (k, v) = (dZ^T[v][2k], dZ^T[v][2k + 1]); an odd mc pairs the last token with zero.
  static void token_pairs(const T* src, int64_t vb, int64_t mc, int64_t ld, T* dst) {
    const int64_t pairs = mc / 2;
    uint32_t* o = reinterpret_cast<uint32_t*>(dst);
    const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
    constexpr int64_t kB = 16;
    for (int64_t v0 = 0; v0 < vb; v0 += kB)
      for (int64_t k0 = 0; k0 < pairs; k0 += kB)
        for (int64_t v = v0; v < std::min(vb, v0 + kB); ++v) {
          const uint32_t* row = reinterpret_cast<const uint32_t*>(s16 + v * ld);
          for (int64_t k = k0; k < std::min(pairs, k0 + kB); ++k) o[k * kPairLd + v] = row[k];
        }
    if (mc % 2)
      for (int64_t v = 0; v < vb; ++v) o[pairs * kPairLd + v] = uint32_t(s16[v * ld + mc - 1]);
  }

  // A operand of the dH GEMM, W_block^T [D, kv] (rows ld_out apart) from rows w[0..vb) of length d;
  // columns [vb, kv) are zero (the VNNI K padding).
  static void w_transposed(const T* w, int64_t vb, int64_t d, int64_t kv, int64_t ld_out, T* out) {
    constexpr int64_t kB = 32;
    for (int64_t r0 = 0; r0 < vb; r0 += kB)
      for (int64_t k0 = 0; k0 < d; k0 += kB)
        for (int64_t k = k0; k < std::min(d, k0 + kB); ++k)
          for (int64_t r = r0; r < std::min(vb, r0 + kB); ++r) out[k * ld_out + r] = w[r * d + k];
    for (int64_t k = 0; k < d; ++k)
      for (int64_t r = vb; r < kv; ++r) out[k * ld_out + r] = T(0.f);
  }
};

// Online softmax statistics of one token: running max m, s = sum exp(z - m), q = sum exp(z - m) (z - m).
// Keeping q relative to the running max avoids the cancellation of lse - sum(p z) for peaked rows.
struct Stats {
  float* m;
  float* s;
  float* q;
};

// Rescales running stats to a new max and folds in a block's exp-sums, kW tokens at a time. With keep_e
// the tile's logits are replaced by their exp(z - new max), which the one-pass schedule keeps.
inline void fold_block(float* z, int64_t rows, int64_t ldz, int64_t n0, int64_t width, Vec bmax, const Stats& st,
                       bool want_q, bool keep_e) {
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
    Vec d = Vec::loadu(z + r * ldz + n0, width) - m_new;
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

// Applies the logit transform to a raw tile (rows ldz apart) in place and folds it into the running stats
// (leaving exp(z - max) in the tile with keep_e).
template <typename T>
void forward_tile(float* z, int64_t vb, int64_t mc, int64_t ldz, const T* bias, int64_t v0, const Transform& tr,
                  const Stats& st, bool want_q, bool keep_e) {
  for (int64_t n0 = 0; n0 < mc; n0 += kW) {
    const int64_t width = std::min(kW, mc - n0);
    Vec bmax(kNegInf);
    for (int64_t r = 0; r < vb; ++r) {
      float* p = z + r * ldz + n0;
      Vec v = tr.apply(Vec::loadu(p, width) + Vec(bias_at(bias, v0 + r)));
      v.store(p, width);
      // lanes past `width` hold garbage; they are never stored back
      bmax = at::vec::maximum(bmax, v);
    }
    fold_block(z, vb, ldz, n0, width, bmax, st, want_q, keep_e);
  }
}

// Per-token inputs of the backward for one super-chunk, as contiguous float arrays.
struct GradInputs {
  const float* lse;
  const float* g_logp;
  const float* g_ent;  // nullptr: no entropy gradient
  const float* mean_z;  // sum_j p_j z_j = lse - entropy (only with g_ent)
};

// What every dLoss/draw tile ends with: the onehot term at the targets (z_t: the transformed target logit
// of each token), then the tile's per-row sums into db_rows when given.
inline void finish_grad_tile(float* d, int64_t vb, int64_t mc, int64_t ldz, int64_t v0, const int64_t* tgt,
                             const float* z_t, const float* g_logp, const Transform& tr, float* db_rows) {
  for (int64_t n = 0; n < mc; ++n) {
    const int64_t r = tgt[n] - v0;
    if (r >= 0 && r < vb) d[r * ldz + n] += g_logp[n] * tr.slope(z_t[n]);
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
    Vec lse = Vec::loadu(g.lse + n0, width);
    Vec gl = Vec::loadu(g.g_logp + n0, width);
    Vec ge = g.g_ent ? Vec::loadu(g.g_ent + n0, width) : Vec(0.f);
    Vec mz = g.g_ent ? Vec::loadu(g.mean_z + n0, width) : Vec(0.f);
    for (int64_t r = 0; r < vb; ++r) {
      float* p = z + r * ldz + n0;
      Vec zz = tr.apply(Vec::loadu(p, width) + Vec(bias_at(bias, v0 + r)));
      Vec prob = (zz - lse).exp_u20();
      Vec d = Vec(0.f) - gl * prob;
      if (g.g_ent) d = d - ge * prob * (zz - mz);
      (d * tr.slope(zz)).store(p, width);
    }
  }
  finish_grad_tile(z, vb, mc, ldz, v0, tgt, z_t, g.g_logp, tr, db_rows);
}

// Turns a tile of kept e = exp(z - m) into dLoss/draw in place (fp32), where m_blk holds each token's
// running max when the forward folded this block: p = e exp(m - lse) costs one exp per token, not per
// logit. Only the entropy gradient and soft-capping need z itself: z = m + log(e) (e = 0 has p = 0).
inline void grad_tile_kept(float* e, int64_t vb, int64_t mc, int64_t ldz, const float* m_blk, const float* z_t,
                           int64_t v0, const int64_t* tgt, const Transform& tr, const GradInputs& g, float* db_rows) {
  const bool need_z = g.g_ent != nullptr || tr.cap > 0;
  for (int64_t n0 = 0; n0 < mc; n0 += kW) {
    const int64_t width = std::min(kW, mc - n0);
    Vec m = Vec::loadu(m_blk + n0, width);
    Vec scale = (m - Vec::loadu(g.lse + n0, width)).exp_u20();
    Vec gl = Vec::loadu(g.g_logp + n0, width);
    Vec ge = g.g_ent ? Vec::loadu(g.g_ent + n0, width) : Vec(0.f);
    Vec mz = g.g_ent ? Vec::loadu(g.mean_z + n0, width) : Vec(0.f);
    for (int64_t r = 0; r < vb; ++r) {
      float* p = e + r * ldz + n0;
      Vec ev = Vec::loadu(p, width);
      Vec prob = ev * scale;
      Vec d = Vec(0.f) - gl * prob;
      if (need_z) {
        Vec zz = m + at::vec::maximum(ev, Vec(std::numeric_limits<float>::min())).log();
        if (g.g_ent) d = d - ge * prob * (zz - mz);
        d = d * tr.slope(zz);
      } else {
        d = d * Vec(tr.inv_t);
      }
      d.store(p, width);
    }
  }
  finish_grad_tile(e, vb, mc, ldz, v0, tgt, z_t, g.g_logp, tr, db_rows);
}

// sum_j p_j z_j = lse - entropy per token, which the entropy gradient needs (empty without it).
inline std::vector<float> mean_logits(const float* lse, const c10::optional<at::Tensor>& ent_t, bool need, int64_t n) {
  std::vector<float> out;
  if (!need) return out;
  const float* ent = ent_t->data_ptr<float>();
  out.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = lse[i] - ent[i];
  return out;
}

// Low-precision dW accumulated across token chunks: hi is the output itself, lo an int8 residual in
// units of ulp(hi) / 256, which carries 8 more mantissa bits from one chunk to the next. Stores round to
// nearest even, so the vector and scalar forms below give identical bits.
template <typename T>
struct Compensated {
  static_assert(std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>);
  // The unit as a float exponent field, from hi's float exponent field ef: bf16 keeps 7 fraction bits
  // (unit = 2^(ef - 127 - 15)); fp16 keeps 10 and its subnormals share the exponent of 2^-14
  // (unit = 2^(max(ef, 113) - 127 - 18)). A field <= 0 means hi is tiny and the residual is dropped.
  static constexpr int32_t kMinField = std::is_same_v<T, at::BFloat16> ? 1 : 113;
  static constexpr int32_t kShift = std::is_same_v<T, at::BFloat16> ? 15 : 18;

  static int32_t unit_field(float hi) {
    uint32_t bits;
    std::memcpy(&bits, &hi, 4);
    return std::max<int32_t>((bits >> 23) & 0xFF, kMinField) - kShift;
  }
  static float from_field(int32_t field) {
    if (field <= 0) return 0.f;
    const uint32_t fb = uint32_t(field) << 23;
    float f;
    std::memcpy(&f, &fb, 4);
    return f;
  }
  static void store(float full, T* hi, int8_t* lo) {
    const T h(full);
    *hi = h;
    const int32_t uf = unit_field(static_cast<float>(h));
    // the unit is a power of two, so scaling by its inverse is exact
    const float q = uf > 0 ? std::nearbyint((full - static_cast<float>(h)) * from_field(254 - uf)) : 0.f;
    *lo = static_cast<int8_t>(std::clamp(q, -127.f, 127.f));
  }
  static float load(const T* hi, const int8_t* lo) {
    const float h = static_cast<float>(*hi);
    return h + static_cast<float>(*lo) * from_field(unit_field(h));
  }

#if defined(__AVX2__) && defined(__F16C__)
  static __m256 load_hi(const T* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, at::BFloat16>)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    else
      return _mm256_cvtph_ps(v);
  }
  // Round to nearest even, NaN to the quiet NaN c10 uses.
  static __m128i round_hi(__m256 x) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      const __m256i b = _mm256_castps_si256(x);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
      return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    } else {
      return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
  }
  // 2^(field) for field > 0, else 0; `field` holds unit fields (or their inverses) as int32 lanes.
  static __m256 pow2(__m256i field, __m256i positive) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(field, 23), positive));
  }
  static __m256i unit_field(__m256 hi) {
    const __m256i ef = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(hi), 23), _mm256_set1_epi32(0xFF));
    return _mm256_sub_epi32(_mm256_max_epi32(ef, _mm256_set1_epi32(kMinField)), _mm256_set1_epi32(kShift));
  }
  // out[0..8) (+ its residual unless first) += tile[0..8), with the new residual stored.
  static void add8(const float* tile, T* out, int8_t* lo, bool first) {
    const __m256i zero = _mm256_setzero_si256();
    __m256 full = _mm256_loadu_ps(tile);
    if (!first) {
      const __m256 h = load_hi(out);
      const __m256i uf = unit_field(h);
      const __m128i l8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(lo));
      const __m256 l = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(l8));
      full = _mm256_add_ps(_mm256_fmadd_ps(l, pow2(uf, _mm256_cmpgt_epi32(uf, zero)), h), full);
    }
    const __m128i hb = round_hi(full);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), hb);
    const __m256 h = load_hi(out);
    const __m256i uf = unit_field(h);
    const __m256 inv = pow2(_mm256_sub_epi32(_mm256_set1_epi32(254), uf), _mm256_cmpgt_epi32(uf, zero));
    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(full, h), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_max_ps(_mm256_min_ps(q, _mm256_set1_ps(127.f)), _mm256_set1_ps(-127.f));
    const __m256i qi = _mm256_cvtps_epi32(q);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(lo), _mm_packs_epi16(q16, q16));
  }
#endif
};

// Writes (first) or adds n fp32 dW values into the output; 16-bit outputs carry the int8 residual lo
// whenever more than one chunk adds into them (lo == nullptr only for a single write).
template <typename T>
void flush_dw(const float* tile, int64_t n, T* out, int8_t* lo, bool first) {
  if constexpr (std::is_same_v<T, float>) {
    if (first) {
      std::memcpy(out, tile, n * sizeof(float));
    } else {
      int64_t i = 0;
      for (; i + kW <= n; i += kW) (Vec::loadu(out + i) + Vec::loadu(tile + i)).store(out + i);
      for (; i < n; ++i) out[i] += tile[i];
    }
  } else {
    if (lo == nullptr) {
      TORCH_INTERNAL_ASSERT(first, "a 16-bit dW accumulated over chunks needs its residual");
      at::vec::convert(tile, out, n);
      return;
    }
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; i + 8 <= n; i += 8) Compensated<T>::add8(tile + i, out + i, lo + i, first);
#endif
    for (; i < n; ++i)
      Compensated<T>::store(first ? tile[i] : Compensated<T>::load(out + i, lo + i) + tile[i], out + i, lo + i);
  }
}

// Tokens per super-chunk: whole token chunks whose per-token buffers fit the budget, at most max_tokens
// (or the override, which tests use to force several super-chunks).
int64_t super_chunk_tokens(int64_t n, const LogprobsOptions& opt, int64_t bytes_per_token, int64_t budget,
                           int64_t max_tokens = std::numeric_limits<int64_t>::max()) {
  const int64_t chunks = opt.super_chunk > 0
                             ? ceil_div(opt.super_chunk, kTokenChunk)
                             : std::max<int64_t>(1, std::min(budget / (bytes_per_token * kTokenChunk),
                                                             max_tokens / kTokenChunk));
  return std::min(n, chunks * kTokenChunk);
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

struct Partition {
  int64_t nthreads, nblocks;
  int64_t begin(int64_t tid) const { return tid * nblocks / nthreads; }
  int64_t end(int64_t tid) const { return (tid + 1) * nblocks / nthreads; }
};

template <typename T>
void forward_impl(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                  const LogprobsOptions& opt, at::Tensor& logp_out, at::Tensor& lse_out,
                  c10::optional<at::Tensor> ent_out, uint8_t* kept = nullptr) {
  const int64_t N = h.size(0), D = h.size(1), V = w.size(0);
  const T* hp = h.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = b ? b->data_ptr<T>() : nullptr;
  const int64_t* tp = t.data_ptr<int64_t>();
  const Engine eng = opt.engine;
  const bool vnni = use_vnni<T>(eng, D);
  const bool want_q = ent_out.has_value();
  const Transform tr(opt);
  const Partition part{at::get_num_threads(), ceil_div(V, kVocabBlock)};
  const int64_t nthreads = part.nthreads;

  // super-chunks bound the packed H^T and the per-thread stats; kept logits hold one token chunk
  TORCH_INTERNAL_ASSERT(kept == nullptr || N <= kTokenChunk);
  const int64_t S = kept ? N : super_chunk_tokens(N, opt, nthreads * D * 4, kDhBudgetBytes);
  const KeptLayout kl(N, V, h.scalar_type());
  const int64_t nchunks_max = ceil_div(S, kTokenChunk);
  std::vector<T> packed(static_cast<size_t>(nchunks_max * D * kLd));
  std::vector<float> stats(static_cast<size_t>(nthreads * 3 * S));
  std::vector<float> zt(static_cast<size_t>(S));

  for (int64_t s0 = 0; s0 < N; s0 += S) {
    const int64_t sn = std::min(S, N - s0);
    const int64_t nchunks = ceil_div(sn, kTokenChunk);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t mc = std::min(kTokenChunk, sn - c * kTokenChunk);
        Packer<T>::h_transposed(hp + (s0 + c * kTokenChunk) * D, mc, D, vnni, packed.data() + c * D * kLd);
      }
    });
    std::fill(stats.begin(), stats.end(), 0.f);
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> tile(static_cast<size_t>(kVocabBlock * kLd));
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
    float* lse = lse_out.data_ptr<float>() + s0;
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
      const double ls = m + std::log(s);
      lse[n] = static_cast<float>(ls);
      logp[n] = static_cast<float>(double(zt[n]) - ls);
      if (want_q) ent[n] = static_cast<float>(std::log(s) - q / s);
    }
  }
}

template <typename T>
void backward_impl(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                   const at::Tensor& lse_t, const c10::optional<at::Tensor>& ent_t, const at::Tensor& gl_t,
                   const c10::optional<at::Tensor>& ge_t, const LogprobsOptions& opt, c10::optional<at::Tensor> dh,
                   c10::optional<at::Tensor> dw, c10::optional<at::Tensor> db) {
  const int64_t N = h.size(0), D = h.size(1), V = w.size(0);
  const T* hp = h.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = b ? b->data_ptr<T>() : nullptr;
  const int64_t* tp = t.data_ptr<int64_t>();
  const Engine eng = opt.engine;
  const bool vnni = use_vnni<T>(eng, D);
  const bool need_dh = dh.has_value(), need_dw = dw.has_value(), need_db = db.has_value();
  const Transform tr(opt);
  const Partition part{at::get_num_threads(), ceil_div(V, kVocabBlock)};
  const int64_t nthreads = part.nthreads;
  const float* lse = lse_t.data_ptr<float>();
  const float* gl = gl_t.data_ptr<float>();
  const float* ge = ge_t ? ge_t->data_ptr<float>() : nullptr;
  const std::vector<float> mean_z = mean_logits(lse, ent_t, ge != nullptr, N);

  // Per thread and token of a super-chunk: an fp32 dH^T column and kGroup * kVocabBlock dZ values.
  const int64_t per_token = nthreads * (D * 4 + kGroup * kVocabBlock * int64_t(sizeof(T)));
  const int64_t S = super_chunk_tokens(N, opt, per_token, kBackwardBudgetBytes,
                                      std::is_same_v<T, float> ? kFloatBackwardTokens
                                                               : std::numeric_limits<int64_t>::max());
  const int64_t nsuper = ceil_div(N, S);
  const int64_t nchunks_max = ceil_div(S, kTokenChunk);
  const int64_t s_ld = round_up2(S) + 16;  // rows of dZ^T and of dH^T
  const int64_t wt_ld = kGroup * kVocabBlock + 32;
  std::vector<T> packed_ht(static_cast<size_t>(nchunks_max * D * kLd));
  // A operand of the VNNI dW^T GEMM: H^T [D, tokens] of the super-chunk (the plain path reads h directly)
  std::vector<T> ht(vnni && need_dw ? static_cast<size_t>(D * s_ld) : 0, T(0.f));
  std::vector<float> dht(need_dh ? static_cast<size_t>(nthreads * D * s_ld) : 0);
  std::vector<float> db_acc(need_db ? static_cast<size_t>(V) : 0, 0.f);
  std::vector<int8_t> dw_lo;
  T* dwp = need_dw ? dw->data_ptr<T>() : nullptr;
  if (need_dw && nsuper > 1 && !std::is_same_v<T, float>) dw_lo.resize(static_cast<size_t>(V * D));

  for (int64_t si = 0; si < nsuper; ++si) {
    const int64_t s0 = si * S, sn = std::min(S, N - s0);
    const int64_t nchunks = ceil_div(sn, kTokenChunk);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t mc = std::min(kTokenChunk, sn - c * kTokenChunk);
        const T* hc = hp + (s0 + c * kTokenChunk) * D;
        Packer<T>::h_transposed(hc, mc, D, vnni, packed_ht.data() + c * D * kLd);
        if (!ht.empty())
          for (int64_t k = 0; k < D; ++k)
            for (int64_t n = 0; n < mc; ++n) ht[k * s_ld + c * kTokenChunk + n] = hc[n * D + k];
      }
    });
    if (need_dh) std::fill(dht.begin(), dht.end(), 0.f);
    const GradInputs gin_base{lse + s0, gl + s0, ge ? ge + s0 : nullptr, ge ? mean_z.data() + s0 : nullptr};

    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> tile(static_cast<size_t>(kVocabBlock * kLd));
      // dZ^T of a group of blocks for every token of the super-chunk, in the GEMM dtype
      std::vector<T> dzt(static_cast<size_t>(kGroup * kVocabBlock * s_ld), T(0.f));
      std::vector<T> dz_vnni(vnni && need_dh ? static_cast<size_t>(kGroup * kVocabBlock * kLd) : 0);
      std::vector<T> dz_pairs(vnni && need_dw ? static_cast<size_t>(kTokenChunk * kPairLd) : 0);
      std::vector<T> wt(need_dh ? static_cast<size_t>(D * wt_ld) : 0);
      std::vector<float> dwt(vnni && need_dw ? static_cast<size_t>(D * kPairLd) : 0);
      std::vector<float> dw_tile(need_dw ? static_cast<size_t>(kVocabBlock * D) : 0);
      std::vector<float> db_rows(kGroup * kVocabBlock);
      for (int64_t tid = t0; tid < t1; ++tid) {
        float* my_dht = need_dh ? dht.data() + tid * D * s_ld : nullptr;
        for (int64_t g0 = part.begin(tid); g0 < part.end(tid); g0 += kGroup) {
          const int64_t nb = std::min(kGroup, part.end(tid) - g0);
          const int64_t v0 = g0 * kVocabBlock, gv = std::min(nb * kVocabBlock, V - v0);
          const int64_t kv = vnni ? round_up2(gv) : gv;  // K of the dH GEMM
          if (need_dh) Packer<T>::w_transposed(wp + v0 * D, gv, D, kv, wt_ld, wt.data());
          std::fill(db_rows.begin(), db_rows.end(), 0.f);
          for (int64_t bi = 0; bi < nb; ++bi) {
            const int64_t bv0 = v0 + bi * kVocabBlock, vb = std::min(kVocabBlock, V - bv0);
            T* dzt_block = dzt.data() + bi * kVocabBlock * s_ld;
            for (int64_t c = 0; c < nchunks; ++c) {
              const int64_t n0 = c * kTokenChunk, mc = std::min(kTokenChunk, sn - n0);
              GradInputs gin = gin_base;
              gin.lse += n0;
              gin.g_logp += n0;
              if (gin.g_ent) {
                gin.g_ent += n0;
                gin.mean_z += n0;
              }
              tile_gemm<T>(eng, vb, mc, D, D, kLd, kLd, false, wp + bv0 * D, packed_ht.data() + c * D * kLd, tile.data(),
                           vnni);
              grad_tile<T>(tile.data(), vb, mc, kLd, bp, bv0, tp + s0 + n0, tr, gin,
                               need_db ? db_rows.data() + bi * kVocabBlock : nullptr);
              for (int64_t r = 0; r < vb; ++r) {
                if constexpr (std::is_same_v<T, float>)
                  std::memcpy(dzt_block + r * s_ld + n0, tile.data() + r * kLd, mc * sizeof(float));
                else
                  at::vec::convert(tile.data() + r * kLd, dzt_block + r * s_ld + n0, mc);
              }
              if (vnni && need_dw) {
                // dW^T [D, vb] += H_chunk^T [D, mc] dZ [mc, vb]: the GEMM shape brgemm runs fastest
                Packer<T>::token_pairs(dzt_block + n0, vb, mc, s_ld, dz_pairs.data());
                tile_gemm<T>(eng, D, vb, round_up2(mc), s_ld, kPairLd, kPairLd, c > 0, ht.data() + n0, dz_pairs.data(),
                             dwt.data(), true);
              }
            }
            if (need_dw) {
              if (vnni) {
                for (int64_t k = 0; k < D; ++k)
                  for (int64_t r = 0; r < vb; ++r) dw_tile[r * D + k] = dwt[k * kPairLd + r];
              } else {
                tile_gemm<T>(eng, vb, D, sn, s_ld, D, D, false, dzt_block, hp + s0 * D, dw_tile.data(), false);
              }
              flush_dw<T>(dw_tile.data(), vb * D, dwp + bv0 * D, dw_lo.empty() ? nullptr : dw_lo.data() + bv0 * D,
                          si == 0);
            }
          }
          if (need_dh) {
            for (int64_t c = 0; c < nchunks; ++c) {
              const int64_t n0 = c * kTokenChunk, mc = std::min(kTokenChunk, sn - n0);
              const T* bz = dzt.data() + n0;
              int64_t ldb = s_ld;
              if (vnni) {
                Packer<T>::interleave_rows(bz, gv, mc, s_ld, kLd, dz_vnni.data());
                bz = dz_vnni.data();
                ldb = kLd;
              }
              tile_gemm<T>(eng, D, mc, kv, wt_ld, ldb, s_ld, true, wt.data(), bz, my_dht + n0, vnni);
            }
          }
          if (need_db)
            for (int64_t r = 0; r < gv; ++r) db_acc[v0 + r] += db_rows[r];
        }
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

// Gradient step of the one-pass schedule for one chunk of N <= kTokenChunk tokens whose exp-values
// forward_impl kept in `kept`: per vocab block, dZ from the kept tile, dW_block = dZ^T H_chunk
// (fp32 tile, flushed into dW at once) and, per group of blocks, dH_chunk += dZ W_group. With the
// forward's logits GEMM that is three GEMMs per token; the price is that dW (V x D, plus its int8
// residual) is re-read and re-written once per chunk. Its GEMMs take row-major operands (no VNNI
// packing), which every engine runs at speed: on AMX, ATen's brgemm on unpacked operands measured
// 820-990 GFLOP/s per thread at these shapes, as fast as on packed ones.
template <typename T>
void chunk_backward_impl(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                         const at::Tensor& t, uint8_t* kept, const at::Tensor& lse_t,
                         const c10::optional<at::Tensor>& ent_t, const at::Tensor& gl_t,
                         const c10::optional<at::Tensor>& ge_t, const LogprobsOptions& opt,
                         c10::optional<at::Tensor> dh, c10::optional<at::Tensor> dw,
                         c10::optional<at::Tensor> dw_lo, c10::optional<at::Tensor> db_acc, bool accumulate) {
  const int64_t N = h.size(0), D = h.size(1), V = w.size(0);
  const Engine eng = opt.engine;
  TORCH_INTERNAL_ASSERT(N <= kTokenChunk);
  const T* hp = h.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = b ? b->data_ptr<T>() : nullptr;
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
  const float* lse = lse_t.data_ptr<float>();
  const float* ge = ge_t ? ge_t->data_ptr<float>() : nullptr;
  const std::vector<float> mean_z = mean_logits(lse, ent_t, ge != nullptr, N);
  const GradInputs gin{lse, gl_t.data_ptr<float>(), ge, ge ? mean_z.data() : nullptr};
  std::vector<float> dh_acc(need_dh ? static_cast<size_t>(nthreads * N * D) : 0, 0.f);

  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    // dZ^T [vb, N] of a block in fp32 (the A operand of the fp32 dW GEMM) and 16-bit, and dZ [N, gv] of a
    // group of blocks (the A operand of the dH GEMM)
    std::vector<float> tile(static_cast<size_t>(kVocabBlock * kLd));
    std::vector<T> dzt(std::is_same_v<T, float> || !need_dw ? 0 : static_cast<size_t>(kVocabBlock * kLd));
    std::vector<T> dz(need_dh ? static_cast<size_t>(N * ldg) : 0);
    std::vector<float> dw_tile(need_dw ? static_cast<size_t>(kVocabBlock * D) : 0);
    std::vector<float> db_rows(kGroup * kVocabBlock);
    for (int64_t tid = t0; tid < t1; ++tid) {
      float* my_dh = need_dh ? dh_acc.data() + tid * N * D : nullptr;
      for (int64_t g0 = part.begin(tid); g0 < part.end(tid); g0 += kGroup) {
        const int64_t nb = std::min(kGroup, part.end(tid) - g0);
        const int64_t v0 = g0 * kVocabBlock, gv = std::min(nb * kVocabBlock, V - v0);
        std::fill(db_rows.begin(), db_rows.end(), 0.f);
        for (int64_t bi = 0; bi < nb; ++bi) {
          const int64_t blk = g0 + bi, bv0 = blk * kVocabBlock, vb = std::min(kVocabBlock, V - bv0);
          float* z = tile.data();
          const KeptT<T>* e = kl.tile<KeptT<T>>(kept, blk);
          for (int64_t r = 0; r < vb; ++r) {
            if constexpr (std::is_same_v<KeptT<T>, float>)
              std::memcpy(z + r * kLd, e + r * kl.ld, N * sizeof(float));
            else
              at::vec::convert(e + r * kl.ld, z + r * kLd, N);
          }
          grad_tile_kept(z, vb, N, kLd, kl.max_row(kept, blk), z_t, bv0, tp, tr, gin,
                         dbp ? db_rows.data() + bi * kVocabBlock : nullptr);
          if (need_dw) {
            const T* a = reinterpret_cast<const T*>(z);
            if constexpr (!std::is_same_v<T, float>) {
              at::vec::convert(z, dzt.data(), vb * kLd);
              a = dzt.data();
            }
            tile_gemm<T>(eng, vb, D, N, kLd, D, D, false, a, hp, dw_tile.data(), false);
            flush_dw<T>(dw_tile.data(), vb * D, dwp + bv0 * D, lop ? lop + bv0 * D : nullptr, !accumulate);
          }
          if (need_dh) {
            T* out = dz.data() + bi * kVocabBlock;
            constexpr int64_t kB = 16;
            for (int64_t r0 = 0; r0 < vb; r0 += kB)
              for (int64_t n = 0; n < N; ++n)
                for (int64_t r = r0; r < std::min(vb, r0 + kB); ++r) out[n * ldg + r] = T(z[r * kLd + n]);
          }
        }
        if (need_dh) tile_gemm<T>(eng, N, D, gv, ldg, D, D, true, dz.data(), wp + v0 * D, my_dh, false);
        if (dbp)
          for (int64_t r = 0; r < gv; ++r) dbp[v0 + r] += db_rows[r];
      }
    }
     release(eng);
  });

  if (need_dh) {
    T* out = dh->data_ptr<T>();
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
        else
          at::vec::convert(row.data(), out + n * D, D);
      }
    });
  }
}

void check_inputs(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t) {
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), "grpo_kernels._C: expects h [N, D], w [V, D]");
  TORCH_CHECK(h.is_contiguous() && w.is_contiguous() && t.is_contiguous(), "grpo_kernels._C: inputs must be contiguous");
  TORCH_CHECK(h.scalar_type() == w.scalar_type(), "grpo_kernels._C: h and w must share a dtype");
  TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == h.size(0), "grpo_kernels._C: t must be int64 [N]");
  TORCH_CHECK(!b || (b->is_contiguous() && b->scalar_type() == w.scalar_type() && b->numel() == w.size(0)),
              "grpo_kernels._C: b must be [V] with w's dtype");
}

void check_kept(const at::Tensor& h, const at::Tensor& w, const at::Tensor& kept) {
  TORCH_CHECK(h.size(0) <= kTokenChunk, "grpo_kernels._C: a one-pass chunk holds at most ", kTokenChunk, " tokens");
  TORCH_CHECK(kept.scalar_type() == at::kByte && kept.is_contiguous() &&
                  kept.numel() >= KeptLayout(h.size(0), w.size(0), h.scalar_type()).bytes(),
              "grpo_kernels._C: kept must be a uint8 workspace of kept_bytes(n, V, dtype) bytes");
}

}  // namespace

#define GRPO_DISPATCH(dtype, ...)                                                    \
  switch (dtype) {                                                                   \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }              \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }    \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }            \
    default: TORCH_CHECK(false, "grpo_kernels._C: unsupported dtype ", dtype);       \
  }

void forward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
             const LogprobsOptions& opt, at::Tensor& logp, at::Tensor& lse, c10::optional<at::Tensor> entropy) {
  check_inputs(h, w, b, t);
  check_engine(opt.engine, h.scalar_type());
  if (h.size(0) == 0) return;
  GRPO_DISPATCH(h.scalar_type(), [&] { forward_impl<scalar_t>(h, w, b, t, opt, logp, lse, entropy); });
}

void backward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
              const at::Tensor& lse, const c10::optional<at::Tensor>& entropy, const at::Tensor& g_logp,
              const c10::optional<at::Tensor>& g_ent, const LogprobsOptions& opt, c10::optional<at::Tensor> dh,
              c10::optional<at::Tensor> dw, c10::optional<at::Tensor> db) {
  check_inputs(h, w, b, t);
  check_engine(opt.engine, h.scalar_type());
  TORCH_CHECK(!g_ent || entropy, "grpo_kernels._C: the entropy gradient needs the forward's entropy");
  if (h.size(0) == 0) {
    if (dw) dw->zero_();
    if (db) db->zero_();
    return;
  }
  GRPO_DISPATCH(h.scalar_type(),
                [&] { backward_impl<scalar_t>(h, w, b, t, lse, entropy, g_logp, g_ent, opt, dh, dw, db); });
}

int64_t fused_chunk_tokens(int64_t n, int64_t v, int64_t d, at::ScalarType dtype) {
  for (int64_t mc = std::min(kTokenChunk, ceil_div(n, 16) * 16); mc > 16; mc -= 16) {
    const bool residual = dtype != at::kFloat && n > mc;
    if (kept_bytes(mc, v, dtype) + (residual ? v * d : 0) <= kFusedBudgetBytes) return mc;
  }
  return 16;
}

int64_t kept_bytes(int64_t n, int64_t v, at::ScalarType dtype) { return KeptLayout(n, v, dtype).bytes(); }

void chunk_forward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                   const LogprobsOptions& opt, at::Tensor& kept, at::Tensor& logp, at::Tensor& lse,
                   c10::optional<at::Tensor> entropy) {
  check_inputs(h, w, b, t);
  check_engine(opt.engine, h.scalar_type());
  check_kept(h, w, kept);
  GRPO_DISPATCH(h.scalar_type(),
                [&] { forward_impl<scalar_t>(h, w, b, t, opt, logp, lse, entropy, kept.data_ptr<uint8_t>()); });
}

void chunk_backward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                    at::Tensor& kept, const at::Tensor& lse, const c10::optional<at::Tensor>& entropy,
                    const at::Tensor& g_logp, const c10::optional<at::Tensor>& g_ent, const LogprobsOptions& opt,
                    c10::optional<at::Tensor> dh, c10::optional<at::Tensor> dw, c10::optional<at::Tensor> dw_lo,
                    c10::optional<at::Tensor> db_acc, bool accumulate) {
  check_inputs(h, w, b, t);
  check_engine(opt.engine, h.scalar_type());
  check_kept(h, w, kept);
  TORCH_CHECK(!g_ent || entropy, "grpo_kernels._C: the entropy gradient needs the forward's entropy");
  TORCH_CHECK(!dw_lo || (dw && dw_lo->scalar_type() == at::kChar && dw_lo->numel() == dw->numel()),
              "grpo_kernels._C: dw_lo must be int8 like dw");
  TORCH_CHECK(!accumulate || !dw || dw_lo || h.scalar_type() == at::kFloat,
              "grpo_kernels._C: accumulating a 16-bit dw needs dw_lo");
  TORCH_CHECK(!db_acc || db_acc->scalar_type() == at::kFloat, "grpo_kernels._C: db_acc must be float32");
  if (h.size(0) == 0) return;
  GRPO_DISPATCH(h.scalar_type(), [&] {
    chunk_backward_impl<scalar_t>(h, w, b, t, kept.data_ptr<uint8_t>(), lse, entropy, g_logp, g_ent, opt, dh, dw, dw_lo,
                                  db_acc, accumulate);
  });
}

std::string gemm_path(at::ScalarType dtype, int64_t d, Engine engine) {
  check_engine(engine, dtype);
  bool vnni = false;
  GRPO_DISPATCH(dtype, [&] { vnni = use_vnni<scalar_t>(engine, d); });
  return std::string(engine_name(engine)) + (vnni ? "/amx-vnni" : "/plain");
}

}  // namespace grpo_kernels
