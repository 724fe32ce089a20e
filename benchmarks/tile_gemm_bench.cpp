// Micro-benchmark of the 16-bit tile GEMMs at the kernels' shapes (benchmarks/tile_gemm_bench.py builds
// and runs it): ATen's brgemm on plain operands, the same on VNNI operands (oneDNN's JIT micro-kernel),
// MKL's cblas_gemm_bf16bf16f32, and our own AMX kernel (csrc/amx_gemm.h) on VNNI operands. B is packed
// once, as the kernels do (the AMX kernel with C macro blocks); A streams through 16 distinct blocks, as the vocab blocks of W do.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>

#include <chrono>

#include "amx_gemm.h"

using bf16 = c10::BFloat16;
using GemmHalfFn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int);
using SetLocalThreadsFn = int (*)(int);

static GemmHalfFn mkl_bf16() {
  void* lib = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
  return reinterpret_cast<GemmHalfFn>(dlsym(lib, "cblas_gemm_bf16bf16f32"));
}
static SetLocalThreadsFn mkl_threads() {
  void* lib = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
  return reinterpret_cast<SetLocalThreadsFn>(dlsym(lib, "MKL_Set_Num_Threads_Local"));
}

// VNNI pairs of a row-major [k, n] matrix: word (p, j) = (B[2p][j], B[2p+1][j]) at p * ldb + j.
static void to_vnni(const bf16* b, int64_t k, int64_t n, int64_t ldb_plain, int64_t ldb, bf16* out) {
  for (int64_t p = 0; p < k / 2; ++p)
    for (int64_t j = 0; j < n; ++j) {
      out[(p * ldb + j) * 2] = b[(2 * p) * ldb_plain + j];
      out[(p * ldb + j) * 2 + 1] = b[(2 * p + 1) * ldb_plain + j];
    }
}

static void run_one(const std::string& eng, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                    bool add, const bf16* a, const bf16* bp, const bf16* bv, float* c) {
  if (eng == "brgemm") {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, bp, c, false);
  } else if (eng == "brgemm-vnni") {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, bv, c, true);
  } else if (eng == "mkl") {
    static const GemmHalfFn fn = mkl_bf16();
    fn(101, 111, 111, int(m), int(n), int(k), 1.f, reinterpret_cast<const uint16_t*>(a), int(lda),
       reinterpret_cast<const uint16_t*>(bp), int(ldb), add ? 1.f : 0.f, c, int(ldc));
  } else if (eng == "amx") {
    grpo_kernels::amx::gemm(m, n, k, lda, ldb, ldc, add, a, bv, c);
  } else {
    TORCH_CHECK(false, "engine?");
  }
}

// GFLOP/s of C [m, n] (+)= A [m, k] B [k, n] on every thread at once (each thread its own C), best of 3.
double gflops(const std::string& eng, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, bool add,
              int64_t reps) {
  constexpr int64_t kBlocks = 16;
  const at::Tensor A = at::randn({kBlocks * m, lda}).to(at::kBFloat16);
  const at::Tensor B = at::randn({k, ldb}).to(at::kBFloat16);
  at::Tensor BV = at::zeros({(k + 1) / 2 * ldb * 2}, at::kBFloat16);
  to_vnni(B.data_ptr<bf16>(), k, n, ldb, ldb, BV.data_ptr<bf16>());
  const int64_t ldc = n + 16, nt = at::get_num_threads();
  if (eng == "amx") TORCH_CHECK(grpo_kernels::amx::available(), "no AMX");
  static const SetLocalThreadsFn set_threads = mkl_threads();
  double best = 1e30;
  for (int trial = 0; trial < 3; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, nt, 1, [&](int64_t a0, int64_t a1) {
      std::vector<float> c(static_cast<size_t>(m * ldc), 0.f);
      const int prev = set_threads ? set_threads(1) : 0;
      for (int64_t tid = a0; tid < a1; ++tid)
        for (int64_t r = 0; r < reps; ++r)
          run_one(eng, m, n, k, lda, ldb, ldc, add, A.data_ptr<bf16>() + ((tid * 7 + r) % kBlocks) * m * lda,
                  B.data_ptr<bf16>(), BV.data_ptr<bf16>(), c.data());
      if (set_threads) set_threads(prev);
      at::native::cpublas::brgemm_release(true);
    });
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * m * n * k * reps * nt / best * 1e-9;
}

// Max |C_engine - C_fp32| / max |C_fp32| on one call, for a correctness check of the engine.
double rel_err(const std::string& eng, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, bool add) {
  const at::Tensor A = at::randn({m, lda}).to(at::kBFloat16);
  const at::Tensor B = at::randn({k, ldb}).to(at::kBFloat16);
  at::Tensor BV = at::zeros({(k + 1) / 2 * ldb * 2 + 64}, at::kBFloat16);
  to_vnni(B.data_ptr<bf16>(), k, n, ldb, ldb, BV.data_ptr<bf16>());
  const int64_t ldc = n + 16;
  at::Tensor C = at::randn({m, ldc});
  const at::Tensor ref = (add ? C.narrow(1, 0, n) : at::zeros({m, n})) +
                         at::mm(A.narrow(1, 0, k).to(at::kFloat), B.narrow(1, 0, n).to(at::kFloat));
  run_one(eng, m, n, k, lda, ldb, ldc, add, A.data_ptr<bf16>(), B.data_ptr<bf16>(), BV.data_ptr<bf16>(),
          C.data_ptr<float>());
  at::native::cpublas::brgemm_release(true);
  return ((C.narrow(1, 0, n) - ref).abs().max() / ref.abs().max()).item<double>();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("gflops", &gflops);
  mod.def("rel_err", &rel_err);
}
