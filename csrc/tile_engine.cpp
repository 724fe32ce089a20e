// Tile-GEMM engines (see tile_engine.h).
#include "kernel_isa.h"  // before ATen: at::vec's conversions for this ISA (mkl-upcast)

#include "tile_engine.h"

#include "amx_gemm.h"
#include "avx512_bf16_gemm.h"
#include "dw_accumulator.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <type_traits>

namespace grpo_kernels {
namespace {

// MKL's entry points, as libtorch_cpu exports them (LP64: 32-bit integers). The CBLAS enums are plain ints.
constexpr int kRowMajor = 101, kNoTrans = 111;
using GemmHalfFn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int);
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using SetLocalThreadsFn = int (*)(int);

struct Mkl {
  GemmHalfFn bf16 = nullptr, f16 = nullptr;
  SgemmFn sgemm = nullptr;
  SetLocalThreadsFn set_local_threads = nullptr;

  Mkl() {
    // torch loads libtorch_cpu without RTLD_GLOBAL, so look in it by name first.
    void* lib = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
    auto find = [&](const char* name) -> void* {
      void* p = lib ? dlsym(lib, name) : nullptr;
      return p ? p : dlsym(RTLD_DEFAULT, name);
    };
    bf16 = reinterpret_cast<GemmHalfFn>(find("cblas_gemm_bf16bf16f32"));
    f16 = reinterpret_cast<GemmHalfFn>(find("cblas_gemm_f16f16f32"));
    sgemm = reinterpret_cast<SgemmFn>(find("sgemm_"));
    set_local_threads = reinterpret_cast<SetLocalThreadsFn>(find("MKL_Set_Num_Threads_Local"));
  }
};

const Mkl& mkl() {
  static const Mkl m;
  return m;
}

// Each kernel thread runs its own tiles: MKL must not start threads of its own inside them.
struct MklOneThread {
  int prev = 0;
  MklOneThread() {
    if (mkl().set_local_threads) prev = mkl().set_local_threads(1);
  }
  ~MklOneThread() {
    if (mkl().set_local_threads) mkl().set_local_threads(prev);
  }
};

void mkl_gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add, const float* a,
              const float* b, float* c) {
  // row-major C = A B is column-major C^T = B^T A^T
  const int M = int(m), N = int(n), K = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  const float one = 1.f, beta = add ? 1.f : 0.f;
  MklOneThread guard;
  mkl().sgemm("N", "N", &N, &M, &K, &one, b, &lb, a, &la, &beta, c, &lc);
}

template <typename T>
void mkl_gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add, const T* a, const T* b,
              float* c) {
  const GemmHalfFn fn = std::is_same_v<T, at::BFloat16> ? mkl().bf16 : mkl().f16;
  MklOneThread guard;
  fn(kRowMajor, kNoTrans, kNoTrans, int(m), int(n), int(k), 1.f, reinterpret_cast<const uint16_t*>(a), int(lda),
     reinterpret_cast<const uint16_t*>(b), int(ldb), add ? 1.f : 0.f, c, int(ldc));
}

// mkl-upcast's fp32 copies of the operands, per thread: they grow to the largest tile of a run of tile GEMMs
// and are freed when the run ends (release), so that no memory outlives a kernel call.
struct UpcastScratch {
  detail::Scratch<float> a, b;
};
UpcastScratch& upcast_scratch() {
  thread_local UpcastScratch s;
  return s;
}

// 16-bit tiles widened to fp32 (exactly), then sgemm.
template <typename T>
void upcast_gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add, const T* a,
                 const T* b, float* c) {
  detail::Scratch<float>& wa = upcast_scratch().a;
  detail::Scratch<float>& wb = upcast_scratch().b;
  if (wa.size() < static_cast<size_t>(m * k)) wa.resize(static_cast<size_t>(m * k));
  if (wb.size() < static_cast<size_t>(k * n)) wb.resize(static_cast<size_t>(k * n));
  for (int64_t r = 0; r < m; ++r) at::vec::convert(a + r * lda, wa.data() + r * k, k);
  for (int64_t r = 0; r < k; ++r) at::vec::convert(b + r * ldb, wb.data() + r * n, n);
  mkl_gemm(m, n, k, k, n, ldc, add, wa.data(), wb.data(), c);
}

}  // namespace

Engine parse_engine(const std::string& name) {
  if (name == "brgemm") return Engine::kBrgemm;
  if (name == "mkl") return Engine::kMkl;
  if (name == "atmm") return Engine::kAtMm;
  if (name == "brgemm-vnni") return Engine::kBrgemmVnni;
  if (name == "amx") return Engine::kAmx;
  if (name == "mkl-upcast") return Engine::kMklUpcast;
  if (name == "avx512-bf16") return Engine::kAvx512Bf16;
  if (name == "amx-emulated") return Engine::kAmxEmulated;
  TORCH_CHECK(false,
              "grpo_kernels._C: engine must be 'brgemm', 'brgemm-vnni', 'mkl', 'mkl-upcast', 'atmm', 'amx', "
              "'avx512-bf16' or 'amx-emulated'; got '",
              name, "'");
}

const char* engine_name(Engine e) {
  switch (e) {
    case Engine::kBrgemm: return "brgemm";
    case Engine::kMkl: return "mkl";
    case Engine::kAtMm: return "atmm";
    case Engine::kBrgemmVnni: return "brgemm-vnni";
    case Engine::kAmx: return "amx";
    case Engine::kMklUpcast: return "mkl-upcast";
    case Engine::kAvx512Bf16: return "avx512-bf16";
    case Engine::kAmxEmulated: return "amx-emulated";
  }
  return "?";
}

bool has_amx(at::ScalarType dtype) {
  return dtype != at::kFloat && at::native::cpublas::could_pack(dtype);
}

std::string engine_unavailable(Engine e, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "grpo_kernels._C: unsupported dtype ", dtype);
  switch (e) {
    case Engine::kBrgemm: return "";
    case Engine::kBrgemmVnni:
      if (dtype == at::kFloat) return "fp32 tiles take no VNNI packing";
      return has_amx(dtype) ? "" : "VNNI-packed brgemm needs AMX tiles for this dtype, which this CPU lacks";
    case Engine::kMkl:
      if (dtype == at::kFloat) return mkl().sgemm ? "" : "MKL's sgemm_ is not exported by this torch";
      if ((dtype == at::kBFloat16 ? mkl().bf16 : mkl().f16) == nullptr)
        return dtype == at::kBFloat16 ? "MKL's cblas_gemm_bf16bf16f32 is not exported by this torch"
                                      : "MKL's cblas_gemm_f16f16f32 is not exported by this torch";
      return "";
    case Engine::kAtMm: return dtype == at::kFloat ? "" : "at::mm has no 16-bit x 16-bit -> fp32 GEMM on CPU";
    case Engine::kMklUpcast:
      if (dtype == at::kFloat) return "fp32 tiles need no widening (engine 'mkl' runs them)";
      return mkl().sgemm ? "" : "MKL's sgemm_ is not exported by this torch";
    case Engine::kAmx:
      if (dtype != at::kBFloat16) return "the AMX kernel runs bf16 tiles only";
      if (!amx::compiled) return "this build of grpo_kernels._C has no AMX kernel (compiler without amx-tile/amx-bf16)";
      if (!amx::available()) return "this CPU has no AMX bf16 tiles, or Linux did not grant them to this process";
      return has_amx(dtype) ? "" : "ATen's brgemm reports no AMX for bf16 (it runs the kernel's ragged edges)";
    case Engine::kAvx512Bf16:
      if (dtype != at::kBFloat16) return "the AVX-512-BF16 kernel runs bf16 tiles only";
      if (!avx512bf16::compiled)
        return "this build of grpo_kernels._C has no AVX-512-BF16 kernel (compiler without avx512bf16)";
      return avx512bf16::available() ? "" : "this CPU has no AVX-512-BF16 (vdpbf16ps), or the OS does not enable AVX-512";
    case Engine::kAmxEmulated: return dtype == at::kBFloat16 ? "" : "the emulated AMX kernel runs bf16 tiles only";
  }
  return "unknown engine";
}

void check_engine(Engine e, at::ScalarType dtype) {
  const std::string why = engine_unavailable(e, dtype);
  TORCH_CHECK(why.empty(), "grpo_kernels._C: engine '", engine_name(e), "' cannot run ", dtype, " tiles here: ", why);
}

// The amx engine's kernel, on the hardware tiles or on the emulated ones: the same schedule branches.
static bool amx_kernel(Engine e) { return e == Engine::kAmx || e == Engine::kAmxEmulated; }

// The engines whose tile GEMM can take a VNNI-packed B (tile_gemm's b_vnni).
static bool reads_vnni(Engine e) {
  return e == Engine::kBrgemmVnni || amx_kernel(e) || e == Engine::kAvx512Bf16;
}

template <typename T>
bool use_vnni(Engine e, int64_t d) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    // VNNI pairs run along D in the logits GEMM, so D must be even. For ATen's brgemm AMX is what makes
    // packing pay; our AVX-512-BF16 kernel reads only packed B.
    if (d % 2 != 0 || !reads_vnni(e)) return false;
    if (e == Engine::kAvx512Bf16 || e == Engine::kAmxEmulated) return std::is_same_v<T, at::BFloat16>;
    return has_amx(c10::CppTypeToScalarType<T>::value);
  }
}

bool use_vnni(Engine e, at::ScalarType dtype, int64_t d) {
  return dtype == at::kBFloat16 ? use_vnni<at::BFloat16>(e, d) : dtype == at::kHalf ? use_vnni<at::Half>(e, d) : false;
}

bool vnni_gradients(Engine e) { return e == Engine::kBrgemmVnni || e == Engine::kAvx512Bf16 || amx_kernel(e); }

template <typename T>
bool vnni_chunk_gradients(Engine e, int64_t d) {
  return (amx_kernel(e) || e == Engine::kAvx512Bf16) && use_vnni<T>(e, d);
}

template <typename T>
void tile_gemm(Engine e, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add, const T* a,
               const T* b, float* c, bool b_vnni) {
  TORCH_INTERNAL_ASSERT(!b_vnni || reads_vnni(e));
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (e == Engine::kAmx && b_vnni) return amx::gemm_hw(m, n, k, lda, ldb, ldc, add, a, b, c);
    if (e == Engine::kAmxEmulated && b_vnni) return amx::gemm_emulated(m, n, k, lda, ldb, ldc, add, a, b, c);
    if (e == Engine::kAvx512Bf16 && b_vnni)
      return avx512bf16::gemm(m, n, k, lda, ldb, ldc, add, reinterpret_cast<const uint16_t*>(a),
                              reinterpret_cast<const uint32_t*>(b), c);
  }
  if (e == Engine::kAvx512Bf16 || e == Engine::kAmxEmulated) e = Engine::kBrgemm;  // plain B: ATen's brgemm
  if (e == Engine::kAmx) {
    // plain B (the one-pass chunk's GEMMs, odd D): ATen's brgemm, which must reload its tile configuration
    at::native::cpublas::brgemm_release(true);
    e = Engine::kBrgemm;
  }
  if (e == Engine::kBrgemmVnni) e = Engine::kBrgemm;  // the same entry; only the B layout differs
  if constexpr (std::is_same_v<T, float>) {
    if (e == Engine::kMkl) return mkl_gemm(m, n, k, lda, ldb, ldc, add, a, b, c);
    if (e == Engine::kBrgemm) return at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, false);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor ct = at::from_blob(c, {m, n}, {ldc, 1}, f32);
    at::Tensor at_ = at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, f32);
    at::Tensor bt = at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, f32);
    if (add)
      ct.addmm_(at_, bt);
    else
      at::mm_out(ct, at_, bt);
  } else {
    if (e == Engine::kMkl) return mkl_gemm<T>(m, n, k, lda, ldb, ldc, add, a, b, c);
    if (e == Engine::kMklUpcast) return upcast_gemm<T>(m, n, k, lda, ldb, ldc, add, a, b, c);
    TORCH_INTERNAL_ASSERT(e == Engine::kBrgemm);
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, b_vnni);
  }
}

void release(Engine e) {
  if (e == Engine::kBrgemm || e == Engine::kBrgemmVnni || amx_kernel(e) || e == Engine::kAvx512Bf16)
    at::native::cpublas::brgemm_release(true);
  if (e == Engine::kMklUpcast) upcast_scratch() = UpcastScratch{};
}

bool widens_operands(Engine e, at::ScalarType dtype) {
  if (dtype == at::kFloat) return false;
  return e == Engine::kMklUpcast || ((e == Engine::kBrgemm || e == Engine::kMkl) && !has_amx(dtype));
}

template <typename T>
static double tile_gflops_impl(Engine e, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, bool add,
                               int64_t reps) {
  constexpr int64_t kBlocks = 16;  // distinct A blocks, as the kernels stream the vocab blocks of W
  const at::ScalarType dt = c10::CppTypeToScalarType<T>::value;
  const at::Tensor a = at::randn({kBlocks * m, lda}).to(dt);
  // B in the layout the kernels hand this engine: plain [k, ldb], or VNNI pairs (k rounded up to even)
  const bool vnni = use_vnni<T>(e, k);
  const at::Tensor b = at::randn({vnni ? (k + 1) / 2 * 2 : k, ldb}).to(dt);
  const int64_t ldc = n, nthreads = at::get_num_threads();
  double best = 1e30;
  for (int trial = 0; trial < 3; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, nthreads, 1, [&](int64_t a0, int64_t a1) {
      detail::Scratch<float> c(static_cast<size_t>(m * ldc), 0.f);
      for (int64_t tid = a0; tid < a1; ++tid)
        for (int64_t r = 0; r < reps; ++r)
          tile_gemm<T>(e, m, n, k, lda, ldb, ldc, add, a.data_ptr<T>() + ((tid + r) % kBlocks) * m * lda,
                       b.data_ptr<T>(), c.data(), vnni);
      release(e);
    });
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * m * n * k * reps * nthreads / best * 1e-9;
}

std::string gemm_path(at::ScalarType dtype, int64_t d, Engine engine) {
  check_engine(engine, dtype);
  const bool vnni = use_vnni(engine, dtype, d);
  return std::string(engine_name(engine)) + (!vnni ? "/plain" : engine == Engine::kAvx512Bf16 ? "/vnni" : "/amx-vnni");
}

double tile_gemm_gflops(Engine e, at::ScalarType dtype, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                        bool add, int64_t reps) {
  check_engine(e, dtype);
  TORCH_CHECK(m > 0 && n > 0 && k > 0 && lda >= k && ldb >= n && reps > 0,
              "tile_gemm_gflops: m, n, k, reps > 0, lda >= k and ldb >= n; got m=", m, " n=", n, " k=", k, " lda=", lda,
              " ldb=", ldb, " reps=", reps);
  switch (dtype) {
    case at::kFloat: return tile_gflops_impl<float>(e, m, n, k, lda, ldb, add, reps);
    case at::kBFloat16: return tile_gflops_impl<at::BFloat16>(e, m, n, k, lda, ldb, add, reps);
    default: return tile_gflops_impl<at::Half>(e, m, n, k, lda, ldb, add, reps);
  }
}

double tile_gflops(Engine e, at::ScalarType dtype, int64_t d, int64_t reps) {
  // the forward's logits tile: W block [256, d] times H^T [d, 256]
  return tile_gemm_gflops(e, dtype, 256, 256, d, d, 256, false, reps);
}

namespace {
// The checks' common part: the operands validated, and B as the kernels hand it over (row-major with a padded
// leading dimension, or VNNI pair rows) with that leading dimension.
std::pair<at::Tensor, int64_t> check_operands(const char* what, Engine e, const at::Tensor& a, const at::Tensor& b,
                                              bool vnni) {
  const at::ScalarType dt = a.scalar_type();
  check_engine(e, dt);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), what, ": a [m, k], b [k, n]");
  TORCH_CHECK(b.scalar_type() == dt, what, ": a, b of one dtype");
  TORCH_CHECK(a.stride(1) == 1, what, ": a must have unit column stride");
  const int64_t k = a.size(1), n = b.size(1);
  TORCH_CHECK(!vnni || (dt != at::kFloat && k % 2 == 0), what, ": VNNI operands take 16-bit inputs and an even k");
  TORCH_CHECK(!vnni || reads_vnni(e), what, ": engine '", engine_name(e), "' takes no VNNI operands");
  const int64_t ldb = n + 3;
  at::Tensor bp;
  if (vnni) {
    const at::Tensor pairs = b.reshape({k / 2, 2, n}).transpose(1, 2).contiguous();  // [k/2, n, 2]
    bp = at::zeros({k / 2, ldb, 2}, b.options());
    bp.narrow(1, 0, n).copy_(pairs);
  } else {
    bp = at::zeros({k, ldb}, b.options());
    bp.narrow(1, 0, n).copy_(b);
  }
  return {bp, ldb};
}
}  // namespace

void tile_gemm_check(Engine e, const at::Tensor& a, const at::Tensor& b, at::Tensor& c, bool add, bool vnni) {
  // not a structured binding: C++17 lambdas cannot capture one
  const std::pair<at::Tensor, int64_t> operands = check_operands("tile_gemm_check", e, a, b, vnni);
  const at::Tensor& bp = operands.first;
  const int64_t ldb = operands.second;
  TORCH_CHECK(c.dim() == 2 && c.size(0) == a.size(0) && c.size(1) == b.size(1) && c.scalar_type() == at::kFloat &&
                  c.stride(1) == 1,
              "tile_gemm_check: c [m, n] fp32 with unit column stride");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  GRPO_DISPATCH(a.scalar_type(), [&] {
    tile_gemm<scalar_t>(e, m, n, k, a.stride(0), ldb, c.stride(0), add, a.data_ptr<scalar_t>(), bp.data_ptr<scalar_t>(),
                        c.data_ptr<float>(), vnni);
    release(e);
  });
}

at::Tensor tile_gemm_flush_check(Engine e, const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                                 const c10::optional<at::Tensor>& lo, bool first, bool vnni) {
  // not a structured binding: C++17 lambdas cannot capture one
  const std::pair<at::Tensor, int64_t> operands = check_operands("tile_gemm_flush_check", e, a, b, vnni);
  const at::Tensor& bp = operands.first;
  const int64_t ldb = operands.second;
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n && out.is_contiguous() &&
                  out.scalar_type() == a.scalar_type(),
              "tile_gemm_flush_check: out [m, n], contiguous, of a's dtype");
  TORCH_CHECK(!lo || (lo->scalar_type() == at::kChar && lo->sizes() == out.sizes() && lo->is_contiguous()),
              "tile_gemm_flush_check: lo int8 like out, contiguous");
  TORCH_CHECK(!lo || a.scalar_type() != at::kFloat, "tile_gemm_flush_check: an fp32 out keeps no residual");
  TORCH_CHECK(first || lo || a.scalar_type() == at::kFloat,
              "tile_gemm_flush_check: adding into a 16-bit out needs its residual lo");
  at::Tensor c = at::empty({m, n}, a.options().dtype(at::kFloat));
  GRPO_DISPATCH(a.scalar_type(), [&] {
    // the fp32 product as the engine's own GEMM forms it, for the caller to add by the accumulator's rule
    tile_gemm<scalar_t>(e, m, n, k, a.stride(0), ldb, n, false, a.data_ptr<scalar_t>(), bp.data_ptr<scalar_t>(),
                        c.data_ptr<float>(), vnni);
    detail::flush_dw<scalar_t>(c.data_ptr<float>(), m * n, out.data_ptr<scalar_t>(),
                               lo ? lo->data_ptr<int8_t>() : nullptr, first);
    release(e);
  });
  return c;
}

#define GRPO_INSTANTIATE(T)                                                                                       \
  template bool use_vnni<T>(Engine, int64_t);                                                                     \
  template bool vnni_chunk_gradients<T>(Engine, int64_t);                                                         \
  template void tile_gemm<T>(Engine, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const T*, const T*, \
                             float*, bool);
GRPO_INSTANTIATE(float)
GRPO_INSTANTIATE(at::BFloat16)
GRPO_INSTANTIATE(at::Half)
#undef GRPO_INSTANTIATE

}  // namespace grpo_kernels
