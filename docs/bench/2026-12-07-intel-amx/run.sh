#!/usr/bin/env bash
# Issue 14's rows on Intel Xeon with AMX (family 6 model 167, 2 vCPU), run from the repo root at the commit in
# machine.txt, nothing else heavy beside it:  bash docs/bench/2026-12-07-intel-amx/run.sh OUTDIR
# The first invocation after a quiet spell has run 13-40 % slow on this machine kind: a throwaway run goes first.
set -euo pipefail
OUT=${1:?usage: run.sh OUTDIR}
mkdir -p "$OUT"
{ lscpu; echo; echo "commit $(git rev-parse --short HEAD)"; } > "$OUT/machine.txt"
BF16_FLOOR=$(python benchmarks/targets.py --fastest-bf16-floor)
echo "bf16 floor: $BF16_FLOOR" | tee "$OUT/engines.txt"
python -c "import torch; from grpo_kernels.backends import cpu_engines as e; print('bf16', e.selection(torch.bfloat16)); print('fp32', e.selection(torch.float32))" >> "$OUT/engines.txt"
python benchmarks/run.py --quick --ops grpo_fwd_bwd --providers ours --repeats 1 --out /tmp/warmup.json > /dev/null 2>&1
run() { local name=$1; shift; echo "== $name"; python benchmarks/run.py "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; }
run grpo_bf16 --ops grpo_fwd_bwd --dtypes bf16 --sizes 8x512 --providers ours materialize cce liger trl-chunked --repeats 2 --floor "$BF16_FLOOR"
run logprobs_bf16 --ops logprobs_fwd logprobs_fwd_bwd --dtypes bf16 --sizes 1024 4096 16384 --providers ours --repeats 2 --floor "$BF16_FLOOR"
run grpo_fp32 --ops grpo_fwd_bwd --dtypes fp32 --sizes 8x512 --providers ours materialize cce liger trl-chunked --repeats 1
run logprobs_fp32 --ops logprobs_fwd logprobs_fwd_bwd --dtypes fp32 --sizes 1024 4096 --providers ours --repeats 1
python benchmarks/targets.py "$OUT"/grpo_*.json "$OUT"/logprobs_*.json --out "$OUT/verdict.json" | tee "$OUT/verdict.md"
