"""Pieces every training loop shares: progress reporting, the LR schedule, the precision context and
the torchrun / DDP process group."""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


class Reporter:
    """Progress callbacks; the default does nothing (library code never prints)."""

    def start(self, name: str, total: int | None) -> None: ...
    def advance(self, name: str, n: int = 1, **fields: Any) -> None: ...
    def finish(self, name: str) -> None: ...


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 0, evaluated per iteration."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast_context(device: str | torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere (chosen once per loop)."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Dist, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.

    Returns the rank info and this process's device (cuda:LOCAL_RANK under torchrun on GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    log.info("rank %d of %d on %s", rank, world, device)
    return Dist(rank, world, local), device


def all_reduce_mean(values: dict[str, float], info: Dist, device: str) -> dict[str, float]:
    """Average scalar metrics over ranks, ignoring NaN (a metric a rank had no data for).

    Every rank must pass the same keys (use NaN for "no value"); identity on one process."""
    if not info.enabled or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    v = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    ok = torch.isfinite(v)
    both = torch.stack([torch.where(ok, v, torch.zeros_like(v)), ok.double()])  # [2, K]
    dist.all_reduce(both)
    mean = both[0] / both[1]  # NaN where no rank had a value
    return dict(zip(keys, mean.tolist()))
