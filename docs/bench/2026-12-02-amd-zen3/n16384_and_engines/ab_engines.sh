#!/bin/bash
# Fresh-process A/B of the 16-bit engines on the GRPO loss at 4x512 (AMD EPYC Zen 3, 2 vCPU, main 57c56c1),
# engines alternating, each process a warm-up and two timed calls; output in ab_bf16.log / ab_fp16.log.
H=$(dirname "$0")
for i in 1 2 3; do for e in brgemm mkl-upcast; do
  echo "$e $(GRPO_KERNELS_CPU_ENGINE=bf16=$e python $H/one_loss.py bf16 4x512 3 | tr '\n' ' ')"; done; done > $H/ab_bf16.log
for i in 1 2; do for e in brgemm mkl-upcast; do
  echo "$e $(GRPO_KERNELS_CPU_ENGINE=fp16=$e python $H/one_loss.py fp16 4x512 3 | tr '\n' ' ')"; done; done > $H/ab_fp16.log
