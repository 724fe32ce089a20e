// pybind11 bindings of grpo_kernels._C. Outputs are allocated by the Python launcher
// (grpo_kernels/backends/cpu.py) and written in place here.
#include <torch/extension.h>

#include "logprobs_cpu.h"

namespace grpo_kernels {
// one_pass.cpp (declared here, not in logprobs_cpu.h, to keep the change within the one-pass files):
// a one-pass gradient scaled by grad_output once that is known, in place: out = g * (out + lo) rounded
// once (fp32: out *= g; no residual lo: out = g * out; g == 1: unchanged).
void scale_rounded_once(at::Tensor& out, const c10::optional<at::Tensor>& lo, const at::Tensor& scale);
}  // namespace grpo_kernels

namespace {

grpo_kernels::LogprobsOptions options(double temperature, c10::optional<double> softcap, int64_t super_chunk,
                                      const std::string& engine) {
  grpo_kernels::LogprobsOptions o;
  o.engine = grpo_kernels::parse_engine(engine);
  o.temperature = temperature;
  o.softcap = softcap.value_or(0.0);
  o.super_chunk = super_chunk;
  return o;
}

void forward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
             double temperature, c10::optional<double> softcap, int64_t super_chunk, const std::string& engine,
             at::Tensor logp, at::Tensor lse, c10::optional<at::Tensor> entropy) {
  py::gil_scoped_release no_gil;
  grpo_kernels::forward(h, w, b, t, options(temperature, softcap, super_chunk, engine), logp, lse, entropy);
}

void backward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
              const at::Tensor& lse, const c10::optional<at::Tensor>& entropy, const at::Tensor& g_logp,
              const c10::optional<at::Tensor>& g_ent, double temperature, c10::optional<double> softcap,
              int64_t super_chunk, const std::string& engine, c10::optional<at::Tensor> dh,
              c10::optional<at::Tensor> dw, c10::optional<at::Tensor> db) {
  py::gil_scoped_release no_gil;
  grpo_kernels::backward(h, w, b, t, lse, entropy, g_logp, g_ent, options(temperature, softcap, super_chunk, engine),
                         dh, dw, db);
}

void chunk_forward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                   double temperature, c10::optional<double> softcap, const std::string& engine, at::Tensor kept,
                   at::Tensor logp, at::Tensor lse, c10::optional<at::Tensor> entropy) {
  py::gil_scoped_release no_gil;
  grpo_kernels::chunk_forward(h, w, b, t, options(temperature, softcap, 0, engine), kept, logp, lse, entropy);
}

void chunk_backward(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& t,
                    at::Tensor kept, const at::Tensor& lse, const c10::optional<at::Tensor>& entropy,
                    const at::Tensor& g_logp, const c10::optional<at::Tensor>& g_ent, double temperature,
                    c10::optional<double> softcap, const std::string& engine, c10::optional<at::Tensor> dh,
                    c10::optional<at::Tensor> dh_lo, c10::optional<at::Tensor> dw, c10::optional<at::Tensor> dw_lo,
                    c10::optional<at::Tensor> db_acc, bool accumulate) {
  py::gil_scoped_release no_gil;
  grpo_kernels::chunk_backward(h, w, b, t, kept, lse, entropy, g_logp, g_ent, options(temperature, softcap, 0, engine),
                               dh, dh_lo, dw, dw_lo, db_acc, accumulate);
}

void scale_rounded_once(at::Tensor out, const c10::optional<at::Tensor>& lo, const at::Tensor& scale) {
  py::gil_scoped_release no_gil;
  grpo_kernels::scale_rounded_once(out, lo, scale);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "grpo_kernels C++ CPU kernels: streamed per-token log-probs, entropy and their gradients";
  m.def("forward", &forward, "logp, lse (and entropy) of targets without materializing logits",
        py::arg("h"), py::arg("w"), py::arg("b"), py::arg("t"), py::arg("temperature"), py::arg("softcap"),
        py::arg("super_chunk"), py::arg("engine"), py::arg("logp"), py::arg("lse"), py::arg("entropy"));
  m.def("backward", &backward, "dh, dw, db of sum(g_logp * logp + g_ent * entropy)", py::arg("h"), py::arg("w"),
        py::arg("b"), py::arg("t"), py::arg("lse"), py::arg("entropy"), py::arg("g_logp"), py::arg("g_ent"),
        py::arg("temperature"), py::arg("softcap"), py::arg("super_chunk"), py::arg("engine"), py::arg("dh"),
        py::arg("dw"), py::arg("db"));
  m.def("chunk_forward", &chunk_forward, "forward of one one-pass chunk, keeping its logits", py::arg("h"),
        py::arg("w"), py::arg("b"), py::arg("t"), py::arg("temperature"), py::arg("softcap"), py::arg("engine"),
        py::arg("kept"), py::arg("logp"), py::arg("lse"), py::arg("entropy"));
  m.def("chunk_backward", &chunk_backward, "dh, dw (accumulated), db_acc of one one-pass chunk from its kept logits",
        py::arg("h"), py::arg("w"), py::arg("b"), py::arg("t"), py::arg("kept"), py::arg("lse"), py::arg("entropy"),
        py::arg("g_logp"), py::arg("g_ent"), py::arg("temperature"), py::arg("softcap"), py::arg("engine"), py::arg("dh"),
        py::arg("dh_lo"), py::arg("dw"), py::arg("dw_lo"), py::arg("db_acc"), py::arg("accumulate"));
  m.def("scale_rounded_once", &scale_rounded_once,
        "out = scale * (out + its int8 residual lo) in place, rounded once (fp32 or no lo: out *= scale; scale 1: unchanged)",
        py::arg("out"), py::arg("lo"), py::arg("scale"));
  m.def("fused_chunk_tokens", &grpo_kernels::fused_chunk_tokens, "tokens per one-pass chunk");
  m.def(
      "backward_tokens",
      [](int64_t n, int64_t v, int64_t d, at::ScalarType dtype, bool need_dw, const std::string& engine) {
        grpo_kernels::LogprobsOptions opt;
        opt.engine = grpo_kernels::parse_engine(engine);
        return grpo_kernels::backward_tokens(n, v, d, dtype, need_dw, opt, at::get_num_threads());
      },
      "tokens per super-chunk of the two-pass backward (its default sizing) on an engine", py::arg("n"), py::arg("v"),
      py::arg("d"), py::arg("dtype"), py::arg("need_dw"), py::arg("engine") = "brgemm");
  m.def(
      "widens_operands",
      [](const std::string& engine, at::ScalarType dtype) {
        return grpo_kernels::widens_operands(grpo_kernels::parse_engine(engine), dtype);
      },
      "whether the engine's 16-bit GEMMs make fp32 copies of their operands (counted in the backward's budget)");
  m.def("kept_bytes", &grpo_kernels::kept_bytes, "bytes of the one-pass workspace for a chunk of n tokens");
  m.def(
      "gemm_path",
      [](at::ScalarType dtype, int64_t d, const std::string& engine) {
        return grpo_kernels::gemm_path(dtype, d, grpo_kernels::parse_engine(engine));
      },
      "GEMM path of an engine for a dtype and hidden size: '<engine>/amx-vnni', '<engine>/vnni' or '<engine>/plain'");
  m.def(
      "engine_unavailable",
      [](const std::string& engine, at::ScalarType dtype) {
        return grpo_kernels::engine_unavailable(grpo_kernels::parse_engine(engine), dtype);
      },
      "'' when an engine runs tiles of a dtype here, else the reason it cannot");
  m.def("has_amx", &grpo_kernels::has_amx, "whether 16-bit tiles of a dtype run on AMX here");
  m.def(
      "tile_gflops",
      [](const std::string& engine, at::ScalarType dtype, int64_t d, int64_t reps) {
        py::gil_scoped_release no_gil;
        return grpo_kernels::tile_gflops(grpo_kernels::parse_engine(engine), dtype, d, reps);
      },
      "GFLOP/s of an engine on the forward's [256 x 256 x d] tile, all threads at once");
  m.def(
      "tile_gemm_gflops",
      [](const std::string& engine, at::ScalarType dtype, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
         bool add, int64_t reps) {
        py::gil_scoped_release no_gil;
        return grpo_kernels::tile_gemm_gflops(grpo_kernels::parse_engine(engine), dtype, m, n, k, lda, ldb, add,
                                              reps);
      },
      "GFLOP/s of an engine on C [m, n] (+)= A [m, k] B [k, n], all threads at once (benchmarks/tile_gemm_bench.py)");
  m.def(
      "tile_gemm_check",
      [](const std::string& engine, const at::Tensor& a, const at::Tensor& b, at::Tensor c, bool add, bool vnni) {
        py::gil_scoped_release no_gil;
        grpo_kernels::tile_gemm_check(grpo_kernels::parse_engine(engine), a, b, c, add, vnni);
      },
      "c (+)= a @ b through an engine's tile GEMM on one thread (b packed into VNNI pairs when vnni), for tests",
      py::arg("engine"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("add"), py::arg("vnni"));
  m.def(
      "tile_gemm_flush_check",
      [](const std::string& engine, const at::Tensor& a, const at::Tensor& b, at::Tensor out,
         const c10::optional<at::Tensor>& lo, bool first, bool vnni) {
        py::gil_scoped_release no_gil;
        return grpo_kernels::tile_gemm_flush_check(grpo_kernels::parse_engine(engine), a, b, out, lo, first, vnni);
      },
      "out (+ residual lo) (+)= a @ b through an engine's dW step on one thread; returns the engine's fp32 a @ b",
      py::arg("engine"), py::arg("a"), py::arg("b"), py::arg("out"), py::arg("lo"), py::arg("first"), py::arg("vnni"));
  m.def("num_threads", [] { return at::get_num_threads(); });
}
