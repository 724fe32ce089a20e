"""Multi-process cases of tests/test_distributed.py: what each rank runs, and the one-process reference.

Every case is a pair: ``run_<case>(rank, world, seed)`` runs inside a spawned gloo process and
returns what rank 0 (and for error cases every rank) reports; ``ref_<case>(world, seed)`` runs in
the pytest process (torch.distributed not initialized) on the concatenated batch. Inputs come from
the seed alone, so both sides build the same model and batch. Sizes are tiny: the point is the
combination of shards and ranks, not the kernels (their own tests cover those).
"""

from __future__ import annotations

import datetime
import os
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import grpo_kernels as gk
from grpo_kernels import reference

D = 8  # hidden size
B_PER_RANK = 2  # sequences per rank
T = 5  # completion positions


# ---------------------------------------------------------------------------------------------------
# A tiny policy: embedding -> residual tanh MLP layers -> LM head; forward returns the GRPO loss
# ---------------------------------------------------------------------------------------------------


class TinyPolicy(nn.Module):
    def __init__(self, vocab: int, config: gk.GRPOConfig, *, bias: bool = False, n_layers: int = 2) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(vocab, D)
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(n_layers))
        self.lm_head = nn.Linear(D, vocab, bias=bias)

    def forward(self, input_ids: Tensor, completion_ids: Tensor, mask: Tensor, advantages: Tensor,
                ref_logp: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        self.head_was_dtensor = gk.distributed.is_dtensor(self.lm_head.weight)
        out = gk.fused_linear_grpo_loss(h, self.lm_head.weight, completion_ids, mask, advantages, self.config,
                                        ref_logp=ref_logp, bias=self.lm_head.bias)
        return out.loss, torch.stack([out.metrics[k] for k in sorted(out.metrics)])


@dataclass
class Batch:
    input_ids: Tensor
    completion_ids: Tensor
    mask: Tensor
    advantages: Tensor
    ref_logp: Tensor

    def rows(self, rank: int, per_rank: int) -> "Batch":
        s = slice(rank * per_rank, (rank + 1) * per_rank)
        return Batch(*(getattr(self, f)[s] for f in self.__dataclass_fields__))


def make_batch(vocab: int, n_seq: int, seed: int, *, equal_counts: bool = False) -> Batch:
    """n_seq sequences; with equal_counts every rank's B_PER_RANK rows hold the same number of tokens.

    Token means taken per rank (the entropy bonus, the metrics) match the whole batch's only when
    the ranks hold equal token counts; the dapo normalizer is global and is tested with unequal ones.
    """
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(n_seq, T, generator=g) > 0.3).long()
    mask[:, 0] = 1
    if equal_counts:
        base = mask[:B_PER_RANK]
        mask = torch.cat([base.roll(r, dims=1) for r in range(n_seq // B_PER_RANK)])
    return Batch(
        input_ids=torch.randint(0, vocab, (n_seq, T), generator=g),
        completion_ids=torch.randint(0, vocab, (n_seq, T), generator=g),
        mask=mask,
        advantages=torch.randn(n_seq, generator=g),
        ref_logp=-2.0 - torch.rand(n_seq, T, generator=g),
    )


def make_policy(vocab: int, config: gk.GRPOConfig, seed: int, *, bias: bool = False) -> TinyPolicy:
    torch.manual_seed(seed)
    model = TinyPolicy(vocab, config, bias=bias)
    with torch.no_grad():  # a head of larger scale, so the softmax is not nearly uniform
        model.lm_head.weight.mul_(4.0)
    return model


# case: (config, V, bias, equal token counts per rank)
MODEL_CONFIGS = {
    "ddp_module": (gk.GRPOConfig(loss_type="dapo", beta=0.05), 11, False, False),
    "fsdp_root": (gk.GRPOConfig(loss_type="grpo", beta=0.0, entropy_coef=0.01), 11, True, True),
    "fsdp_head_unit": (gk.GRPOConfig(loss_type="dapo", beta=0.05, temperature=0.7), 13, True, False),
}


def ref_model_case(case: str, world: int, seed: int) -> dict:
    """One process, the concatenated batch of all ranks."""
    config, vocab, bias, equal = MODEL_CONFIGS[case]
    model = make_policy(vocab, config, seed, bias=bias)
    batch = make_batch(vocab, world * B_PER_RANK, seed, equal_counts=equal)
    loss, metrics = model(batch.input_ids, batch.completion_ids, batch.mask, batch.advantages, batch.ref_logp)
    loss.backward()
    return {"loss": loss.detach(), "metrics": metrics, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _gather_scalars(x: Tensor, world: int) -> Tensor:
    out = [torch.zeros_like(x) for _ in range(world)]
    torch.distributed.all_gather(out, x.contiguous())
    return torch.stack(out)


def _rank_summary(loss: Tensor, metrics: Tensor, mask: Tensor, world: int) -> dict:
    """The ranks' losses (mean: what DDP's averaged gradients differentiate) and token-weighted metrics."""
    losses = _gather_scalars(loss.detach().reshape(1), world)[:, 0]
    ms = _gather_scalars(metrics.detach(), world)
    tokens = _gather_scalars(mask.sum().double().reshape(1), world)[:, 0]
    return {"loss": losses.mean(), "metrics": ((ms.double() * tokens[:, None]).sum(0) / tokens.sum()).float()}


def run_model_case(case: str, rank: int, world: int, seed: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    config, vocab, bias, equal = MODEL_CONFIGS[case]
    model = make_policy(vocab, config, seed, bias=bias)
    batch = make_batch(vocab, world * B_PER_RANK, seed, equal_counts=equal).rows(rank, B_PER_RANK)
    names = [n for n, _ in model.named_parameters()]
    if case == "ddp_module":
        wrapped = DDP(model)
        run = wrapped
    else:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        if case == "fsdp_head_unit":
            fully_shard(model.lm_head, mesh=mesh)  # the loss sees lm_head.weight as a Shard(0) DTensor
        fully_shard(model, mesh=mesh)
        run = model
    loss, metrics = run(batch.input_ids, batch.completion_ids, batch.mask, batch.advantages, batch.ref_logp)
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad
        grads[n.replace("module.", "")] = g.full_tensor() if gk.distributed.is_dtensor(g) else g.clone()
    out = _rank_summary(loss, metrics, batch.mask, world)
    out["grads"] = grads
    out["names"] = names
    out["head_was_dtensor"] = model.head_was_dtensor
    return out


# ---------------------------------------------------------------------------------------------------
# Bare heads: tensor parallel (Shard(0) weight, Replicate hidden) and data parallel (plain hidden)
# ---------------------------------------------------------------------------------------------------


def head_problem(vocab: int, n: int, seed: int, *, dtype=torch.float32, bias: bool = True):
    g = torch.Generator().manual_seed(seed + 7)
    hidden = torch.randn(n, D, generator=g).to(dtype)
    weight = (3.0 * torch.randn(vocab, D, generator=g) / D**0.5).to(dtype)
    b = (0.5 * torch.randn(vocab, generator=g)).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    c_logp = torch.randn(n, generator=g)  # the loss is sum(c_logp * logp + c_ent * entropy)
    c_ent = torch.randn(n, generator=g)
    return hidden, weight, b, targets, c_logp, c_ent


LOGPROB_OPTS = dict(temperature=0.8, softcap=6.0)


def _logprob_objective(logp: Tensor, ent: Tensor, c_logp: Tensor, c_ent: Tensor) -> Tensor:
    return (c_logp * logp).sum() + (c_ent * ent).sum()


def ref_tp_logprobs(world: int, seed: int, vocab: int) -> dict:
    hidden, weight, b, targets, c_logp, c_ent = head_problem(vocab, 9, seed)
    targets[2] = -100
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, b)]
    logp, ent = gk.linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, **LOGPROB_OPTS)
    _logprob_objective(logp, ent, c_logp, c_ent).backward()
    return {"logp": logp.detach(), "entropy": ent.detach(), "dh": leaves[0].grad, "dw": leaves[1].grad, "db": leaves[2].grad}


def _head_placement(name: str):
    from torch.distributed.tensor import Replicate, Shard

    return [Shard(0)] if name == "shard" else [Replicate()]


def run_tp_logprobs(rank: int, world: int, seed: int, vocab: int, placement: str = "shard", backend: str = "auto") -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    hidden, weight, b, targets, c_logp, c_ent = head_problem(vocab, 9, seed)
    targets[2] = -100
    h_leaf = hidden.clone().requires_grad_(True)
    w = distribute_tensor(weight, mesh, _head_placement(placement)).requires_grad_(True)
    bb = distribute_tensor(b, mesh, _head_placement(placement)).requires_grad_(True)
    h = DTensor.from_local(h_leaf, mesh, [Replicate()])
    logp, ent = gk.linear_logprobs(h, w, targets, bias=bb, return_entropy=True, backend=backend, **LOGPROB_OPTS)
    ran = gk.last_backend()
    _logprob_objective(logp, ent, c_logp, c_ent).backward()
    return {"logp": logp.detach(), "entropy": ent.detach(), "dh": h_leaf.grad, "dw": w.grad.full_tensor(),
            "db": bb.grad.full_tensor(), "local_rows": w.to_local().shape[0], "dh_ranks": _gather_scalars(h_leaf.grad, world),
            "backend": ran, "grad_placements": (str(w.grad.placements), str(bb.grad.placements))}


def dp_counts(world: int) -> list[int]:
    return [3 + 2 * r for r in range(world)]  # different token counts per rank: padded gathers


def ref_dp_logprobs(world: int, seed: int, vocab: int) -> dict:
    n = sum(dp_counts(world))
    hidden, weight, b, targets, c_logp, c_ent = head_problem(vocab, n, seed)
    targets[1] = -100
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, b)]
    logp, ent = gk.linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, **LOGPROB_OPTS)
    _logprob_objective(logp, ent, c_logp, c_ent).backward()
    return {"logp": logp.detach(), "entropy": ent.detach(), "dh": leaves[0].grad, "dw": leaves[1].grad, "db": leaves[2].grad}


def run_dp_logprobs(rank: int, world: int, seed: int, vocab: int, placement: str = "shard", backend: str = "auto") -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    counts = dp_counts(world)
    hidden, weight, b, targets, c_logp, c_ent = head_problem(vocab, sum(counts), seed)
    targets[1] = -100
    s = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    h_leaf = hidden[s].clone().requires_grad_(True)
    w = distribute_tensor(weight, mesh, _head_placement(placement)).requires_grad_(True)
    bb = distribute_tensor(b, mesh, _head_placement(placement)).requires_grad_(True)
    logp, ent = gk.linear_logprobs(h_leaf, w, targets[s], bias=bb, return_entropy=True, backend=backend, **LOGPROB_OPTS)
    ran = gk.last_backend()
    _logprob_objective(logp, ent, c_logp[s], c_ent[s]).backward()
    if placement == "replicate":  # a Replicate gradient must be the same on every rank
        every = _gather_scalars(w.grad.to_local(), world)
        assert bool((every == every[0]).all()), "the replicated head's gradient differs across ranks"
    # each rank's piece of the concatenated batch, gathered (padded to the longest) in rank order
    pieces = {}
    for name, x in (("logp", logp.detach()), ("entropy", ent.detach()), ("dh", h_leaf.grad)):
        longest = max(counts)
        pad = torch.cat([x, x.new_zeros((longest - x.shape[0],) + tuple(x.shape[1:]))])
        every = _gather_scalars(pad, world)
        pieces[name] = torch.cat([every[r, : counts[r]] for r in range(world)])
    # the head's gradient is the ranks' mean: W times it is the gradient of the summed objective
    return {**pieces, "dw": world * w.grad.full_tensor(), "db": world * bb.grad.full_tensor(), "backend": ran,
            "grad_placements": (str(w.grad.placements), str(bb.grad.placements))}


TP_FUSED_CONFIG = gk.GRPOConfig(loss_type="dapo", beta=0.04, entropy_coef=0.02, temperature=0.9, logit_softcap=8.0)


def ref_tp_fused(world: int, seed: int) -> dict:
    vocab = 11
    model = make_policy(vocab, TP_FUSED_CONFIG, seed, bias=True)
    batch = make_batch(vocab, world * B_PER_RANK, seed)
    h = torch.randn(world * B_PER_RANK, T, D, generator=torch.Generator().manual_seed(seed + 3)).requires_grad_(True)
    w = model.lm_head.weight.detach().clone().requires_grad_(True)
    b = model.lm_head.bias.detach().clone().requires_grad_(True)
    out = gk.fused_linear_grpo_loss(h, w, batch.completion_ids, batch.mask, batch.advantages, TP_FUSED_CONFIG,
                                    ref_logp=batch.ref_logp, bias=b, num_items_in_batch=int(batch.mask.sum()))
    out.loss.backward()
    return {"loss": out.loss.detach(), "metrics": {k: v for k, v in out.metrics.items()}, "dh": h.grad, "dw": w.grad, "db": b.grad}


def run_tp_fused(rank: int, world: int, seed: int) -> dict:
    """Every rank holds the whole batch (tensor parallel): num_items_in_batch must not be divided by W."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    vocab = 11
    mesh = init_device_mesh("cpu", (world,))
    model = make_policy(vocab, TP_FUSED_CONFIG, seed, bias=True)
    batch = make_batch(vocab, world * B_PER_RANK, seed)
    h_leaf = torch.randn(world * B_PER_RANK, T, D, generator=torch.Generator().manual_seed(seed + 3)).requires_grad_(True)
    w = distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]).requires_grad_(True)
    b = distribute_tensor(model.lm_head.bias.detach(), mesh, [Shard(0)]).requires_grad_(True)
    h = DTensor.from_local(h_leaf, mesh, [Replicate()])
    crit = gk.FusedLinearGRPOLoss(TP_FUSED_CONFIG)
    out = crit(h, w, batch.completion_ids, batch.mask, batch.advantages, ref_logp=batch.ref_logp, bias=b,
               num_items_in_batch=int(batch.mask.sum()))
    out.loss.backward()
    return {"loss": out.loss.detach(), "metrics": dict(out.metrics), "dh": h_leaf.grad, "dw": w.grad.full_tensor(),
            "db": b.grad.full_tensor()}


DP_GROUP_CONFIG = gk.GRPOConfig(loss_type="dapo", beta=0.0)


def _dp_group_inputs(world: int, seed: int):
    vocab = 11
    model = make_policy(vocab, DP_GROUP_CONFIG, seed)
    batch = make_batch(vocab, world * B_PER_RANK, seed)
    h = torch.randn(world * B_PER_RANK, T, D, generator=torch.Generator().manual_seed(seed + 5))
    return model.lm_head.weight.detach(), batch, h


def ref_dp_group(world: int, seed: int) -> dict:
    weight, batch, h = _dp_group_inputs(world, seed)
    h = h.requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = gk.fused_linear_grpo_loss(h, w, batch.completion_ids, batch.mask, batch.advantages, DP_GROUP_CONFIG)
    out.loss.backward()
    return {"loss": out.loss.detach(), "dh": h.grad, "dw": w.grad}


def run_dp_group(rank: int, world: int, seed: int) -> dict:
    """A (dp = W, tp = 1) mesh: a Replicate hidden on the tp sub-mesh needs dp_group for dapo."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    tp = mesh["tp"]
    weight, batch, h_full = _dp_group_inputs(world, seed)
    mine = batch.rows(rank, B_PER_RANK)
    h_leaf = h_full[rank * B_PER_RANK: (rank + 1) * B_PER_RANK].clone().requires_grad_(True)
    w = distribute_tensor(weight, tp, [Shard(0)]).requires_grad_(True)
    h = DTensor.from_local(h_leaf, tp, [Replicate()])
    args = (h, w, mine.completion_ids, mine.mask, mine.advantages, DP_GROUP_CONFIG)
    result = {"missing": _error_of(lambda: gk.fused_linear_grpo_loss(*args))}
    out = gk.fused_linear_grpo_loss(*args, dp_group=mesh["dp"].get_group())
    out.loss.backward()
    dw = w.grad.full_tensor()
    torch.distributed.all_reduce(dw)  # the tp ranks' gradients; DDP over dp would average them
    result.update(loss=_gather_scalars(out.loss.detach().reshape(1), world)[:, 0].mean(), dh=_gather_scalars(h_leaf.grad, world),
                  dw=dw / world)
    return result


# ---------------------------------------------------------------------------------------------------
# bf16: a data-parallel sharded head against the fp64 oracle, bounded by the bf16 materializing path
# ---------------------------------------------------------------------------------------------------

BF16_CONFIG = gk.GRPOConfig(loss_type="grpo", beta=0.04)
BF16_VOCAB = 37


def _bf16_inputs(world: int, seed: int):
    g = torch.Generator().manual_seed(seed + 11)
    n_seq = world * B_PER_RANK
    h = torch.randn(n_seq, T, D, generator=g).bfloat16()
    w = (3.0 * torch.randn(BF16_VOCAB, D, generator=g) / D**0.5).bfloat16()
    batch = make_batch(BF16_VOCAB, n_seq, seed)
    return h, w, batch


def ref_bf16(world: int, seed: int) -> dict:
    h, w, batch = _bf16_inputs(world, seed)
    out = {}
    for name, dtype in (("oracle", torch.float64), ("same_dtype", None)):
        hl = h.clone().requires_grad_(True)
        wl = w.clone().requires_grad_(True)
        res = reference.fused_linear_grpo_loss(hl, wl, batch.completion_ids, batch.mask, batch.advantages, BF16_CONFIG,
                                               ref_logp=batch.ref_logp, compute_dtype=dtype)
        res.loss.backward()
        out[name] = {"loss": res.loss.detach().double(), "dh": hl.grad.double(), "dw": wl.grad.double()}
    return out


def run_bf16(rank: int, world: int, seed: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    h, w, batch = _bf16_inputs(world, seed)
    mine = batch.rows(rank, B_PER_RANK)
    hl = h[rank * B_PER_RANK: (rank + 1) * B_PER_RANK].clone().requires_grad_(True)
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(True)
    out = gk.fused_linear_grpo_loss(hl, wd, mine.completion_ids, mine.mask, mine.advantages, BF16_CONFIG, ref_logp=mine.ref_logp)
    out.loss.backward()
    # grpo averages over sequences: the ranks' mean loss is the whole batch's, and dH of a rank's loss is W x the whole's
    return {"loss": _gather_scalars(out.loss.detach().reshape(1), world)[:, 0].mean().double(),
            "dh": _gather_scalars(hl.grad, world).reshape(h.shape).double() / world, "dw": wd.grad.full_tensor().double(),
            "dtypes": (str(hl.grad.dtype), str(wd.grad.dtype))}


# ---------------------------------------------------------------------------------------------------
# Payloads: every collective's tensors, counted by a dispatch mode (c10d and functional collectives)
# ---------------------------------------------------------------------------------------------------


class CollectiveLog(TorchDispatchMode):
    """Records (op, [bytes of each tensor argument]) of every collective that runs under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            sizes = []

            def visit(x):
                if isinstance(x, Tensor):
                    sizes.append(x.numel() * x.element_size())
                elif isinstance(x, (list, tuple)):
                    for y in x:
                        visit(y)

            visit(args)
            visit(list((kwargs or {}).values()))
            self.calls.append((func.overloadpacket.__name__, sizes))
        return func(*args, **(kwargs or {}))


PAYLOAD_VOCAB = 1024  # V x D = 8192 elements against a few hundred for the tokens
PAYLOAD_TOKENS = 6


def run_payload(rank: int, world: int, seed: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    hidden, weight, _, targets, c_logp, c_ent = head_problem(PAYLOAD_VOCAB, PAYLOAD_TOKENS, seed + rank, bias=False)
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_(True)
    logs = {}
    for mode in ("tp", "dp"):
        h_leaf = hidden.clone().requires_grad_(True)
        h = DTensor.from_local(h_leaf, mesh, [Replicate()]) if mode == "tp" else h_leaf
        if mode == "tp":  # the same tokens on every rank
            t = targets.clone()
            torch.distributed.broadcast(t, 0)
            torch.distributed.broadcast(h_leaf.data, 0)
        else:
            t = targets
        log = CollectiveLog()
        with log:
            logp, ent = gk.linear_logprobs(h, w, t, return_entropy=True)
            _logprob_objective(logp, ent, c_logp, c_ent).backward()
        logs[mode] = log.calls
    return {"calls": logs, "vocab": PAYLOAD_VOCAB, "tokens": PAYLOAD_TOKENS}


# ---------------------------------------------------------------------------------------------------
# Bad input: every rank must raise the same clear error (and none may hang)
# ---------------------------------------------------------------------------------------------------


def _error_of(thunk: Callable[[], object]) -> Optional[str]:
    try:
        thunk()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_errors(rank: int, world: int, seed: int) -> dict:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    other = DeviceMesh("cpu", torch.arange(world).flip(0))  # the same ranks in another order: another mesh
    hidden, weight, b, targets, _, _ = head_problem(10, 4, seed)
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.0)
    ids, mask, adv = targets.reshape(1, 4), torch.ones(1, 4), torch.ones(1)
    w0 = distribute_tensor(weight, mesh, [Shard(0)])
    h_rep = DTensor.from_local(hidden, mesh, [Replicate()])
    local_rows = 3 if rank == 0 else 2  # from_local without a shape: each rank infers a different V
    # a bias split unlike the weight (from_local with the global shape): one row moved from the first shard to the last
    b_sizes = [x.shape[0] for x in weight.chunk(world)]
    b_sizes[0], b_sizes[-1] = b_sizes[0] - 1, b_sizes[-1] + 1
    b_start = sum(b_sizes[:rank])
    bias_unlike = DTensor.from_local(b[b_start: b_start + b_sizes[rank]], mesh, [Shard(0)], run_check=False,
                                     shape=b.shape, stride=b.stride())
    cases = {
        "shard_along_d": lambda: gk.linear_logprobs(hidden, distribute_tensor(weight, mesh, [Shard(1)]), targets),
        "other_mesh": lambda: gk.linear_logprobs(DTensor.from_local(hidden, other, [Replicate()]), w0, targets),
        "hidden_sharded": lambda: gk.linear_logprobs(distribute_tensor(hidden, mesh, [Shard(0)]), w0, targets),
        "plain_weight": lambda: gk.linear_logprobs(h_rep, weight, targets),
        "plain_bias": lambda: gk.linear_logprobs(hidden, w0, targets, bias=b),
        "dtensor_targets_dp": lambda: gk.linear_logprobs(hidden, w0, DTensor.from_local(targets, mesh, [Replicate()])),
        "mask_dtensor_dp": lambda: gk.fused_linear_grpo_loss(hidden.reshape(1, 4, D), w0, ids,
                                                             DTensor.from_local(mask, mesh, [Replicate()]), adv, cfg),
        "vocab_disagrees": lambda: gk.linear_logprobs(
            hidden, DTensor.from_local(weight[:local_rows], mesh, [Shard(0)], run_check=False), targets.clamp(max=1)),
        "target_out_of_range": lambda: gk.linear_logprobs(hidden, w0, torch.full_like(targets, 10)),
        "two_d_mesh": lambda: gk.linear_logprobs(
            hidden, distribute_tensor(weight, init_device_mesh("cpu", (1, world)), [Replicate(), Shard(0)]), targets),
        "bias_sharded_unlike_weight": lambda: gk.linear_logprobs(hidden, w0, targets, bias=bias_unlike),
    }
    return {name: _error_of(thunk) for name, thunk in cases.items()}


# ---------------------------------------------------------------------------------------------------
# The worker: one spawn per world size runs every case, so the process start-up is paid once
# ---------------------------------------------------------------------------------------------------

def triton_runs_here() -> bool:
    """Triton kernels on CPU tensors: only in the interpreter (tests/conftest.py sets it without CUDA)."""
    return gk.backends.triton_available() and gk.backends.triton_interpret()


def _if_triton(thunk: Callable[[], dict]) -> dict:
    return thunk() if triton_runs_here() else {"skipped": "Triton is not installed or TRITON_INTERPRET is not 1"}


WORLD_CASES: dict[str, Callable[[int, int, int], dict]] = {
    "ddp_module": lambda r, w, s: run_model_case("ddp_module", r, w, s),
    "fsdp_root": lambda r, w, s: run_model_case("fsdp_root", r, w, s),
    "fsdp_head_unit": lambda r, w, s: run_model_case("fsdp_head_unit", r, w, s),
    "tp_logprobs": lambda r, w, s: run_tp_logprobs(r, w, s, vocab=13),
    "tp_logprobs_empty_shard": lambda r, w, s: run_tp_logprobs(r, w, s, vocab=4 if w == 3 else 1),
    "tp_logprobs_replicated": lambda r, w, s: run_tp_logprobs(r, w, s, vocab=13, placement="replicate"),
    "tp_logprobs_torch": lambda r, w, s: run_tp_logprobs(r, w, s, vocab=13, backend="torch"),
    "tp_logprobs_triton": lambda r, w, s: _if_triton(lambda: run_tp_logprobs(r, w, s, vocab=13, backend="triton")),
    "dp_logprobs": lambda r, w, s: run_dp_logprobs(r, w, s, vocab=13),
    "dp_logprobs_replicated": lambda r, w, s: run_dp_logprobs(r, w, s, vocab=13, placement="replicate"),
    "dp_logprobs_torch": lambda r, w, s: run_dp_logprobs(r, w, s, vocab=13, backend="torch"),
    "dp_logprobs_triton": lambda r, w, s: _if_triton(lambda: run_dp_logprobs(r, w, s, vocab=13, backend="triton")),
    "tp_fused": run_tp_fused,
    "dp_group": run_dp_group,
    "bf16": run_bf16,
    "payload": run_payload,
    "errors": run_errors,
}


def worker(rank: int, world: int, seed: int, outdir: str) -> None:
    torch.set_num_threads(1)
    gk.backends.set_poison(True)
    torch.distributed.init_process_group("gloo", init_method=f"file://{outdir}/rendezvous", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        for name, case in WORLD_CASES.items():
            try:
                result = {"ok": case(rank, world, seed)}
            except Exception:  # reported by the test of this case, with the rank's traceback
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(outdir, f"{name}.{rank}.pt"))
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
