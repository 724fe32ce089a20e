#!/bin/bash
# Fresh-process A/B of the fused loss's two CPU schedules on the avx512-bf16 engine (bf16, 8x512), alternating;
# each process times the three-GEMM floor once, then a warm-up and two calls (one_loss.py). Output: ab_schedule.log.
H=$(dirname "$0")
for i in 1 2; do for s in one-pass two-pass; do
  python $H/one_loss.py bf16 8x512 3 $s; done; done > $H/ab_schedule.log 2>&1
