import sys, time
from pathlib import Path
ROOT = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(ROOT)]
import torch, grpo_kernels as gk
assert gk.__file__.startswith(str(ROOT)), gk.__file__
N, D, V = int(sys.argv[2]), 896, 151936
torch.manual_seed(0)
h = (torch.randn(N, D) * 0.5).requires_grad_()
w = (torch.randn(V, D) * 0.02).requires_grad_()
t = torch.randint(0, V, (N,))
out = []
for i in range(int(sys.argv[3])):
    h.grad = w.grad = None
    t0 = time.perf_counter(); gk.linear_logprobs(h, w, t).sum().backward(); out.append(time.perf_counter() - t0)
print(ROOT.name, " ".join(f"{x:.2f}" for x in out), flush=True)
