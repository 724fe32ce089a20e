#!/usr/bin/env bash
# Issue 14's CPU table on this machine in one command: the engines chosen, the tile GEMM rates, the GRPO loss against
# every installed peer (bf16, fp32), linear_logprobs forward and forward + backward at N = 1024 / 4096 / 16384, the
# bf16 accuracy table, then the verdict of every target (benchmarks/targets.py). Run it on a quiet machine, nothing
# else heavy beside it (about 40 min on 2 vCPU):
#
#   bash benchmarks/cpu_targets.sh OUTDIR
#
# The floor of bf16 inputs is the faster of torch's bf16 and fp32 GEMMs here (targets.py --fastest-bf16-floor).
# Every file lands in OUTDIR; verdict.md is the table to quote, with the machine named in its first line.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/cpu_targets.sh OUTDIR}
mkdir -p "$OUT"
PEERS="cce liger materialize trl-chunked"
# the race is against every peer: without one installed its verdict could only be "not measured"
python -c "import cut_cross_entropy, liger_kernel, trl" 2>/dev/null || {
  echo "cpu_targets: the peers are not all installed; first: pip install -e '.[peers,trl]' (with --no-build-isolation)" >&2
  exit 2
}

{ lscpu; echo; echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"; } > "$OUT/machine.txt"
python - > "$OUT/engines.txt" <<'PY'
import torch
from grpo_kernels.backends import cpu, cpu_engines
for dt in (torch.bfloat16, torch.float16, torch.float32):
    engine, why = cpu_engines.selection(dt)
    print(f"{dt}: {engine} ({cpu.gemm_path(dt, 896)}) - {why}")
PY
BF16_FLOOR=$(python benchmarks/targets.py --fastest-bf16-floor 2>> "$OUT/engines.txt")
echo "bf16 floor: $BF16_FLOOR" >> "$OUT/engines.txt"
cat "$OUT/engines.txt"

run() {  # name, then run.py arguments
  local name=$1; shift
  echo "== $name"
  python benchmarks/run.py "$@" --repeats 2 --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
}
run grpo_bf16 --ops grpo_fwd_bwd --dtypes bf16 --sizes 8x512 --providers ours $PEERS --floor "$BF16_FLOOR"
run grpo_fp32 --ops grpo_fwd_bwd --dtypes fp32 --sizes 8x512 --providers ours $PEERS
for dt in bf16 fp32; do
  floor=dtype; [ "$dt" = bf16 ] && floor=$BF16_FLOOR
  run "logprobs_fwd_$dt" --ops logprobs_fwd --dtypes $dt --sizes 1024 4096 16384 --providers ours --floor "$floor"
  run "logprobs_fwd_bwd_$dt" --ops logprobs_fwd_bwd --dtypes $dt --sizes 1024 4096 16384 --providers ours --floor "$floor"
done
echo "== tile GEMM rates, accuracy"
python benchmarks/tile_gemm_bench.py --out "$OUT/tile_gemm_bench.json" > "$OUT/tile_gemm_bench.log" 2>&1
python benchmarks/accuracy.py --dtypes bf16 > "$OUT/accuracy_bf16.md" 2>&1
python benchmarks/targets.py "$OUT"/grpo_*.json "$OUT"/logprobs_*.json --out "$OUT/verdict.json" | tee "$OUT/verdict.md"
