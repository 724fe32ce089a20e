"""Scale-out on torch.distributed: LM heads given as DTensors, replicated or sharded along the vocabulary.

``linear_logprobs`` and ``fused_linear_grpo_loss`` send their calls here when an argument is a
DTensor (or, for the loss, when a ``dp_group`` is given). Four layouts, fixed by the placements of
the weight (on a 1-D device mesh of W ranks) and the type of the hidden states:

============================  =======================  ============================================
weight                        hidden                   what runs
============================  =======================  ============================================
``Shard(0)`` (vocab shards)   ``Replicate`` DTensor    tensor parallel: every rank holds the same N
                                                       tokens; each computes its vocabulary shard
                                                       for them; dH is all-reduced
``Shard(0)``                  plain per-rank tensor    data parallel (a head that is its own FSDP2
                                                       unit): the ranks' hidden states and targets
                                                       are all-gathered, each rank computes its
                                                       vocabulary shard for all of them, dH is
                                                       reduce-scattered back to its owner
``Replicate``                 ``Replicate`` DTensor    every rank computes everything; no collective
``Replicate``                 plain per-rank tensor    each rank its own tokens; dW (and db) is
                                                       all-reduced to the ranks' mean
============================  =======================  ============================================

A vocabulary shard needs only per-token partial statistics of the other shards, combined exactly:
the shard's max logit ``m_r`` and log-sum ``ls_r`` (all-reduce MAX gives ``m``, then
``E = sum_r exp(m_r - m + ls_r)`` and the global pair ``lse = (m, log E)``), the target logit above
``m`` (from the shard that owns the target, 0 elsewhere, summed), and the entropy
(``H = log E + sum_r exp(m_r - m + ls_r) (H_r - ls_r - m_r + m) / E``, with ``H_r`` the entropy of the
shard's own softmax). The gradient pass recomputes the shard's logits with the *global*
lse and entropy, which makes its softmax the shard's slice of the global one; a target outside
the shard points at an extra all-zero weight row there, so no shard but the owner adds the
target's one-hot term (that row's dH term is zero; its dW row is dropped). The [V, D] weight is
never gathered and dW comes back as the matching ``Shard(0)`` gradient: the shard's rows only.

Collectives per call of a sharded head (``N`` tokens in total over the ranks for data parallel,
the shared ``N`` for tensor parallel; ``n`` this rank's tokens, ``n_max`` the largest ``n``; ``e``
bytes per element of the hidden states; fp32 partials, fp64 for fp64 inputs; ignore_index and
masked tokens are dropped first and never travel):

- validation: one all-gather of 9 int64 per rank (V, D, local V, mesh coordinate, n, layout and
  dtype flags, the bias's local V), so that every rank raises the same error for a bad layout.
- forward, data parallel only: all-gather of the hidden states (``n_max x D x e`` bytes sent per
  rank, ``W n_max x D x e`` received) and of the targets (``8 n_max``).
- forward: all-reduce MAX of ``N`` floats and all-reduce SUM of ``2 N`` floats (``3 N`` when the
  entropy is returned; the fused loss always returns it, for its metric).
- backward, data parallel only: all-gather of the loss coefficients dLoss/dlogp (and dLoss/dH_t),
  ``n_max`` (``2 n_max``) floats per rank.
- backward: dH of the N tokens in fp32 (the shards' partial dH are summed before one rounding to
  the hidden dtype): tensor parallel all-reduces ``N x D x 4`` bytes; data parallel
  reduce-scatters it (``W n_max x D x 4`` in, ``n_max x D x 4`` out per rank).

That is O(N x D) bytes, against O(V x D) for gathering the weight (at Qwen2.5-0.5B's V = 151936,
D = 896 with 8 ranks of 4096 tokens: 59 MB of bf16 hidden states vs 272 MB of weight). Locally each
rank holds the gathered hidden states for the backward (``N x D x e`` bytes) and, in the backward,
one copy of its weight shard with the extra zero row.

Gradients and the data-parallel mean: under data parallelism each rank's loss covers its own
tokens, and DDP / FSDP average the ranks' gradients. The hidden states therefore get their own
rank's gradient (the reduce-scatter sums the shards' partials of it), and the head's dW (and db)
is the mean over the mesh's ranks of their losses' gradients, as FSDP would have made it. Under
tensor parallelism every rank computes the same loss, dW is that loss's gradient and dH comes
back identical on every rank (a Replicate gradient).

The data-parallel group of the dapo / cispo / vespo token normalizer (see
:func:`grpo_kernels.policy_loss.active_token_count`) is, in this order: the ``dp_group`` argument;
for a Replicate (tensor-parallel) hidden state, no data parallelism when its mesh spans every
rank (its ranks hold the same tokens, which must not be counted twice) and an error asking for
``dp_group`` when the mesh is a sub-mesh; for plain per-rank hidden states, the default group.

The outputs are plain tensors: this rank's tokens' log-probs (and loss, metrics), identical on
every rank under tensor parallelism. Every rank of the mesh must make the same call (the
collectives run whether or not this rank's tensors need gradients).

The kernels of a shard are the ordinary backends' forward and backward, reached through one
adapter (:func:`_shard_kernels`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from . import _entry, backends
from ._checks import DataChecks, check_config
from .backends import LogprobsParams
from .config import GRPOConfig
from .policy_loss import DPGroup, GRPOLossOutput, Number, check_dp_group, grpo_loss_unchecked


@dataclass(frozen=True)
class ShardOptions:
    """The non-tensor options of one DTensor call: the public ones, the resolved backend, and what the
    kernels read (``kernel``: the single-process :class:`~grpo_kernels.backends.LogprobsParams`)."""

    temperature: float
    softcap: Optional[float]
    ignore_index: int
    return_entropy: bool
    backend: str

    @property
    def kernel(self) -> LogprobsParams:
        return LogprobsParams.make(self.temperature, self.softcap, self.return_entropy)

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def is_dtensor(*xs: object) -> bool:
    """Whether any argument is a DTensor (without importing torch.distributed.tensor when nothing could be one)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(x, mod.DTensor) for x in xs)


class MeshChecks(DataChecks):
    """The entry's data-dependent checks when the head is a DTensor: a verdict computed on a DTensor (the
    bias's finiteness, say) is made whole here, where DTensors enter, so every rank reads every rank's
    verdict and raises the same error."""

    def require(self, ok: Tensor, message, error: type = ValueError) -> None:
        super().require(ok.full_tensor() if is_dtensor(ok) else ok, message, error)


# ---------------------------------------------------------------------------------------------------
# The adapter: the only place that uses the backends' internal contract (grpo_kernels.backends)
# ---------------------------------------------------------------------------------------------------


def _shard_kernels(op: str, params: ShardOptions, *args: object):
    """Run one vocabulary shard through the selected backend's ``forward`` or ``backward``.

    forward(h [N, D], w [v, D], b [v] | None, t [N] in [0, v)) -> (logp, entropy | None, lse) of the shard's
    own softmax; backward(h, w, b, t, lse, entropy, g_logp, g_entropy, needs) -> (dh, dw, db) with the
    lse and entropy given (here: the global ones).
    """
    impl = backends.get(params.backend)
    if op == "forward":
        h, w, b, t = args
        return impl.forward(h, w, b, t, params.kernel)
    h, w, b, t, lse, ent, g_logp, g_ent, needs = args
    return impl.backward(h, w, b, t, lse, ent, g_logp, g_ent, params.kernel, needs)


# ---------------------------------------------------------------------------------------------------
# Layout: what the placements say, checked before anything runs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How the head and the tokens lie over the ranks (one per call, from the arguments' placements)."""

    mesh: object  # DeviceMesh of the weight (None: plain tensors, only with an explicit dp_group)
    sharded: bool  # weight Shard(0) along the vocabulary
    tokens_replicated: bool  # hidden is a Replicate DTensor: every rank of the mesh holds the same tokens

    @property
    def group(self):
        return self.mesh.get_group()


def _placements(x: Tensor) -> str:
    return "(" + ", ".join(str(p) for p in x.placements) + ")"


def _layout(fn: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], others: dict[str, Optional[Tensor]]) -> Layout:
    """Resolve and check the layout; raise on DTensor / plain mixes the op cannot reconcile."""
    dt = sys.modules.get("torch.distributed.tensor")
    DTensor = dt.DTensor if dt is not None else ()
    if not isinstance(weight, DTensor):
        named = {"hidden": hidden, "bias": bias, **others}
        culprits = [k for k, v in named.items() if isinstance(v, DTensor)]
        if culprits:
            raise ValueError(
                f"{fn}: weight must be a DTensor when {', '.join(culprits)} is one (the op takes the mesh from the LM "
                f"head); got a plain torch.Tensor weight with {culprits[0]} on {named[culprits[0]].device_mesh}"
            )
        return Layout(mesh=None, sharded=False, tokens_replicated=False)
    from torch.distributed.tensor import Replicate, Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{fn}: weight must be a DTensor on a 1-D device mesh; got a {mesh.ndim}-D mesh {mesh} "
                         "(pass the vocabulary-parallel sub-mesh's DTensor)")
    place = weight.placements[0]
    if type(place) is Shard and place.dim == 0:
        sharded = True
    elif isinstance(place, Replicate):
        sharded = False
    else:
        raise ValueError(f"{fn}: weight must be replicated or sharded along the vocabulary (Replicate() or Shard(0)); "
                         f"got placements {_placements(weight)}")
    if bias is not None:
        if not isinstance(bias, DTensor) or bias.device_mesh != mesh or tuple(bias.placements) != tuple(weight.placements):
            got = f"placements {_placements(bias)} on {bias.device_mesh}" if isinstance(bias, DTensor) else "a plain torch.Tensor"
            raise ValueError(f"{fn}: bias must be a DTensor laid out like weight ({_placements(weight)} on {mesh}); got {got}")
    if isinstance(hidden, DTensor):
        if hidden.device_mesh != mesh:
            raise ValueError(f"{fn}: hidden must live on weight's mesh {mesh}; got a DTensor on {hidden.device_mesh}")
        if not all(isinstance(p, Replicate) for p in hidden.placements):
            raise ValueError(f"{fn}: hidden must be a Replicate DTensor (tensor parallel: the same tokens on every rank) or a "
                             f"plain per-rank tensor (data parallel); got placements {_placements(hidden)}")
    replicated = isinstance(hidden, DTensor)
    for name, x in others.items():
        if not isinstance(x, DTensor):
            continue
        if not replicated:
            raise ValueError(f"{fn}: {name} must be a plain per-rank tensor like hidden (data parallel); got a DTensor "
                             f"with placements {_placements(x)}")
        if x.device_mesh != mesh or not all(isinstance(p, Replicate) for p in x.placements):
            raise ValueError(f"{fn}: {name} must be a plain tensor or a Replicate DTensor on weight's mesh {mesh}; got "
                             f"placements {_placements(x)} on {x.device_mesh}")
    return Layout(mesh=mesh, sharded=sharded, tokens_replicated=replicated)


def _local(x: Optional[Tensor]) -> Optional[Tensor]:
    """The rank's plain tensor (differentiable: the gradient goes back with x's placements)."""
    return x.to_local() if is_dtensor(x) else x


@dataclass(frozen=True)
class ShardSpec:
    """A sharded head's call, as every rank agreed on it in the validation all-gather."""

    group: object  # ProcessGroup of the mesh
    rank: int  # this rank in the group
    world: int
    vocab_start: int  # first vocabulary id of this rank's shard
    vocab_local: int  # rows of this rank's shard (0 is allowed: uneven shards)
    counts: tuple[int, ...]  # tokens per rank (data parallel) or (N,) * world (tensor parallel)
    gather: bool  # data parallel: gather the tokens, reduce-scatter dH
    params: ShardOptions

    @property
    def total(self) -> int:
        return sum(self.counts) if self.gather else self.counts[0]

    @property
    def own(self) -> slice:
        if not self.gather:
            return slice(0, self.counts[0])
        start = sum(self.counts[: self.rank])
        return slice(start, start + self.counts[self.rank])


def _shard_spec(fn: str, layout: Layout, weight: Tensor, bias: Optional[Tensor], hidden_dtype: torch.dtype, n: int,
                params: ShardOptions) -> ShardSpec:
    """The validation all-gather: every rank checks the same facts and raises the same error."""
    dist = torch.distributed
    group = layout.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    V, D = weight.shape
    local_v = weight.to_local().shape[0]
    # -1: no bias. A bias built with DTensor.from_local can split V unlike the weight; its shard must match the weight's
    local_b = -1 if bias is None else bias.to_local().shape[0]
    coord = layout.mesh.get_coordinate()[0]
    mine = torch.tensor([V, D, local_v, coord, n, int(layout.tokens_replicated), int(params.return_entropy),
                         _DTYPE_CODES[hidden_dtype], local_b], dtype=torch.int64, device=weight.to_local().device)
    every = torch.empty(world * mine.numel(), dtype=torch.int64, device=mine.device)
    _all_gather_into(every, mine, group)
    rows = every.reshape(world, -1).cpu().tolist()
    col = lambda j: [r[j] for r in rows]  # noqa: E731
    if len(set(col(0))) > 1:
        raise ValueError(f"{fn}: weight must have the same vocabulary size V on every rank of its mesh; got V = {col(0)} across ranks")
    if len(set(col(1))) > 1:
        raise ValueError(f"{fn}: weight must have the same hidden size D on every rank of its mesh; got D = {col(1)} across ranks")
    if sum(col(2)) != V:
        raise ValueError(f"{fn}: weight's vocabulary shards must add up to V = {V}; got local sizes {col(2)} across ranks")
    if col(8) != [-1] * world and col(8) != col(2):
        raise ValueError(f"{fn}: bias must be given on every rank or on none, sharded like weight (the same local "
                         f"vocabulary rows); got bias local sizes {col(8)} (-1: no bias) against weight's {col(2)} across ranks")
    if len(set(col(5))) > 1:
        raise ValueError(f"{fn}: hidden must be a Replicate DTensor on every rank or a plain tensor on every rank; got "
                         f"{['Replicate' if f else 'plain' for f in col(5)]} across ranks")
    if len(set(col(6))) > 1 or len(set(col(7))) > 1:
        raise ValueError(f"{fn}: every rank must make the same call (return_entropy, hidden dtype); got return_entropy "
                         f"{[bool(f) for f in col(6)]} and dtype codes {col(7)} across ranks")
    if layout.tokens_replicated and len(set(col(4))) > 1:
        raise ValueError(f"{fn}: a Replicate hidden must hold the same tokens on every rank; got {col(4)} valid tokens across ranks")
    start = sum(r[2] for r in rows if r[3] < coord)
    return ShardSpec(group=group, rank=rank, world=world, vocab_start=start, vocab_local=local_v, counts=tuple(col(4)),
                     gather=not layout.tokens_replicated, params=params)


# ---------------------------------------------------------------------------------------------------
# Collectives on rows of uneven length
# ---------------------------------------------------------------------------------------------------


def _all_gather_into(out: Tensor, x: Tensor, group: object) -> None:
    """out [W * n, ...] <- every rank's x [n, ...] (all_gather_single where this torch has it)."""
    dist = torch.distributed
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter_into(out: Tensor, x: Tensor, group: object) -> None:
    """out [n, ...] <- the sum over ranks of this rank's [n, ...] block of x [W * n, ...]."""
    dist = torch.distributed
    getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(out, x, group=group)


def _gather_rows(x: Tensor, spec: ShardSpec) -> Tensor:
    """[n_rank, ...] on each rank -> [sum n, ...] in rank order (padded to the longest for the all-gather)."""
    longest = max(spec.counts)
    pad = x if x.shape[0] == longest else torch.cat([x, x.new_zeros((longest - x.shape[0],) + tuple(x.shape[1:]))])
    out = x.new_empty((spec.world * longest,) + tuple(x.shape[1:]))
    _all_gather_into(out, pad.contiguous(), spec.group)
    if all(c == longest for c in spec.counts):
        return out
    return torch.cat([out[i * longest: i * longest + c] for i, c in enumerate(spec.counts)])


def _reduce_scatter_rows(x: Tensor, spec: ShardSpec) -> Tensor:
    """[sum n, ...] partial sums on each rank -> this rank's [n_rank, ...] rows, summed over the ranks."""
    longest = max(spec.counts)
    if all(c == longest for c in spec.counts):
        inp = x.contiguous()
    else:
        inp = x.new_zeros((spec.world * longest,) + tuple(x.shape[1:]))
        start = 0
        for i, c in enumerate(spec.counts):
            inp[i * longest: i * longest + c] = x[start: start + c]
            start += c
    out = x.new_empty((longest,) + tuple(x.shape[1:]))
    _reduce_scatter_into(out, inp, spec.group)
    return out[: spec.counts[spec.rank]]


# ---------------------------------------------------------------------------------------------------
# The sharded op
# ---------------------------------------------------------------------------------------------------


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _global_stats(h: Tensor, w: Tensor, b: Optional[Tensor], lt: Tensor, owned: Tensor, spec: ShardSpec):
    """Per-token (logp, entropy | None, lse [N, 2]) over the whole vocabulary from this shard and two all-reduces.

    Every quantity stays relative to the global max m (the backends' lse pair, see
    :class:`grpo_kernels.backends.Backend`): the shard's log-sum-exp is m_r + ls_r, its target logit
    logp_r + ls_r above m_r, so nothing of size |m| is ever subtracted in fp32.
    """
    acc = _acc_dtype(h)
    n = h.shape[0]
    want_ent = spec.params.return_entropy
    if spec.vocab_local > 0:
        logp_l, ent_l, lse_l = _shard_kernels("forward", spec.params, h, w, b, torch.where(owned, lt, torch.zeros_like(lt)))
        m_l, ls_l = lse_l[:, 0].to(acc), lse_l[:, 1].to(acc)
        yt = logp_l.to(acc) + ls_l  # the target logit above m_l (meaningful where owned)
        ent_l = None if ent_l is None else ent_l.to(acc)
    else:  # an empty shard (V not divisible by the ranks): no logits, nothing to add
        m_l = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
        ls_l = torch.zeros(n, dtype=acc, device=h.device)
        yt = torch.zeros(n, dtype=acc, device=h.device)
        ent_l = torch.zeros(n, dtype=acc, device=h.device) if want_ent else None
    dist = torch.distributed
    m = m_l.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=spec.group)
    shift = m_l - m  # <= 0; -inf for an empty shard
    e = torch.exp(shift + ls_l)
    parts = [e, torch.where(owned, yt + shift, torch.zeros((), dtype=acc))]
    if want_ent:
        # H = log E + sum_r e_r (H_r - ls_r - shift_r) / E: every term is O(log V), no cancellation
        parts.append(torch.where(e > 0, e * (ent_l - ls_l - shift), torch.zeros((), dtype=acc)))
    sums = torch.stack(parts)
    dist.all_reduce(sums, group=spec.group)
    log_e = torch.log(sums[0])
    logp = sums[1] - log_e
    ent = log_e + sums[2] / sums[0] if want_ent else None
    return logp, ent, torch.stack([m, log_e], dim=-1)


def _shard_backward(h, w, b, lt, owned, lse, ent, g_logp, g_ent, params: ShardOptions, needs):
    """This shard's (partial dH [N, D], dW [v, D] | None, db [v] | None) for the tokens' loss coefficients."""
    n, d = h.shape
    v = w.shape[0]
    if v == 0:
        return (h.new_zeros((n, d)), w.new_zeros((0, d)) if needs[1] else None,
                b.new_zeros((0,)) if needs[2] and b is not None else None)
    if bool(owned.all()):
        wk, bk, tk = w, b, lt
    else:
        # a target another shard owns points at an extra zero row: its one-hot term adds 0 to dH, and the row's dW/db are dropped
        wk = torch.cat([w, w.new_zeros((1, d))])
        bk = None if b is None else torch.cat([b, b.new_zeros((1,))])
        tk = torch.where(owned, lt, torch.full_like(lt, v))
    dh, dw, db = _shard_kernels("backward", params, h, wk, bk, tk, lse, ent, g_logp, g_ent, needs)
    return dh, None if dw is None else dw[:v], None if db is None else db[:v]


@dataclass(frozen=True)
class ShardedCall:
    """The non-differentiable part of one sharded-head call: the targets ([N] int64, ignore_index
    included), the rows of the valid tokens ([n] int64, or None when every row is valid), the
    :class:`ShardSpec` every rank agreed on (its counts are of valid tokens), and the public
    function's name for errors."""

    targets: Tensor
    rows: Optional[Tensor]
    spec: ShardSpec
    fn: str


class VocabShardedLogprobs(torch.autograd.Function):
    """Log-probs (and entropy) of this rank's valid tokens from its vocabulary shard and the others' partials.

    Takes (hidden [N, D], weight shard, bias shard | None, :class:`ShardedCall`), like
    :class:`grpo_kernels.logprobs.LinearLogprobsFunction`: the ignore_index rows are dropped here, get
    log-prob 0 (and entropy 0) and zero gradient, and never travel in a collective.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: ShardedCall):
        from .logprobs import gather_rows, scatter_rows  # here, not at the top: grpo_kernels.logprobs imports this module

        spec, rows, n = call.spec, call.rows, hidden.shape[0]
        hv, tv = gather_rows(hidden, rows), gather_rows(call.targets, rows)
        h = _gather_rows(hv, spec) if spec.gather else hv
        t = _gather_rows(tv, spec) if spec.gather else tv
        lt = t - spec.vocab_start
        owned = (lt >= 0) & (lt < spec.vocab_local)
        logp, ent, lse = _global_stats(h, weight, bias, lt, owned, spec)
        ctx.set_materialize_grads(False)
        ctx.call = call
        ctx.hidden_dtype = hidden.dtype
        ctx.n = n
        # the backward reads only what this forward derived (lt, owned: new tensors), never the caller's
        # targets, so a change to them in place after the forward cannot reach the gradient; refusing it
        # as the single-process op must (its backward re-reads the targets) would stop one rank while the
        # others wait in the backward's collectives
        ctx.save_for_backward(h, weight, bias, lt, owned, lse, ent)
        own = spec.own
        if ent is None:
            return scatter_rows(logp[own].clone(), rows, n)
        return scatter_rows(logp[own].clone(), rows, n), scatter_rows(ent[own].clone(), rows, n)

    @staticmethod
    def backward(ctx, g_logp: Optional[Tensor], g_ent: Optional[Tensor] = None):
        from .logprobs import differentiable_once, gather_rows, scatter_rows

        call: ShardedCall = ctx.call
        # every rank runs the same backward call, so all of them raise here, before any collective
        differentiable_once(call.fn)
        h, weight, bias, lt, owned, lse, ent = ctx.saved_tensors
        spec, rows = call.spec, call.rows
        n_own = spec.own.stop - spec.own.start
        # every rank runs the same collectives, so missing gradients become zeros rather than skipped work
        g_logp = lse.new_zeros(n_own) if g_logp is None else gather_rows(g_logp, rows).to(lse.dtype)
        g_ent = None if ent is None else (lse.new_zeros(n_own) if g_ent is None else gather_rows(g_ent, rows).to(lse.dtype))
        coef = torch.stack([g_logp] if ent is None else [g_logp, g_ent], dim=1)
        if spec.gather:
            coef = _gather_rows(coef, spec)
        g_l = coef[:, 0].contiguous()
        g_e = None if ent is None else coef[:, 1].contiguous()
        needs = (True, ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        dh, dw, db = _shard_backward(h, weight, bias, lt, owned, lse, ent, g_l, g_e, spec.params, needs)
        dh = dh.to(_acc_dtype(h))
        if spec.gather:
            dh = _reduce_scatter_rows(dh, spec)
            # each rank's dW sums every rank's loss; FSDP/DDP semantics want the ranks' mean
            dw = None if dw is None else dw / spec.world
            db = None if db is None else db / spec.world
        else:
            torch.distributed.all_reduce(dh, group=spec.group)
        dh = scatter_rows(dh.to(ctx.hidden_dtype), rows, ctx.n) if ctx.needs_input_grad[0] else None
        return dh, dw, db, None


class _MeanGradient(torch.autograd.Function):
    """Identity; the backward all-reduces the gradient to the group's mean (a replicated head, per-rank tokens)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: object):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        return g / torch.distributed.get_world_size(ctx.group), None


def _logprobs(fn: str, layout: Layout, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
              params: ShardOptions):
    """(logp, entropy | None) [...] of this rank's tokens; hidden, targets already local, weight/bias as given."""
    from . import logprobs as lp

    if not layout.sharded:
        w, b = _local(weight), _local(bias)
        if layout.mesh is not None and not layout.tokens_replicated:
            w = _MeanGradient.apply(w, layout.group)
            b = None if b is None else _MeanGradient.apply(b, layout.group)
        out = lp.linear_logprobs(hidden, w, targets, bias=b, temperature=params.temperature, softcap=params.softcap,
                                 ignore_index=params.ignore_index, return_entropy=params.return_entropy, backend=params.backend)
        return out if params.return_entropy else (out, None)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    rows = lp.select_rows(t != params.ignore_index) if t.numel() else None
    n_valid = t.numel() if rows is None else rows.numel()
    spec = _shard_spec(fn, layout, weight, bias, hidden.dtype, n_valid, params)
    if spec.total == 0:  # no valid token on any rank: nothing to compute, and no rank runs a collective
        # zero gradients (not None) for every input, bias included, in the single-process op's output dtype
        zero = h2.sum() * 0.0 + weight.to_local().sum() * 0.0
        if bias is not None:
            zero = zero + bias.to_local().sum() * 0.0
        acc = _acc_dtype(h2)
        logp = zero.to(acc) + torch.zeros(lead, dtype=acc, device=hidden.device)
        return logp, (logp.clone() if params.return_entropy else None)
    w = weight.to_local()
    b = None if bias is None else bias.to_local()
    out = VocabShardedLogprobs.apply(h2, w, b, ShardedCall(t, rows, spec, fn))
    logp, ent = (out if params.return_entropy else (out, None))
    return logp.reshape(lead), (None if ent is None else ent.reshape(lead))


# ---------------------------------------------------------------------------------------------------
# Public entry points (reached from grpo_kernels.linear_logprobs / fused_linear_grpo_loss)
# ---------------------------------------------------------------------------------------------------


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`grpo_kernels.linear_logprobs` with a DTensor LM head (see the module docstring for the layouts).

    Args:
        hidden: [..., D] plain per-rank hidden states (data parallel) or a Replicate DTensor on weight's
            mesh (tensor parallel).
        weight: [V, D] DTensor on a 1-D mesh, ``Replicate()`` or ``Shard(0)`` (uneven shards allowed).
        targets: [...] token ids in [0, V) or ignore_index: plain, or a Replicate DTensor with a Replicate hidden.
        bias: optional [V] DTensor laid out like weight.
        temperature, softcap, ignore_index, return_entropy, backend: as for the single-process op.

    Returns:
        logp [...] float32 (and entropy [...]) of this rank's tokens as plain tensors. Collectives
        for a Shard(0) head: the validation all-gather (9 int64 per rank); data parallel: all-gather
        of hidden and targets (n_max x D x e and 8 n_max bytes per rank); all-reduce MAX of N and SUM
        of 2N (3N with entropy) fp32; backward: data parallel all-gather of n_max (2 n_max) fp32
        coefficients, then dH in fp32 (tensor parallel all-reduce N x D x 4 bytes, data parallel
        reduce-scatter W n_max x D x 4 bytes). A replicated head with per-rank tokens all-reduces
        dW (V x D in the weight's dtype) to the ranks' mean; with a Replicate hidden nothing runs.
    """
    fn = _entry.LOGPROBS
    layout = _layout(fn, hidden, weight, bias, {"targets": targets})
    h, t = _local(hidden), _local(targets)
    name = _entry.logprobs_call(h, weight, t, bias, temperature, softcap, ignore_index, return_entropy, backend,
                                MeshChecks(fn))
    params = ShardOptions(float(temperature), None if softcap is None else float(softcap), int(ignore_index),
                          return_entropy, name)
    logp, ent = _logprobs(fn, layout, h, weight, bias, t, params)
    return (logp, ent) if return_entropy else logp


def resolve_dp_group(fn: str, layout: Layout, config: GRPOConfig, dp_group: Optional[object]) -> DPGroup:
    """The data-parallel group of the token normalizer: dp_group, else from the layout, else the default group."""
    if dp_group is not None:
        return dp_group
    if not layout.tokens_replicated:
        return None  # per-rank tokens: the default group, as on the single-head path
    if layout.mesh.size() == torch.distributed.get_world_size():
        return False  # the mesh's ranks hold the same tokens and there are no others: no data parallelism
    if config.loss_type in ("dapo", "cispo", "vespo"):
        raise ValueError(
            f"{fn}: dp_group is required for loss_type={config.loss_type!r} with a Replicate hidden on a sub-mesh "
            f"(the mesh's {layout.mesh.size()} ranks hold the same tokens, so the data-parallel group is not the default "
            f"group of {torch.distributed.get_world_size()}); got dp_group=None. Pass e.g. mesh['dp'].get_group()"
        )
    return False


def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    advantages: Tensor,
    config: GRPOConfig,
    *,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    is_ratio: Optional[Tensor] = None,
    num_items_in_batch: Optional[Number] = None,
    backend: str = "auto",
    dp_group: Optional[object] = None,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.fused_linear_grpo_loss` with a DTensor LM head, or with an explicit dp_group.

    Two passes: the sharded log-probs and entropy of the completion tokens (the collectives of
    :func:`linear_logprobs` with the entropy, masked tokens dropped), the GRPO loss on them
    (``grpo_loss``'s code, so every loss_type works), then the gradient pass through autograd.
    Shapes as for the single-process op (this rank's [B, T] tokens; hidden a plain [B, T, D] or a
    Replicate DTensor); ``dp_group`` overrides the data-parallel group of the dapo / cispo / vespo
    normalizer (module docstring). With plain tensors and a dp_group the loss runs on the local head.
    """
    fn = _entry.FUSED
    check_config(fn, config)  # first, as on the single-process path: a bad config is named before the layout
    others = {"completion_ids": completion_ids, "mask": mask, "advantages": advantages, "old_logp": old_logp,
              "ref_logp": ref_logp, "is_ratio": is_ratio}
    layout = _layout(fn, hidden, weight, bias, others)
    h = _local(hidden)
    ids, mask, advantages, old_logp, ref_logp, is_ratio = (_local(others[k]) for k in others)
    groups = []

    def dp_group_checks() -> None:
        check_dp_group(fn, dp_group)
        groups.append(resolve_dp_group(fn, layout, config, dp_group) if layout.mesh is not None else dp_group)

    name = _entry.fused_call(h, weight, ids, mask, advantages, config, old_logp, ref_logp, bias, is_ratio,
                             num_items_in_batch, backend, MeshChecks(fn), more=dp_group_checks)
    (group,) = groups
    params = ShardOptions(config.temperature, config.logit_softcap, -100, True, name)
    detach = lambda x: None if x is None else x.detach()  # noqa: E731
    mask, advantages, old_logp, ref_logp, is_ratio = map(detach, (mask, advantages, old_logp, ref_logp, is_ratio))
    targets = torch.where(mask != 0, ids.long(), torch.full_like(ids, -100, dtype=torch.long))
    logp, ent = _logprobs(fn, layout, h, weight, bias, targets, params)
    out = grpo_loss_unchecked(logp, advantages, mask, config, old_logp=old_logp, ref_logp=ref_logp, is_ratio=is_ratio,
                     num_items_in_batch=num_items_in_batch, entropy=ent, dp_group=group)
    out_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    return GRPOLossOutput(loss=out.loss.to(out_dtype), metrics={k: torch.as_tensor(v).detach().float() for k, v in out.metrics.items()})
