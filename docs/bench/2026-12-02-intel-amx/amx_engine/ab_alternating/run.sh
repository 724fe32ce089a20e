cd /work/main
for e in brgemm amx brgemm amx; do
  GRPO_KERNELS_CPU_ENGINE="bf16=$e" timeout 300 python benchmarks/run.py --ops logprobs_fwd logprobs_fwd_bwd grpo_fwd_bwd --dtypes bf16 --sizes 4096 8x512 --providers ours --repeats 2 --timeout 200 --out /tmp/ab/$e-$(date +%H%M%S).json > /tmp/ab/$e-$(date +%H%M%S).log 2>&1
  echo "$(date +%T) $e done"
done
