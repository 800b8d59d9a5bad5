"""Data-parallel training under torchrun: process group, rank, and the few collectives the engine needs.

`torchrun --nproc_per_node=N -m pipeline run TASK` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE set; each
trains on its shard of every epoch (pipeline/data/sampling.py) with gradients averaged by DistributedDataParallel.
Only rank 0 talks to MLflow and writes checkpoints. A plain `pipeline run` is world size 1 and none of this runs.
`data.batch_size` is per process, as in torchvision's references: the global batch is batch_size x N.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init() -> Context:
    """The process group torchrun asked for (NCCL on GPUs, gloo on CPU), or a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context()
    ctx = Context(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return ctx


def shutdown(ctx: Context) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def device_for(ctx: Context, device: torch.device) -> torch.device:
    """Each process of a node takes its own GPU."""
    return torch.device("cuda", ctx.local_rank) if ctx.active and device.type == "cuda" else device


def broadcast(ctx: Context, value):
    """Rank 0's `value` on every rank (a run id, a decision)."""
    if not ctx.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(ctx: Context, value: torch.Tensor) -> torch.Tensor:
    """The average of a scalar tensor over ranks (logged losses)."""
    if not ctx.active:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / ctx.world


def all_true(ctx: Context, flag: torch.Tensor) -> torch.Tensor:
    """Whether `flag` holds on every rank: all ranks must agree to skip a step, or DDP waits forever."""
    if not ctx.active:
        return flag
    value = flag.detach().to(torch.int32).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


def merge_evaluators(ctx: Context, evaluator):
    """Every rank's evaluator (each saw its shard of the validation set) merged into one, on every rank."""
    if not ctx.active:
        return evaluator
    parts = [None] * ctx.world
    dist.all_gather_object(parts, evaluator)
    merged = parts[0]
    for other in parts[1:]:
        merged.merge(other)
    return merged


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


class DDP(DistributedDataParallel):
    """DistributedDataParallel that lets task code reach the wrapped model's attributes (`model.head`, ...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(ctx: Context, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not ctx.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
