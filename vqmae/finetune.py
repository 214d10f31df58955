"""Stage 3: emotion models from a pretrained MAE, evaluated speaker-independently (DESIGN.md §6).

    finetune(store, cfg, run_dir, mae=mae.pt) → run_dir/summary.json, report.md, plots, per-unit
    classifier checkpoints and predictions

A *unit* is one model trained and tested: (label fraction, fold, variant). Variants are the inits
in ``cfg.finetune.inits`` — ``pretrained`` (encoder from the MAE) and ``scratch`` (the identical
backbone, randomly initialised) — plus, with ``distill``, ``student`` (audio-only, distilled from
the fold's pretrained audiovisual model) and ``audio_labels`` (the same audio-only model trained on
labels alone). Within a (fraction, fold) every variant sees the same training windows in the same
order and starts from the same head initialisation, so their difference is the backbone's.

Rules (DESIGN.md §6): folds are by speaker and cover every speaker (`vqmae.folds`); the epoch is
selected on validation speakers carved from the training speakers; test clips are scored over all
their non-overlapping windows with the logits (or values) averaged per clip; the test fold is never
used for any choice. Each unit writes ``result.json`` last, atomically: a rerun skips finished
units and resumes an interrupted one from its last epoch (``last.pt``).

Training windows: each epoch every training clip appears once per window that tiles it, at a
random start (`vqmae.windows.WindowPlan`); audio-only clips take part in audiovisual models with
their visual half absent. With ``modality_dropout`` p an audiovisual sample that has both
modalities loses one of them (each with probability p/2), which is what lets one model be scored on
audio alone or video alone.

Speaker normalisation (``speaker_norm``, on by default; `vqmae.classifier`): at the start of every
epoch each training speaker's mean pooled features are computed per presence pattern (no gradient)
and subtracted from that speaker's samples; validation and test speakers are normalised by the mean
over their own clips' windows (their labels are never used); the saved model stores the average of
the training speakers' means for clips of an unknown speaker.

Data-parallel under ``torchrun`` like stage 2: each rank trains on its slice of every global batch
(DDP averages the gradients), every rank evaluates identically, rank 0 writes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vqmae import baseline
from vqmae import folds as folds_mod
from vqmae import metrics as M
from vqmae.checkpoint import checkpoint_sha256, load_checkpoint, restore_rng, save_checkpoint
from vqmae.classifier import (EmotionModel, center_table, drop_modality, head_outputs, load_encoder,
                              mean_center)
from vqmae.config import Config, FinetuneConfig, MAEConfig
from vqmae.datasets import EMOTIONS
from vqmae.mae import MAEDims
from vqmae.pretrain import batch_dict, check_parents, store_parents
from vqmae.store import TokenStore
from vqmae.training import Dist, Reporter, autocast_context, init_distributed, lr_at
from vqmae.utils import atomic_write_bytes, atomic_write_json
from vqmae.windows import WindowPlan, make_batch, tile_windows, window_geometry

log = logging.getLogger(__name__)

CKPT_NAME = "classifier.pt"
VARIANTS = ("pretrained", "scratch", "tokens", "student", "audio_labels")
EVAL_MODES = ("av", "audio", "visual")


class FinetuneError(RuntimeError):
    """A run that must not start or continue (no labels, MAE / store mismatch, other config)."""


# ----------------------------------------------------------------------------------------------
# the task: what the outputs mean, the loss and the metrics


@dataclass(frozen=True)
class Task:
    """``kind`` classify (softmax over ``names``), multilabel (a sigmoid per name) or regress
    (one value per target column in ``names``)."""

    kind: str
    names: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Task":
        return cls(str(d["kind"]), tuple(d["names"]))

    @property
    def select_key(self) -> str:
        """The validation metric that selects the epoch (higher is better)."""
        return {"classify": "uar", "multilabel": "macro_f1", "regress": "ccc"}[self.kind]

    def targets(self, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """classify: int64 [n] (-1 = no usable label); multilabel: float32 [n, C] (NaN row = no
        labels); regress: float32 [n, D] (NaN = missing value)."""
        if self.kind == "classify":
            index = {c: i for i, c in enumerate(self.names)}
            return np.array([index.get(str(x), -1) for x in clips["label"][rows]], np.int64)
        if self.kind == "multilabel":
            out = np.zeros((len(rows), len(self.names)), np.float32)
            index = {c: i for i, c in enumerate(self.names)}
            for j, cell in enumerate(clips["labels"][rows].tolist()):
                hits = [index[x] for x in str(cell).split(";") if x in index]
                out[j] = np.nan if not hits else 0.0
                out[j, hits] = 1.0
            return out
        return np.stack([np.asarray(clips[t][rows], np.float32) for t in self.names], 1)

    def has_target(self, y: np.ndarray) -> np.ndarray:
        """bool [n]: the clip can be trained and scored on."""
        if self.kind == "classify":
            return y >= 0
        if self.kind == "multilabel":
            return ~np.isnan(y).any(1)
        return ~np.isnan(y).all(1)

    def loss(self, out: torch.Tensor, y: torch.Tensor, class_weight: torch.Tensor | None
             ) -> torch.Tensor:
        """Per-sample loss [B] (regress: the batch's 1 − CCC, repeated: CCC is a batch statistic)."""
        if self.kind == "classify":
            return F.cross_entropy(out.float(), y, weight=class_weight, reduction="none")
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(out.float(), y, reduction="none").mean(1)
        return M.ccc_loss(out.float(), y).expand(out.shape[0])

    def metrics(self, y: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
        if self.kind == "classify":
            return M.classification_metrics(y, scores, len(self.names))
        if self.kind == "multilabel":
            return M.multilabel_metrics(y, 1.0 / (1.0 + np.exp(-scores)))
        return M.regression_metrics(y, scores, self.names)


def build_task(fcfg: FinetuneConfig, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> Task:
    """The task and its class / label / target names, from the store's labelled clips."""
    if fcfg.task == "regress":
        missing = [t for t in fcfg.targets if t not in clips]
        if missing or not fcfg.targets:
            raise FinetuneError(f"finetune.targets {list(fcfg.targets)}: the store has no column "
                                f"{missing}; choose from valence, arousal, dominance")
        return Task("regress", tuple(fcfg.targets))
    if fcfg.task == "multilabel":
        found = {x for cell in clips["labels"][rows].tolist() for x in str(cell).split(";") if x}
    else:
        found = {str(x) for x in clips["label"][rows].tolist() if str(x)}
    order = [e for e in EMOTIONS if e in found] + sorted(found - set(EMOTIONS))
    if len(order) < 2:
        raise FinetuneError(f"task {fcfg.task!r} needs at least 2 classes among the store's clips, "
                            f"found {order}")
    return Task(fcfg.task, tuple(order))


# ----------------------------------------------------------------------------------------------
# data: windows of labelled clips


class ClipWindows:
    """Windows of codes for fine-tuning, read from a store held in RAM.

    ``names`` are the backbone's modalities; a clip is usable when it has frames of at least one.
    """

    def __init__(self, store: TokenStore, names: tuple[str, ...], window_seconds: float):
        self.store = store
        self.names = names
        mode = "av" if len(names) == 2 else names[0]
        self.geom = window_geometry(store.specs, mode, window_seconds)
        self.specs = {m: store.specs[m] for m in names}
        self.length = {m: np.asarray(store.clips[f"{m}_length"], np.int64) for m in names}
        self.steps = np.max([-(-self.length[m] // self.geom.ratio[m]) for m in names], axis=0)
        for m in names:
            store.codes(m)  # load once

    def usable(self) -> np.ndarray:
        ok = self.store.clips["status"] == "ok"
        return np.flatnonzero(ok & (self.steps > 0)).astype(np.int64)

    def has(self, m: str, rows: np.ndarray) -> np.ndarray:
        return self.length[m][rows] > 0

    def batch(self, rows: np.ndarray, starts: np.ndarray, device: str) -> dict[str, torch.Tensor]:
        """rows [B] table rows, starts [B] in window-grid steps → the model's batch dict."""
        parts = {m: self.store.read_windows(m, rows, starts * self.geom.ratio[m], self.geom.frames[m])
                 for m in self.names}
        return batch_dict(make_batch(rows, starts, parts, self.specs), device)

    def tiles(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every clip's non-overlapping windows from frame 0 → (rows [n], starts [n])."""
        return tile_windows(rows, self.steps[rows], self.geom.window_steps)


def restrict(batch: Mapping[str, torch.Tensor], mode: str, names: Sequence[str]) -> dict:
    """Keep only the modalities of eval mode ``mode`` (av, audio, visual) present."""
    out = dict(batch)
    for m in names:
        if mode != "av" and m != mode:
            out = drop_modality(out, m)
    return out


@torch.no_grad()
def pooled_windows(model: EmotionModel, data: ClipWindows, rows: np.ndarray, mode: str, device: str,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Every non-overlapping window of clips ``rows`` in eval mode ``mode`` through the encoder
    and pooling → (pooled float32 `[n_windows, M, D]`, present `[n_windows, M]`, window clip
    position int64 `[n_windows]` into ``rows``), on ``device``."""
    was = model.training
    model.eval()
    win_rows, win_starts = data.tiles(rows)
    pos = np.searchsorted(rows, win_rows) if np.all(np.diff(rows) > 0) else \
        np.array([np.flatnonzero(rows == r)[0] for r in win_rows], np.int64)
    xs, ps = [], []
    with autocast_context(device):
        for a in range(0, len(win_rows), batch_size):
            b = data.batch(win_rows[a:a + batch_size], win_starts[a:a + batch_size], device)
            x, p = model.pooled(restrict(b, mode, data.names))
            xs.append(x.float())
            ps.append(p)
    model.train(was)
    m, d = len(model.names), model.out.in_features // len(model.names)
    x = torch.cat(xs) if xs else torch.zeros(0, m, d, device=device)
    p = torch.cat(ps) if ps else torch.zeros(0, m, dtype=torch.bool, device=device)
    return x, p, pos


@torch.no_grad()
def predict_clips(model: EmotionModel, data: ClipWindows, rows: np.ndarray, mode: str,
                  device: str, batch_size: int, groups: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic clip scores: every window of every clip, outputs averaged per clip.

    ``groups`` (int64 per store row, e.g. speaker ids): with a speaker-normalised model each group's
    mean pooled features are taken over these rows' windows (in this ``mode``) and subtracted;
    without it the model's stored mean is used.

    → (clip outputs float32 [n_clips, C], window outputs [n_windows, C], window clip position
    int64 [n_windows] into ``rows``)."""
    was = model.training
    model.eval()
    x, present, pos = pooled_windows(model, data, rows, mode, device, batch_size)
    group = None
    if groups is not None:  # dense ids of the scored rows' groups
        inverse = np.unique(np.asarray(groups)[rows[pos]], return_inverse=True)[1]
        group = torch.from_numpy(inverse.astype(np.int64)).to(x.device)
    with autocast_context(device):
        win = head_outputs(model, x, present, group, batch_size).numpy() if len(pos) else \
            np.zeros((0, 0), np.float32)
    clip = np.zeros((len(rows), win.shape[1] if win.size else 0), np.float64)
    np.add.at(clip, pos, win)
    clip /= np.bincount(pos, minlength=len(rows))[:, None].clip(min=1)
    model.train(was)
    return clip.astype(np.float32), win, pos


# ----------------------------------------------------------------------------------------------
# units


@dataclass(frozen=True)
class Unit:
    variant: str
    fraction: float
    fold: folds_mod.Fold

    @property
    def name(self) -> str:
        return f"{self.variant}/frac{self.fraction:g}/{self.fold.name}"

    @property
    def seed_key(self) -> str:
        """Shared by every variant of one (fraction, fold): same windows, same head init."""
        return f"frac{self.fraction:g}/{self.fold.name}"


def unit_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=4).digest(), "little")


@dataclass
class Backbone:
    """What every unit builds its encoder from."""

    mae_cfg: MAEConfig
    dims: MAEDims
    names: tuple[str, ...]
    state: dict[str, torch.Tensor] | None  # the pretrained MAE's state dict (None: no MAE)
    parents: dict[str, str]  # tokenizer sha256s (+ the MAE's)
    mae_path: str | None


def load_backbone(store: TokenStore, cfg: Config, mae: str | Path | None) -> Backbone:
    """The MAE's config, dims and weights (checked against the store's tokenizers), or — without an
    MAE — today's `cfg.mae` on the store's dims (from-scratch runs only)."""
    parents = store_parents(store)
    if mae is None:
        if "pretrained" in cfg.finetune.inits or cfg.finetune.distill:
            raise FinetuneError("a pretrained MAE is needed (--mae mae.pt) for the 'pretrained' "
                                "and distillation variants; use --from-scratch to train without one")
        dims = MAEDims.from_specs(store.specs, cfg.mae)
        names = ("audio", "visual") if cfg.mae.modalities == "av" else (cfg.mae.modalities,)
        return Backbone(cfg.mae, dims, names, None, parents, None)
    path = Path(mae)
    ckpt = load_checkpoint(path, kind="mae")
    try:
        check_parents(path, ckpt["parents"], store)
    except Exception as e:
        raise FinetuneError(str(e)) from None
    mae_cfg = Config.from_dict(ckpt["config"]).mae
    dims = MAEDims.from_dict(ckpt["extra"]["dims"])
    store_dims = MAEDims.from_specs({m: s for m, s in store.specs.items() if dims.get(m)}, mae_cfg)
    for m in ("audio", "visual"):
        if dims.get(m) is not None and store_dims.get(m) != dims.get(m):
            raise FinetuneError(f"{path}: {m} codes of the MAE are {dims.get(m)}, the store "
                                f"{store.path} has {store_dims.get(m)}")
    names = ("audio", "visual") if mae_cfg.modalities == "av" else (mae_cfg.modalities,)
    parents = {**ckpt["parents"], "mae": checkpoint_sha256(path)}
    return Backbone(mae_cfg, dims, names, ckpt["state_dict"], parents, str(path.resolve()))


def _batch_targets(task: Task, y_all: np.ndarray, pos: np.ndarray, device: str) -> torch.Tensor:
    y = y_all[pos]
    if task.kind == "classify":
        return torch.from_numpy(y).to(device)
    return torch.from_numpy(y.astype(np.float32)).to(device)


def _make_model(bb: Backbone, task: Task, fcfg: FinetuneConfig, seed: int, variant: str,
                device: str) -> EmotionModel:
    torch.manual_seed(seed)  # same head init for every variant of a (fraction, fold)
    model = EmotionModel(bb.mae_cfg, bb.dims, len(task.names), fcfg.pooling, fcfg.dropout,
                         speaker_norm=fcfg.speaker_norm)
    if variant in ("pretrained", "student", "audio_labels"):
        load_encoder(model, bb.state)
    if fcfg.freeze:
        model.backbone.requires_grad_(False)
    return model.to(device)


def _optimizer(model: EmotionModel, fcfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW: the encoder at ``lr``, pooling and head at ``head_lr``; no weight decay on biases,
    norms, embeddings and learned tokens / queries (as in pretraining)."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = fcfg.lr if name.startswith("backbone.") else fcfg.head_lr
        plain = p.ndim < 2 or any(k in name for k in ("embed", "pos", "modality", "absent",
                                                       "query", "token"))
        groups.setdefault((lr, 0.0 if plain else fcfg.weight_decay), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd}
                              for (lr, wd), ps in groups.items()], betas=(0.9, 0.999))


def _drop_for_training(batch: dict[str, torch.Tensor], names: Sequence[str], p: float,
                       force_audio_only: bool, gen: torch.Generator, info: Dist
                       ) -> dict[str, torch.Tensor]:
    """Modality dropout; the draws are made for the global batch and sliced per rank, so a sample's
    fate does not depend on the number of processes."""
    if force_audio_only:
        return restrict(batch, "audio", names)
    if len(names) != 2 or p <= 0:
        return batch
    has = {m: batch[f"{m}_valid"].any(1) for m in names}  # [b]
    both = has["audio"] & has["visual"]
    b = both.shape[0]
    u = torch.rand(b * info.world_size, generator=gen)[info.rank * b:(info.rank + 1) * b].to(both.device)
    batch = drop_modality(batch, "visual", both & (u < p / 2))
    return drop_modality(batch, "audio", both & (u >= p / 2) & (u < p))


@dataclass
class UnitResult:
    unit: str
    metrics: dict[str, dict[str, Any]]  # eval name ("av", "audio", "visual", "noise/<snr>/av") → metrics
    best_epoch: int
    val: float
    epochs: int
    seconds: float
    n_train: int
    n_val: int
    n_test: int
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "metrics": _jsonable(self.metrics)}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


class Trainer:
    """Trains and tests units on one store; see the module docstring."""

    def __init__(self, store: TokenStore, cfg: Config, bb: Backbone, task: Task, run: Path,
                 device: str, info: Dist, reporter: Reporter, noisy: Mapping[float, TokenStore]):
        self.store, self.cfg, self.bb, self.task, self.run = store, cfg, bb, task, run
        self.fcfg = cfg.finetune
        self.device, self.info, self.reporter = device, info, reporter
        self.data = ClipWindows(store, bb.names, bb.mae_cfg.window_seconds)
        self.noisy = {snr: ClipWindows(s, bb.names, bb.mae_cfg.window_seconds)
                      for snr, s in noisy.items()}
        n = store.n_clips
        self.y = np.full(n, -1, np.int64) if task.kind == "classify" else \
            np.full((n, len(task.names)), np.nan, np.float32)
        rows = np.arange(n)
        self.y[rows] = task.targets(store.clips, rows)
        speakers = [str(x) for x in store.clips["speaker"].tolist()]
        self.group = np.unique(speakers, return_inverse=True)[1].astype(np.int64)  # speaker id per row
        self.teachers: dict[str, np.ndarray] = {}  # seed_key → teacher clip logits over all rows
        self._token_features: dict[str, np.ndarray] | None = None  # the token baseline's, built once

    # -- evaluation --------------------------------------------------------------------------

    def modes(self) -> list[str]:
        ok = [m for m in self.fcfg.eval_modalities if m == "av" or m in self.bb.names]
        return [m for m in ok if not (m == "av" and len(self.bb.names) == 1)] or [self.bb.names[0]]

    def score(self, model, rows: np.ndarray, mode: str, data: ClipWindows | None = None
              ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """Metrics of clips ``rows`` in eval mode ``mode`` (clips lacking that modality are left
        out) → (metrics with n_clips, clip outputs, the rows scored)."""
        data = data or self.data
        if mode != "av":
            rows = rows[data.has(mode, rows)]
        if not len(rows):
            return {"n_clips": 0}, np.zeros((0, len(self.task.names)), np.float32), rows
        out, _, _ = predict_clips(model, data, rows, mode, self.device, self.fcfg.eval_batch, self.group)
        return {**self.task.metrics(self.y[rows], out), "n_clips": int(len(rows))}, out, rows

    # -- one unit ----------------------------------------------------------------------------

    def train_unit(self, unit: Unit, train: np.ndarray, val: np.ndarray, test: np.ndarray,
                   save_model: bool) -> UnitResult:
        fcfg, device, info = self.fcfg, self.device, self.info
        out_dir = self.run / "units" / unit.name
        out_dir.mkdir(parents=True, exist_ok=True)
        seed = unit_seed(self.cfg.seed, unit.seed_key)
        model = _make_model(self.bb, self.task, fcfg, seed, unit.variant, device)
        opt = _optimizer(model, fcfg)
        plan = WindowPlan(train, self.data.steps[train], self.data.geom.window_steps, seed)
        per_epoch = max(1, math.ceil(plan.samples_per_epoch / fcfg.batch_size))
        total, warmup = fcfg.epochs * per_epoch, int(round(fcfg.warmup_epochs * per_epoch))
        class_weight = self._class_weight(train)
        teacher = self._teacher_targets(unit) if unit.variant == "student" else None
        audio_only = unit.variant in ("student", "audio_labels")
        state = self._resume(out_dir / "last.pt", model, opt)
        epoch, best = state["epoch"], state["best"]
        net = model
        if info.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                find_unused_parameters=True)  # absent modalities leave pooling parameters unused
        gen = torch.Generator().manual_seed(seed + 1)
        ctx = autocast_context(device)
        t0 = time.perf_counter()
        self.reporter.start(unit.name, fcfg.epochs)
        self.reporter.advance(unit.name, epoch)
        while epoch < fcfg.epochs:
            table = self._train_centers(model, train, audio_only) if model.speaker_norm else None
            net.train()
            if fcfg.freeze:
                model.backbone.eval()
            losses = []
            for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, g["base_lr"], warmup, total)
                gen.manual_seed(seed * 7919 + step)  # a pure function of the step: resumable
                rows, starts = plan.batch(step, fcfg.batch_size, info.rank, info.world_size)
                batch = self.data.batch(rows, starts, device)
                batch = _drop_for_training(batch, self.bb.names, fcfg.modality_dropout, audio_only, gen,
                                           info)
                y = _batch_targets(self.task, self.y, rows, device)
                with ctx:
                    out = net(batch) if table is None else \
                        net(batch, table, torch.from_numpy(self.group[rows]).to(device))
                per_sample = self.task.loss(out, y, class_weight)
                if teacher is not None:
                    per_sample = self._distill(out, per_sample, teacher, rows, y)
                loss = per_sample.mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"finetune {unit.name}: non-finite loss at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), fcfg.grad_clip)
                opt.step()
                losses.append(loss.item())
            epoch += 1
            val_metrics, _, _ = self.score(model, val, "audio" if audio_only else self._val_mode())
            value = float(val_metrics.get(self.task.select_key, math.nan))
            row = {"epoch": epoch, "loss/train": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                   **{f"val/{k}": v for k, v in val_metrics.items() if np.isscalar(v)}}
            improved = math.isfinite(value) and (best["value"] is None or value > best["value"])
            if improved or best["state"] is None:
                best = {"value": value if math.isfinite(value) else None, "epoch": epoch,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            if info.main:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(_jsonable(row)) + "\n")
                if epoch < fcfg.epochs:
                    save_checkpoint(out_dir / "last.pt", kind="classifier", model=model,
                                    config=self.cfg, parents=self.bb.parents, step=epoch,
                                    optimizer=opt, extra={"epoch": epoch, "best_state": best["state"],
                                                          "best_epoch": best["epoch"],
                                                          "best_value": best["value"]})
            self.reporter.advance(unit.name, 1, loss=row["loss/train"],
                                  **{self.task.select_key: value})
        self.reporter.finish(unit.name)
        model.load_state_dict(best["state"])
        if model.speaker_norm:  # the fallback for a clip of an unknown speaker (see classifier.py)
            model.center.copy_(mean_center(self._train_centers(model, train, audio_only)))
        result = self._test(unit, model, test, audio_only)
        result.update(best_epoch=best["epoch"], val=best["value"] if best["value"] is not None else math.nan,
                      epochs=fcfg.epochs, seconds=time.perf_counter() - t0, n_train=len(train),
                      n_val=len(val), n_test=len(test))
        res = UnitResult(unit=unit.name, **result)
        if info.main:
            if save_model:
                res.checkpoint = str(self._save_classifier(out_dir / CKPT_NAME, model, unit, res))
            atomic_write_json(out_dir / "result.json", res.to_dict())
            (out_dir / "last.pt").unlink(missing_ok=True)
        if unit.variant == "pretrained" and fcfg.distill:
            self.teachers[unit.seed_key] = self._teacher_logits(model, train)
        return res

    def token_unit(self, unit: Unit, train: np.ndarray, val: np.ndarray, test: np.ndarray) -> UnitResult:
        """The bag-of-tokens baseline on this unit's clips (`vqmae.baseline`): same folds, same
        label subset, penalty chosen on the validation speakers, one model per test modality."""
        t0 = time.perf_counter()
        if self._token_features is None:
            rows = np.arange(self.store.n_clips)
            self._token_features = {m: baseline.histogram_features(self.store, rows, m, self.fcfg.token_pool)
                                    for m in self.bb.names}
        cw = self._class_weight(train)
        metrics, outputs, val_uar = baseline.run_baseline(
            self._token_features, self.y, len(self.task.names), train, val, test, self.modes(),
            self.task.metrics, None if cw is None else cw.cpu().numpy())
        res = UnitResult(unit=unit.name, metrics=metrics, best_epoch=0, val=val_uar, epochs=0,
                         seconds=time.perf_counter() - t0, n_train=len(train), n_val=len(val),
                         n_test=len(test))
        if self.info.main:
            out_dir = self.run / "units" / unit.name
            out_dir.mkdir(parents=True, exist_ok=True)
            self._write_predictions(out_dir / "predictions.csv",
                                    [(mode, out, rows) for mode, (rows, out) in outputs.items()])
            atomic_write_json(out_dir / "result.json", res.to_dict())
        log.info("%s: %s", unit.name, {m: round(v.get("uar", math.nan), 3) for m, v in metrics.items()})
        return res

    def _train_centers(self, model: EmotionModel, train: np.ndarray, audio_only: bool) -> torch.Tensor:
        """Each training speaker's mean pooled features per presence pattern (a center table):
        over the windows of its training clips scored as training will present them (audiovisual,
        and each modality alone when modality dropout can remove the other)."""
        modes = ["audio"] if audio_only else ["av"] if len(self.bb.names) == 1 else \
            ["av", *self.bb.names] if self.fcfg.modality_dropout > 0 else ["av"]
        xs, ps, gs = [], [], []
        for mode in modes:
            rows = train if mode == "av" else train[self.data.has(mode, train)]
            x, p, pos = pooled_windows(model, self.data, rows, mode, self.device, self.fcfg.eval_batch)
            xs.append(x)
            ps.append(p)
            gs.append(torch.from_numpy(self.group[rows][pos]))
        n_groups = int(self.group.max()) + 1 if len(self.group) else 1
        return center_table(torch.cat(xs), torch.cat(ps), torch.cat(gs).to(self.device), n_groups)

    def _val_mode(self) -> str:
        return "av" if len(self.bb.names) == 2 else self.bb.names[0]

    def _test(self, unit: Unit, model, test: np.ndarray, audio_only: bool) -> dict[str, Any]:
        modes = ["audio"] if audio_only else self.modes()
        metrics: dict[str, Any] = {}
        preds = []
        for mode in modes:
            m, out, rows = self.score(model, test, mode)
            metrics[mode] = m
            preds.append((mode, out, rows))
        for snr, data in self.noisy.items():
            for mode in modes:
                if mode == "visual":
                    continue  # noise is added to the audio only
                m, _, _ = self.score(model, test, mode, data)
                metrics[f"noise{snr:g}dB/{mode}"] = m
        if self.info.main:
            self._write_predictions(self.run / "units" / unit.name / "predictions.csv", preds)
        return {"metrics": metrics}

    def _write_predictions(self, path: Path, preds) -> None:
        clips, names = self.store.clips, self.task.names
        lines = ["mode,clip_id,speaker,target,prediction," + ",".join(names)]
        for mode, out, rows in preds:
            for r, o in zip(rows.tolist(), out):
                if self.task.kind == "classify":
                    target = names[self.y[r]] if self.y[r] >= 0 else ""
                    pred = names[int(np.argmax(o))]
                elif self.task.kind == "multilabel":
                    target = ";".join(n for n, v in zip(names, self.y[r]) if v > 0.5)
                    pred = ";".join(n for n, v in zip(names, o) if v > 0)
                else:
                    target = ";".join(f"{v:.4f}" for v in self.y[r])
                    pred = ";".join(f"{v:.4f}" for v in o)
                lines.append(",".join([mode, str(clips["clip_id"][r]), str(clips["speaker"][r]),
                                       target, pred] + [f"{v:.5f}" for v in o]))
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())

    def _class_weight(self, train: np.ndarray) -> torch.Tensor | None:
        if self.task.kind != "classify" or not self.fcfg.class_weights:
            return None
        counts = np.bincount(self.y[train], minlength=len(self.task.names)).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
        return torch.tensor(w, dtype=torch.float32, device=self.device)

    # -- distillation ------------------------------------------------------------------------

    def _teacher_logits(self, model, rows: np.ndarray) -> np.ndarray:
        out, _, _ = predict_clips(model, self.data, rows, "av", self.device, self.fcfg.eval_batch,
                                  self.group)
        full = np.full((self.store.n_clips, out.shape[1]), np.nan, np.float32)
        full[rows] = out
        return full

    def _teacher_targets(self, unit: Unit) -> dict[str, torch.Tensor]:
        """The fold's AV teacher's clip probabilities at temperature T, and each clip's reliability:
        the teacher's probability of the clip's true label (its agreement with the label)."""
        logits = self.teachers.get(unit.seed_key)
        if logits is None:
            raise FinetuneError(f"{unit.name}: the fold's pretrained audiovisual teacher has not been "
                                f"trained in this process (run with 'pretrained' in finetune.inits)")
        t = self.fcfg.distill_temperature
        lg = torch.from_numpy(np.nan_to_num(logits))
        soft = torch.softmax(lg / t, -1)
        p = torch.softmax(lg, -1)
        y = torch.from_numpy(np.clip(self.y, 0, None))
        reliability = p.gather(1, y[:, None]).squeeze(1) * torch.from_numpy(self.y >= 0).float()
        return {"soft": soft.to(self.device), "reliability": reliability.to(self.device)}

    def _distill(self, out: torch.Tensor, ce: torch.Tensor, teacher: dict[str, torch.Tensor],
                 rows: np.ndarray, y: torch.Tensor) -> torch.Tensor:
        """Per sample: (1 − w) CE(label) + w T² KL(teacher_T ‖ student_T), w = weight × reliability."""
        t = self.fcfg.distill_temperature
        idx = torch.from_numpy(rows).to(out.device)
        w = self.fcfg.distill_weight * teacher["reliability"][idx]
        log_q = F.log_softmax(out.float() / t, -1)
        kl = F.kl_div(log_q, teacher["soft"][idx], reduction="none").sum(-1) * t * t
        return (1 - w) * ce + w * kl

    # -- checkpoints -------------------------------------------------------------------------

    def _resume(self, path: Path, model, opt) -> dict[str, Any]:
        state = {"epoch": 0, "best": {"value": None, "epoch": 0, "state": None}}
        if not path.exists():
            return state
        ckpt = load_checkpoint(path, kind="classifier")
        if Config.from_dict(ckpt["config"]) != replace(self.cfg, device=Config.from_dict(ckpt["config"]).device):
            raise FinetuneError(f"{path}: interrupted unit was trained with another config; use the "
                                f"same --preset/--set or a new run directory")
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt)  # dropout draws continue as in an uninterrupted run
        ex = ckpt["extra"]
        log.info("%s: resuming at epoch %d", path, ex["epoch"])
        return {"epoch": int(ex["epoch"]), "best": {"value": ex["best_value"], "epoch": int(ex["best_epoch"]),
                                                    "state": ex["best_state"]}}

    def _save_classifier(self, path: Path, model, unit: Unit, res: UnitResult) -> Path:
        extra = {"task": self.task.to_dict(), "dims": self.bb.dims.to_dict(),
                 "mae_config": asdict(self.bb.mae_cfg),
                 "variant": unit.variant, "fold": unit.fold.name, "fraction": unit.fraction,
                 "test_speakers": list(unit.fold.test_speakers),
                 "val_speakers": list(unit.fold.val_speakers),
                 "tokenizers": _store_tokenizers(self.store), "store": str(self.store.path),
                 "mae": self.bb.mae_path or "", "best_epoch": res.best_epoch}
        return save_checkpoint(path, kind="classifier", model=model, config=self.cfg,
                               parents=self.bb.parents, step=res.best_epoch,
                               metrics=_flat_metrics(res.metrics), extra=extra)


def _store_tokenizers(store: TokenStore) -> dict[str, Any]:
    """{modality: {"path", "sha256"}} recorded by `vqmae tokenize` in the store's attributes."""
    return dict(store.attrs.get("config", {}).get("tokenizers", {}))  # {} for an older store


def _flat_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    return {f"{mode}/{k}": float(v) for mode, m in metrics.items() for k, v in m.items()
            if np.isscalar(v) and not isinstance(v, str)}


# ----------------------------------------------------------------------------------------------
# the whole run


@dataclass
class FinetuneResult:
    run: Path
    units: list[UnitResult]
    summary: dict[str, Any]
    report: str


def finetune(store_path: str | Path, cfg: Config, run_dir: str | Path, *, mae: str | Path | None = None,
             device: str = "cpu", reporter: Reporter = Reporter(), split_file: str | Path | None = None,
             noisy_stores: Mapping[float, str | Path] | None = None) -> FinetuneResult:
    """Train and test every unit (see the module docstring); resumable; writes the report."""
    info, device = init_distributed(device)
    fcfg = cfg.finetune
    _check_config(fcfg)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    store = TokenStore.open(store_path)
    bb = load_backbone(store, cfg, mae)
    _check_run_config(run, cfg, info)
    noisy = {float(snr): TokenStore.open(p) for snr, p in (noisy_stores or {}).items()}
    for snr, s in noisy.items():
        if store_parents(s) != store_parents(store) or s.n_clips != store.n_clips or \
                not np.array_equal(s.clips["clip_id"], store.clips["clip_id"]):
            raise FinetuneError(f"noisy store {s.path} ({snr:g} dB) does not hold the clips of "
                                f"{store.path} encoded by the same tokenizers")
    data_probe = ClipWindows(store, bb.names, bb.mae_cfg.window_seconds)
    usable = data_probe.usable()
    task = build_task(fcfg, store.clips, usable)
    y = task.targets(store.clips, usable)
    usable = usable[task.has_target(y)]
    if not len(usable):
        raise FinetuneError(f"{store.path}: no clip with status ok, codes and a {fcfg.task} target")
    fold_list = _folds(store, usable, cfg, split_file)
    trainer = Trainer(store, cfg, bb, task, run, device, info, reporter, noisy)
    if info.main:
        atomic_write_json(run / "folds.json", [
            {"name": f.name, "test_speakers": list(f.test_speakers), "val_speakers": list(f.val_speakers),
             "n_train": len(f.train), "n_val": len(f.val), "n_test": len(f.test)} for f in fold_list])
    units = _run_units(trainer, fold_list, cfg, task)
    summary, report = summarize(units, cfg, task, fold_list, run, bb)
    if info.main:
        atomic_write_json(run / "summary.json", _jsonable(summary))
        atomic_write_bytes(run / "report.md", report.encode())
        _plots(units, cfg, task, run, summary)
    if info.enabled:
        torch.distributed.barrier()
    return FinetuneResult(run, units, summary, report)


def _check_config(fcfg: FinetuneConfig) -> None:
    bad = [v for v in fcfg.inits if v not in ("pretrained", "scratch", "tokens")]
    if bad or not fcfg.inits:
        raise FinetuneError(f"finetune.inits {list(fcfg.inits)}: expected any of 'pretrained', 'scratch' "
                            f"and 'tokens' (the bag-of-tokens baseline)")
    if "tokens" in fcfg.inits and (fcfg.task != "classify" or fcfg.token_pool < 1):
        raise FinetuneError("finetune.inits 'tokens' (the bag-of-tokens baseline) needs task 'classify' "
                            f"and finetune.token_pool >= 1 (got {fcfg.task!r}, {fcfg.token_pool})")
    bad = [m for m in fcfg.eval_modalities if m not in EVAL_MODES]
    if bad:
        raise FinetuneError(f"finetune.eval_modalities: unknown {bad}; expected {list(EVAL_MODES)}")
    if not fcfg.label_fractions or any(not 0 < f <= 1 for f in fcfg.label_fractions):
        raise FinetuneError(f"finetune.label_fractions {list(fcfg.label_fractions)}: each must lie in (0, 1]")
    if fcfg.distill and (fcfg.task != "classify" or "pretrained" not in fcfg.inits):
        raise FinetuneError("finetune.distill needs task 'classify' and 'pretrained' in finetune.inits "
                            "(the teacher is the fold's pretrained audiovisual model)")
    if not 0 <= fcfg.modality_dropout <= 1:
        raise FinetuneError(f"finetune.modality_dropout={fcfg.modality_dropout} must lie in [0, 1]")
    if fcfg.epochs < 1 or fcfg.batch_size < 1:
        raise FinetuneError("finetune.epochs and finetune.batch_size must be positive")


def _check_run_config(run: Path, cfg: Config, info: Dist) -> None:
    path = run / "config.json"
    if path.exists():
        stored = Config.from_dict(json.loads(path.read_text()))
        if replace(stored, device=cfg.device) != cfg:
            raise FinetuneError(f"{run}: this run directory was made with another config "
                                f"(config.json); use the same --preset/--set to resume, or a new --run")
    elif info.main:
        atomic_write_json(path, cfg.to_dict())


def _folds(store: TokenStore, usable: np.ndarray, cfg: Config, split_file) -> list[folds_mod.Fold]:
    fcfg, clips = cfg.finetune, store.clips
    try:
        if split_file is not None:
            spec = folds_mod.read_split_file(split_file, clips["clip_id"], clips["path"])
            # a speaker → fold file gives k folds; a clip → train/val/test file one (unlisted
            # clips are left out, and logged)
            return spec.folds(clips["speaker"], usable, seed=cfg.seed, val_speakers=fcfg.val_speakers)
        if fcfg.protocol == "split":
            return folds_mod.make_folds(clips["speaker"], usable, protocol="split",
                                        split=np.asarray(clips["split"]))
        return folds_mod.make_folds(clips["speaker"], usable, protocol=fcfg.protocol, k=fcfg.folds,
                                    seed=cfg.seed, val_speakers=fcfg.val_speakers)
    except ValueError as e:
        raise FinetuneError(f"{store.path}: {e}") from None


def _run_units(trainer: Trainer, fold_list: list[folds_mod.Fold], cfg: Config, task: Task
               ) -> list[UnitResult]:
    fcfg = cfg.finetune
    largest = max(fcfg.label_fractions)
    variants = list(fcfg.inits) + (["student", "audio_labels"] if fcfg.distill else [])
    results = []
    for frac in sorted(fcfg.label_fractions):
        for i, fold in enumerate(fold_list):
            train = _subset(trainer, task, fold.train, frac, cfg.seed + i)
            for variant in variants:
                if variant in ("student", "audio_labels") and frac != largest:
                    continue
                unit = Unit(variant, frac, fold)
                done = trainer.run / "units" / unit.name / "result.json"
                # a student needs its teacher in memory: rerun the teacher if the student is not done
                if done.exists() and not (variant == "pretrained" and fcfg.distill and frac == largest
                                          and not _all_done(trainer.run, fold, frac)):
                    results.append(UnitResult(**json.loads(done.read_text())))
                    log.info("%s: already done", unit.name)
                    continue
                if variant == "tokens":
                    results.append(trainer.token_unit(unit, train, fold.val, fold.test))
                    continue
                results.append(trainer.train_unit(unit, train, fold.val, fold.test,
                                                  save_model=frac == largest))
    return results


def _all_done(run: Path, fold: folds_mod.Fold, frac: float) -> bool:
    return all((run / "units" / f"{v}/frac{frac:g}/{fold.name}" / "result.json").exists()
               for v in ("student", "audio_labels"))


def _subset(trainer: Trainer, task: Task, rows: np.ndarray, frac: float, seed: int) -> np.ndarray:
    if frac >= 1.0:
        return rows
    labels = trainer.y[rows] if task.kind == "classify" else np.full(len(rows), -1, np.int64)
    return rows[folds_mod.stratified_subset(labels, frac, seed)]


# ----------------------------------------------------------------------------------------------
# the report


def _key_metrics(task: Task) -> list[str]:
    return {"classify": ["war", "uar", "macro_f1"], "multilabel": ["macro_f1", "macro_auc", "micro_f1"],
            "regress": ["ccc"] + [f"ccc/{n}" for n in task.names]}[task.kind]


def summarize(units: Sequence[UnitResult], cfg: Config, task: Task, fold_list, run: Path,
              bb: Backbone) -> tuple[dict[str, Any], str]:
    """Aggregate (mean ± std over folds) per (variant, fraction, eval) → summary dict and markdown."""
    keys = _key_metrics(task)
    groups: dict[tuple[str, float, str], list[dict[str, float]]] = {}
    for u in units:
        variant, frac, _ = u.unit.split("/")
        for ev, m in u.metrics.items():
            groups.setdefault((variant, float(frac[4:]), ev), []).append(
                {k: m.get(k) for k in keys + ["n_clips"] if m.get(k) is not None})
    rows = []
    for (variant, frac, ev), per_fold in sorted(groups.items(), key=lambda kv: (
            kv[0][1], VARIANTS.index(kv[0][0]), _eval_order(kv[0][2]))):
        agg = M.aggregate(per_fold)
        rows.append({"variant": variant, "fraction": frac, "eval": ev, "folds": len(per_fold),
                     **{k: agg.get(k) for k in keys}})
    chance = _chance(task)
    summary = {"task": task.to_dict(), "protocol": cfg.finetune.protocol, "folds": len(fold_list),
               "mae": bb.mae_path, "rows": rows, "chance": chance,
               "units": [u.to_dict() for u in units]}
    lines = [f"# Fine-tuning report ({task.kind}: {', '.join(task.names)})", "",
             f"{len(fold_list)} speaker-independent folds ({cfg.finetune.protocol}); epoch selected "
             f"on validation speakers; test clips scored over all windows; mean ± std over folds."
             + (" Speaker-normalised: each speaker's mean pooled features (over its own unlabelled "
                "clips) are subtracted before the head (finetune.speaker_norm)." if cfg.finetune.speaker_norm
                else ""),
             f"MAE: {bb.mae_path or '(none: from scratch)'}. Chance: {chance}.", "",
             "| variant | labels | eval | folds | " + " | ".join(k.upper() for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [M.format_mean_std(r[k]) if r.get(k) else "n/a" for k in keys]
        lines.append(f"| {r['variant']} | {r['fraction']:.0%} | {r['eval']} | {r['folds']} | "
                     + " | ".join(cells) + " |")
    return summary, "\n".join(lines) + "\n"


def _eval_order(ev: str) -> tuple[int, str]:
    noise, _, mode = ev.rpartition("/")
    return (EVAL_MODES.index(mode) if mode in EVAL_MODES else 9, noise)


def _chance(task: Task) -> dict[str, float]:
    if task.kind == "classify":
        return {"uar": 1.0 / len(task.names)}
    if task.kind == "regress":
        return {"ccc": 0.0}
    return {"macro_auc": 0.5}


def _plots(units: Sequence[UnitResult], cfg: Config, task: Task, run: Path, summary) -> None:
    from vqmae import plots

    if task.kind == "classify":
        largest = max(cfg.finetune.label_fractions)
        for variant in VARIANTS:
            # each unit's first test mode: av (audio for the audio-only variants and backbones)
            mats = [np.asarray(m["confusion"]) for u in units
                    if u.unit.startswith(f"{variant}/frac{largest:g}/")
                    for m in [next(iter(u.metrics.values()))] if "confusion" in m]
            if mats:
                plots.confusion_png(np.sum(mats, 0), task.names, run / f"confusion_{variant}.png",
                                    f"{variant}: test clips of every fold")
    if len(cfg.finetune.label_fractions) > 1:
        key = _key_metrics(task)[1 if task.kind == "classify" else 0]
        ev = "av" if any(r["eval"] == "av" for r in summary["rows"]) else summary["rows"][0]["eval"]
        curves = {}
        for variant in cfg.finetune.inits:
            sel = sorted((r["fraction"], r[key]) for r in summary["rows"]
                         if r["variant"] == variant and r["eval"] == ev and r.get(key))
            curves[variant] = ([f for f, _ in sel], [s["mean"] for _, s in sel], [s["std"] for _, s in sel])
        plots.label_efficiency_png(curves, run / "label_efficiency.png", key.upper())

