#!/bin/bash
# Issue 14's table on Intel Xeon with AMX (2 vCPU), main 7b31760, one lock hold, run from the repo root:
#   flock /tmp/gk-heavy.lock bash docs/bench/2026-12-02-intel-amx/final_7b31760/run.sh
# The first invocation of a hold has run 13-40 % slow, so a throwaway quick run goes first.
D=docs/bench/2026-12-02-intel-amx/final_7b31760
python benchmarks/run.py --quick --ops grpo_fwd_bwd --providers ours --repeats 1 --out /tmp/warmup.json > /dev/null 2>&1
python benchmarks/run.py --ops grpo_fwd_bwd --dtypes bf16 --sizes 8x512 --providers ours materialize cce liger trl-chunked --repeats 2 --out $D/grpo_bf16.json > $D/grpo_bf16.log 2>&1
python benchmarks/run.py --ops logprobs_fwd logprobs_fwd_bwd --dtypes bf16 --sizes 1024 4096 16384 --providers ours --repeats 2 --out $D/logprobs_bf16.json > $D/logprobs_bf16.log 2>&1
python benchmarks/run.py --ops grpo_fwd_bwd --dtypes fp32 --sizes 8x512 --providers ours materialize cce liger trl-chunked --repeats 1 --out $D/grpo_fp32.json > $D/grpo_fp32.log 2>&1
python benchmarks/run.py --ops logprobs_fwd logprobs_fwd_bwd --dtypes fp32 --sizes 1024 4096 --providers ours --repeats 1 --out $D/logprobs_fp32.json > $D/logprobs_fp32.log 2>&1
# added after the hold, on the same kernels (branch onepass-amx 7cc6e15): the memory at twice the largest N
# python benchmarks/run.py --ops logprobs_fwd_bwd --dtypes bf16 --sizes 32768 --providers ours --repeats 1 --out $D/logprobs_fwd_bwd_bf16_32768.json
