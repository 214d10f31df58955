"""The one training loop (`Fit`) the tokenizers, pretraining and fine-tuning all run, and what it
stands on: progress reporting, the LR schedule, metric logs, the torchrun / DDP process group.

    fit = Fit("pretrain", model, opt, total_steps=…, warmup_steps=…, grad_clip=…, device=…)
    step = fit.run(step_fn, start=step, stop=stop, log_every=10, on_log=…, hooks=[(100, save)])

A stage supplies `step_fn(step) → StepOut(loss, metrics, n)`: its batch and forward pass, run under
the precision context the loop chose once. The loop does the rest the same way for every stage: the
per-iteration learning rate, a non-finite loss stopping every rank together with the step number,
the backward pass, gradient clipping, the optimizer step, averaging metrics over the steps between
log rows (and over ranks), progress, and periodic hooks (validation, checkpoints, panels).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from vqmae.utils import autocast_context

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


class MetricsLog:
    """Append-only JSON lines (`metrics.jsonl`), one object per row; a no-op off rank 0 or without
    a path. Where the `tensorboard` package is installed (`pip install 'vqmae[tensorboard]'`), the
    numeric fields of every row also go to TensorBoard event files in ``tensorboard/`` beside it,
    at the row's ``step`` (or ``epoch``): ``tensorboard --logdir runs/``."""

    def __init__(self, path: str | os.PathLike | None, info: Dist = Dist()):
        self.path = Path(path) if path is not None and info.main else None
        self.board = _summary_writer(self.path.parent / "tensorboard") if self.path is not None else None

    def write(self, row: Mapping[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(row)) + "\n")
        if self.board is not None:
            step = row.get("step", row.get("epoch"))
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, step)
            self.board.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (its files and thread); the JSON lines need nothing."""
        if self.board is not None:
            self.board.close()
            self.board = None


def _summary_writer(directory: Path) -> Any:
    """A TensorBoard SummaryWriter on `directory`, or None without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))


@dataclass
class StepOut:
    """What a stage's step function returns: the loss to minimise (a scalar tensor), metrics to log
    (floats or 0-d tensors, the same keys every step on every rank) and this rank's sample count."""

    loss: torch.Tensor
    metrics: Mapping[str, Any] = field(default_factory=dict)
    n: int = 0


def adamw(groups: Any, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over every parameter: 6× faster steps on CPU than
    the per-tensor loop) wherever torch has it for these parameters' device and dtype."""
    groups = list(groups)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, **kwargs)


def base_lrs(opt: torch.optim.Optimizer) -> list[float]:
    """Each parameter group's configured learning rate (read this before a resume loads optimizer
    state, which carries the last scheduled value)."""
    return [float(g.get("base_lr", g["lr"])) for g in opt.param_groups]


class Fit:
    """One optimisation loop; see the module docstring.

    `model` is the unwrapped module (gradients are clipped over its parameters); `step_fn` may call
    a DDP / compiled wrapper of it. `bases` are the groups' peak learning rates (`base_lrs`), each
    scheduled with warm-up and cosine decay over `total_steps`.
    """

    def __init__(self, name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, *,
                 total_steps: int, warmup_steps: int, grad_clip: float, bases: Sequence[float],
                 device: str = "cpu", info: Dist = Dist(), reporter: Reporter = Reporter()):
        self.name, self.model, self.opt = name, model, opt
        self.total_steps, self.warmup_steps, self.grad_clip = total_steps, warmup_steps, grad_clip
        self.bases = list(bases)
        self.device, self.info, self.reporter = device, info, reporter
        if len(self.bases) != len(opt.param_groups):
            raise ValueError(f"{name}: {len(self.bases)} base learning rates for "
                             f"{len(opt.param_groups)} parameter groups")

    def run(self, step_fn: Callable[[int], StepOut], *, start: int, stop: int, log_every: int,
            on_log: Callable[[int, dict[str, float]], None] | None = None,
            hooks: Sequence[tuple[int, Callable[[int], None]]] = (),
            keys: Sequence[str] | None = None,
            progress: Callable[[dict[str, float]], dict[str, Any]] | None = None) -> int:
        """Steps `start` → `stop`; returns `stop`.

        Every `log_every` steps (and at `stop`) the metrics of the steps since the last row are
        averaged (`keys`: the fixed set to average, NaN where absent; default: the first step's
        keys plus loss/total and grad_norm), averaged over ranks, and passed with `step`, `lr` and
        `samples_per_s` to `on_log(step, row)`. Each hook `(period, fn)` runs `fn(step)` after every
        `period`-th step and at `stop`, in the order given.
        """
        ctx = autocast_context(self.device)
        self.reporter.start(self.name, self.total_steps)
        self.reporter.advance(self.name, start)
        window: list[dict[str, torch.Tensor]] = []
        finite: torch.Tensor | None = None  # all losses since the last check finite
        t0, n_samples, last_log = time.perf_counter(), 0, start
        step = start
        while step < stop:
            for group, base in zip(self.opt.param_groups, self.bases):
                group["lr"] = lr_at(step, base, self.warmup_steps, self.total_steps)
            with ctx:
                out = step_fn(step)
            loss = out.loss.float()
            # no host sync per step: finiteness is accumulated on the device and checked when a
            # row is logged or a hook is due (before any checkpoint could be written)
            finite = torch.isfinite(loss.detach()) if finite is None else finite & torch.isfinite(loss.detach())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.opt.step()
            step += 1
            n_samples += out.n * self.info.world_size
            window.append({"loss/total": loss.detach(), "grad_norm": grad_norm.detach(),
                           **{k: torch.as_tensor(v).detach().to(loss.device) for k, v in out.metrics.items()}})
            due = step % log_every == 0 or step == stop or any(step % p == 0 for p, _ in hooks)
            if due:
                self._check_finite(finite, step)
                finite = None
            if step % log_every == 0 or step == stop:
                row = self._row(window, keys, step, n_samples, t0)
                window = []
                if on_log is not None:
                    on_log(step, row)
                self.reporter.advance(self.name, step - last_log, **(progress(row) if progress else
                                                                     {"loss": row["loss/total"]}))
                last_log = step
            for period, fn in hooks:
                if step % period == 0 or step == stop:
                    fn(step)
        self.reporter.finish(self.name)
        return step

    def _check_finite(self, finite: torch.Tensor | None, step: int) -> None:
        """Raise when a loss since the last check was NaN / inf, on every rank at once (one rank
        raising alone would leave the others waiting in the next collective)."""
        if finite is None:
            return
        ok = finite.to(torch.int32)
        if self.info.enabled:
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if not bool(ok):
            raise FloatingPointError(f"{self.name}: non-finite loss (rank {self.info.rank}) at or "
                                     f"before step {step}")

    def _row(self, window: list[dict[str, torch.Tensor]], keys: Sequence[str] | None, step: int,
             n_samples: int, t0: float) -> dict[str, float]:
        """The window's per-key means (one host transfer for all of them)."""
        keys = list(keys) if keys is not None else list(window[0])
        means = [torch.stack([w[k].float().reshape(()) for w in window if k in w]).mean()
                 if any(k in w for w in window) else None for k in keys]
        values = torch.stack([m for m in means if m is not None]).tolist() if any(m is not None for m in means) else []
        it = iter(values)
        row = {k: (next(it) if m is not None else math.nan) for k, m in zip(keys, means)}
        row = all_reduce_mean(row, self.info, self.device)
        return {"step": step, "lr": self.opt.param_groups[0]["lr"],
                "samples_per_s": n_samples / max(time.perf_counter() - t0, 1e-9), **row}
