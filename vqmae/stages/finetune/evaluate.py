"""`vqmae evaluate RUN STORE`: the saved fold models of a finished fine-tuning run, scored on another
token store made with the same tokenizers.

- **A twin of the training store** holds every clip id each fold tested, for example the store of a
  noisy twin of the corpus (`vqmae synth --kind speech` writes them). Each fold's model then scores its
  own test clips, as in the run. Clean-trained models scored on noisy files is the noise-robustness
  protocol of the speech-emotion literature.
- **Any other store** is another corpus. Its speakers are new to every model, so each fold's model
  scores all of its clips (cross-corpus).

The saved baselines (`baseline.npz` of the bag-of-tokens and eGeMAPS units) are scored the same way:
their features are recomputed from the evaluated store, and eGeMAPS reads the store's own media files,
so a noisy twin's eGeMAPS features are the noisy audio's.

Clips are scored exactly as `vqmae finetune` scored its test clips:

- every non-overlapping window of a clip goes through the model, and the outputs are averaged per clip;
- each speaker is normalised by the mean features of their own clips.

The result is one row per (variant, label fraction, eval mode), mean ± std over the folds. It is
written to `RUN/evaluate/<store name>/` as `summary.json` and `report.md`.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqmae.checkpoint import ParentMismatchError, check_parents, load_classifier
from vqmae.stages.finetune import baseline, egemaps
from vqmae.stages.finetune.data import CKPT_NAME, EVAL_MODES, ClipWindows, FinetuneError, predict_clips
from vqmae.stages.finetune.report import aggregate_rows, markdown_table
from vqmae.stages.finetune.trainer import jsonable
from vqmae.store import TokenStore
from vqmae.tasks import task_from_dict
from vqmae.training import Reporter
from vqmae.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    out: Path
    protocol: str  # "twin" (each fold's own test clips) or "cross-corpus" (every clip)
    summary: dict[str, Any]
    report: str


def evaluate(run_dir: str | Path, store_path: str | Path, out_dir: str | Path | None = None, *,
             device: str = "cpu", batch_size: int = 128, reporter: Reporter = Reporter()) -> EvaluateResult:
    """Score every saved classifier of the fine-tuning run at `run_dir` on `store_path` (see the
    module docstring); writes and returns the summary and the markdown report."""
    run, store = Path(run_dir), TokenStore.open(store_path)
    dest = Path(out_dir) if out_dir is not None else run / "evaluate" / store.path.name.removesuffix(".zarr")
    units = sorted((run / "units").glob(f"*/frac*/*/{CKPT_NAME}"))
    fitted = sorted((run / "units").glob(f"*/frac*/*/{baseline.BASELINE_FILE}"))
    if not units and not fitted:
        raise FinetuneError(f"{run}: no saved model (units/<variant>/frac<f>/<fold>/{CKPT_NAME} or "
                            f"{baseline.BASELINE_FILE}); is it a finished `vqmae finetune` run?")
    ids = {str(c): i for i, c in enumerate(store.clips["clip_id"].tolist())}
    ok = np.asarray(store.clips["status"]) == "ok"
    tested = {u: _tested_ids(u.parent) for u in units + fitted}
    twin = all(cid in ids for clip_ids in tested.values() for cid in clip_ids)
    speakers = [str(s) for s in store.clips["speaker"].tolist()]
    groups = np.unique(speakers, return_inverse=True)[1].astype(np.int64)
    per: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    task = task_from_dict(baseline.load_models(fitted[0])[0]["task"]) if fitted else None
    reporter.start("evaluate", len(units))
    for path in units:
        loaded = load_classifier(path, device=device, with_tokenizers=False)
        tokenizer_parents = {k: v for k, v in loaded.ckpt["parents"].items() if k.endswith("_tokenizer")}
        try:
            check_parents(path, tokenizer_parents, store)
        except ParentMismatchError as e:
            raise FinetuneError(str(e)) from None
        task, model = loaded.task, loaded.model
        data = ClipWindows(store, tuple(model.names), loaded.mae_cfg.window_seconds)
        rows = np.array(sorted(ids[c] for c in tested[path]), np.int64) if twin else data.usable()
        y = task.targets(store.clips, rows)
        rows = rows[task.has_target(y) & ok[rows]]
        variant, frac, _ = path.parent.relative_to(run / "units").parts
        for mode in _modes(model.names, loaded.cfg.finetune.eval_modalities):
            scored = rows if mode == "av" else rows[data.has(mode, rows)]
            if not len(scored):
                continue
            outputs, _, _ = predict_clips(model, data, scored, mode, device, batch_size, groups)
            metrics = task.metrics(task.targets(store.clips, scored), outputs)
            keep = {k: metrics[k] for k in task.key_metrics if metrics.get(k) is not None}
            per.setdefault((variant, frac, mode), []).append({**keep, "n_clips": len(scored)})
        reporter.advance("evaluate")
    reporter.finish("evaluate")
    features = _Features(store, dest, groups)
    for path in fitted:
        meta, models = baseline.load_models(path)
        rows = np.array(sorted(ids[c] for c in tested[path]), np.int64) if twin \
            else np.flatnonzero(ok).astype(np.int64)
        y = task.targets(store.clips, rows)
        rows = rows[task.has_target(y) & ok[rows]]
        variant, frac, _ = path.parent.relative_to(run / "units").parts
        feats = features.get(meta)
        for mode, model in models.items():
            scored = baseline.usable_rows(feats, rows, mode)
            if not len(scored):
                continue
            outputs = model(baseline.mode_features(feats, scored, mode))
            metrics = task.metrics(task.targets(store.clips, scored), outputs)
            keep = {k: metrics[k] for k in task.key_metrics if metrics.get(k) is not None}
            per.setdefault((variant, frac, mode), []).append({**keep, "n_clips": len(scored)})
    protocol = "twin" if twin else "cross-corpus"
    summary, report = _summarise(per, task, run, store, protocol)
    atomic_write_json(dest / "summary.json", jsonable(summary))
    atomic_write_bytes(dest / "report.md", report.encode())
    return EvaluateResult(dest, protocol, summary, report)


class _Features:
    """Each baseline's features of the evaluated store, computed once: code histograms from its codes
    (centred per speaker where the unit's were), eGeMAPS from its clips' media (a noisy twin's noisy
    files), z-scored per speaker."""

    def __init__(self, store: TokenStore, cache_dir: Path, groups: np.ndarray):
        self.store, self.cache_dir, self.groups = store, cache_dir, groups
        self.done: dict[tuple, dict[str, np.ndarray]] = {}

    def get(self, meta: dict) -> dict[str, np.ndarray]:
        names = sorted({m for mode in meta["modes"] for m in baseline.mode_names(mode)})
        centred = bool(meta.get("speaker_norm", False))  # absent: a run from before centring
        key = (meta["variant"], meta["token_pool"], tuple(names), centred)
        if key not in self.done:
            if meta["variant"] == "tokens":
                self.done[key] = baseline.token_features(self.store, names, meta["token_pool"],
                                                         self.groups if centred else None)
            else:
                raw = egemaps.store_features(self.store, self.cache_dir)
                self.done[key] = {"audio": egemaps.speaker_normalized(raw, self.groups)}
        return self.done[key]


def _tested_ids(unit_dir: Path) -> set[str]:
    """The clip ids a unit was tested on (its predictions.csv)."""
    with open(unit_dir / "predictions.csv", newline="") as f:
        return {row["clip_id"] for row in csv.DictReader(f)}


def _modes(names: tuple[str, ...], wanted: tuple[str, ...]) -> list[str]:
    if len(names) == 1:
        return [names[0]]
    return [m for m in EVAL_MODES if m in wanted] or ["av"]


def _summarise(per, task, run: Path, store: TokenStore, protocol: str) -> tuple[dict[str, Any], str]:
    keys = task.key_metrics
    groups = {(v, float(frac.removeprefix("frac")), mode): folds for (v, frac, mode), folds in per.items()}
    rows = aggregate_rows(groups, keys)
    summary = {"run": str(run), "store": str(store.path), "protocol": protocol, "task": task.to_dict(),
               "metrics": keys, "rows": rows, "chance": task.chance}
    what = ("each fold's model on its own test clips" if protocol == "twin"
            else "every fold's model on every clip of the store")
    lines = [f"# Evaluation of {run} on {store.path}", "",
             f"{protocol}: {what}; mean ± std over folds. Chance: {task.chance}.", "",
             *markdown_table(rows, keys)]
    return summary, "\n".join(lines) + "\n"


def read_summary(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "summary.json").read_text())
