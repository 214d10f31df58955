"""The fine-tuning report: mean ± std over folds per (variant, label fraction, eval mode) as a
summary dict and a markdown table, and the plots (confusion matrices, label efficiency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vqmae import metrics as M
from vqmae.config import Config
from vqmae.stages.finetune.data import EVAL_MODES, VARIANTS, Backbone
from vqmae.stages.finetune.trainer import UnitResult
from vqmae.tasks import Task

def summarize(units: Sequence[UnitResult], cfg: Config, task: Task, fold_list, run: Path,
              bb: Backbone) -> tuple[dict[str, Any], str]:
    """Aggregate (mean ± std over folds) per (variant, fraction, eval) → summary dict and markdown."""
    keys = task.key_metrics
    groups: dict[tuple[str, float, str], list[dict[str, float]]] = {}
    for u in units:
        variant, frac, _ = u.unit.split("/")
        for ev, m in u.metrics.items():
            groups.setdefault((variant, float(frac[4:]), ev), []).append(
                {k: m.get(k) for k in keys + ["n_clips"] if m.get(k) is not None})
    rows = aggregate_rows(groups, keys)
    chance = task.chance
    summary = {"task": task.to_dict(), "metrics": keys, "protocol": cfg.finetune.protocol, "folds": len(fold_list),
               "mae": bb.mae_path, "rows": rows, "chance": chance,
               "units": [u.to_dict() for u in units]}
    lines = [f"# Fine-tuning report ({task.kind}: {', '.join(task.names)})", "",
             f"{len(fold_list)} speaker-independent folds ({cfg.finetune.protocol}); epoch selected "
             f"on validation speakers; test clips scored over all windows; mean ± std over folds."
             + (" Speaker-normalised: each speaker's mean pooled features (over its own unlabelled "
                "clips) are subtracted before the head (finetune.speaker_norm)." if cfg.finetune.speaker_norm
                else ""),
             f"MAE: {bb.mae_path or '(none: from scratch)'}. Chance: {chance}.", "",
             *markdown_table(rows, keys)]
    return summary, "\n".join(lines) + "\n"


def aggregate_rows(groups: dict[tuple[str, float, str], list[dict[str, float]]],
                   keys: Sequence[str]) -> list[dict[str, Any]]:
    """{(variant, fraction, eval): per-fold metrics} → report rows with mean ± std over folds, in
    the report's order (fraction, variant, eval mode)."""
    rows = []
    for (variant, frac, ev), per_fold in sorted(groups.items(), key=lambda kv: (
            kv[0][1], VARIANTS.index(kv[0][0]), _eval_order(kv[0][2]))):
        agg = M.aggregate(per_fold)
        rows.append({"variant": variant, "fraction": frac, "eval": ev, "folds": len(per_fold),
                     **{k: agg.get(k) for k in keys}})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """The report rows as markdown table lines."""
    lines = ["| variant | labels | eval | folds | " + " | ".join(k.upper() for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [M.format_mean_std(r[k]) if r.get(k) else "n/a" for k in keys]
        lines.append(f"| {r['variant']} | {r['fraction']:.0%} | {r['eval']} | {r['folds']} | "
                     + " | ".join(cells) + " |")
    return lines


def _eval_order(ev: str) -> tuple[int, str]:
    noise, _, mode = ev.rpartition("/")
    return (EVAL_MODES.index(mode) if mode in EVAL_MODES else 9, noise)


def write_plots(units: Sequence[UnitResult], cfg: Config, task: Task, run: Path, summary) -> None:
    """Confusion matrices (tasks with one class per clip) and the label-efficiency curve."""
    from vqmae import plots  # matplotlib: loaded only when plots are drawn

    largest = max(cfg.finetune.label_fractions)
    for variant in VARIANTS:
        # each unit's first test mode: av (audio for the audio-only variants and backbones)
        mats = [np.asarray(m["confusion"]) for u in units
                if u.unit.startswith(f"{variant}/frac{largest:g}/") and u.metrics  # a skipped baseline has none
                for m in [next(iter(u.metrics.values()))] if "confusion" in m]
        if mats:
            plots.confusion_png(np.sum(mats, 0), task.names, run / f"confusion_{variant}.png",
                                f"{variant}: test clips of every fold")
    if len(cfg.finetune.label_fractions) > 1:
        key = task.curve_key
        ev = "av" if any(r["eval"] == "av" for r in summary["rows"]) else summary["rows"][0]["eval"]
        curves = {}
        for variant in cfg.finetune.inits:
            sel = sorted((r["fraction"], r[key]) for r in summary["rows"]
                         if r["variant"] == variant and r["eval"] == ev and r.get(key))
            curves[variant] = ([f for f, _ in sel], [s["mean"] for _, s in sel], [s["std"] for _, s in sel])
        plots.label_efficiency_png(curves, run / "label_efficiency.png", key.upper())
