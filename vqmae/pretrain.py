"""Stage 2: masked-token pretraining on a token store.

    pretrain(store, cfg, run_dir) → run_dir/mae.pt, metrics.jsonl, summary.json

One loop for one process or many (`torchrun`: DDP, NCCL on GPU, gloo on CPU). Every source of
randomness is a function of (seed, step): the window batch (`WindowPlan`), and the masking generator
seeded per step and rank. So a run resumed from a checkpoint at step k continues exactly the
trajectory of an uninterrupted run, and N processes see the same global batch as one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqmae.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from vqmae.config import Config
from vqmae.mae import MAEDims, MAEModel
from vqmae.store import TokenStore
from vqmae.training import Dist, Reporter, all_reduce_mean, autocast_context, init_distributed, lr_at
from vqmae.utils import atomic_write_json
from vqmae.windows import WindowBatch, WindowData, unigram_baseline

log = logging.getLogger(__name__)

CKPT_NAME = "mae.pt"
# Seeds of the per-step masking generators: far from the seeds used for splits and windows.
MASK_SEED_OFFSET = 7_919


class PretrainError(RuntimeError):
    """A run that must not start or continue (tokenizer mismatch, other config on resume, ...)."""


def store_parents(store: TokenStore) -> dict[str, str]:
    """The tokenizer hashes a model trained on `store` depends on: {"audio_tokenizer": sha, ...}."""
    return {f"{m}_tokenizer": spec.tokenizer_sha256 for m, spec in sorted(store.specs.items())}


def check_parents(where: Path, expected: dict[str, str], store: TokenStore) -> None:
    """Refuse a store whose tokenizers differ from the ones a checkpoint was trained on."""
    have = store_parents(store)
    for key, sha in expected.items():
        if key in have and have[key] != sha:
            raise PretrainError(f"{where}: {key} mismatch: checkpoint was trained on {sha[:12]}…, "
                                f"store {store.path} has {have[key][:12]}…")
        if key not in have:
            raise PretrainError(f"{where}: checkpoint needs {key}, store {store.path} has only "
                                f"{sorted(have)}")


def batch_dict(batch: WindowBatch, device: str) -> dict[str, torch.Tensor]:
    """A `WindowBatch` as the model's input dict, on `device`."""
    out = {}
    for m in ("audio", "visual"):
        codes = getattr(batch, m)
        if codes is not None:
            out[m] = codes.to(device, non_blocking=True)
            out[f"{m}_valid"] = getattr(batch, f"{m}_valid").to(device, non_blocking=True)
    return out


def mask_generator(seed: int, step: int, rank: int, device: str) -> torch.Generator:
    """The masking randomness of one step on one rank: a pure function of its arguments."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + MASK_SEED_OFFSET) * 4_099 + step * 64 + rank)
    return g


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


@torch.no_grad()
def evaluate(model: MAEModel, data: WindowData, cfg: Config, device: str, info: Dist) -> dict[str, float]:
    """Validation loss and masked-token accuracy, with fixed masking (same every call)."""
    was_training = model.training
    model.eval()
    keys = metric_keys(model)
    sums, counts = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0)
    for i, batch in enumerate(data.val_batches()):
        gen = mask_generator(cfg.seed + 1, i, info.rank, device)
        with autocast_context(device):
            out = model(batch_dict(batch, device), gen)
        values = {**{k: float(v) for k, v in out.metrics.items()}, "loss/total": float(out.loss)}
        for k in keys:
            if k in values and math.isfinite(values[k]):
                sums[k] += values[k] * len(batch)
                counts[k] += len(batch)
    model.train(was_training)
    metrics = {f"val/{k.replace('/', '_')}": sums[k] / counts[k] if counts[k] else math.nan
               for k in keys}
    return all_reduce_mean(metrics, info, device)


def pretrain(store_path: str | Path, cfg: Config, run_dir: str | Path, *, device: str = "cpu",
             reporter: Reporter = Reporter(), max_steps: int | None = None) -> PretrainResult:
    """Train (or resume) the masked-token transformer on a store; see the module docstring.

    `max_steps` stops early at that global step (the schedule still spans `cfg.pretrain.steps`), e.g.
    to test that resuming equals an uninterrupted run.
    """
    info, device = init_distributed(device)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    pcfg = cfg.pretrain
    store = TokenStore.open(store_path)
    data = WindowData(store, cfg, rank=info.rank, world_size=info.world_size)
    dims = MAEDims.from_specs(store.specs, cfg.mae)
    parents = store_parents(store)
    torch.manual_seed(cfg.seed)
    model = MAEModel(cfg.mae, dims).to(device)
    lr = pcfg.base_lr * pcfg.batch_size / 256
    opt = torch.optim.AdamW(param_groups(model, pcfg.weight_decay), lr=lr, betas=tuple(pcfg.betas))
    path = run / CKPT_NAME
    step = _resume(path, cfg, model, opt, store) if path.exists() else 0
    if info.main:
        atomic_write_json(run / "config.json", cfg.to_dict())
    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
            find_unused_parameters=True)  # a modality with no masked token leaves its head unused
    if pcfg.compile:
        net = torch.compile(net)
    unigram = _unigram(store, data, run, info)
    stop = min(pcfg.steps, max_steps if max_steps is not None else pcfg.steps)
    ctx = autocast_context(device)
    batches = data.train_loader(step)
    reporter.start("pretrain", pcfg.steps)
    reporter.advance("pretrain", step)
    window: list[dict[str, float]] = []
    # a finished run that is started again evaluates instead of overwriting its summary with nothing
    val: dict[str, float] = evaluate(model, data, cfg, device, info) if step >= stop else {}
    t_start, n_windows = time.perf_counter(), 0
    net.train()
    while step < stop:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, pcfg.warmup_steps, pcfg.steps)
        batch = next(batches)
        with ctx:
            out = net(batch_dict(batch, device), mask_generator(cfg.seed, step, info.rank, device))
        loss = out.loss.float()
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if info.enabled:  # every rank stops together: one raising alone would hang the others
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            raise FloatingPointError(f"pretrain: non-finite loss ({loss.item()} on rank {info.rank}) "
                                     f"at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg.grad_clip)
        opt.step()
        step += 1
        n_windows += len(batch) * info.world_size
        window.append({"loss/total": loss.item(), "grad_norm": float(grad_norm),
                       **{k: float(v) for k, v in out.metrics.items()}})
        keys = metric_keys(model) + ["grad_norm"]
        if step % pcfg.log_every == 0 or step == stop:
            row = _log_row(window, keys, step, opt, n_windows, t_start, info, device)
            window = []
            if info.main:
                _append_jsonl(run / "metrics.jsonl", row)
            reporter.advance("pretrain", pcfg.log_every if step % pcfg.log_every == 0 else step % pcfg.log_every,
                             loss=row["loss/total"], **{k: row[k] for k in ("acc/audio", "acc/visual") if k in row},
                             windows_s=row["windows_per_s"])
        if step % pcfg.val_every == 0 or step == stop:
            val = evaluate(model, data, cfg, device, info)
            if info.main:
                _append_jsonl(run / "metrics.jsonl", {"step": step, **val})
        if info.main and (step % pcfg.ckpt_every == 0 or step == stop):
            save_checkpoint(path, kind="mae", model=model, config=cfg.to_dict(), parents=parents,
                            step=step, metrics={**val}, optimizer=opt,
                            extra={"dims": dims.to_dict(), "store": str(store.path)})
    reporter.finish("pretrain")
    wps = n_windows / max(time.perf_counter() - t_start, 1e-9)
    if info.main:
        _write_summary(run, step, val, unigram, wps)
    if info.enabled:
        torch.distributed.barrier()  # no rank returns before rank 0 has written the checkpoint
    return PretrainResult(path, step, val, unigram, wps, model)


def _resume(path: Path, cfg: Config, model: MAEModel, opt: torch.optim.Optimizer,
            store: TokenStore) -> int:
    ckpt = load_checkpoint(path, kind="mae")
    check_parents(path, ckpt["parents"], store)
    stored = Config.from_dict(ckpt["config"])
    if replace(stored, device=cfg.device) != replace(cfg, device=stored.device):
        raise PretrainError(f"{path}: checkpoint was trained with another config; resume with the "
                            f"same --preset/--set, or use a new run directory")
    model.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    restore_rng(ckpt)
    log.info("%s: resuming at step %d", path, ckpt["step"])
    return int(ckpt["step"])


def _unigram(store: TokenStore, data: WindowData, run: Path, info: Dist) -> dict[str, float]:
    """Masked-token accuracy of always predicting each position's most frequent training code."""
    base = unigram_baseline(store, data.train_rows, data.val_batches(), list(data.specs))
    out = {f"unigram/{m}": b.accuracy for m, b in base.items() if b.accuracy is not None}
    if info.main:
        atomic_write_json(run / "unigram.json", {m: {"accuracy": b.accuracy,
                                                      "train_accuracy": b.train_accuracy}
                                                  for m, b in base.items()})
    return out


def _log_row(window: list[dict[str, float]], keys: list[str], step: int, opt, n_windows: int,
             t_start: float, info: Dist, device: str) -> dict[str, float]:
    row = {k: float(np.mean(vals)) if (vals := [w[k] for w in window if k in w]) else math.nan
           for k in keys}
    row = all_reduce_mean(row, info, device)
    return {"step": step, "lr": opt.param_groups[0]["lr"],
            "windows_per_s": n_windows / max(time.perf_counter() - t_start, 1e-9), **row}


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _write_summary(run: Path, step: int, val: dict[str, float], unigram: dict[str, float],
                   wps: float) -> None:
    rows = {}
    for m in ("audio", "visual"):
        if f"val/acc_{m}" in val:
            rows[m] = {"masked_token_accuracy": val[f"val/acc_{m}"],
                       "unigram_accuracy": unigram.get(f"unigram/{m}", math.nan)}
    atomic_write_json(run / "summary.json", {"step": step, "val": val, "modalities": rows,
                                             "windows_per_s": wps})
