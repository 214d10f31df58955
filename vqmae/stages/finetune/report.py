"""The fine-tuning report: mean ± std over folds per (variant, label fraction, eval mode) as a
summary dict and a markdown table, and the plots (confusion matrices, label efficiency)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator, Sequence

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


def write_plots(units: Sequence[UnitResult], cfg: Config, task: Task, run: Path, summary
                ) -> list[tuple[str, str]]:
    """Confusion matrices (tasks with one class per clip) and the label-efficiency curve; returns
    (title, file name) of each plot written, for the report."""
    from vqmae import plots  # matplotlib: loaded only when plots are drawn

    written = []
    largest = max(cfg.finetune.label_fractions)
    if len(cfg.finetune.label_fractions) > 1:
        key = task.curve_key
        ev = "av" if any(r["eval"] == "av" for r in summary["rows"]) else summary["rows"][0]["eval"]
        curves = {}
        for variant in cfg.finetune.inits:
            sel = sorted((r["fraction"], r[key]) for r in summary["rows"]
                         if r["variant"] == variant and r["eval"] == ev and r.get(key))
            curves[variant] = ([f for f, _ in sel], [s["mean"] for _, s in sel], [s["std"] for _, s in sel])
        bounds = (-1.0, 1.0) if "ccc" in key else (0.0, 1.0)
        plots.label_efficiency_png(curves, run / "label_efficiency.png", key.upper(), bounds)
        written.append((f"Label efficiency ({key.upper()}, {ev}, mean ± std over folds)", "label_efficiency.png"))
    for variant in VARIANTS:
        # each unit's first test mode: av (audio for the audio-only variants and backbones)
        mats = [np.asarray(m["confusion"]) for u in units
                if u.unit.startswith(f"{variant}/frac{largest:g}/") and u.metrics  # a skipped baseline has none
                for m in [next(iter(u.metrics.values()))] if "confusion" in m]
        if mats:
            name = f"confusion_{variant}.png"
            plots.confusion_png(np.sum(mats, 0), task.names, run / name, f"{variant}: test clips of every fold")
            written.append((f"Confusion matrix: {variant}, {largest:.0%} of the labels, every fold's test clips",
                            name))
    return written


def _full_label_predictions(units: Sequence[UnitResult], cfg: Config, run: Path
                            ) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """(variant, fold, rows of predictions.csv) of every unit at the largest label fraction."""
    largest = max(cfg.finetune.label_fractions)
    for u in units:
        variant, frac, fold = u.unit.split("/")
        path = run / "units" / u.unit / "predictions.csv"
        if float(frac[4:]) == largest and path.exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows:
                yield variant, fold, rows


def _uar(pairs: Sequence[tuple[str, str]]) -> float:
    """(target, prediction) pairs → the mean recall over the targets present."""
    classes = sorted({t for t, _ in pairs})
    return float(np.mean([np.mean([p == c for t, p in pairs if t == c]) for c in classes]))


def per_speaker_lines(units: Sequence[UnitResult], cfg: Config, task: Task, run: Path) -> list[str]:
    """Markdown: each test speaker's UAR per variant (the largest label fraction, each unit's first
    test mode), read from the units' predictions.csv. Single-label classification only."""
    if task.kind != "classify":
        return []
    table: dict[str, dict[str, float]] = {}
    folds: dict[str, str] = {}
    mode_of: dict[str, str] = {}
    for variant, fold, rows in _full_label_predictions(units, cfg, run):
        mode = rows[0]["mode"]
        mode_of[variant] = mode
        by_speaker: dict[str, list[tuple[str, str]]] = {}
        for r in rows:
            if r["mode"] == mode:
                by_speaker.setdefault(r["speaker"], []).append((r["target"], r["prediction"]))
        for spk, pairs in by_speaker.items():
            table.setdefault(spk, {})[variant] = _uar(pairs)
            folds[spk] = fold
    variants = [v for v in VARIANTS if v in mode_of]
    if not table:
        return []
    lines = ["| speaker | fold | " + " | ".join(f"{v} ({mode_of[v]})" for v in variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    for spk in sorted(table, key=lambda x: (folds[x], x)):
        cells = [f"{table[spk][v]:.3f}" if v in table[spk] else "" for v in variants]
        lines.append(f"| {spk} | {folds[spk]} | " + " | ".join(cells) + " |")
    return lines


def paired_modalities(units: Sequence[UnitResult], cfg: Config, task: Task, run: Path
                      ) -> list[dict[str, Any]]:
    """UAR of each test modality on the same clips: those scored in every mode (the talking-face
    clips; audio-only clips are scored in av and audio mode only, so the `av` row of the main table
    mixes them in). Per variant with all three modes, the largest label fraction; mean ± std over
    folds, from the units' predictions.csv. Single-label classification only."""
    if task.kind != "classify":
        return []
    largest = max(cfg.finetune.label_fractions)
    per: dict[tuple[str, str], list[float]] = {}
    for variant, _, rows in _full_label_predictions(units, cfg, run):
        modes = {r["mode"] for r in rows}
        if not {"av", "audio", "visual"} <= modes:
            continue
        both = {r["clip_id"] for r in rows if r["mode"] == "visual"} & {r["clip_id"] for r in rows if r["mode"] == "audio"}
        for mode in ("av", "audio", "visual"):
            sel = [(r["target"], r["prediction"]) for r in rows if r["mode"] == mode and r["clip_id"] in both]
            if sel:
                per.setdefault((variant, mode), []).append(_uar(sel))
    out = []
    for variant in VARIANTS:
        if all((variant, m) in per for m in ("av", "audio", "visual")):
            row = {"variant": variant, "fraction": largest, **{  # mean ± sample std, as every table
                m: M.aggregate([{"uar": v} for v in per[(variant, m)]])["uar"] for m in ("av", "audio", "visual")}}
            for m in ("audio", "visual"):  # the paired test: each fold's av minus its m, same clips
                row[f"av-{m}"] = M.aggregate([{"uar": a - b} for a, b in zip(per[(variant, "av")],
                                                                            per[(variant, m)])])["uar"]
            out.append(row)
    return out


def paired_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["## Audiovisual against each modality alone, on the same clips", "",
             f"UAR with {rows[0]['fraction']:.0%} of the labels on the clips that have both a face and a "
             "voice (mean ± std over folds): the fair comparison of the three test modes. The last two "
             "columns are each fold's audiovisual UAR minus its one-modality UAR (mean ± std over folds): "
             "audiovisual wins beyond the fold spread where the mean exceeds the std.", "",
             "| variant | av | audio | visual | av − audio | av − visual |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(
            M.format_mean_std(r[m]) if m in r else "" for m in ("av", "audio", "visual", "av-audio", "av-visual"))
            + " |")
    return lines + [""]


def report_sections(plots_written: Sequence[tuple[str, str]], speaker_lines: Sequence[str],
                    largest: float, paired: Sequence[str] = ()) -> str:
    """The report's paired-modality table, plots (embedded) and per-speaker table, after the
    results table."""
    out = list(paired)
    for title, name in plots_written:
        out += [f"## {title}", "", f"![{title}]({name})", ""]
    if speaker_lines:
        out += [f"## Per test speaker: UAR with {largest:.0%} of the labels", "",
                "Each speaker is tested in one fold; the recall of each emotion it has, averaged.", "",
                *speaker_lines, ""]
    return "\n" + "\n".join(out) if out else ""
