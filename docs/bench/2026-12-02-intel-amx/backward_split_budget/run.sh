#!/bin/bash
# N=16384 logprobs fwd+bwd bf16: main (a9fbbd0) vs the residual-budget change, alternating in one lock hold
cd "$(dirname "$0")"
for i in 1 2; do
  for tree in main op; do
    d=/work/main; [ $tree = op ] && d=/work/wt-op
    (cd $d && PYTHONPATH=$d python benchmarks/run.py --ops logprobs_fwd_bwd --dtypes bf16 --sizes 16384 --providers ours --repeats 1 --timeout 400 --out $PWD/$tree-$i.json) > $PWD/$tree-$i.log 2>&1
  done
done
