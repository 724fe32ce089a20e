"""linear_logprobs forward, bf16, N=4096, D=896, V=151936: public call vs the raw _C.forward, in one process."""
import sys, time, json
import torch
import grpo_kernels as gk
from grpo_kernels import _C
tree = sys.argv[1]
torch.manual_seed(0)
N, D, V = 4096, 896, 151936
dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[2]]
h = torch.randn(N, D).to(dt); w = (torch.randn(V, D) * 0.02).to(dt); t = torch.randint(0, V, (N,))
def pub():
    with torch.no_grad():
        gk.linear_logprobs(h, w, t)
logp = torch.empty(N); lse = torch.empty(N)
def raw():
    if tree == "base":
        _C.forward(h, w, None, t, 1.0, 0.0, 0, logp, lse, None)
    else:
        from grpo_kernels.backends import cpu_engines
        _C.forward(h, w, None, t, 1.0, 0.0, 0, cpu_engines.engine_for(dt), logp, lse, None)
out = {}
pub(); raw()
for name, f in (("public", pub), ("raw", raw), ("public2", pub), ("raw2", raw)):
    ts = []
    for _ in range(3):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    out[name] = [round(x, 3) for x in ts]
print(tree, sys.argv[2], json.dumps(out))
