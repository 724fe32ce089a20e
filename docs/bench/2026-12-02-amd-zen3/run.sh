#!/bin/bash
# Issue 14's table on AMD EPYC Zen 3 (family 25 model 1, AVX2, 2 vCPU), main 53ba947, run from the repo root
# one invocation after another with nothing else heavy beside them (the JSON and logs beside this file).
D=docs/bench/2026-12-02-amd-zen3
python benchmarks/run.py --ops grpo_fwd_bwd --dtypes fp32 --sizes 8x512 --providers ours cce liger materialize trl-chunked --repeats 1 --out $D/grpo_fp32.json > $D/grpo_fp32.log 2>&1
python benchmarks/run.py --ops grpo_fwd_bwd --dtypes bf16 --sizes 8x512 --providers ours --floor fp32 --repeats 2 --out $D/grpo_bf16.json > $D/grpo_bf16.log 2>&1
python benchmarks/run.py --ops logprobs_fwd --dtypes bf16 fp32 --sizes 1024 4096 16384 --providers ours --floor fp32 --repeats 1 --out $D/logprobs_fwd.json > $D/logprobs_fwd.log 2>&1
python benchmarks/run.py --ops logprobs_fwd_bwd --dtypes bf16 --sizes 1024 4096 --providers ours --floor fp32 --repeats 1 --out $D/logprobs_fwd_bwd_bf16.json > $D/logprobs_fwd_bwd_bf16.log 2>&1
python benchmarks/run.py --ops logprobs_fwd_bwd --dtypes fp32 --sizes 1024 4096 --providers ours --repeats 1 --out $D/logprobs_fwd_bwd_fp32.json > $D/logprobs_fwd_bwd_fp32.log 2>&1
# Stopped after 12 min inside the materializing provider's warm-up + 1 repetition (torch's bf16 GEMMs, ~18 GFLOP/s
# here); only its floor and ours finished (the log beside this file):
python benchmarks/run.py --ops grpo_fwd_bwd --dtypes bf16 --sizes 2x512 --providers ours cce liger materialize trl-chunked --floor fp32 --repeats 1 --out $D/grpo_bf16_peers_2x512.json > $D/grpo_bf16_peers_2x512.log 2>&1
