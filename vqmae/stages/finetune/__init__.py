"""Stage 3: emotion models from a pretrained MAE, evaluated speaker-independently (docs/design.md §6).

    finetune(store, cfg, run_dir, mae=mae.pt) → run_dir/summary.json, report.md, plots, per-unit
    classifier checkpoints and predictions

A *unit* is one model trained and tested: (label fraction, fold, variant). Variants are the inits
in ``cfg.finetune.inits`` — ``pretrained`` (encoder from the MAE, fine-tuned), ``probe`` (its linear
probe: the pretrained encoder frozen, a linear head fitted to convergence on speaker-centred mean
clip vectors), ``scratch`` (the identical backbone, randomly initialised) and the baselines
``tokens`` and ``egemaps`` — plus, with ``distill``, ``student`` (audio-only, distilled from
the fold's pretrained audiovisual model) and ``audio_labels`` (the same audio-only model trained on
labels alone). Within a (fraction, fold) every variant sees the same training windows in the same
order and starts from the same head initialisation, so their difference is the backbone's.

Rules (docs/design.md §6): folds are by speaker and cover every speaker (`vqmae.folds`); the epoch is
selected on validation speakers carved from the training speakers; test clips are scored whole: all
their non-overlapping windows are encoded and pooled into one clip vector by the model's learned
clip pooling; the test fold is never used for any choice. Each unit writes ``result.json`` last, atomically: a rerun skips finished
units and resumes an interrupted one from its last epoch (``last.pt``).

Training samples are crops of whole clips: each epoch every training clip appears once per
``clip_windows`` windows that tile it, as that many consecutive windows from a random start
(`vqmae.windows.WindowPlan`), pooled like a test clip; audio-only clips take part in audiovisual models with
their visual half absent. With ``modality_dropout`` p an audiovisual sample that has both
modalities loses one of them (each with probability p/2), which is what lets one model be scored on
audio alone or video alone.

Speaker normalisation (``speaker_norm``, on by default; `vqmae.models.classifier`): at the start of every
epoch each training speaker's mean clip vector is computed per presence pattern (no gradient)
and subtracted from that speaker's samples; validation and test speakers are normalised by the mean
over their own clips (their labels are never used); the saved model stores the average of
the training speakers' means for clips of an unknown speaker.

Data-parallel under ``torchrun`` like stage 2: each rank trains on its slice of every global batch
(DDP averages the gradients), every rank evaluates identically, rank 0 writes.

The package's parts: `data` (the backbone, windows of labelled clips, clip scoring), `trainer`
(one unit trained through `vqmae.training.Fit` and tested), `baseline` (bag-of-tokens), `report`
(the summary table and plots); the task (classify, multilabel, regress) is a `vqmae.tasks.Task`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from vqmae import folds as folds_mod
from vqmae.audio import NoiseSpec
from vqmae.checkpoint import check_resume, store_parents
from vqmae.config import Config, FinetuneConfig, resolve_modalities
from vqmae.noise import noisy_store
from vqmae.stages.finetune.data import BASELINES, EVAL_MODES, LINEAR, ClipWindows, FinetuneError, load_backbone
from vqmae.stages.finetune.report import (paired_lines, paired_modalities, per_speaker_lines, report_sections,
                                          summarize, write_plots)
from vqmae.stages.finetune.trainer import Trainer, Unit, UnitResult, jsonable
from vqmae.store import StoreError, TokenStore
from vqmae.tasks import TASKS, Task, TaskError, build_task
from vqmae.training import Dist, Reporter, init_distributed
from vqmae.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    run: Path
    units: list[UnitResult]
    summary: dict[str, Any]
    report: str


def finetune(store_path: str | Path, cfg: Config, run_dir: str | Path, *, mae: str | Path | None = None,
             device: str = "cpu", reporter: Reporter = Reporter(), split_file: str | Path | None = None,
             noisy_stores: Mapping[float, str | Path] | None = None, workers: int = 2) -> FinetuneResult:
    """Train and test every unit (see the module docstring); resumable; writes the report.

    Test clips are also scored on noisy twins of the store: `noisy_stores` ({snr_db: path}), or,
    when not given, the ones `cfg.finetune.noise_snrs` asks for, built under `run_dir/noisy` (the
    store's clips re-tokenized with seeded noise, `workers` decoding processes; cached). A run that
    this call started and a damaged store stopped (`StoreError`) leaves no directory behind."""
    run, fresh = Path(run_dir), not Path(run_dir).exists()
    try:
        return _finetune(store_path, cfg, run, mae=mae, device=device, reporter=reporter,
                         split_file=split_file, noisy_stores=noisy_stores, workers=workers)
    except StoreError:
        if fresh:
            shutil.rmtree(run, ignore_errors=True)
        raise


def _finetune(store_path: str | Path, cfg: Config, run: Path, *, mae: str | Path | None,
              device: str, reporter: Reporter, split_file: str | Path | None,
              noisy_stores: Mapping[float, str | Path] | None, workers: int) -> FinetuneResult:
    info, device = init_distributed(device)
    fcfg = cfg.finetune
    _check_config(fcfg)
    store = TokenStore.open(store_path)
    cfg = resolve_modalities(cfg, store.specs)  # from scratch: the store's modalities
    bb = load_backbone(store, cfg, mae)
    run.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run leaves no directory
    _check_run_config(run, cfg, info)
    if noisy_stores is None:
        noisy_stores = _noisy_stores(Path(store_path), cfg, run, device, workers, reporter, info)
    noisy = {float(snr): TokenStore.open(p) for snr, p in noisy_stores.items()}
    for snr, s in noisy.items():
        if store_parents(s) != store_parents(store) or s.n_clips != store.n_clips or \
                not np.array_equal(s.clips["clip_id"], store.clips["clip_id"]):
            raise FinetuneError(f"noisy store {s.path} ({snr:g} dB) does not hold the clips of "
                                f"{store.path} encoded by the same tokenizers")
    data_probe = ClipWindows(store, bb.names, bb.mae_cfg.window_seconds)
    usable = data_probe.usable()
    try:
        task = build_task(fcfg, store.clips, usable)
    except TaskError as e:
        raise FinetuneError(str(e)) from None
    y = task.targets(store.clips, usable)
    usable = usable[task.has_target(y)]
    if not len(usable):
        raise FinetuneError(f"{store.path}: no clip with status ok, codes and a {fcfg.task} target")
    fold_list = _folds(store, usable, cfg, split_file)
    trainer = Trainer(store, cfg, bb, task, run, device, info, reporter, noisy, workers)
    if info.main:
        atomic_write_json(run / "folds.json", [
            {"name": f.name, "test_speakers": list(f.test_speakers), "val_speakers": list(f.val_speakers),
             "n_train": len(f.train), "n_val": len(f.val), "n_test": len(f.test)} for f in fold_list])
    units = _run_units(trainer, fold_list, cfg, task)
    summary, report = summarize(units, cfg, task, fold_list, run, bb)
    if info.main:
        summary["paired"] = paired_modalities(units, cfg, task, run)
        atomic_write_json(run / "summary.json", jsonable(summary))
        written = write_plots(units, cfg, task, run, summary)
        report += report_sections(written, per_speaker_lines(units, cfg, task, run),
                                  max(cfg.finetune.label_fractions), paired_lines(summary["paired"]))
        atomic_write_bytes(run / "report.md", report.encode())
    if info.enabled:
        torch.distributed.barrier()
    return FinetuneResult(run, units, summary, report)


def _noisy_stores(store: Path, cfg: Config, run: Path, device: str, workers: int, reporter: Reporter,
                  info: Dist) -> dict[float, Path]:
    """{snr: path} of the noisy twins `cfg.finetune.noise_snrs` asks for, built by rank 0."""
    kind, out = cfg.finetune.noise_kind, {}
    for snr in cfg.finetune.noise_snrs:
        out[snr] = run / "noisy" / f"{kind}{snr:g}dB.zarr"
        if info.main:
            log.info("re-tokenizing the store's clips with %s noise at %g dB → %s", kind, snr, out[snr])
            noisy_store(store, out[snr], NoiseSpec(snr, kind, cfg.seed), cfg=cfg, device=device,
                        workers=workers, reporter=reporter)
    if info.enabled and out:
        torch.distributed.barrier()
    return out


def _check_config(fcfg: FinetuneConfig) -> None:
    bad = [v for v in fcfg.inits if v not in ("pretrained", "probe", "scratch", *BASELINES)]
    if bad or not fcfg.inits:
        raise FinetuneError(f"finetune.inits {list(fcfg.inits)}: expected any of 'pretrained', 'probe' "
                            f"(its linear probe), 'scratch', 'tokens' (the bag-of-tokens baseline) and "
                            f"'egemaps' (the eGeMAPS baseline)")
    if fcfg.task not in TASKS:
        raise FinetuneError(f"finetune.task {fcfg.task!r}: expected one of {sorted(TASKS)}")
    single = TASKS[fcfg.task].single_label
    if "tokens" in fcfg.inits and fcfg.token_pool < 1:
        raise FinetuneError(f"finetune.token_pool must be >= 1, got {fcfg.token_pool}")
    bad = [m for m in fcfg.eval_modalities if m not in EVAL_MODES]
    if bad:
        raise FinetuneError(f"finetune.eval_modalities: unknown {bad}; expected {list(EVAL_MODES)}")
    if not fcfg.label_fractions or any(not 0 < f <= 1 for f in fcfg.label_fractions):
        raise FinetuneError(f"finetune.label_fractions {list(fcfg.label_fractions)}: each must lie in (0, 1]")
    if fcfg.distill and (not single or "pretrained" not in fcfg.inits):
        raise FinetuneError("finetune.distill needs task 'classify' and 'pretrained' in finetune.inits "
                            "(the teacher is the fold's pretrained audiovisual model)")
    if not 0 <= fcfg.modality_dropout <= 1:
        raise FinetuneError(f"finetune.modality_dropout={fcfg.modality_dropout} must lie in [0, 1]")
    if fcfg.epochs < 1 or fcfg.batch_size < 1:
        raise FinetuneError("finetune.epochs and finetune.batch_size must be positive")


def _check_run_config(run: Path, cfg: Config, info: Dist) -> None:
    path = run / "config.json"
    if path.exists():
        check_resume(path, json.loads(path.read_text()), cfg, "finetune", FinetuneError)
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
    if not (task.single_label or task.values):  # the linear models classify or regress
        skipped = [v for v in variants if v in LINEAR]
        if skipped:
            log.warning("%s: no linear model for task %r; skipped", skipped, task.kind)
        variants = [v for v in variants if v not in LINEAR]
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
                if variant in BASELINES:
                    results.append(trainer.baseline_unit(unit, train, fold.val, fold.test))
                    continue
                if variant == "probe":
                    results.append(trainer.probe_unit(unit, train, fold.val, fold.test,
                                                      save_model=frac == largest))
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
    return rows[folds_mod.stratified_subset(task.strata(trainer.y[rows]), frac, seed)]
