"""Evaluation metrics for stage 3 (docs/design.md §6): WAR / UAR / macro-F1 with a confusion matrix for
categorical emotions, per-emotion F1 and ROC-AUC for multi-label, CCC for dimensional targets, a
differentiable CCC loss, and mean ± std aggregation over folds.

Numpy only (torch for `ccc_loss`). Conventions: an undefined per-class number is NaN, never a silent
0 or 1, and macro averages skip NaNs, so a class that a fold does not contain cannot drag its average.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

import numpy as np
import torch


def _as_2d(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, C], got shape {arr.shape}")
    return arr


def _check_rows(n_a: int, n_b: int, a: str, b: str) -> None:
    if n_a != n_b:
        raise ValueError(f"{a} has {n_a} rows but {b} has {n_b}")
    if n_a == 0:
        raise ValueError(f"{a} is empty: no samples to score")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0 (without a division warning)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    """Mean of the finite entries; NaN (no warning) when there are none."""
    x = np.asarray(x, np.float64)
    keep = ~np.isnan(x)
    return float(x[keep].mean()) if keep.any() else math.nan


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 [C, C] counts; rows = true class, columns = predicted class."""
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # 2TP / (2TP + FP + FN) equals the harmonic mean of precision and recall, and stays defined
    # (= 0) when a class is only ever predicted or only ever missed; NaN when it never occurs at all.
    return _ratio(2 * tp, 2 * tp + fp + fn)


def classification_metrics(y_true, scores, n_classes: int) -> dict:
    """Single-label scores: y_true int [n] in [0, n_classes), scores float [n, C] (logits or
    probabilities; the argmax is the prediction).

    Returns {"war": accuracy, "uar": mean recall over the classes present in y_true, "macro_f1": mean
    F1 over the classes present in y_true or predicted, "confusion": int64 [C, C] (rows = true),
    "recall": float [C] (NaN for classes absent from y_true), "f1": float [C] (NaN for classes neither
    present nor predicted)}.
    """
    y = np.asarray(y_true)
    s = _as_2d(scores, "scores")
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D [n], got shape {y.shape}")
    _check_rows(len(y), len(s), "y_true", "scores")
    if s.shape[1] != n_classes:
        raise ValueError(f"scores has {s.shape[1]} columns but n_classes is {n_classes}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class ids, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true holds class ids in [{y.min()}, {y.max()}], outside [0, {n_classes})")
    if not np.isfinite(s).all():
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite values")
    conf = confusion_matrix(y.astype(np.int64), s.argmax(axis=1), n_classes)
    tp = np.diag(conf)
    support, predicted = conf.sum(axis=1), conf.sum(axis=0)
    recall = _ratio(tp, support)
    f1 = _f1_from_counts(tp, predicted - tp, support - tp)
    return {"war": float(tp.sum() / len(y)), "uar": _nanmean(recall), "macro_f1": _nanmean(f1),
            "confusion": conf, "recall": recall, "f1": f1}


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks [n] with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values; every member of a run gets the run's mean rank.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(y, score) -> float:
    """Area under the ROC curve as the Mann–Whitney statistic: P(score_pos > score_neg) + ½ P(tie).

    y: {0, 1} (or bool) [n]; score: float [n]. NaN when y holds a single class.
    """
    y, score = np.asarray(y), np.asarray(score, np.float64)
    if y.ndim != 1 or score.ndim != 1:
        raise ValueError(f"y and score must be 1-D, got shapes {y.shape} and {score.shape}")
    _check_rows(len(y), len(score), "y", "score")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y must hold only 0 and 1, got values {np.unique(y)[:10].tolist()}")
    if not np.isfinite(score).all():
        raise ValueError(f"score holds {int((~np.isfinite(score)).sum())} non-finite values")
    pos = y.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = _ranks(score)[pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multilabel_metrics(y_true, probs, threshold: float = 0.5) -> dict:
    """Multi-label scores: y_true {0, 1} [n, C], probs float [n, C] in [0, 1]; a label is predicted
    where probs >= threshold.

    Returns {"f1": [C] (NaN where a label is neither present nor predicted), "auc": [C] (NaN where
    y_true has one class for that label), "macro_f1", "macro_auc" (means over the defined entries, NaN
    if none), "micro_f1" (from counts pooled over labels), "subset_accuracy" (rows with every label
    right)}.
    """
    y, p = _as_2d(y_true, "y_true"), _as_2d(probs, "probs").astype(np.float64)
    _check_rows(len(y), len(p), "y_true", "probs")
    if y.shape[1] != p.shape[1]:
        raise ValueError(f"y_true has {y.shape[1]} labels but probs has {p.shape[1]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0 and 1, got values {np.unique(y)[:10].tolist()}")
    if not (np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0):
        raise ValueError("probs must be finite probabilities in [0, 1] (apply a sigmoid to logits)")
    truth, pred = y.astype(bool), p >= threshold
    tp = (truth & pred).sum(axis=0)
    fp = (~truth & pred).sum(axis=0)
    fn = (truth & ~pred).sum(axis=0)
    f1 = _f1_from_counts(tp, fp, fn)
    auc = np.array([roc_auc(y[:, c], p[:, c]) for c in range(y.shape[1])])
    micro = _ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    return {"f1": f1, "auc": auc, "macro_f1": _nanmean(f1), "macro_auc": _nanmean(auc),
            "micro_f1": float(micro), "subset_accuracy": float((truth == pred).all(axis=1).mean())}


def ccc(x, y) -> float:
    """Lin's concordance correlation coefficient of two 1-D series [n]:
    2 cov(x, y) / (var x + var y + (mean x − mean y)²), population (ddof 0) moments.

    NaN when n < 2 or when both series are the same constant (0 / 0).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"ccc needs two 1-D series of equal length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        return math.nan
    mx, my = x.mean(), y.mean()
    cov = ((x - mx) * (y - my)).mean()
    den = x.var() + y.var() + (mx - my) ** 2
    return float(2 * cov / den) if den > 0 else math.nan


def regression_metrics(y_true, pred, names: Sequence[str]) -> dict:
    """Dimensional targets: y_true, pred float [n, D] with D = len(names) (e.g. valence, arousal).

    Rows where y_true is NaN are left out of that dimension only (a clip may lack a dimension).
    Returns {"ccc/<name>", "mse/<name>" for each name, "ccc": mean CCC, "mse": mean MSE}; the means
    run over the dimensions where the number is defined (NaN if none).
    """
    y, p = _as_2d(y_true, "y_true").astype(np.float64), _as_2d(pred, "pred").astype(np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true has shape {y.shape} but pred has shape {p.shape}")
    if y.shape[1] != len(names):
        raise ValueError(f"{y.shape[1]} target columns but {len(names)} names {list(names)}")
    if not np.isfinite(p).all():
        raise ValueError(f"pred holds {int((~np.isfinite(p)).sum())} non-finite values")
    out: dict = {}
    for d, name in enumerate(names):
        keep = ~np.isnan(y[:, d])
        out[f"ccc/{name}"] = ccc(p[keep, d], y[keep, d])
        out[f"mse/{name}"] = float(((p[keep, d] - y[keep, d]) ** 2).mean()) if keep.any() else math.nan
    out["ccc"] = _nanmean(np.array([out[f"ccc/{n}"] for n in names]))
    out["mse"] = _nanmean(np.array([out[f"mse/{n}"] for n in names]))
    return out


def ccc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scalar mean over dimensions of (1 − CCC) between pred and target [n, D]; differentiable.

    NaN entries of target are ignored per dimension; dimensions with fewer than 2 labelled rows are
    left out of the mean. If no dimension is usable the loss is a zero that still depends on `pred`
    (so every data-parallel rank runs the same backward graph).
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"ccc_loss needs pred and target of one shape [n, D], got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    mask = ~torch.isnan(target)
    w = mask.to(pred.dtype)
    # torch.where (not multiplication by the mask) keeps NaN targets out of values and gradients.
    t = torch.where(mask, target, torch.zeros_like(target)).to(pred.dtype)
    p = torch.where(mask, pred, torch.zeros_like(pred))
    count = w.sum(dim=0)
    safe = count.clamp(min=1.0)
    mp, mt = p.sum(dim=0) / safe, t.sum(dim=0) / safe  # [D]
    dp, dt = (p - mp) * w, (t - mt) * w  # [n, D]
    var_p, var_t = (dp * dp).sum(dim=0) / safe, (dt * dt).sum(dim=0) / safe
    cov = (dp * dt).sum(dim=0) / safe
    conc = 2 * cov / (var_p + var_t + (mp - mt) ** 2 + eps)  # [D]
    usable = count >= 2
    if not bool(usable.any()):
        return pred.sum() * 0.0
    return (1.0 - conc[usable]).mean()


def _is_scalar(v) -> bool:
    if isinstance(v, np.ndarray):
        return v.ndim == 0 and np.issubdtype(v.dtype, np.number)
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def aggregate(per_fold: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean ± std over folds of every key that is a number in every fold (arrays are ignored).

    Returns {key: {"mean", "std", "n"}}: std is the sample std (ddof 1), 0.0 when n == 1; NaN values
    are left out per key and n counts the rest (mean and std are NaN when n == 0).
    """
    if not per_fold:
        raise ValueError("aggregate needs at least one fold's metrics, got none")
    keys = [k for k in per_fold[0] if all(k in fold and _is_scalar(fold[k]) for fold in per_fold)]
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        vals = np.array([float(fold[key]) for fold in per_fold])
        vals = vals[~np.isnan(vals)]
        n = len(vals)
        mean = float(vals.mean()) if n else math.nan
        std = float(vals.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan)
        out[key] = {"mean": mean, "std": std, "n": n}
    return out


def format_mean_std(stats: Mapping[str, float], digits: int = 3) -> str:
    """{"mean": 0.8123, "std": 0.0411} → "0.812 ± 0.041"."""
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
