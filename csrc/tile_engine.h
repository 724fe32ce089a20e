// Tile-GEMM engines: the one interface every schedule's GEMMs go through.
//
// tile_gemm computes C [m, n] (+)= A [m, k] B [k, n] with fp32 C, from row-major operands (B in VNNI
// pairs when asked for, brgemm only). Which engine runs is chosen per dtype by the Python side
// (grpo_kernels/backends/cpu_engines.py: capability, a short measured probe, or the user's choice) and
// travels in LogprobsOptions; the kernels never pick one themselves.
//
// - brgemm: ATen's cpublas::brgemm on plain row-major operands. For 16-bit inputs ATen then runs its
//           full bf16/fp16 x -> fp32 GEMM (with its own packing and cache blocking), not the micro-kernel.
// - brgemm-vnni: the same entry with VNNI-packed B operands (on AMX: oneDNN's JIT brgemm micro-kernel).
//           Measured on an Intel Xeon with AMX, 1 thread, bf16: 250-550 GFLOP/s at the kernels' shapes
//           against 600-1,000 for plain `brgemm`, so it is opt-in (GRPO_KERNELS_CPU_ENGINE=brgemm-vnni).
//           benchmarks/tile_gemm_bench.py (2026-12-02, same machine kind) has it as fast as `amx` on the
//           forward's tile (1,135 vs 1,076 GFLOP/s per thread on 2 threads; plain brgemm 728) and slow
//           on the per-chunk VNNI gradient shapes, which `amx` does not use.
// - mkl:    MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (16-bit x 16-bit -> fp32) and sgemm,
//           resolved at run time from the libtorch_cpu the torch wheel ships (no new dependency).
// - atmm:   at::mm on strided views (fp32 only; torch.mm's own sgemm).
// - mkl-upcast: 16-bit tiles only: both operands widened to fp32 in per-thread scratch, then MKL's sgemm. The
//           products of 16-bit values are exact in fp32 and the sums fp32, as in the 16-bit engines, so the
//           class of accuracy is theirs. For CPUs whose 16-bit GEMMs widen to fp32 inside anyway: on AMD
//           EPYC Zen 3 (AVX2, 2 threads) fp16 tiles ran at 100-126 GFLOP/s on it against 79-82 on MKL's and
//           ATen's fp16 GEMMs, while bf16 tiles tied (backends/cpu_engines.py says when it is chosen).
// - amx:    our own cache-blocked AMX kernel (csrc/amx_gemm.h), bf16 only, on the brgemm-vnni operand layout
//           (VNNI-packed B, packed once per super-chunk or block by the schedules); ragged edges and plain-B
//           calls (odd D) go to ATen's brgemm.
// - amx-emulated: the amx engine's kernel on software tiles (amx_gemm.h's EmulatedTiles), bf16 only, on every
//           machine, with the amx engine's operand layouts and schedule branches: a test engine, so that those run
//           where AMX does not. Slow (scalar); never chosen, only forced.
// - avx512-bf16: our own cache-blocked AVX-512-BF16 kernel (csrc/avx512_bf16_gemm.h), bf16 only, for CPUs with
//           vdpbf16ps and no AMX (AMD Zen 4 / Zen 5): the amx engine's operand layout (VNNI-packed B), in every
//           GEMM of both schedules; plain-B calls (odd D) go to ATen's brgemm.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace grpo_kernels {

enum class Engine : int64_t {
  kBrgemm = 0,
  kMkl = 1,
  kAtMm = 2,
  kBrgemmVnni = 3,
  kAmx = 4,
  kMklUpcast = 5,
  kAvx512Bf16 = 6,
  kAmxEmulated = 7
};

Engine parse_engine(const std::string& name);
const char* engine_name(Engine e);
// Empty when the engine runs tiles of this dtype here, else why it cannot.
std::string engine_unavailable(Engine e, at::ScalarType dtype);
void check_engine(Engine e, at::ScalarType dtype);
// Whether this machine has AMX tiles for 16-bit GEMMs (what makes VNNI packing pay).
bool has_amx(at::ScalarType dtype);

// VNNI-packed operands for this engine, dtype and hidden size, with an even D: brgemm-vnni or amx on AMX, or
// avx512-bf16 (which reads nothing else).
template <typename T>
bool use_vnni(Engine e, int64_t d);
// The same for a runtime dtype (fp32: never).
bool use_vnni(Engine e, at::ScalarType dtype, int64_t d);

// Whether the two-pass backward's dW and dH GEMMs take VNNI operands too (dW per group of vocab blocks over the whole
// super-chunk, B = H in token pairs; dH per group and token chunk, B = dZ in vocab-row pairs), given that its
// logits GEMM takes VNNI operands: brgemm-vnni, avx512-bf16 (whose plain-operand calls would run ATen's brgemm,
// ~215 GFLOP/s on AMD Zen 5 against the kernel's ~1,000) and amx. On amx the whole-group plain-operand GEMMs had
// measured faster (2026-12-02) while the kernel's scratch started 16 bytes into a cache line; with line-aligned
// scratch (common.h, Scratch) our kernel is the fastest engine at every gradient shape (Intel Xeon with AMX,
// 2 threads, tile_gemm_gflops: 2,040-2,640 GFLOP/s against 1,750-2,180 for brgemm-vnni, brgemm and mkl), and
// the backward at N = 4096 took 1.99-2.09 s with dW over the super-chunk against 2.17-2.26 s with per-chunk
// dW^T GEMMs (K = 256, whose fp32 C was re-read and re-written per chunk).
bool vnni_gradients(Engine e);

// Whether the one-pass chunk's dW and dH GEMMs take VNNI operands (H_chunk in token pairs, W_group in
// vocab-row pairs, packed by the schedule): the amx and avx512-bf16 engines with an even D. Plain-operand calls would go to
// ATen's brgemm, which packs its B operand per call.
template <typename T>
bool vnni_chunk_gradients(Engine e, int64_t d);

template <typename T>
void tile_gemm(Engine e, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add, const T* a,
               const T* b, float* c, bool b_vnni);

// "<engine>/amx-vnni" (packed operands on AMX), "<engine>/vnni" (packed operands for avx512-bf16) or
// "<engine>/plain".
std::string gemm_path(at::ScalarType dtype, int64_t d, Engine engine);

// Whether the engine's 16-bit GEMMs make fp32 copies of their operands per call, scratch that grows with the
// operands: mkl-upcast by construction, and MKL's and ATen's 16-bit GEMMs off AMX as measured (AMD EPYC Zen 3,
// 2 threads: the two-pass backward's whole-group GEMMs took ~12.5 KB per token of a super-chunk beyond the
// backward's own buffers, 68 MiB at 5,632 tokens). The two-pass backward counts it against its budget.
// avx512-bf16 counts as not widening: at an even D its GEMMs read the packed operands in place (an odd D, whose
// plain calls go to ATen's brgemm, is left uncounted).
bool widens_operands(Engine e, at::ScalarType dtype);

// Ends a thread's run of tile GEMMs (releases brgemm's AMX tile configuration, mkl-upcast's scratch).
void release(Engine e);

// GFLOP/s of the forward's tile shape [256 x 256 x d] on every thread at once (reps tiles each, best
// of 3): the measured probe that picks an engine where capability alone does not.
double tile_gflops(Engine e, at::ScalarType dtype, int64_t d, int64_t reps);

// GFLOP/s of C [m, n] (+)= A [m, k] B [k, n] through tile_gemm on every thread at once (each thread its own
// C, A streaming through 16 blocks, B in the layout the kernels hand the engine), best of 3: the probe
// above at any of the kernels' tile shapes (benchmarks/tile_gemm_bench.py).
double tile_gemm_gflops(Engine e, at::ScalarType dtype, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                        bool add, int64_t reps);

// c [m, n] (+)= a [m, k] b [k, n] through tile_gemm on one thread, from row-major (strided) tensors, with b packed
// into VNNI pairs first when `vnni` (k even; the engine must take VNNI operands): the engines' own GEMM, for tests
// against a float64 matmul at ragged shapes.
void tile_gemm_check(Engine e, const at::Tensor& a, const at::Tensor& b, at::Tensor& c, bool add, bool vnni);

// The one pass's dW step on one thread: the fp32 product a [m, k] b [k, n] from the engine's tile_gemm (b as in
// tile_gemm_check), added into out (+ its int8 residual lo; `first` writes) by flush_dw. Returns the product, so
// that a test can apply the accumulator's rule to it and require the very bits flush_dw stored.
at::Tensor tile_gemm_flush_check(Engine e, const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                                 const c10::optional<at::Tensor>& lo, bool first, bool vnni);

}  // namespace grpo_kernels
