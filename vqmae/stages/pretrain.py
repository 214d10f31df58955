"""Stage 2: masked-token pretraining on a token store.

    pretrain(store, cfg, run_dir) → run_dir/mae.pt, metrics.jsonl, summary.json

One loop for one process or many (`torchrun`: DDP, NCCL on GPU, gloo on CPU). Every source of
randomness is a function of (seed, step): the window batch (`WindowPlan`), and the masking generator
seeded per step. So a run resumed from a checkpoint at step k continues exactly the trajectory of an
uninterrupted run, and N processes follow one process's trajectory (within float tolerance):

* Masks are drawn for the GLOBAL batch on every rank (`GlobalMasking`: its padding follows from the
  windows' clip lengths and starts, no codes exchanged), and each rank keeps its own slice, so the
  masking of a sample does not depend on the number of ranks.
* Each rank's CE is its summed per-token CE over (global masked-token count / world size), so
  DDP's gradient mean is the gradient of the global mean, and the mean over ranks of the logged CE,
  accuracy and loss is the global batch's. The contrastive term is over the global batch too.
* Resume is decided by rank 0 alone: it loads and checks the checkpoint and broadcasts the state.

Exactness holds for stores loaded into RAM (`pretrain.ram_limit_gb`). A store streamed from disk
resumes at the start of the epoch containing the checkpoint's step (see `WindowData.train_loader`),
so windows of that epoch are seen again.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqmae.checkpoint import (ParentMismatchError, check_parents, check_resume, load_checkpoint, restore_rng,
                              save_checkpoint, store_parents, store_tokenizers)
from vqmae.config import Config, resolve_modalities
from vqmae.models.layout import MAEDims
from vqmae.models.mae import MAEModel
from vqmae.models.masking import Bounds
from vqmae.recon import predicted_codes, save_panels
from vqmae.store import TokenStore
from vqmae.training import Dist, Fit, MetricsLog, Reporter, StepOut, adamw, base_lrs, init_distributed
from vqmae.utils import atomic_write_json, autocast_context
from vqmae.windows import (WindowBatch, WindowData, batch_dict, make_batch, position_counts, tile_windows,
                           unigram_baseline)

log = logging.getLogger(__name__)

CKPT_NAME = "mae.pt"
# Seeds of the per-step masking generators: far from the seeds used for splits and windows.
MASK_SEED_OFFSET = 7_919


class PretrainError(RuntimeError):
    """A run that must not start or continue (tokenizer mismatch, other config on resume, ...)."""


def mask_generator(seed: int, step: int, device: str) -> torch.Generator:
    """The masking randomness of one global batch (the same on every rank): a pure function of
    its arguments."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + MASK_SEED_OFFSET) * 4_099 + step)
    return g


def gather_rows(x: torch.Tensor, info: Dist) -> torch.Tensor:
    """This rank's rows `[b, ...]` → every rank's, in rank order `[world × b, ...]`; only this
    rank's slice keeps its gradient (the others arrive detached). Identity on one process."""
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts)


@dataclass
class StepMasks:
    """The masking of one global batch, as one rank needs it."""

    mask: dict[str, torch.Tensor]  # [b, N] bool, this rank's slice of the global masks
    count: dict[str, torch.Tensor]  # [] masked valid tokens in the global batch
    fraction: dict[str, torch.Tensor]  # [] masked share of the global batch's valid patches
    bounds: Bounds | None  # host-known bounds of the counts (vqmae.models.masking.Bounds)


class GlobalMasking:
    """Masks of a global batch, drawn identically on every rank from its windows alone.

    A window's valid frames of modality m are `clamp(length − start × ratio, 0, frames)` (valid
    frames are a prefix), so its patch padding and the valid ids of each patch follow without
    reading codes; `model.sample_masking` then draws the global batch's masks with one generator.
    """

    def __init__(self, model: MAEModel, data: WindowData, device: str):
        self.model = model
        self.lengths = {m: torch.as_tensor(np.asarray(data.store.clips[f"{m}_length"], np.int64),
                                           device=device) for m in model.names}  # [n_clips]
        self.ratio = {m: data.geom.ratio[m] for m in model.names}
        lays = model.layouts
        self.first = {m: lay.time_index(device) * lay.time for m, lay in lays.items()}  # [N]
        self.ids_per_frame = {m: math.prod(lay.spatial) for m, lay in lays.items()}

    def geometry(self, rows: torch.Tensor, starts: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """rows, starts `[B]` (table rows, starts in grid steps) → per modality padding `[B, N]`
        bool and valid ids per patch `[B, N]` int64, as `MAEModel.prepare` finds them."""
        padding, ids = {}, {}
        for m, lay in self.model.layouts.items():
            avail = (self.lengths[m][rows] - starts * self.ratio[m]).clamp(0, lay.frames)  # [B]
            frames = (avail[:, None] - self.first[m]).clamp(0, lay.time)  # [B, N]
            padding[m] = frames == 0
            ids[m] = frames * self.ids_per_frame[m]
        return padding, ids

    def draw(self, rows: torch.Tensor, starts: torch.Tensor, generator: torch.Generator,
             lo: int, hi: int) -> StepMasks:
        """Masks of the global batch (rows, starts `[B]`) → this rank's rows `[lo, hi)`."""
        padding, ids = self.geometry(rows, starts)
        masking = self.model.sample_masking(padding, generator)
        mask, count, fraction = {}, {}, {}
        for m, pad in padding.items():
            full = masking.mask[m]  # [B, N]
            mask[m] = full[lo:hi]
            count[m] = (ids[m] * full).sum().float()
            fraction[m] = (full.sum() / (~pad).sum().clamp(min=1)).float()
        return StepMasks(mask, count, fraction, masking.bounds)


def global_windows(data: WindowData, batch: WindowBatch, step: int, info: Dist,
                   device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's (rows, starts) `[B]` on `device`: from the plan in RAM (no exchange),
    gathered from the ranks when streaming. Checks that this rank holds its slice of it."""
    if data.in_ram:
        rows, starts = data.plan.samples(step * data.batch_size, data.batch_size)
        lo = info.rank * data.per_rank
        if not (np.array_equal(rows[lo:lo + len(batch)], batch.rows.numpy())
                and np.array_equal(starts[lo:lo + len(batch)], batch.starts.numpy())):
            raise RuntimeError(f"step {step}: rank {info.rank}'s batch is not its slice of the "
                               f"global batch the plan gives")
        return torch.from_numpy(rows).to(device), torch.from_numpy(starts).to(device)
    return (gather_rows(batch.rows.to(device), info), gather_rows(batch.starts.to(device), info))


def metric_keys(model: MAEModel) -> list[str]:
    """The fixed set of logged metrics (identical on every rank, so they can be all-reduced)."""
    keys = ["loss/total"] + [f"{k}/{m}" for m in model.names for k in ("acc", "mask")]
    keys += [f"loss/{m}_ce" for m in model.names]
    return keys + (["loss/contrastive"] if len(model.names) == 2 else [])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, embeddings and position / modality / mask tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "pos" in name or "mask_token" in name
         or "modality" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class PretrainResult:
    checkpoint: Path
    step: int
    val: dict[str, float]
    unigram: dict[str, float]
    windows_per_s: float
    model: MAEModel
    run: Path
    warnings: list[str]  # also logged: what a caller should not miss

    @property
    def accuracy(self) -> dict[str, tuple[float, float]]:
        """{modality: (held-out masked-token accuracy, per-position unigram accuracy)}."""
        return {m: (self.val[f"val/acc_{m}"], self.unigram.get(f"unigram/{m}", math.nan))
                for m in ("audio", "visual") if f"val/acc_{m}" in self.val}

    @property
    def cross_entropy(self) -> dict[str, tuple[float, float]]:
        """{modality: (held-out masked-token cross-entropy, the unigram's), nats per token}."""
        return {m: (self.val.get(f"val/loss_{m}_ce", math.nan), self.unigram.get(f"unigram/{m}_ce", math.nan))
                for m in self.accuracy}


def context_warnings(result: PretrainResult) -> list[str]:
    """A model whose masked-token accuracy is not above the unigram baseline, and whose
    cross-entropy is not below the unigram's either, ignores the context; fine-tuning from it may
    trail training from scratch. (Codes that change from frame to frame, as audio codes do, can keep
    the accuracy at the unigram's while the cross-entropy shows the context used.)"""
    ce = result.cross_entropy
    behind = [f"{m} {acc:.3f} ≤ {base:.3f}" for m, (acc, base) in result.accuracy.items()
              if acc <= base and not ce[m][0] < ce[m][1]]
    if not behind:
        return []
    return [f"masked-token accuracy not above the unigram baseline ({'; '.join(behind)}): the model "
            f"does not use the visible context yet, and fine-tuning from it may trail training from "
            f"scratch. More steps, or see docs/commands.md, pretrain (masking, position init)."]


def val_windows(data: WindowData) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every validation window, in global batches of `batch_size` → [(rows [n], starts [n])]
    (the last one smaller); the same on every rank."""
    rows, starts = tile_windows(data.val_rows, data.steps[data.val_rows], data.geom.window_steps)
    return [(rows[a:a + data.batch_size], starts[a:a + data.batch_size])
            for a in range(0, len(rows), data.batch_size)]


def read_windows(data: WindowData, rows: np.ndarray, starts: np.ndarray) -> WindowBatch:
    """Windows (rows, starts `[n]`) from RAM or with one batched zarr read per modality."""
    if data.in_ram:
        return data.windows(rows, starts)
    parts = {m: data.store.read_windows(m, rows, starts * data.geom.ratio[m], data.geom.frames[m])
             for m in data.specs}
    return make_batch(rows, starts, parts, data.specs)


@torch.no_grad()
def evaluate(model: MAEModel, data: WindowData, masker: GlobalMasking, cfg: Config, device: str,
             info: Dist) -> dict[str, float]:
    """Validation loss and masked-token accuracy over every validation window, with fixed masking
    (same every call). Global batches as one process sees them; each rank scores a contiguous
    share of each and the shares are summed, so CE, accuracy and mask fractions equal one
    process's. (The contrastive metric is per rank share under DDP, an approximation.)"""
    was_training = model.training
    model.eval()
    keys = metric_keys(model)
    sums, counts = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0)
    w = cfg.mae.contrastive_weight
    for i, (rows, starts) in enumerate(val_windows(data)):
        n = len(rows)
        lo, hi = info.rank * n // info.world_size, (info.rank + 1) * n // info.world_size
        masks = masker.draw(torch.from_numpy(rows).to(device), torch.from_numpy(starts).to(device),
                            mask_generator(cfg.seed + 1, i, device), lo, hi)
        share = {f"mask/{m}": float(f) / info.world_size for m, f in masks.fraction.items()}
        defined = {f"{k}/{m}": float(c) > 0 for m, c in masks.count.items()
                   for k in ("loss", "acc")}  # the same on every rank: a global count
        share.update({k: 0.0 for m in model.names for k in (f"loss/{m}_ce", f"acc/{m}")})
        share["loss/contrastive"] = 0.0
        if hi > lo:  # a rank may hold none of a small last batch
            with autocast_context(device):
                out = model(batch_dict(read_windows(data, rows[lo:hi], starts[lo:hi]), device),
                            None, mask=masks.mask, ce_denominator=masks.count, bounds=masks.bounds)
            share.update({k: float(v) for k, v in out.metrics.items() if not k.startswith("mask/")})
            share["loss/contrastive"] = share.get("loss/contrastive", 0.0) / info.world_size
        ce = [share[f"loss/{m}_ce"] for m in model.names if defined[f"loss/{m}"]]
        share["loss/total"] = sum(ce) + w * share["loss/contrastive"]
        for k in keys:
            if k in share and defined.get(k.replace("_ce", ""), True):
                sums[k] += share[k] * n
                counts[k] += n
    model.train(was_training)
    return _sum_over_ranks(sums, counts, info, device)


def _sum_over_ranks(sums: dict[str, float], counts: dict[str, int], info: Dist,
                    device: str) -> dict[str, float]:
    """`val/<key>` = (sum over ranks of sums[key]) / counts[key] (the same count on every rank)."""
    keys = sorted(sums)
    total = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if info.enabled:
        torch.distributed.all_reduce(total)
    return {f"val/{k.replace('/', '_')}": v / counts[k] if counts[k] else math.nan
            for k, v in zip(keys, total.tolist())}


def pretrain(store_path: str | Path, cfg: Config, run_dir: str | Path, *, device: str = "cpu",
             reporter: Reporter = Reporter(), max_steps: int | None = None) -> PretrainResult:
    """Train (or resume) the masked-token transformer on a store; see the module docstring.

    `max_steps` stops early at that global step (the schedule still spans `cfg.pretrain.steps`), e.g.
    to test that resuming equals an uninterrupted run.
    """
    info, device = init_distributed(device)
    run = Path(run_dir)
    pcfg = cfg.pretrain
    store = TokenStore.open(store_path)
    cfg = resolve_modalities(cfg, store.specs)  # the checkpoint records the concrete modalities
    data = WindowData(store, cfg, rank=info.rank, world_size=info.world_size)
    unigram, unigram_doc = _unigram(store, data)  # reads every clip's codes: a damaged store stops here
    run.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run leaves no directory
    dims = MAEDims.from_specs(store.specs, cfg.mae)
    parents = store_parents(store)
    torch.manual_seed(cfg.seed)
    model = MAEModel(cfg.mae, dims).to(device)
    lr = pcfg.base_lr * pcfg.batch_size / 256
    opt = adamw(param_groups(model, pcfg.weight_decay), lr=lr, betas=tuple(pcfg.betas))
    fit = Fit("pretrain", model, opt, total_steps=pcfg.steps, warmup_steps=pcfg.warmup_steps,
              grad_clip=pcfg.grad_clip, bases=base_lrs(opt), device=device, info=info, reporter=reporter)
    path = run / CKPT_NAME
    step = _resume(path, cfg, model, opt, store, info)
    if step == 0 and cfg.mae.unigram_prior:  # a resumed run has its prior in the checkpoint
        for m in model.names:
            model.set_prior(m, position_counts(store, m, data.train_rows))
    if info.main:
        atomic_write_json(run / "config.json", cfg.to_dict())
        atomic_write_json(run / "unigram.json", unigram_doc)
    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
            find_unused_parameters=True)  # a modality with no masked token leaves its head unused
    if pcfg.compile:
        model.compile_blocks()
    masker = GlobalMasking(model, data, device)
    gather = partial(gather_rows, info=info)
    panel_tokenizers = {m: t.model for m, t in store_tokenizers(store, device=device, required=False).items()} \
        if info.main else {}
    stop = min(pcfg.steps, max_steps if max_steps is not None else pcfg.steps)
    batches = data.train_loader(step)
    metrics = MetricsLog(run / "metrics.jsonl", info)
    # a finished run that is started again evaluates instead of overwriting its summary with nothing
    val: dict[str, float] = evaluate(model, data, masker, cfg, device, info) if step >= stop else {}
    net.train()

    def step_fn(step: int) -> StepOut:
        batch = next(batches)
        lo = info.rank * data.per_rank
        masks = masker.draw(*global_windows(data, batch, step, info, device),
                            mask_generator(cfg.seed, step, device), lo, lo + len(batch))
        out = net(batch_dict(batch, device), None, mask=masks.mask, bounds=masks.bounds,
                  ce_denominator={m: c / info.world_size for m, c in masks.count.items()}, gather=gather)
        return StepOut(out.loss, {**out.metrics, **{f"mask/{m}": f for m, f in masks.fraction.items()}},
                       len(batch))

    def on_log(step: int, row: dict[str, float]) -> None:
        row["windows_per_s"] = row.pop("samples_per_s")
        metrics.write(row)

    def validate(step: int) -> None:
        nonlocal val
        val = evaluate(model, data, masker, cfg, device, info)
        metrics.write({"step": step, **val})

    def panels(step: int) -> None:
        if info.main:
            _panels(model, data, panel_tokenizers, run, step, cfg, device)

    def save(step: int) -> None:
        if info.main:
            save_checkpoint(path, kind="mae", model=model, config=cfg.to_dict(), parents=parents,
                            step=step, metrics={**val}, optimizer=opt,
                            extra={"dims": dims.to_dict(), "store": str(store.path)})

    t_start = time.perf_counter()
    step0 = step
    step = fit.run(step_fn, start=step, stop=stop, log_every=pcfg.log_every, on_log=on_log,
                   keys=metric_keys(model) + ["grad_norm"],
                   hooks=[(pcfg.val_every, validate), (pcfg.recon_every, panels), (pcfg.ckpt_every, save)],
                   progress=lambda row: {"loss": row["loss/total"], "windows_s": row["windows_per_s"],
                                         **{k: row[k] for k in ("acc/audio", "acc/visual") if k in row}})
    metrics.close()
    n_windows = (step - step0) * data.batch_size
    wps = n_windows / max(time.perf_counter() - t_start, 1e-9)
    if info.main:
        _write_summary(run, step, val, unigram, wps)
    if info.enabled:
        torch.distributed.barrier()  # no rank returns before rank 0 has written the checkpoint
    result = PretrainResult(path, step, val, unigram, wps, model, run, [])
    result.warnings = context_warnings(result)
    for w in result.warnings:
        log.warning("%s", w)
    return result


def _panels(model: MAEModel, data: WindowData, tokenizers: dict, run: Path, step: int, cfg: Config,
            device: str) -> None:
    """Reconstruction PNGs of the first validation window, through the store's tokenizers
    (none when they could not be found: `checkpoint.store_tokenizers` logged why)."""
    windows = val_windows(data)
    if not tokenizers or not windows:
        return
    rows, starts = windows[0]
    batch = batch_dict(read_windows(data, rows[:1], starts[:1]), device)
    codes = predicted_codes(model, batch, mask_generator(cfg.seed + 2, 0, device),
                            {m: t.id_ranges() for m, t in tokenizers.items()})
    for p in save_panels(codes, tokenizers, run / "recon", f"step{step:07d}"):
        log.info("reconstruction panel: %s", p)


def _resume(path: Path, cfg: Config, model: MAEModel, opt: torch.optim.Optimizer,
            store: TokenStore, info: Dist) -> int:
    """Resume from `path` if rank 0 finds it → the step to continue from (0: a fresh run).

    Rank 0 alone looks at the file, checks it and broadcasts its state (or its error): every rank
    then loads the same state, or raises the same error, whatever each one's filesystem shows.
    """
    state, error = None, None
    if info.main and path.exists():
        try:
            state = _load_resume_state(path, cfg, store)
        except Exception as exc:  # noqa: BLE001 - sent to the other ranks, raised everywhere
            error = exc
    if info.enabled:
        box = [state, error]
        torch.distributed.broadcast_object_list(box, src=0)
        state, error = box
    if error is not None:
        raise error
    if state is None:
        return 0
    model.load_state_dict(state["state_dict"])
    opt.load_state_dict(state["optimizer"])
    restore_rng(state)  # rank 0's generators: every rank's were equal when it was saved
    log.info("%s: resuming at step %d", path, state["step"])
    return int(state["step"])


def _load_resume_state(path: Path, cfg: Config, store: TokenStore) -> dict[str, Any]:
    ckpt = load_checkpoint(path, kind="mae")
    try:
        check_parents(path, ckpt["parents"], store)
    except ParentMismatchError as e:
        raise PretrainError(str(e)) from None
    check_resume(path, ckpt["config"], cfg, "pretrain", PretrainError)
    return {k: ckpt[k] for k in ("step", "state_dict", "optimizer", "rng")}


def _unigram(store: TokenStore, data: WindowData) -> tuple[dict[str, float], dict]:
    """Masked-token accuracy of always predicting each position's most frequent training code, and
    the unigram.json document."""
    batches = (read_windows(data, rows, starts) for rows, starts in val_windows(data))
    base = unigram_baseline(store, data.train_rows, batches, list(data.specs))
    out = {f"unigram/{m}": b.accuracy for m, b in base.items() if b.accuracy is not None}
    out |= {f"unigram/{m}_ce": b.cross_entropy for m, b in base.items() if b.cross_entropy is not None}
    return out, {m: {"accuracy": b.accuracy, "train_accuracy": b.train_accuracy, "cross_entropy": b.cross_entropy}
                 for m, b in base.items()}


def _write_summary(run: Path, step: int, val: dict[str, float], unigram: dict[str, float],
                   wps: float) -> None:
    rows = {}
    for m in ("audio", "visual"):
        if f"val/acc_{m}" in val:
            rows[m] = {"masked_token_accuracy": val[f"val/acc_{m}"],
                       "unigram_accuracy": unigram.get(f"unigram/{m}", math.nan),
                       "cross_entropy": val.get(f"val/loss_{m}_ce", math.nan),
                       "unigram_cross_entropy": unigram.get(f"unigram/{m}_ce", math.nan)}
    atomic_write_json(run / "summary.json", {"step": step, "val": val, "modalities": rows,
                                             "windows_per_s": wps})
