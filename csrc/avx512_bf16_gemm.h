// A cache-blocked bf16 x bf16 -> fp32 GEMM on AVX-512-BF16 (vdpbf16ps), our own (the `avx512-bf16` tile
// engine, tile_engine.h), for CPUs that have the instruction but no AMX tiles (AMD Zen 4 / Zen 5, Intel
// Cooper Lake). It reads the operand layout the `amx` engine reads, so the schedules pack for both alike.
//
// C [m, n] (+)= A [m, k] B [k, n]: A row-major (lda elements), B in VNNI pairs (pair row p holds
// (B[2p][j], B[2p+1][j]) as one 32-bit word at p * ldb + j), C fp32 row-major; k even (the schedules pad
// an odd K with a zero row in B and a zero column in A).
//
// Register blocking kMr x kNr = 6 x 64: 24 zmm accumulators, 4 zmm of B per pair row, one broadcast pair
// of A. Each vdpbf16ps adds 16 lanes x 2 products into fp32, so a pair row of the block is 24 of them
// against 4 loads of B and 6 broadcasts of A. Cache blocking: K in slices of kKcPairs pair rows; within a
// slice each 64-column B panel (kKcPairs x 64 words, 64 KiB, L1/L2) serves every 6-row strip of A.
// Measured on AMD EPYC Zen 5 (2 vCPU, 2026-12-06, standalone harness with this blocking): 1,010-1,040
// GFLOP/s on 2 threads at the kernels' shapes (256 x 256 x 896, 256 x 896 x 1024), against 905 for
// torch's bf16 matmul (oneDNN) on the whole [4096 x 896] x [896 x 37984] and ~215 for ATen's brgemm and
// MKL's cblas_gemm_bf16bf16f32 on the same tiles. 14 x 32 blocking measured the same; 6 x 64 is kept for
// its 4-row tail at 256 rows (16 accumulators, enough to hide vdpbf16ps' latency on two pipes).
// Ragged edges run here too: fewer rows through the same template, a partial last column vector masked.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

// GCC 10 and clang 9 know the AVX-512-BF16 intrinsics; the kernel is compiled for them whatever -march says
// (function-level target) and runs only where the CPU and the OS allow (available()).
#if defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define GRPO_AVX512_BF16_KERNEL 1
#include <immintrin.h>
#endif

namespace grpo_kernels::avx512bf16 {

#ifdef GRPO_AVX512_BF16_KERNEL
inline constexpr bool compiled = true;

constexpr int kMr = 6, kNv = 4, kNr = 16 * kNv;
constexpr int64_t kKcPairs = 256;  // pair rows of K per cache slice

// Whether this CPU has AVX-512-BF16 and the OS saves the zmm state (libgcc's / compiler-rt's CPU model
// checks XCR0 before it reports an AVX-512 feature).
inline bool available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// One rows x (16 * nv) block of C over kp pair rows; the last column vector is masked by `last`.
template <int Rows, int Nv>
__attribute__((always_inline)) inline void block(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                                                 float* c, int64_t ldc, int64_t kp, bool load_c, __mmask16 last) {
  // The accumulators must live in registers: GCC 12 keeps the array in memory (a store per vdpbf16ps, a
  // third of the speed) unless the loops over it are unrolled before its scalar replacement, hence the pragmas.
  __m512 acc[Rows][Nv];
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < Nv; ++j)
      acc[i][j] = load_c ? _mm512_maskz_loadu_ps(j == Nv - 1 ? last : __mmask16(0xFFFF), c + i * ldc + 16 * j)
                         : _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    __m512i bv[Nv];
#pragma GCC unroll 8
    for (int j = 0; j < Nv; ++j)
      // a partial last vector must not read past the operand's last row: masked (zeros) there
      bv[j] = j == Nv - 1 ? _mm512_maskz_loadu_epi32(last, b + p * ldb + 16 * j) : _mm512_loadu_si512(b + p * ldb + 16 * j);
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      int32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * p, sizeof(pair));  // (A[i][2p], A[i][2p + 1]) as one word
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
      for (int j = 0; j < Nv; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, (__m512bh)bv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < Nv; ++j)
      _mm512_mask_storeu_ps(c + i * ldc + 16 * j, j == Nv - 1 ? last : __mmask16(0xFFFF), acc[i][j]);
}

template <int Nv>
inline void strip(int64_t rows, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t kp, bool load_c, __mmask16 last) {
  switch (rows) {
    case 6: return block<6, Nv>(a, lda, b, ldb, c, ldc, kp, load_c, last);
    case 5: return block<5, Nv>(a, lda, b, ldb, c, ldc, kp, load_c, last);
    case 4: return block<4, Nv>(a, lda, b, ldb, c, ldc, kp, load_c, last);
    case 3: return block<3, Nv>(a, lda, b, ldb, c, ldc, kp, load_c, last);
    case 2: return block<2, Nv>(a, lda, b, ldb, c, ldc, kp, load_c, last);
    default: return block<1, Nv>(a, lda, b, ldb, c, ldc, kp, load_c, last);
  }
}

// C [m, n] (+)= A [m, k] B [k, n] (layouts above), k even.
inline void gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add, const uint16_t* a,
                 const uint32_t* b, float* c) {
  TORCH_INTERNAL_ASSERT(k % 2 == 0, "avx512-bf16 GEMM: K must be even (VNNI pairs); got ", k);
  if (k == 0) {
    if (!add)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
    return;
  }
  const int64_t kpt = k / 2;
  for (int64_t p0 = 0; p0 < kpt; p0 += kKcPairs) {
    const int64_t kp = std::min(kKcPairs, kpt - p0);
    const bool load_c = add || p0 > 0;
    for (int64_t n0 = 0; n0 < n; n0 += kNr) {
      const int64_t nn = std::min<int64_t>(kNr, n - n0);
      const int nv = int((nn + 15) / 16);
      const __mmask16 last = nn % 16 ? __mmask16((1u << (nn % 16)) - 1) : __mmask16(0xFFFF);
      const uint32_t* bp = b + p0 * ldb + n0;
      for (int64_t m0 = 0; m0 < m; m0 += kMr) {
        const int64_t rows = std::min<int64_t>(kMr, m - m0);
        const uint16_t* ap = a + m0 * lda + 2 * p0;
        float* cp = c + m0 * ldc + n0;
        switch (nv) {
          case 4: strip<4>(rows, ap, lda, bp, ldb, cp, ldc, kp, load_c, last); break;
          case 3: strip<3>(rows, ap, lda, bp, ldb, cp, ldc, kp, load_c, last); break;
          case 2: strip<2>(rows, ap, lda, bp, ldb, cp, ldc, kp, load_c, last); break;
          default: strip<1>(rows, ap, lda, bp, ldb, cp, ldc, kp, load_c, last); break;
        }
      }
    }
  }
}

#pragma GCC pop_options

#else  // no AVX-512-BF16 intrinsics in this compiler: the engine reports itself unavailable
inline constexpr bool compiled = false;
inline bool available() { return false; }
inline void gemm(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const uint16_t*, const uint32_t*, float*) {
  TORCH_INTERNAL_ASSERT(false, "grpo_kernels._C: built without the AVX-512-BF16 kernel");
}
#endif

}  // namespace grpo_kernels::avx512bf16
