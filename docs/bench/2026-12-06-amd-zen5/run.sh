#!/bin/bash
# Issue 14's table on AMD EPYC Zen 5 (family 26 model 2, avx512_bf16, no AMX, 2 vCPU), run from the repo root one
# invocation after another with nothing else heavy beside them (JSON and logs beside this file). Floor: torch's GEMMs
# in the inputs' dtype (bf16 here runs oneDNN's AVX-512-BF16 GEMM, ~905 GFLOP/s, four times torch's fp32 ~222).
D=docs/bench/2026-12-06-amd-zen5
python benchmarks/run.py --ops grpo_fwd_bwd --dtypes bf16 --sizes 8x512 --providers ours cce liger materialize trl-chunked --repeats 2 --out $D/grpo_bf16.json > $D/grpo_bf16.log 2>&1
python benchmarks/run.py --ops grpo_fwd_bwd --dtypes fp32 --sizes 8x512 --providers ours cce liger materialize trl-chunked --repeats 2 --out $D/grpo_fp32.json > $D/grpo_fp32.log 2>&1
python benchmarks/run.py --ops logprobs_fwd --dtypes bf16 fp32 --sizes 1024 4096 16384 --providers ours --repeats 2 --out $D/logprobs_fwd.json > $D/logprobs_fwd.log 2>&1
python benchmarks/run.py --ops logprobs_fwd_bwd --dtypes bf16 fp32 --sizes 1024 4096 16384 --providers ours --repeats 2 --out $D/logprobs_fwd_bwd.json > $D/logprobs_fwd_bwd.log 2>&1
bash $D/ab_schedule.sh
# Reruns at 4b8e78f (the forward epilogue without a transformed copy of the tile):
python benchmarks/run.py --ops logprobs_fwd --dtypes bf16 fp32 --sizes 1024 4096 16384 --providers ours --repeats 2 --out $D/logprobs_fwd_epilogue.json > $D/logprobs_fwd_epilogue.log 2>&1
python benchmarks/run.py --ops grpo_fwd_bwd --dtypes bf16 --sizes 8x512 --providers ours cce --repeats 2 --out $D/grpo_bf16_epilogue.json > $D/grpo_bf16_epilogue.log 2>&1
python benchmarks/accuracy.py --dtypes bf16 > $D/accuracy_bf16.md 2>&1  # at b91134f
python benchmarks/tile_gemm_bench.py --out $D/tile_gemm_bench.json > $D/tile_gemm_bench.log 2>&1  # at 56e64ac
# Rerun at 31da4b0 (after amx-emulated; the avx512-bf16 paths unchanged), 2026-12-06 evening:
python benchmarks/run.py --ops grpo_fwd_bwd --dtypes bf16 --sizes 8x512 --providers ours cce liger materialize trl-chunked --repeats 2 --out $D/grpo_bf16_head.json > $D/grpo_bf16_head.log 2>&1
