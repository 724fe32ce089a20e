"""What the one pass keeps alive between forward and backward, and the op's peak (RSS), at the Qwen head.

python mem_one_pass.py DTYPE N SCALE  (run with MALLOC_MMAP_THRESHOLD_=131072, PYTHONPATH=tree)
"""
import json, sys
import torch
import grpo_kernels as gk
from grpo_kernels import backends
from grpo_kernels.backends.cpu import CpuBackend, CpuTuning

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1]]
n, scale = int(sys.argv[2]), float(sys.argv[3])
B, T = max(1, n // 512), min(n, 512)
D, V = 896, 151936
torch.manual_seed(0)
hidden = torch.randn(B, T, D).to(dtype).requires_grad_()
weight = (torch.randn(V, D) * 0.02).to(dtype).requires_grad_()
ids = torch.randint(0, V, (B, T))
mask = torch.ones(B, T)
adv = torch.randn(B)
cfg = gk.GRPOConfig(loss_type="dapo", beta=0.0)
mb = lambda x: round(x / 1e6, 1)
with backends.use(CpuBackend(CpuTuning(schedule="one-pass"))):
    # prime (OpenMP pools, JIT) on a slice
    gk.fused_linear_grpo_loss(hidden[:1, :16].detach(), weight.detach(), ids[:1, :16], mask[:1, :16], adv[:1], cfg)
    base = status("VmRSS")
    reset_hwm()
    out = gk.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, cfg)
    after_fwd = status("VmRSS")
    peak_fwd = status("VmHWM")
    reset_hwm()
    (out.loss * scale).backward()
    del out
    after_bwd = status("VmRSS")
    peak_bwd = status("VmHWM")
grads = hidden.grad.numel() * hidden.grad.element_size() + weight.grad.numel() * weight.grad.element_size()
print(json.dumps({"dtype": sys.argv[1], "n": n, "scale": scale, "ran": gk.last_backend("fused_linear_grpo_loss"),
                  "grads_MB": mb(grads),
                  "alive_after_forward_MB (RSS - base - grads)": mb(after_fwd - base - grads),
                  "alive_after_backward_MB (RSS - base - grads)": mb(after_bwd - base - grads),
                  "peak_forward_extra_MB": mb(peak_fwd - base - grads),
                  "peak_backward_extra_MB": mb(max(peak_bwd, after_fwd) - base - grads)}))
