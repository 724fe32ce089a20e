#!/bin/bash
# alternate base (127eafe) and new (working tree) in fresh processes
for round in 1 2 3; do
  for cfg in "bf16 4x512 3 auto" "fp32 4x512 3 auto" "bf16 4x512 3 two-pass"; do
    for side in base new; do
      dir=/work/wt-base; [ $side = new ] && dir=/work/main
      echo -n "$round $side $cfg: "
      (cd $dir && python docs/bench/2026-12-06-amd-zen5/one_loss.py $cfg 2>/dev/null)
    done
  done
done
#!/bin/bash
for round in 4 5 6 7; do
  for side in new base; do
    dir=/work/wt-base; [ $side = new ] && dir=/work/main
    echo -n "$round $side fp32 4x512 3 auto: "
    (cd $dir && python docs/bench/2026-12-06-amd-zen5/one_loss.py fp32 4x512 3 auto 2>/dev/null)
  done
done
