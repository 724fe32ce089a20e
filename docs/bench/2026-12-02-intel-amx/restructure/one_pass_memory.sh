# run from /work/wt-core2 under flock /tmp/gk-heavy.lock; /work/main = main 8f95b91 (before the change), /work/wt-core2 = after
for tree in /work/main /work/wt-core2; do
  for args in "bf16 1024 0.5" "bf16 1024 1.0" "bf16 256 0.5" "fp32 1024 0.5"; do
    echo "$tree $args $(MALLOC_MMAP_THRESHOLD_=131072 PYTHONPATH=$tree python docs/bench/2026-12-02-intel-amx/restructure/mem_one_pass.py $args 2>&1 | tail -1)"
  done
done
