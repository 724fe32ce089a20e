"""Data parallelism for the trainer: torchrun's environment, DDP or FSDP2 around the model, the collectives.

``torchrun --nproc_per_node N -m grpo_kernels train ...`` starts N copies of the main job; each
finds torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` /
``MASTER_PORT``) and :func:`init_from_env` joins the process group: nccl when CUDA is available
(one GPU per process, ``cuda:LOCAL_RANK``), gloo otherwise. Without those variables nothing is
initialized and the trainer runs as one process, exactly as before.

The trainer never calls the model's own forward for training: it runs the body and hands the
hidden states to the fused kernels. DDP and FSDP2 act through a module's forward (DDP prepares its
gradient all-reduce there; FSDP2 gathers the root's parameters there), so every call of the model
goes through :class:`ModelCall`, whose forward runs a function on the model: ``call(fn, *args)`` is
``fn(model, *args)`` inside the wrapper's forward. Under FSDP2 the LM-head weight seen inside is
then the gathered plain tensor, the case the fused loss handles without DTensors.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel job (the default process group).

    ``rank`` / ``world_size`` are the global ones; ``local_world_size`` is the processes on this
    machine (they share its cores); ``fsdp`` picks FSDP2 ``fully_shard`` over DDP.
    """

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the logs, metrics, plots and checkpoint metadata."""
        return self.rank == 0

    def rows(self, total: int) -> slice:
        """This rank's contiguous share of ``total`` rows (``total`` divisible by the world size)."""
        n = total // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)


def in_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def exit_rank(code: int) -> NoReturn:
    """End a process torchrun started with ``code``, without interpreter finalization.

    torch 2.13 keeps a gloo process group alive past ``destroy_process_group`` (after FSDP2 training,
    and after a TRL / accelerate DDP run: references that ``gc.collect()`` does not clear), so its
    worker threads live on into interpreter finalization. A gloo thread that then releases a tensor
    with a Python object attached takes the GIL, the finalizing interpreter makes that thread exit,
    and the exit unwinds through C++ ``noexcept`` frames: ``terminate called without an active
    exception``, SIGABRT, and torchrun reports the whole (finished) job as failed. Seen on Intel AMX
    machines, about once in every few 2-process runs. Call this once everything the rank writes is
    closed: it flushes logging and the standard streams and leaves with ``os._exit``, so there is no
    finalization and no thread to race with.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def init_from_env() -> bool:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); whether this call created it.

    False when not under torchrun, or when a process group exists already (a test or a user
    script made it: it is used as it is, and its owner destroys it).
    """
    if dist.is_available() and dist.is_initialized():
        return False
    if not in_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("grpo: torchrun started this process but this torch has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def current(fsdp: bool = False) -> Optional[DataParallel]:
    """The job's DataParallel when a process group is initialized, else None (one process).

    Raises:
        ValueError: ``fsdp`` without a process group (there is nothing to shard over).
    """
    if not (dist.is_available() and dist.is_initialized()):
        if fsdp:
            raise ValueError("GRPOTrainer: fsdp=True needs an initialized torch.distributed process group; got none "
                             "(launch with torchrun --nproc_per_node N -m grpo_kernels train --fsdp ...)")
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    return DataParallel(dist.get_rank(), dist.get_world_size(), local, device, fsdp)


class ModelCall(nn.Module):
    """``call(fn, *args, **kwargs)`` runs ``fn(model, *args, **kwargs)`` inside this module's forward.

    The module DDP or ``fully_shard`` wraps, so that the body, generation and the fused loss (which
    never call the model's own forward) run where the wrapper's hooks are in force.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


def wrap(model: nn.Module, dp: Optional[DataParallel], trainable: bool) -> nn.Module:
    """``ModelCall(model)``, wrapped for ``dp``: DDP or FSDP2 for the policy, FSDP2 or nothing for the frozen reference.

    FSDP2 shards every decoder layer (each its own unit: one all-gather per layer and forward) and
    the root (embeddings, final norm, LM head: gathered in the root's forward, where the loss runs).
    A frozen model under DDP stays a plain replica: DDP has no gradient to synchronize for it, and
    each rank needs the whole model for its share of the batch anyway.
    """
    call = ModelCall(model)
    if dp is None:
        return call
    if dp.fsdp:
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "base_model", model), "layers", None)
        for layer in layers if isinstance(layers, nn.ModuleList) else []:
            fully_shard(layer)
        return fully_shard(call)
    if not trainable:
        return call
    from torch.nn.parallel import DistributedDataParallel

    # No buffer broadcast in the forward: the model's buffers (rotary tables) are never trained, and
    # generation would otherwise broadcast them on every forward (torch >= 2.13 names the switch anew).
    device_ids = [dp.device.index] if dp.device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(call, device_ids=device_ids, **no_sync)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction of the backwards inside (all but the last micro-batch), as DDP's no_sync."""
    if enabled:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def to_float(x: Tensor) -> float:
    """A 0-dim tensor or DTensor (FSDP2's clip_grad_norm_ returns one) as a Python float."""
    full = getattr(x, "full_tensor", None)
    return float(full() if full is not None else x)


def all_gather_rows(x: Tensor, dp: DataParallel) -> Tensor:
    """Every rank's ``x`` [n, ...] concatenated in rank order: [world_size * n, ...], on x's device."""
    t = x.to(dp.device).contiguous()
    parts = [torch.empty_like(t) for _ in range(dp.world_size)]
    dist.all_gather(parts, t)
    return torch.cat(parts).to(x.device)


def sum_over_ranks(x: Tensor, dp: DataParallel) -> Tensor:
    """The sum of ``x`` over ranks (a copy, on x's device)."""
    t = x.to(dp.device).clone()
    dist.all_reduce(t)
    return t.to(x.device)


def mean_over_ranks(values: dict[str, float], dp: DataParallel) -> dict[str, float]:
    """Each value averaged over ranks in one all-reduce (float64; NaN and inf propagate)."""
    keys = sorted(values)
    total = sum_over_ranks(torch.tensor([values[k] for k in keys], dtype=torch.float64), dp)
    return {k: float(v) / dp.world_size for k, v in zip(keys, total)}


def broadcast(obj: Any, dp: DataParallel) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=dp.device)
    return box[0]
