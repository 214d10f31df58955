"""One fine-tuning unit — (variant, label fraction, fold) — trained and tested: the model built from
the backbone, its optimizer, the epochs run through `vqmae.training.Fit` (validation after each one
selects the epoch, ``last.pt`` resumes an interrupted unit), the test scores and predictions, and the
bag-of-tokens baseline's units."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vqmae import folds as folds_mod
from vqmae.checkpoint import check_resume, load_checkpoint, restore_rng, save_checkpoint
from vqmae.config import Config, FinetuneConfig
from vqmae.models.classifier import EmotionModel, center_table, drop_modality, load_encoder, mean_center
from vqmae.stages.finetune import baseline, egemaps
from vqmae.stages.finetune.head import fit_head
from vqmae.stages.finetune.data import (CKPT_NAME, Backbone, ClipWindows, FinetuneError, pooled_clips,
                                        predict_clips, restrict)
from vqmae.store import TokenStore
from vqmae.tasks import Task
from vqmae.training import Dist, Fit, MetricsLog, Reporter, StepOut, adamw, base_lrs
from vqmae.utils import atomic_write_bytes, atomic_write_json, jsonable
from vqmae.windows import WindowPlan

log = logging.getLogger(__name__)


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


def _make_model(bb: Backbone, task: Task, fcfg: FinetuneConfig, seed: int, variant: str,
                device: str) -> EmotionModel:
    torch.manual_seed(seed)  # same head init for every variant of a (fraction, fold)
    model = EmotionModel(bb.mae_cfg, bb.dims, len(task.names), fcfg.pooling, fcfg.dropout,
                         speaker_norm=fcfg.speaker_norm, clip_pooling=fcfg.clip_pooling,
                         head_norm=fcfg.head_norm)
    if variant in ("pretrained", "probe", "student", "audio_labels"):
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
    return adamw([{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd}
                              for (lr, wd), ps in groups.items()], betas=(0.9, 0.999))


def _drop_for_training(batch: dict[str, torch.Tensor], names: Sequence[str], p: float,
                       force_audio_only: bool, gen: torch.Generator, info: Dist, crop: torch.Tensor,
                       n_crops: int) -> dict[str, torch.Tensor]:
    """Modality dropout, per training crop (every window of a crop loses the same modality); the
    draws are made for the global batch and sliced per rank, so a crop's fate does not depend on the
    number of processes. ``crop`` `[n_windows]`: each window's crop, ids below ``n_crops``."""
    if force_audio_only:
        return restrict(batch, "audio", names)
    if len(names) != 2 or p <= 0:
        return batch
    has = {}
    for m in names:  # [n_crops]: the crop has frames of m
        frames = batch[f"{m}_valid"].any(1).long()
        has[m] = torch.zeros(n_crops, dtype=torch.long, device=frames.device).index_add(0, crop, frames) > 0
    both = has["audio"] & has["visual"]
    u = torch.rand(n_crops * info.world_size, generator=gen)[info.rank * n_crops:(info.rank + 1) * n_crops]
    u = u.to(both.device)
    batch = drop_modality(batch, "visual", (both & (u < p / 2))[crop])
    return drop_modality(batch, "audio", (both & (u >= p / 2) & (u < p))[crop])


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
        return {**vars(self), "metrics": jsonable(self.metrics)}


class Trainer:
    """Trains and tests units on one store; see the module docstring."""

    def __init__(self, store: TokenStore, cfg: Config, bb: Backbone, task: Task, run: Path,
                 device: str, info: Dist, reporter: Reporter, noisy: Mapping[float, TokenStore],
                 workers: int = 1):
        self.store, self.cfg, self.bb, self.task, self.run = store, cfg, bb, task, run
        self.fcfg = cfg.finetune
        self.device, self.info, self.reporter = device, info, reporter
        self.data = ClipWindows(store, bb.names, bb.mae_cfg.window_seconds)
        self.noisy = {snr: ClipWindows(s, bb.names, bb.mae_cfg.window_seconds)
                      for snr, s in noisy.items()}
        n = store.n_clips
        self.y = task.empty(n)
        rows = np.arange(n)
        self.y[rows] = task.targets(store.clips, rows)
        speakers = [str(x) for x in store.clips["speaker"].tolist()]
        self.group = np.unique(speakers, return_inverse=True)[1].astype(np.int64)  # speaker id per row
        self.teachers: dict[str, np.ndarray] = {}  # seed_key → teacher clip logits over all rows
        self._features: dict[str, dict[str, np.ndarray]] = {}  # each baseline's, built once
        self.workers = workers  # decoding processes for the eGeMAPS baseline

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
        # one sample = a crop of a clip, at most clip_windows windows long (longer clips give more
        # crops per epoch, in proportion to their length)
        plan = WindowPlan(train, self.data.steps[train], self.data.geom.window_steps * fcfg.clip_windows, seed)
        per_epoch = max(1, math.ceil(plan.samples_per_epoch / fcfg.batch_size))
        bases = base_lrs(opt)
        class_weight = self._class_weight(train)
        teacher = self._teacher_targets(unit) if unit.variant == "student" else None
        audio_only = unit.variant in ("student", "audio_labels")
        state = self._resume(out_dir / "last.pt", model, opt)
        epoch, best = state["epoch"], state["best"]
        # a fitted head needs a linear model of the task (none for multilabel: the head starts random)
        if fcfg.head_init == "fit" and epoch == 0 and not audio_only and (self.task.single_label or self.task.values):
            self._fit_head(model, train, val)  # on vectors centred by each speaker's own mean
        net = model
        if info.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                find_unused_parameters=True)  # absent modalities leave pooling parameters unused
        gen = torch.Generator().manual_seed(seed + 1)
        fit = Fit(unit.name, model, opt, total_steps=fcfg.epochs * per_epoch,
                  warmup_steps=int(round(fcfg.warmup_epochs * per_epoch)), grad_clip=fcfg.grad_clip,
                  bases=bases, device=device, info=info, reporter=self.reporter)
        metrics = MetricsLog(out_dir / "metrics.jsonl", info)
        table: torch.Tensor | None = None
        t0 = time.perf_counter()

        def step_fn(step: int) -> StepOut:
            nonlocal table
            if step % per_epoch == 0:  # an epoch starts: this epoch's speaker means, then train mode
                table = self._train_centers(model, train, audio_only) if model.speaker_norm else None
                net.train()
                if fcfg.freeze:
                    model.backbone.eval()
            gen.manual_seed(seed * 7919 + step)  # a pure function of the step: resumable
            rows, starts = plan.batch(step, fcfg.batch_size, info.rank, info.world_size)
            win_rows, win_starts, crop = self.data.crop_windows(rows, starts, fcfg.clip_windows)
            batch = self.data.batch(win_rows, win_starts, device)
            crop_t = torch.from_numpy(crop).to(device)
            batch = _drop_for_training(batch, self.bb.names, fcfg.modality_dropout, audio_only, gen, info,
                                       crop_t, len(rows))
            y = self.task.batch_targets(self.y[rows], device)
            group = None if table is None else torch.from_numpy(self.group[rows]).to(device)
            mask = model.patch_mask(len(win_rows), fcfg.patch_dropout, gen, device)
            out = net(batch, table, group, crop_t, len(rows), mask)
            per_sample = self.task.loss(out, y, class_weight)
            if teacher is not None:
                per_sample = self._distill(out, per_sample, teacher, rows, y)
            return StepOut(per_sample.mean(), {}, len(rows))

        def end_epoch(step: int, train_row: dict[str, float]) -> None:
            """Logged once per epoch: validation selects the epoch; last.pt resumes the unit."""
            nonlocal best
            epoch = step // per_epoch
            val_metrics, _, _ = self.score(model, val, "audio" if audio_only else self._val_mode())
            value = float(val_metrics.get(self.task.select_key, math.nan))
            row = {"epoch": epoch, "loss/train": train_row["loss/total"], "lr": opt.param_groups[0]["lr"],
                   **{f"val/{k}": v for k, v in val_metrics.items() if np.isscalar(v)}}
            improved = math.isfinite(value) and (best["value"] is None or value > best["value"])
            if improved or best["state"] is None:
                best = {"value": value if math.isfinite(value) else None, "epoch": epoch,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            metrics.write(jsonable(row))
            if info.main and epoch < fcfg.epochs:
                save_checkpoint(out_dir / "last.pt", kind="classifier", model=model,
                                config=self.cfg, parents=self.bb.parents, step=epoch,
                                optimizer=opt, extra={"epoch": epoch, "best_state": best["state"],
                                                      "best_epoch": best["epoch"],
                                                      "best_value": best["value"]})
            train_row["val"] = value

        fit.run(step_fn, start=epoch * per_epoch, stop=fcfg.epochs * per_epoch, log_every=per_epoch,
                on_log=end_epoch,
                progress=lambda row: {"loss": row["loss/total"], self.task.select_key: row["val"]})
        metrics.close()
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

    def probe_unit(self, unit: Unit, train: np.ndarray, val: np.ndarray, test: np.ndarray,
                   save_model: bool) -> UnitResult:
        """The linear probe of the pretrained encoder: the encoder frozen, every patch of every
        window mean-pooled (per spatial position with ``pooling=position``, else over all of them)
        into one vector per modality and clip, each speaker's mean subtracted
        (as ``speaker_norm``), and a linear head fitted to convergence on those vectors — the same
        logistic (ridge for values) regression and validation-chosen penalty as the baselines. The
        training clips are presented audiovisually and, with two modalities, with each one alone,
        so the probe scores audio or video alone as the fine-tuned models do. The fitted
        standardisation is folded into the head: the result is an ordinary `EmotionModel`."""
        t0 = time.perf_counter()
        pooling = "position" if self.fcfg.pooling == "position" else "mean"  # no learned weights
        fcfg = replace(self.fcfg, pooling=pooling, clip_pooling="mean", head_norm="none", speaker_norm=True,
                       freeze=True, dropout=0.0)
        model = _make_model(self.bb, self.task, fcfg, unit_seed(self.cfg.seed, unit.seed_key), "probe",
                            self.device).eval()
        best_score = self._fit_head(model, train, val)
        with torch.no_grad():
            model.center.copy_(mean_center(self._train_centers(model, train, False)))
        result = self._test(unit, model, test, False)
        result.update(best_epoch=0, val=best_score, epochs=0,
                      seconds=time.perf_counter() - t0, n_train=len(train), n_val=len(val), n_test=len(test))
        res = UnitResult(unit=unit.name, **result)
        if self.info.main:
            out_dir = self.run / "units" / unit.name
            if save_model:
                res.checkpoint = str(self._save_classifier(out_dir / CKPT_NAME, model, unit, res,
                                                           replace(self.cfg, finetune=fcfg)))
            atomic_write_json(out_dir / "result.json", res.to_dict())
        return res

    def _fit_head(self, model: EmotionModel, train: np.ndarray, val: np.ndarray) -> float:
        cw = self._class_weight(train)
        return fit_head(model, self.data, self.y, self.group, self.task, train, val,
                        None if cw is None else cw.cpu().numpy(), self.fcfg.eval_batch, self.device)

    def baseline_unit(self, unit: Unit, train: np.ndarray, val: np.ndarray, test: np.ndarray) -> UnitResult:
        """A linear baseline on this unit's clips (`vqmae.stages.finetune.baseline`): same folds,
        same label subset, penalty chosen on the validation speakers. ``tokens``: the bag of tokens,
        one model per test modality; ``egemaps``: eGeMAPS functionals z-scored per speaker, audio."""
        t0 = time.perf_counter()
        features, modes = self._baseline_features(unit.variant)
        cw = self._class_weight(train)
        metrics, outputs, val_score, models = baseline.run_baseline(
            features, self.y, self.task, train, val, test, modes,
            None if cw is None else cw.cpu().numpy(), name=unit.variant)
        res = UnitResult(unit=unit.name, metrics=metrics, best_epoch=0, val=val_score, epochs=0,
                         seconds=time.perf_counter() - t0, n_train=len(train), n_val=len(val),
                         n_test=len(test))
        if self.info.main:
            out_dir = self.run / "units" / unit.name
            out_dir.mkdir(parents=True, exist_ok=True)
            self._write_predictions(out_dir / "predictions.csv",
                                    [(mode, out, rows) for mode, (rows, out) in outputs.items()])
            if models:  # `vqmae evaluate` scores them on other stores
                baseline.save_models(out_dir / baseline.BASELINE_FILE, unit.variant, models, self.task,
                                     self.fcfg.token_pool, self.fcfg.speaker_norm and unit.variant == "tokens")
            atomic_write_json(out_dir / "result.json", res.to_dict())
        key = self.task.select_key
        log.info("%s: %s %s", unit.name, key, {m: round(v.get(key, math.nan), 3) for m, v in metrics.items()})
        return res

    def _baseline_features(self, variant: str) -> tuple[dict[str, np.ndarray], list[str]]:
        """{modality: float32 [n_clips, D]} and the test modes of a baseline, built once per run."""
        if variant not in self._features:
            if variant == "tokens":  # centred per speaker where the transformer is (speaker_norm)
                self._features[variant] = baseline.token_features(
                    self.store, self.bb.names, self.fcfg.token_pool, self.group if self.fcfg.speaker_norm else None)
            else:
                raw = egemaps.store_features(self.store, self.run, self.workers, self.reporter)
                self._features[variant] = {"audio": egemaps.speaker_normalized(raw, self.group)}
        return self._features[variant], self.modes() if variant == "tokens" else ["audio"]

    def _train_centers(self, model: EmotionModel, train: np.ndarray, audio_only: bool) -> torch.Tensor:
        """Each training speaker's mean clip vector per presence pattern (a center table): over its
        training clips scored as training will present them (audiovisual, and each modality alone
        when modality dropout can remove the other)."""
        modes = ["audio"] if audio_only else ["av"] if len(self.bb.names) == 1 else \
            ["av", *self.bb.names] if self.fcfg.modality_dropout > 0 else ["av"]
        xs, ps, gs = [], [], []
        for mode in modes:
            rows = train if mode == "av" else train[self.data.has(mode, train)]
            x, p, _, _, _ = pooled_clips(model, self.data, rows, mode, self.device, self.fcfg.eval_batch)
            xs.append(x)
            ps.append(p)
            gs.append(torch.from_numpy(self.group[rows]))
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
        clips, names, task = self.store.clips, self.task.names, self.task
        lines = ["mode,clip_id,speaker,target,prediction," + ",".join(names)]
        for mode, out, rows in preds:
            for r, o in zip(rows.tolist(), out):
                lines.append(",".join([mode, str(clips["clip_id"][r]), str(clips["speaker"][r]),
                                       task.format_target(self.y[r]), task.format_output(o)]
                                      + [f"{v:.5f}" for v in o]))
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())

    def _class_weight(self, train: np.ndarray) -> torch.Tensor | None:
        w = self.task.class_weight(self.y[train]) if self.fcfg.class_weights else None
        return None if w is None else torch.tensor(w, dtype=torch.float32, device=self.device)

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
        check_resume(path, ckpt["config"], self.cfg, "finetune", FinetuneError)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt)  # dropout draws continue as in an uninterrupted run
        ex = ckpt["extra"]
        log.info("%s: resuming at epoch %d", path, ex["epoch"])
        return {"epoch": int(ex["epoch"]), "best": {"value": ex["best_value"], "epoch": int(ex["best_epoch"]),
                                                    "state": ex["best_state"]}}

    def _save_classifier(self, path: Path, model, unit: Unit, res: UnitResult,
                         cfg: Config | None = None) -> Path:
        extra = {"task": self.task.to_dict(), "dims": self.bb.dims.to_dict(),
                 "mae_config": asdict(self.bb.mae_cfg),
                 "variant": unit.variant, "fold": unit.fold.name, "fraction": unit.fraction,
                 "test_speakers": list(unit.fold.test_speakers),
                 "val_speakers": list(unit.fold.val_speakers),
                 "tokenizers": _store_tokenizers(self.store), "store": str(self.store.path),
                 "mae": self.bb.mae_path or "", "best_epoch": res.best_epoch}
        return save_checkpoint(path, kind="classifier", model=model, config=cfg or self.cfg,
                               parents=self.bb.parents, step=res.best_epoch,
                               metrics=_flat_metrics(res.metrics), extra=extra)


def _store_tokenizers(store: TokenStore) -> dict[str, Any]:
    """{modality: {"path", "sha256"}} recorded by `vqmae tokenize` in the store's attributes."""
    return dict(store.attrs.get("config", {}).get("tokenizers", {}))  # {} for an older store


def _flat_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    return {f"{mode}/{k}": float(v) for mode, m in metrics.items() for k, v in m.items()
            if np.isscalar(v) and not isinstance(v, str)}
