"""torchrun support: one process per device, DistributedDataParallel, rank 0 writes.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..device import torch_device


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str) -> tuple[Context, torch.device]:
    """Join the process group torchrun described (nccl on GPUs, gloo on CPU) and pick this
    process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(), torch_device(device)
    ctx = Context(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    target = torch_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return ctx, target


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sum_across(ctx: Context, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of per-rank numbers (counts, loss sums) over all ranks."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def average_batchnorm(ctx: Context, model: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks, so every rank evaluates and saves the
    same model (DDP synchronises gradients, not buffers updated in the last forward)."""
    if not ctx.enabled:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                if buffer is None:
                    continue
                dist.all_reduce(buffer)
                buffer.div_(ctx.world)
