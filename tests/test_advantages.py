"""group_advantages: every backend against hand-worked values and the float64 oracle of reference.py."""

from __future__ import annotations

import importlib
import math
from fractions import Fraction

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference
from oracle import assert_close_to_oracle, available_backends

BACKENDS = available_backends()
ESTIMATORS = ("grpo", "rloo")
SCALES = ("group", "batch", "none")
NAN = float("nan")


def random_rewards(n_rows: int, n_cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rewards with some unscored entries and some wholly unscored (missing) samples."""
    r = torch.randn(n_rows, n_cols, dtype=torch.float64)
    r[torch.rand(n_rows, n_cols) < 0.2] = NAN
    r[torch.rand(n_rows) < 0.1] = NAN
    return r.to(dtype)


def random_group_ids(n_rows: int) -> torch.Tensor:
    """Shuffled labels of groups of varying sizes (1 to 6), with negative and huge label values."""
    sizes = []
    while sum(sizes) < n_rows:
        sizes.append(min(int(torch.randint(1, 7, ())), n_rows - sum(sizes)))
    values = torch.randperm(10 * len(sizes))[: len(sizes)] * 10**10 - 5 * 10**10
    labels = torch.repeat_interleave(values, torch.tensor(sizes))
    return labels[torch.randperm(n_rows)]


def advantages(backend: str, rewards: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """gk.group_advantages on the device the backend runs on here (Triton: CUDA unless interpreted), back on CPU."""
    device = "cuda" if backend == "triton" and not gk.backends.triton_interpret() else "cpu"

    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    out = gk.group_advantages(move(rewards), *map(move, args), backend=backend, **{k: move(v) for k, v in kwargs.items()})
    assert out.device.type == device
    return out.cpu()


def grouping_kwargs(grouping: str, n_rows: int, group_size: int) -> dict:
    if grouping == "equal":
        return {"group_size": group_size}
    return {"group_ids": random_group_ids(n_rows)}


# ---------------------------------------------------------------------------------------------------
# hand-worked values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_pairs_by_hand(backend, estimator, scale):
    # groups {1, 0} and {0, 1}: mean 1/2; group std sqrt(1/2); batch std of [1, 0, 0, 1] = sqrt(1/3);
    # grpo centers to +-1/2, rloo to +-1 (the other member is the baseline)
    eps = 1e-4
    centered = 0.5 if estimator == "grpo" else 1.0
    std = {"group": math.sqrt(0.5), "batch": math.sqrt(1 / 3), "none": None}[scale]
    a = centered if std is None else centered / (std + eps)
    adv = advantages(backend, torch.tensor([1.0, 0.0, 0.0, 1.0]), 2, scale=scale, estimator=estimator)
    expected = torch.tensor([a, -a, -a, a], dtype=torch.float64)
    assert adv.dtype == torch.float32 and adv.shape == (4,)
    assert_close_to_oracle(backend, adv, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_nan_and_labels_by_hand(backend):
    rewards = torch.tensor([[1.0, NAN], [NAN, NAN], [3.0, 1.0], [0.0, 2.0], [2.0, 0.5]])
    group_ids = torch.tensor([7, 7, 7, -1, 7])
    # R = [1, missing, 3 + 2 * 1, 0 + 2 * 2, 2 + 2 * 0.5] = [1, -, 5, 4, 3]; group 7 = {1, 5, 3}: mean 3,
    # unbiased std 2; leave-one-out baselines 4, 2, 3; group -1 has one member: 0; the missing sample: 0
    kw = dict(group_ids=group_ids, reward_weights=[1.0, 2.0], eps=0.0)
    grpo = advantages(backend, rewards, **kw)
    rloo = advantages(backend, rewards, estimator="rloo", scale="none", **kw)
    assert_close_to_oracle("grpo", grpo, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert_close_to_oracle("rloo", rloo, torch.tensor([-3.0, 0.0, 3.0, 0.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# against the oracle
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouping", ["equal", "ids"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle(seed, backend, estimator, scale, grouping):
    n_rows, n_cols = 24, 3
    rewards = random_rewards(n_rows, n_cols)
    weights = torch.rand(n_cols) + 0.5
    kw = dict(grouping_kwargs(grouping, n_rows, group_size=4), scale=scale, estimator=estimator, reward_weights=weights)
    adv = advantages(backend, rewards, **kw)
    assert gk.last_backend("group_advantages") == ("torch" if backend == "cpu" else backend)
    assert adv.dtype == torch.float32 and adv.shape == (n_rows,)
    assert_close_to_oracle(backend, adv, reference.group_advantages(rewards, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_dtypes(seed, backend, dtype):
    rewards = random_rewards(12, 2, dtype)
    adv = advantages(backend, rewards, 3, reward_weights=torch.tensor([1.0, 0.25]))
    expected = reference.group_advantages(rewards, 3, reward_weights=[1.0, 0.25])
    # bf16/fp16 rewards are upcast, not computed in half precision: the oracle sees the same values
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # float64: the oracle's own rounding, and eps passed to a GPU kernel as a float32 scalar
    assert_close_to_oracle(backend, adv, expected, floor=1e-10 if dtype == torch.float64 else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(seed, backend):
    # [B] equals [B, 1]; strided (transposed) rewards are read in place
    r = torch.randn(8)
    assert torch.equal(advantages(backend, r, 4), advantages(backend, r[:, None], 4))
    strided = random_rewards(20, 5).T.contiguous().T
    assert not strided.is_contiguous()
    ids = (random_group_ids(20) // 10**10).to(torch.int32)
    weights = torch.rand(5)
    adv = advantages(backend, strided, group_ids=ids, reward_weights=weights)
    assert_close_to_oracle(backend, adv, reference.group_advantages(strided, group_ids=ids, reward_weights=weights))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
@pytest.mark.parametrize("scale", SCALES)
def test_triton_loops_over_blocks(seed, monkeypatch, scale):
    # blocks smaller than a group and than the reward columns, so every loop of the kernels runs several times
    kernels = importlib.import_module("grpo_kernels.backends.triton.advantages")
    monkeypatch.setattr(kernels, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(kernels, "MAX_BLOCK_R", 2)
    rewards = random_rewards(90, 5)
    ids = torch.cat([torch.zeros(50, dtype=torch.long), random_group_ids(40) + 1])[torch.randperm(90)]
    kw = dict(group_ids=ids, scale=scale, estimator="rloo", reward_weights=torch.rand(5))
    adv = advantages("triton", rewards, **kw)
    assert_close_to_oracle("triton", adv, reference.group_advantages(rewards, **kw))


# ---------------------------------------------------------------------------------------------------
# the edge cases: zero variance, groups of one, missing samples
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_variance_group_is_exactly_zero(seed, backend, estimator, scale, dtype):
    # the mean of seven 0.1s rounds away from 0.1 (in float32 and float64), so x - mean is not 0: only an
    # explicit rule gives exactly 0; a missing member does not break the tie; eps = 0 must not give 0 / 0
    rewards = torch.cat([torch.full((8,), 0.1), torch.randn(8), torch.full((8,), 0.7)]).to(dtype)
    rewards[7] = NAN
    for eps in (1e-4, 0.0):
        adv = advantages(backend, rewards, 8, scale=scale, estimator=estimator, eps=eps)
        assert torch.equal(adv[:8], torch.zeros(8, dtype=dtype)), adv
        assert torch.equal(adv[16:], torch.zeros(8, dtype=dtype)), adv
        assert bool(torch.isfinite(adv).all()) and bool((adv[8:16] != 0).all()), adv


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_of_one_and_missing_samples_get_zero(seed, backend, estimator):
    kw = dict(estimator=estimator)
    for scale in SCALES:
        assert torch.equal(advantages(backend, torch.randn(5, 2), 1, scale=scale, **kw), torch.zeros(5))
        assert torch.equal(advantages(backend, torch.randn(1), 1, scale=scale, **kw), torch.zeros(1))
        assert torch.equal(advantages(backend, torch.full((4, 3), NAN), 2, scale=scale, **kw), torch.zeros(4))
    # a group left with one scored member, and a group with none
    rewards = torch.tensor([[0.3, NAN], [NAN, NAN], [NAN, NAN], [NAN, NAN], [1.0, 2.0], [0.0, NAN]])
    assert torch.equal(advantages(backend, rewards, 2, **kw)[:4], torch.zeros(4))
    assert advantages(backend, torch.empty(0, 2), 3, **kw).shape == (0,)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_sample_is_as_if_absent(seed, backend, scale):
    # NaN never poisons a group: the others get what they would get without the missing sample
    rewards = random_rewards(16, 2)
    rewards[5] = NAN
    ids = random_group_ids(16)
    keep = torch.arange(16) != 5
    with_missing = advantages(backend, rewards, group_ids=ids, scale=scale)
    without = advantages(backend, rewards[keep], group_ids=ids[keep], scale=scale)
    assert with_missing[5] == 0
    assert_close_to_oracle(backend, with_missing[keep], without.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_groupings_agree(seed, backend):
    # group_size is the special case of consecutive labels; any relabelling or shuffle of the samples
    # (with their labels) permutes the result
    rewards = random_rewards(12, 2)
    by_size = advantages(backend, rewards, 4, scale="batch")
    labels = torch.randperm(3)[torch.arange(12) // 4] * 7 - 3
    assert_close_to_oracle(backend, advantages(backend, rewards, group_ids=labels, scale="batch"),
                           by_size.double())
    perm = torch.randperm(12)
    shuffled = advantages(backend, rewards[perm], group_ids=labels[perm], scale="batch")
    assert_close_to_oracle(backend, shuffled, by_size[perm].double())


# ---------------------------------------------------------------------------------------------------
# dispatch and what the output is
# ---------------------------------------------------------------------------------------------------


def test_auto_on_cpu_runs_torch_and_is_not_differentiable(monkeypatch):
    monkeypatch.delenv("GRPO_KERNELS_BACKEND", raising=False)
    rewards = torch.randn(6, requires_grad=True)
    before = rewards.detach().clone()
    adv = gk.group_advantages(rewards, 3)
    assert gk.last_backend("group_advantages") == "torch"
    assert not adv.requires_grad and adv.device == rewards.device
    assert torch.equal(rewards.detach(), before)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="group_advantages: backend='triton' needs CUDA tensors"):
        gk.group_advantages(torch.randn(4), 2, backend="triton")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", SCALES)
def test_cuda_auto_runs_triton(seed, scale, estimator):
    rewards = random_rewards(4096, 3).cuda()
    kw = dict(group_ids=random_group_ids(4096).cuda(), scale=scale, estimator=estimator,
              reward_weights=torch.tensor([1.0, 0.5, 2.0], device="cuda"))
    adv = gk.group_advantages(rewards, **kw)
    assert gk.last_backend("group_advantages") == "triton" and adv.is_cuda
    assert_close_to_oracle("triton", adv.cpu(), reference.group_advantages(rewards, **kw).cpu())


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------

R4 = torch.zeros(4, 2)
BAD_CALLS = [
    ("rewards-not-tensor", lambda: gk.group_advantages([1.0, 0.0], 2), TypeError, "rewards must be a torch.Tensor"),
    ("rewards-int", lambda: gk.group_advantages(torch.ones(4, dtype=torch.long), 2), TypeError,
     "rewards must have a floating dtype"),
    ("rewards-3d", lambda: gk.group_advantages(torch.zeros(4, 2, 1), 2), ValueError,
     r"rewards must be \[B\] or \[B, R\].*got shape \(4, 2, 1\)"),
    ("rewards-0d", lambda: gk.group_advantages(torch.tensor(1.0), 1), ValueError, r"rewards must be \[B\]"),
    ("rewards-no-columns", lambda: gk.group_advantages(torch.zeros(4, 0), 2), ValueError, r"rewards must be \[B\] or \[B, R\] with R >= 1; got shape \(4, 0\)"),
    ("neither-grouping", lambda: gk.group_advantages(R4), ValueError,
     "exactly one of group_size and group_ids must be given; got neither"),
    ("both-groupings", lambda: gk.group_advantages(R4, 2, torch.zeros(4, dtype=torch.long)), ValueError,
     "exactly one of group_size and group_ids must be given; got both"),
    ("group-size-zero", lambda: gk.group_advantages(R4, 0), ValueError, "group_size must be a positive int; got 0"),
    ("group-size-float", lambda: gk.group_advantages(R4, 2.0), ValueError, "group_size must be a positive int; got 2.0"),
    ("group-size-bool", lambda: gk.group_advantages(R4, True), ValueError, "group_size must be a positive int; got True"),
    ("group-size-not-dividing", lambda: gk.group_advantages(R4, 3), ValueError,
     "group_size must divide the batch size B = 4; got 3"),
    ("group-ids-list", lambda: gk.group_advantages(R4, group_ids=[0, 0, 1, 1]), TypeError,
     "group_ids must be a torch.Tensor; got list"),
    ("group-ids-float", lambda: gk.group_advantages(R4, group_ids=torch.zeros(4)), TypeError,
     "group_ids must be an integer tensor.*got float32"),
    ("group-ids-bool", lambda: gk.group_advantages(R4, group_ids=torch.zeros(4, dtype=torch.bool)), TypeError,
     "group_ids must be an integer tensor.*got bool"),
    ("group-ids-shape", lambda: gk.group_advantages(R4, group_ids=torch.zeros(4, 1, dtype=torch.long)), ValueError,
     r"group_ids must have shape \[B\] = \(4,\); got \(4, 1\)"),
    ("group-ids-device", lambda: gk.group_advantages(R4, group_ids=torch.zeros(4, dtype=torch.long, device="meta")),
     ValueError, "group_ids must be on rewards' device cpu; got meta"),
    ("scale", lambda: gk.group_advantages(R4, 2, scale="std"), ValueError,
     "scale must be one of group, batch, none; got 'std'"),
    ("estimator", lambda: gk.group_advantages(R4, 2, estimator="ppo"), ValueError,
     "estimator must be one of grpo, rloo; got 'ppo'"),
    ("weights-shape", lambda: gk.group_advantages(R4, 2, reward_weights=torch.ones(3)), ValueError,
     r"reward_weights must have shape \[R\] = \(2,\).*got \(3,\)"),
    ("weights-1d-rewards", lambda: gk.group_advantages(torch.zeros(4), 2, reward_weights=[1.0, 1.0]), ValueError,
     r"reward_weights must have shape \[R\] = \(1,\)"),
    ("weights-nan", lambda: gk.group_advantages(R4, 2, reward_weights=[1.0, NAN]), ValueError,
     "reward_weights must be finite; got"),
    ("weights-inf", lambda: gk.group_advantages(R4, 2, reward_weights=torch.tensor([1.0, float("inf")])), ValueError,
     "reward_weights must be finite"),
    # an int or Fraction beyond float64 used to escape as a raw OverflowError from float()
    ("weights-int-beyond-f64", lambda: gk.group_advantages(R4, 2, reward_weights=[1, 10**400]), ValueError,
     r"reward_weights must be finite in float64 \(\|w\| <= 1.798e\+308\); got a value of type int beyond that at index 1$"),
    ("weights-fraction-beyond-f64", lambda: gk.group_advantages(R4, 2, reward_weights=[Fraction(-10**400), 1.0]),
     ValueError, "reward_weights must be finite in float64 .*; got a value of type Fraction beyond that at index 0$"),
    ("weights-strings", lambda: gk.group_advantages(R4, 2, reward_weights=["a", "b"]), TypeError,
     "reward_weights must be a tensor or a sequence of numbers"),
    ("weights-bool", lambda: gk.group_advantages(R4, 2, reward_weights=torch.ones(2, dtype=torch.bool)), TypeError,
     "reward_weights must be a real-valued tensor; got bool"),
    ("weights-device", lambda: gk.group_advantages(R4, 2, reward_weights=torch.ones(2, device="meta")), ValueError,
     "reward_weights must be on rewards' device cpu; got meta"),
    ("eps-negative", lambda: gk.group_advantages(R4, 2, eps=-1e-4), ValueError, "eps must be a finite number >= 0; got -0.0001"),
    ("eps-nan", lambda: gk.group_advantages(R4, 2, eps=NAN), ValueError, "eps must be a finite number >= 0; got nan"),
    ("eps-none", lambda: gk.group_advantages(R4, 2, eps=None), ValueError, "eps must be a finite number >= 0; got None"),
    ("eps-int-beyond-f64", lambda: gk.group_advantages(R4, 2, eps=10**400), ValueError,
     "eps must be a finite number >= 0; got 1000"),  # used to be a raw OverflowError from math.isfinite
    ("backend", lambda: gk.group_advantages(R4, 2, backend="cuda"), ValueError,
     "backend must be one of auto, cpu, triton, torch; got 'cuda'"),
    ("backend-cpu-on-meta", lambda: gk.group_advantages(torch.zeros(4, device="meta"), 2, backend="cpu"), ValueError,
     "backend='cpu' needs CPU tensors; got tensors on meta"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_validation(call, error, match):
    with pytest.raises(error, match="^group_advantages: " + match):
        call()
