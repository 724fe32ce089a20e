"""Times the fused GRPO loss (forward + backward, the benchmarks' ``ours`` provider) K times in one process.

    python docs/bench/2026-12-02-amd-zen3/n16384_and_engines/one_loss.py {bf16|fp16|fp32} BxT K

The first call is the warm-up; GRPO_KERNELS_CPU_ENGINE picks the engine (ab_engines.sh).
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import providers  # noqa: E402
from cases import Case, make_inputs  # noqa: E402

dtype, size, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
B, T = map(int, size.split("x"))
inp = make_inputs(Case("grpo_fwd_bwd", dtype, (B, T)))
loss = providers._ours_grpo("cpu")
for _ in range(k):
    inp.weight.grad = inp.hidden.grad = None
    t0 = time.perf_counter()
    loss(inp).backward()
    print(f"{time.perf_counter() - t0:.2f}s", flush=True)
