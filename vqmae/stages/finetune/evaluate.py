"""`vqmae evaluate RUN STORE`: the saved fold models of a finished fine-tuning run, scored on another
token store made with the same tokenizers.

- **A twin of the training store** holds every clip id each fold tested, for example the store of a
  noisy twin of the corpus (`vqmae synth --kind speech` writes them). Each fold's model then scores its
  own test clips, as in the run. Clean-trained models scored on noisy files is the noise-robustness
  protocol of the speech-emotion literature.
- **Any other store** is another corpus. Its speakers are new to every model, so each fold's model
  scores all of its clips (cross-corpus).

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

from vqmae import metrics as M
from vqmae.checkpoint import ParentMismatchError, check_parents, load_classifier
from vqmae.stages.finetune.data import CKPT_NAME, EVAL_MODES, ClipWindows, FinetuneError, predict_clips
from vqmae.stages.finetune.trainer import jsonable
from vqmae.store import TokenStore
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
    units = sorted((run / "units").glob(f"*/frac*/*/{CKPT_NAME}"))
    if not units:
        raise FinetuneError(f"{run}: no saved classifier (units/<variant>/frac<f>/<fold>/{CKPT_NAME}); is it "
                            f"a finished `vqmae finetune` run?")
    ids = {str(c): i for i, c in enumerate(store.clips["clip_id"].tolist())}
    ok = np.asarray(store.clips["status"]) == "ok"
    tested = {u: _tested_ids(u.parent) for u in units}
    twin = all(cid in ids for clip_ids in tested.values() for cid in clip_ids)
    speakers = [str(s) for s in store.clips["speaker"].tolist()]
    groups = np.unique(speakers, return_inverse=True)[1].astype(np.int64)
    per: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    task = None
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
            out, _, _ = predict_clips(model, data, scored, mode, device, batch_size, groups)
            metrics = task.metrics(task.targets(store.clips, scored), out)
            keep = {k: metrics[k] for k in task.key_metrics if metrics.get(k) is not None}
            per.setdefault((variant, frac, mode), []).append({**keep, "n_clips": len(scored)})
        reporter.advance("evaluate")
    reporter.finish("evaluate")
    protocol = "twin" if twin else "cross-corpus"
    summary, report = _summarise(per, task, run, store, protocol)
    out = Path(out_dir) if out_dir is not None else run / "evaluate" / store.path.name.removesuffix(".zarr")
    atomic_write_json(out / "summary.json", jsonable(summary))
    atomic_write_bytes(out / "report.md", report.encode())
    return EvaluateResult(out, protocol, summary, report)


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
    rows = []
    for (variant, frac, mode), folds in sorted(per.items(), key=lambda kv: (kv[0][1], kv[0][0],
                                                                           EVAL_MODES.index(kv[0][2]))):
        agg = M.aggregate(folds)
        rows.append({"variant": variant, "fraction": float(frac.removeprefix("frac")), "eval": mode,
                     "folds": len(folds), **{k: agg.get(k) for k in keys}})
    summary = {"run": str(run), "store": str(store.path), "protocol": protocol, "task": task.to_dict(),
               "metrics": keys, "rows": rows, "chance": task.chance}
    what = ("each fold's model on its own test clips" if protocol == "twin"
            else "every fold's model on every clip of the store")
    lines = [f"# Evaluation of {run} on {store.path}", "",
             f"{protocol}: {what}; mean ± std over folds. Chance: {task.chance}.", "",
             "| variant | labels | eval | folds | " + " | ".join(k.upper() for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [M.format_mean_std(r[k]) if r.get(k) else "n/a" for k in keys]
        lines.append(f"| {r['variant']} | {r['fraction']:.0%} | {r['eval']} | {r['folds']} | "
                     + " | ".join(cells) + " |")
    return summary, "\n".join(lines) + "\n"


def read_summary(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "summary.json").read_text())
