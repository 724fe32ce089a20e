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
//
// The kernel is written over its tiles (HwTiles: the AMX instructions; EmulatedTiles: the same eight tiles and
// tile instructions in plain C++, with a plain loop for the ragged rest), so the `amx-emulated` engine runs this
// very blocking, offset arithmetic and ragged split on machines without AMX, where the tests check it.
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

constexpr int64_t kKc = 256;  // K per cache slice (a multiple of 32)
constexpr int64_t kMc = 256, kNc = 512;  // C macro block (multiples of 32)

#ifdef GRPO_AMX_KERNEL
inline constexpr bool compiled = true;
// The kernel below carries the AMX target whichever tiles it runs on (the emulated ones use no AMX instruction).
#define GRPO_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

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

// The hardware tiles: 8 tiles of 16 rows x 64 bytes. GCC's tile intrinsics paste the tile number into the
// instruction's text, so it must be a literal: each template argument picks its literal through a switch that
// folds away.
#define GRPO_AMX_TILE_SWITCH(T, OP) \
  switch (T) {                      \
    case 0: OP(0); break;           \
    case 1: OP(1); break;           \
    case 2: OP(2); break;           \
    case 3: OP(3); break;           \
    case 4: OP(4); break;           \
    case 5: OP(5); break;           \
    case 6: OP(6); break;           \
    default: OP(7); break;          \
  }
struct HwTiles {
  __attribute__((always_inline)) static inline void configure() {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int i = 0; i < 8; ++i) {
      cfg.rows[i] = 16;
      cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
  }
  __attribute__((always_inline)) static inline void release() { _tile_release(); }
  template <int T>
  __attribute__((always_inline)) static inline void zero() {
#define GRPO_OP(t) _tile_zero(t)
    GRPO_AMX_TILE_SWITCH(T, GRPO_OP)
#undef GRPO_OP
  }
  template <int T>
  __attribute__((always_inline)) static inline void load(const void* p, int64_t stride) {
#define GRPO_OP(t) _tile_loadd(t, p, stride)
    GRPO_AMX_TILE_SWITCH(T, GRPO_OP)
#undef GRPO_OP
  }
  template <int T>
  __attribute__((always_inline)) static inline void store(void* p, int64_t stride) {
#define GRPO_OP(t) _tile_stored(t, p, stride)
    GRPO_AMX_TILE_SWITCH(T, GRPO_OP)
#undef GRPO_OP
  }
  // C += A B: the kernel issues only these four combinations
  template <int C, int A, int B>
  __attribute__((always_inline)) static inline void dp() {
    static_assert(C >= 0 && C < 4 && (A == 4 || A == 5) && (B == 6 || B == 7));
    if constexpr (C == 0) _tile_dpbf16ps(0, 4, 6);
    if constexpr (C == 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (C == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (C == 3) _tile_dpbf16ps(3, 5, 7);
  }
  // The ragged rest goes to ATen's brgemm on the same VNNI operands (oneDNN's micro-kernel), which then owns
  // the tile configuration: ours replaced it, so make it reload before, and drop it after.
  static void ragged_begin() { at::native::cpublas::brgemm_release(true); }
  static void ragged_end() { at::native::cpublas::brgemm_release(true); }
  static void ragged(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                     const c10::BFloat16* a, const c10::BFloat16* b, float* c) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, true);
  }
};
#undef GRPO_AMX_TILE_SWITCH

#pragma GCC pop_options

#else  // no AMX intrinsics in this compiler: the hardware engine reports itself unavailable, the emulated one runs
inline constexpr bool compiled = false;
inline bool available() { return false; }
#define GRPO_AMX_TARGET
#endif

// Software tiles: the eight tile registers as configure() sets them (16 rows of 64 bytes) and the tile
// instructions the kernel issues, in plain C++, per thread. The `amx-emulated` engine runs the very kernel below on
// them, so that its blocking, offsets and ragged split are tested on every machine (slowly: a test engine, never
// chosen). TDPBF16PS is emulated as the ISA reference states it: per pair, c += a0 * b0, then c += a1 * b1, in fp32
// (bf16 products are exact in fp32; the hardware also flushes denormals, which the emulation does not).
struct EmulatedTiles {
  struct alignas(64) State {
    uint8_t t[8][16][64];
  };
  static State& state() {
    thread_local State st;
    return st;
  }
  static void configure() {}
  static void release() {}
  template <int T>
  static void zero() {
    std::memset(state().t[T], 0, sizeof(state().t[T]));
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(state().t[T][r], static_cast<const char*>(p) + r * stride, 64);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(p) + r * stride, state().t[T][r], 64);
  }
  static float bf16(const uint8_t* row, int i) {
    uint16_t h;
    std::memcpy(&h, row + 2 * i, 2);
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  // C [16 x 16 fp32] += A [16 rows x 16 pairs] B [16 pair rows x 16 columns of pairs]
  template <int C, int A, int B>
  static void dp() {
    State& s = state();
    for (int m = 0; m < 16; ++m) {
      float c[16];
      std::memcpy(c, s.t[C][m], 64);
      for (int kp = 0; kp < 16; ++kp) {
        const float a0 = bf16(s.t[A][m], 2 * kp), a1 = bf16(s.t[A][m], 2 * kp + 1);
        for (int n = 0; n < 16; ++n) {
          c[n] += a0 * bf16(s.t[B][kp], 2 * n);
          c[n] += a1 * bf16(s.t[B][kp], 2 * n + 1);
        }
      }
      std::memcpy(s.t[C][m], c, 64);
    }
  }
  static void ragged_begin() {}
  static void ragged_end() {}
  // What brgemm computes on VNNI-packed B, as a plain loop: C [m, n] (+)= A [m, k] B [k, n], k even.
  static void ragged(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                     const c10::BFloat16* a, const c10::BFloat16* b, float* c) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        float acc = add ? c[i * ldc + j] : 0.f;
        for (int64_t p = 0; p < k / 2; ++p) {
          acc += float(a[i * lda + 2 * p]) * float(b[(p * ldb + j) * 2]);
          acc += float(a[i * lda + 2 * p + 1]) * float(b[(p * ldb + j) * 2 + 1]);
        }
        c[i * ldc + j] = acc;
      }
  }
};

// One 32 x 32 block of C over kc (a multiple of 32) of K. a: the block's first row at its K offset;
// b: the block's first pair row and column; c: the block's first element.
template <class Tiles>
GRPO_AMX_TARGET inline void block_2x2(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c,
                                      int64_t ldc, int64_t kc, bool load_c) {
  const int64_t sa = lda * 2, sb = ldb * 4, sc = ldc * 4;
  if (load_c) {
    Tiles::template load<0>(c, sc);
    Tiles::template load<1>(c + 16, sc);
    Tiles::template load<2>(c + 16 * ldc, sc);
    Tiles::template load<3>(c + 16 * ldc + 16, sc);
  } else {
    Tiles::template zero<0>();
    Tiles::template zero<1>();
    Tiles::template zero<2>();
    Tiles::template zero<3>();
  }
  for (int64_t k0 = 0; k0 < kc; k0 += 32) {
    const uint16_t* bk = b + (k0 / 2) * ldb * 2;
    Tiles::template load<4>(a + k0, sa);
    Tiles::template load<6>(bk, sb);
    Tiles::template load<7>(bk + 32, sb);
    Tiles::template dp<0, 4, 6>();
    Tiles::template dp<1, 4, 7>();
    Tiles::template load<5>(a + 16 * lda + k0, sa);
    Tiles::template dp<2, 5, 6>();
    Tiles::template dp<3, 5, 7>();
  }
  Tiles::template store<0>(c, sc);
  Tiles::template store<1>(c + 16, sc);
  Tiles::template store<2>(c + 16 * ldc, sc);
  Tiles::template store<3>(c + 16 * ldc + 16, sc);
}

// The 32-aligned part: C [m1, n1] (+)= A [m1, k1] B [k1, n1], m1, n1, k1 multiples of 32, k1 > 0.
template <class Tiles>
GRPO_AMX_TARGET inline void gemm_aligned(int64_t m1, int64_t n1, int64_t k1, int64_t lda, int64_t ldb, int64_t ldc,
                                         bool add, const uint16_t* a, const uint16_t* b, float* c) {
  Tiles::configure();
  // C in macro blocks of kMc x kNc (512 KiB fp32) that stay in L2 across the K slices
  for (int64_t mb = 0; mb < m1; mb += kMc)
    for (int64_t nb = 0; nb < n1; nb += kNc) {
      const int64_t me = std::min(m1, mb + kMc), ne = std::min(n1, nb + kNc);
      for (int64_t k0 = 0; k0 < k1; k0 += kKc) {
        const int64_t kc = std::min(kKc, k1 - k0);
        const bool load_c = add || k0 > 0;
        for (int64_t n0 = nb; n0 < ne; n0 += 32)
          for (int64_t m0 = mb; m0 < me; m0 += 32)
            block_2x2<Tiles>(a + m0 * lda + k0, lda, b + (k0 / 2) * ldb * 2 + n0 * 2, ldb, c + m0 * ldc + n0, ldc,
                             kc, load_c);
      }
    }
  Tiles::release();
}

// The whole GEMM: the aligned part on the tiles, the ragged rest (rows, columns, K past a multiple of 32) through
// Tiles::ragged on the same VNNI operands. k is even.
template <class Tiles>
inline void gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                 const c10::BFloat16* a, const c10::BFloat16* b, float* c) {
  const int64_t m1 = m / 32 * 32, n1 = n / 32 * 32, k1 = k / 32 * 32;
  const auto* a16 = reinterpret_cast<const uint16_t*>(a);
  const auto* b16 = reinterpret_cast<const uint16_t*>(b);
  const bool aligned = m1 > 0 && n1 > 0 && k1 > 0;
  if (aligned) gemm_aligned<Tiles>(m1, n1, k1, lda, ldb, ldc, add, a16, b16, c);
  if (aligned && m1 == m && n1 == n && k1 == k) return;
  Tiles::ragged_begin();
  if (!aligned) return Tiles::ragged(m, n, k, lda, ldb, ldc, add, a, b, c);
  if (k1 < k)  // the K tail of the aligned block
    Tiles::ragged(m1, n1, k - k1, lda, ldb, ldc, true, a + k1, b + (k1 / 2) * ldb * 2, c);
  if (n1 < n)  // the columns past n1, rows [0, m1)
    Tiles::ragged(m1, n - n1, k, lda, ldb, ldc, add, a, b + n1 * 2, c + n1);
  if (m1 < m)  // the rows past m1, every column
    Tiles::ragged(m - m1, n, k, lda, ldb, ldc, add, a + m1 * lda, b, c + m1 * ldc);
  Tiles::ragged_end();
}

// The `amx` engine: the kernel on the hardware tiles.
inline void gemm_hw(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                    const c10::BFloat16* a, const c10::BFloat16* b, float* c) {
#ifdef GRPO_AMX_KERNEL
  gemm<HwTiles>(m, n, k, lda, ldb, ldc, add, a, b, c);
#else
  TORCH_INTERNAL_ASSERT(false, "grpo_kernels._C: built without the AMX kernel");
#endif
}

// The `amx-emulated` engine: the same kernel on software tiles.
inline void gemm_emulated(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                          const c10::BFloat16* a, const c10::BFloat16* b, float* c) {
  TORCH_INTERNAL_ASSERT(k % 2 == 0, "amx-emulated GEMM: K must be even (VNNI pairs); got ", k);
  gemm<EmulatedTiles>(m, n, k, lda, ldb, ldc, add, a, b, c);
}

#undef GRPO_AMX_TARGET

}  // namespace grpo_kernels::amx
