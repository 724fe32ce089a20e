"""Times the fused GRPO loss (forward + backward, the benchmarks' ``ours`` provider) K times in one process, on
a forced CPU schedule, after the three-GEMM floor of the same inputs (torch's GEMMs in the inputs' dtype).

    python docs/bench/2026-12-06-amd-zen5/one_loss.py {bf16|fp32} BxT K {one-pass|two-pass|auto}

Prints one line: the floor, then each call's time (the first is the warm-up) and its ratio to the floor.
GRPO_KERNELS_CPU_ENGINE picks the engine (ab_schedule.sh).
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import grpo_kernels as gk  # noqa: E402
import providers  # noqa: E402
from cases import Case, make_inputs  # noqa: E402
from grpo_kernels.backends import cpu  # noqa: E402

dtype, size, k, schedule = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
B, T = map(int, size.split("x"))
case = Case("grpo_fwd_bwd", dtype, (B, T))
inp = make_inputs(case)
floor_fn = providers._build_floor(case, inp, case.torch_dtype)
floor_fn()  # warm-up
t0 = time.perf_counter()
floor_fn()
floor = time.perf_counter() - t0
loss = providers._ours_grpo("cpu")
times = []
with gk.backends.use(cpu.CpuBackend(cpu.CpuTuning(schedule=schedule))):
    for _ in range(k):
        inp.weight.grad = inp.hidden.grad = None
        t0 = time.perf_counter()
        loss(inp).backward()
        times.append(time.perf_counter() - t0)
print(f"{schedule}: floor {floor:.2f}s; " + " ".join(f"{t:.2f}s ({t / floor:.2f}x)" for t in times), flush=True)
