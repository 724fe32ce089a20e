// Operand packing for the tile GEMMs: transposes and VNNI interleaves (brgemm on AMX).
#pragma once

#include "common.h"

namespace grpo_kernels::detail {

// dst [cols, rows] (leading dim ld_dst) = src [rows, cols]^T (leading dim ld_src), 16 x 16 blocks at a time
// (ATen's AVX-512 transposes for 16-bit types and fp32; element by element at the edges).
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kB = 16;
  const int64_t r16 = rows / kB * kB, c16 = cols / kB * kB;
  for (int64_t r0 = 0; r0 < r16; r0 += kB)
    for (int64_t c0 = 0; c0 < c16; c0 += kB)
      at::vec::transpose_mxn<T, kB, kB>(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = (r < r16 ? c16 : 0); c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
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

  // A operand of the dH GEMM, W_block^T [D, kv] (rows ld_out apart) from rows w[0..vb) of length d;
  // columns [vb, kv) are zero (the VNNI K padding).
  static void w_transposed(const T* w, int64_t vb, int64_t d, int64_t kv, int64_t ld_out, T* out) {
    transpose_into(w, vb, d, d, out, ld_out);
    for (int64_t k = 0; k < d; ++k)
      for (int64_t r = vb; r < kv; ++r) out[k * ld_out + r] = T(0.f);
  }
};

}  // namespace grpo_kernels::detail
