"""Peak extra RSS (VmHWM after a reset, less the returned dH and dW) of linear_logprobs forward + backward in bf16
at N tokens, super-chunks of S (0: the default sizing); GRPO_KERNELS_CPU_ENGINE picks the engine.

    python docs/bench/2026-12-02-amd-zen3/n16384_and_engines/mem_bwd.py N S
"""
import os, sys, time, torch
from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
import grpo_kernels as gk
from grpo_kernels.backends import cpu
def status_kb(k):
    for line in open("/proc/self/status"):
        if line.startswith(k + ":"): return int(line.split()[1])
N, S = int(sys.argv[1]), int(sys.argv[2]); D, V = 896, 151936
g = torch.Generator().manual_seed(0)
w = (torch.randn(V, D, generator=g) * 0.02).bfloat16().requires_grad_()
h = torch.randn(N, D, generator=g).bfloat16().requires_grad_()
t = torch.randint(0, V, (N,), generator=g); gl = torch.randn(N)
tun = cpu.CpuTuning(super_chunk_tokens=S) if S > 0 else cpu.CpuTuning()
with gk.backends.use(cpu.CpuBackend(tun)):
    lp = gk.linear_logprobs(h[:64], w, t[:64], backend="cpu")   # warm: the probe, thread pools
    (lp * gl[:64]).sum().backward()
    w.grad = h.grad = None
    import gc; gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    base = status_kb("VmRSS"); t0 = time.perf_counter()
    lp = gk.linear_logprobs(h, w, t, backend="cpu")
    (lp * gl).sum().backward()
    peak = status_kb("VmHWM")
out = (h.numel() * 2 + w.numel() * 2) / 1024  # returned grads, kB
print(f"engine {cpu.gemm_path(torch.bfloat16, D)} N={N} S={S}: extra {(peak - base - out) / 1024:.0f} MiB, {time.perf_counter() - t0:.1f} s")
