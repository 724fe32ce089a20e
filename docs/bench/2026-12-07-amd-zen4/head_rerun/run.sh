#!/usr/bin/env bash
# Zen 4 rerun of issue 14's rows after f8f3461 (lse saved as a pair, -ffp-contract=off), from a worktree at the
# commit named in machine.txt, nothing else heavy beside it: the loss at 8x512 (ours only; the peers' rows stand
# from cpu_targets/) and linear_logprobs at N = 1024 / 4096, both dtypes, the same floors as cpu_targets.sh.
set -euo pipefail
OUT=${1:?usage: run.sh OUTDIR}
mkdir -p "$OUT"
{ lscpu; echo; echo "commit $(git rev-parse --short HEAD)"; } > "$OUT/machine.txt"
BF16_FLOOR=$(python benchmarks/targets.py --fastest-bf16-floor)
echo "bf16 floor: $BF16_FLOOR" | tee "$OUT/engines.txt"
run() { local name=$1; shift; echo "== $name"; python benchmarks/run.py "$@" --repeats 2 --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; }
run grpo_bf16 --ops grpo_fwd_bwd --dtypes bf16 --sizes 8x512 --providers ours --floor "$BF16_FLOOR"
run grpo_fp32 --ops grpo_fwd_bwd --dtypes fp32 --sizes 8x512 --providers ours
for dt in bf16 fp32; do
  floor=dtype; [ "$dt" = bf16 ] && floor=$BF16_FLOOR
  run "logprobs_fwd_$dt" --ops logprobs_fwd --dtypes $dt --sizes 1024 4096 --providers ours --floor "$floor"
  run "logprobs_fwd_bwd_$dt" --ops logprobs_fwd_bwd --dtypes $dt --sizes 1024 4096 --providers ours --floor "$floor"
done
python benchmarks/targets.py "$OUT"/grpo_*.json "$OUT"/logprobs_*.json --out "$OUT/verdict.json" | tee "$OUT/verdict.md"
