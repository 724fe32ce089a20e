// The compensated 16-bit dW accumulator: a bf16/fp16 dW plus an int8 residual, so a dW summed over
// several token chunks is rounded as if accumulated in fp32; and its one rounding after scaling by
// grad_output (the one pass forms its gradients before grad_output is known).
#pragma once

#include "common.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace grpo_kernels::detail {

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
  // out[0..8) = round(g * (out + its residual)): the scalar form's exact value, product and rounding.
  static void scale8(T* out, const int8_t* lo, __m256 g) {
    const __m256 h = load_hi(out);
    const __m256i uf = unit_field(h);
    const __m256 l = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lo))));
    const __m256 full = _mm256_fmadd_ps(l, pow2(uf, _mm256_cmpgt_epi32(uf, _mm256_setzero_si256())), h);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), round_hi(_mm256_mul_ps(full, g)));
  }
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // add8 sixteen lanes wide, the same steps in the same order (so the same bits): on AVX-512 machines the
  // flush of the one pass's dW, which is bound by these instructions more than by memory at 8 lanes.
  static __m512 load_hi16(const T* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, at::BFloat16>)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    else
      return _mm512_cvtph_ps(v);
  }
  static __m256i round_hi16(__m512 x) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      const __m512i b = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
      return _mm512_cvtepi32_epi16(r);
    } else {
      return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
  }
  static __m512i unit_field16(__m512 hi) {
    const __m512i ef = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(hi), 23), _mm512_set1_epi32(0xFF));
    return _mm512_sub_epi32(_mm512_max_epi32(ef, _mm512_set1_epi32(kMinField)), _mm512_set1_epi32(kShift));
  }
  // 2^(field) where field > 0, else 0
  static __m512 pow2_16(__m512i field) {
    const __mmask16 positive = _mm512_cmpgt_epi32_mask(field, _mm512_setzero_si512());
    return _mm512_castsi512_ps(_mm512_maskz_mov_epi32(positive, _mm512_slli_epi32(field, 23)));
  }
  static void add16(const float* tile, T* out, int8_t* lo, bool first) {
    __m512 full = _mm512_loadu_ps(tile);
    if (!first) {
      const __m512 h = load_hi16(out);
      const __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))));
      full = _mm512_add_ps(_mm512_fmadd_ps(l, pow2_16(unit_field16(h)), h), full);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), round_hi16(full));
    const __m512 h = load_hi16(out);
    const __m512 inv = pow2_16(_mm512_sub_epi32(_mm512_set1_epi32(254), unit_field16(h)));
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(full, h), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_max_ps(_mm512_min_ps(q, _mm512_set1_ps(127.f)), _mm512_set1_ps(-127.f));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
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
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; i + 16 <= n; i += 16) Compensated<T>::add16(tile + i, out + i, lo + i, first);
#endif
#if defined(__AVX2__) && defined(__F16C__)
    for (; i + 8 <= n; i += 8) Compensated<T>::add8(tile + i, out + i, lo + i, first);
#endif
    for (; i < n; ++i)
      Compensated<T>::store(first ? tile[i] : Compensated<T>::load(out + i, lo + i) + tile[i], out + i, lo + i);
  }
}

// The dW step of a vocabulary block or group, shared by both schedules: dW [m, n] (first: =, else +=) A [m, k]
// B [k, n] on the engine, n = D (dW's rows are contiguous). A 16-bit dW goes through the fp32 `tile` ([m, n]) and
// flush_dw, which keeps its int8 residual lo (_C.tile_gemm_flush_check tests that path bit for bit). An fp32 dW is
// formed by the GEMM in place (beta = 1, no tile written and re-read: the fp32 loss went 1.12x -> 1.05x its floor
// on AMD Zen 4), and `tile` may be null; its bits are then the engine's own summation (MKL and at::mm add dW
// inside the GEMM, not as round(product) + dW), which the whole-op tests judge by the oracle rule.
template <typename T>
void dw_step(Engine e, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, const T* a, const T* b, bool b_vnni,
             float* tile, T* dw, int8_t* lo, bool first) {
  if constexpr (std::is_same_v<T, float>) {
    tile_gemm<T>(e, m, n, k, lda, ldb, n, !first, a, b, dw, b_vnni);
  } else {
    tile_gemm<T>(e, m, n, k, lda, ldb, n, false, a, b, tile, b_vnni);
    flush_dw<T>(tile, m * n, dw, lo, first);
  }
}

// Scales a gradient the one pass formed before grad_output g was known, in place, rounding it once:
// fp32: out *= g. 16-bit with the residual lo the accumulator kept (n int8): out = round(g * (out + lo)),
// the accumulated value (hi + residual is exact in fp32) times g in fp32, rounded to nearest even once.
// 16-bit without a residual (lo == nullptr, which the schedules no longer pass): out = round(g * out), a second
// rounding.
// g == 1 leaves out as it is: hi is already the one rounding of the accumulated value, where
// round(hi + lo) would round a second time at ties.
template <typename T>
void scale_rounded_once(T* out, const int8_t* lo, int64_t n, float g) {
  if (g == 1.f) return;
  at::parallel_for(0, n, int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    if constexpr (std::is_same_v<T, float>) {
      for (; i + kW <= i1; i += kW) (Vec::loadu(out + i) * Vec(g)).store(out + i);
      for (; i < i1; ++i) out[i] *= g;
    } else {
      if (lo == nullptr) {  // no residual kept (dH): a second rounding
        for (; i < i1; ++i) out[i] = T(g * static_cast<float>(out[i]));
        return;
      }
#if defined(__AVX2__) && defined(__F16C__)
      const __m256 gv = _mm256_set1_ps(g);
      for (; i + 8 <= i1; i += 8) Compensated<T>::scale8(out + i, lo + i, gv);
#endif
      for (; i < i1; ++i) out[i] = T(g * Compensated<T>::load(out + i, lo + i));
    }
  });
}

}  // namespace grpo_kernels::detail
