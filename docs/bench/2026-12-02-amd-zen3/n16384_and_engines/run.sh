#!/bin/bash
# AMD EPYC Zen 3 (family 25 model 1, AVX2, 2 vCPU), main 09f6e6c: log-probs forward + backward at N = 16384
# (the 2026-12-02 table's missing row), one invocation after the other, nothing else heavy beside them.
D=${D:-docs/bench/2026-12-02-amd-zen3/n16384_and_engines}
python benchmarks/run.py --ops logprobs_fwd_bwd --dtypes bf16 --sizes 16384 --providers ours --floor fp32 --repeats 1 --out $D/logprobs_fwd_bwd_bf16_16384.json > $D/logprobs_fwd_bwd_bf16_16384.log 2>&1
python benchmarks/run.py --ops logprobs_fwd_bwd --dtypes fp32 --sizes 16384 --providers ours --repeats 1 --out $D/logprobs_fwd_bwd_fp32_16384.json > $D/logprobs_fwd_bwd_fp32_16384.log 2>&1
