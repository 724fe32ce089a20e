// A cache-blocked bf16 x bf16 -> fp32 GEMM on AMX tiles, our own (the `amx` tile engine, tile_engine.h).
//
// C [m, n] (+)= A [m, k] B [k, n]: A row-major (lda elements), B in VNNI pairs (pair row p holds
// (B[2p][j], B[2p+1][j]) as one 32-bit word at p * ldb + j, i.e. the brgemm-vnni layout), C fp32 row-major.
// AMX tile loads take a row stride, so both operands are read where the schedules packed them: no copy.
//
// Register blocking 2 x 2: C tiles 0-3 hold a 32 x 32 fp32 block, tiles 4-5 two 16 x 32 slices of A,
// tiles 6-7 two 16-pair x 16 slices of B. Cache blocking: C in macro blocks of kMc x kNc that stay in L2,
// K in slices of kKc, and within a slice each 32-column B panel (kKc x 32 bf16 = 16 KiB, L1) serves
// every 32-row block of the macro block's A slice (from L2).
// The 32-aligned part [m1 x n1 x k1] runs here; the ragged rest (rows, columns, K past a multiple of 32)
// goes to ATen's brgemm on the same VNNI operands (oneDNN's micro-kernel), which then owns the AMX tile
// configuration until release.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

// GCC 11 and clang 12 know the AMX intrinsics; the kernel is compiled for them whatever -march says
// (function-level target) and runs only where the CPU and Linux allow (available()).
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define GRPO_AMX_KERNEL 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace grpo_kernels::amx {

#ifdef GRPO_AMX_KERNEL
inline constexpr bool compiled = true;

constexpr int64_t kKc = 256;  // K per cache slice (a multiple of 32)
constexpr int64_t kMc = 256, kNc = 512;  // C macro block (multiples of 32)

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Whether this CPU runs AMX bf16 tiles and the kernel let this process use them (Linux asks once).
inline bool available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    unsigned eax, ebx, ecx, edx;
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    if (!((edx >> 22) & 1) || !((edx >> 24) & 1)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

inline void configure() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One 32 x 32 block of C over kc (a multiple of 32) of K. a: the block's first row at its K offset;
// b: the block's first pair row and column; c: the block's first element.
inline void block_2x2(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c, int64_t ldc,
                      int64_t kc, bool load_c) {
  const int64_t sa = lda * 2, sb = ldb * 4, sc = ldc * 4;
  if (load_c) {
    _tile_loadd(0, c, sc);
    _tile_loadd(1, c + 16, sc);
    _tile_loadd(2, c + 16 * ldc, sc);
    _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k0 = 0; k0 < kc; k0 += 32) {
    const uint16_t* bk = b + (k0 / 2) * ldb * 2;
    _tile_loadd(4, a + k0, sa);
    _tile_loadd(6, bk, sb);
    _tile_loadd(7, bk + 32, sb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a + 16 * lda + k0, sa);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + 16, sc);
  _tile_stored(2, c + 16 * ldc, sc);
  _tile_stored(3, c + 16 * ldc + 16, sc);
}

// The 32-aligned part: C [m1, n1] (+)= A [m1, k1] B [k1, n1], m1, n1, k1 multiples of 32, k1 > 0.
inline void gemm_aligned(int64_t m1, int64_t n1, int64_t k1, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                         const uint16_t* a, const uint16_t* b, float* c) {
  configure();
  // C in macro blocks of kMc x kNc (512 KiB fp32) that stay in L2 across the K slices
  for (int64_t mb = 0; mb < m1; mb += kMc)
    for (int64_t nb = 0; nb < n1; nb += kNc) {
      const int64_t me = std::min(m1, mb + kMc), ne = std::min(n1, nb + kNc);
      for (int64_t k0 = 0; k0 < k1; k0 += kKc) {
        const int64_t kc = std::min(kKc, k1 - k0);
        const bool load_c = add || k0 > 0;
        for (int64_t n0 = nb; n0 < ne; n0 += 32)
          for (int64_t m0 = mb; m0 < me; m0 += 32)
            block_2x2(a + m0 * lda + k0, lda, b + (k0 / 2) * ldb * 2 + n0 * 2, ldb, c + m0 * ldc + n0, ldc, kc,
                      load_c);
      }
    }
  _tile_release();
}

#pragma GCC pop_options

// The whole GEMM: the aligned part here, the ragged rest on ATen's brgemm (same VNNI operands). k is even.
inline void gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                 const c10::BFloat16* a, const c10::BFloat16* b, float* c) {
  const int64_t m1 = m / 32 * 32, n1 = n / 32 * 32, k1 = k / 32 * 32;
  const auto* a16 = reinterpret_cast<const uint16_t*>(a);
  const auto* b16 = reinterpret_cast<const uint16_t*>(b);
  const bool aligned = m1 > 0 && n1 > 0 && k1 > 0;
  if (aligned) gemm_aligned(m1, n1, k1, lda, ldb, ldc, add, a16, b16, c);
  if (aligned && m1 == m && n1 == n && k1 == k) return;
  // ATen's brgemm keeps its own tile configuration per thread; ours replaced it, so make it reload.
  at::native::cpublas::brgemm_release(true);
  if (!aligned) return at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, true);
  if (k1 < k)  // the K tail of the aligned block
    at::native::cpublas::brgemm(m1, n1, k - k1, lda, ldb, ldc, true, a + k1, b + (k1 / 2) * ldb * 2, c, true);
  if (n1 < n)  // the columns past n1, rows [0, m1)
    at::native::cpublas::brgemm(m1, n - n1, k, lda, ldb, ldc, add, a, b + n1 * 2, c + n1, true);
  if (m1 < m)  // the rows past m1, every column
    at::native::cpublas::brgemm(m - m1, n, k, lda, ldb, ldc, add, a + m1 * lda, b, c + m1 * ldc, true);
  at::native::cpublas::brgemm_release(true);
}

#else  // no AMX intrinsics in this compiler: the engine reports itself unavailable
inline constexpr bool compiled = false;
inline bool available() { return false; }
inline void gemm(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const c10::BFloat16*,
                 const c10::BFloat16*, float*) {
  TORCH_INTERNAL_ASSERT(false, "grpo_kernels._C: built without the AMX kernel");
}
#endif

}  // namespace grpo_kernels::amx
