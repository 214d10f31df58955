"""Simple baselines for stage 3, on the same folds and label subsets as the transformer: the
bag-of-tokens model (per-position code histograms) and the shared fitting of a linear model to
per-clip features (L2 logistic regression, or ridge regression for continuous targets), whose
penalty is chosen on the fold's validation speakers. `vqmae.stages.finetune.egemaps` feeds it the
standard eGeMAPS acoustic features.

Bag of tokens: per-position code histograms → L2 logistic regression.

A demanding reader of a fine-tuning table asks whether the transformer beats the simplest model of
the same codes. This one sees each clip as, per modality, how often each code id occurs at each
(pooled) grid position over all the clip's frames, standardises those frequencies with the training
clips' statistics and fits a multinomial logistic regression with an L2 penalty (L-BFGS, to
convergence). The penalty is chosen on the fold's validation speakers, like the transformer's
epoch. One model is fitted per test modality (av: both histograms side by side; audio; visual), on
the training clips that have that modality. Single-label classification and regression.

Feature size per modality: (grid positions / pool^dims) × codebook size — 36 × 512 for the visual
24 × 24 grid at pool 4, 16 × 256 for the 64 audio tokens; float32, one row per clip.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vqmae.store import TokenStore
from vqmae.tasks import Task
from vqmae.utils import atomic_write_bytes

log = logging.getLogger(__name__)

PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)  # L2 weights tried on the validation speakers
RIDGE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # × n clips


def histogram_features(store: TokenStore, rows: np.ndarray, modality: str, pool: int) -> np.ndarray:
    """Per-position code frequencies of each clip → float32 [len(rows), positions × codebook].

    Grid positions are pooled in blocks of ``pool`` along every grid axis (the last block may be
    smaller); a clip without this modality gets a zero row."""
    spec = store.specs[modality]
    grid, k = tuple(spec.grid), spec.codebook_size
    pos = _pooled_positions(grid, pool)  # int64 [prod(grid)] → pooled position
    n_pos = int(pos.max()) + 1
    out = np.zeros((len(rows), n_pos * k), np.float32)
    for i, r in enumerate(rows):
        codes = np.asarray(store.clip_codes(modality, int(r)), np.int64)  # [T, tokens]
        if not len(codes):
            continue
        flat = pos[None, :] * k + codes.reshape(len(codes), -1)  # [T, tokens]
        counts = np.bincount(flat.ravel(), minlength=n_pos * k).astype(np.float32)
        out[i] = counts / (len(codes) * np.bincount(pos, minlength=n_pos).repeat(k))
    return out


def per_speaker(feats: np.ndarray, speakers: np.ndarray, scale: bool) -> np.ndarray:
    """Each speaker's rows with that speaker's mean subtracted and, with ``scale``, divided by its
    std (a speaker with one clip is centred only), over rows with features only: a clip without the
    modality stays an all-zero row, and a real clip never reads as one."""
    out = np.zeros_like(feats)
    has = feats.any(1)
    for s in np.unique(speakers[has]):
        rows = np.flatnonzero(has & (speakers == s))
        if scale:
            x = feats[rows].astype(np.float64)
            std = x.std(0) if len(rows) > 1 else np.ones(x.shape[1])
            out[rows] = ((x - x.mean(0)) / np.where(std > 1e-8, std, 1.0)).astype(np.float32)
        else:
            out[rows] = feats[rows] - feats[rows].mean(0, dtype=np.float64).astype(feats.dtype)
        out[rows[~out[rows].any(1)], 0] = 1e-12
    return out


def speaker_centered(feats: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """Each speaker's mean row subtracted from its rows (`per_speaker`), as the transformer's speaker
    normalisation does; a test speaker's mean comes from its own unlabelled clips."""
    return per_speaker(feats, speakers, scale=False)


def token_features(store: TokenStore, names: Sequence[str], pool: int, groups: np.ndarray | None
                   ) -> dict[str, np.ndarray]:
    """The bag of tokens' features of every clip of ``store``: {modality: `histogram_features`},
    centred per speaker (`speaker_centered`) with ``groups`` (speaker id per row), raw without."""
    rows = np.arange(store.n_clips)
    hist = {m: histogram_features(store, rows, m, pool) for m in names}
    return hist if groups is None else {m: speaker_centered(h, groups) for m, h in hist.items()}


def _pooled_positions(grid: tuple[int, ...], pool: int) -> np.ndarray:
    if pool < 1:
        raise ValueError(f"pool={pool} must be >= 1")
    idx = np.indices(grid).reshape(len(grid), -1) // pool  # [dims, tokens]
    sizes = [-(-g // pool) for g in grid]
    return np.ravel_multi_index(tuple(idx), sizes).astype(np.int64)


@dataclass
class LinearModel:
    """A fitted baseline: outputs = standardised features @ weight + bias (logits, or values)."""

    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]
    weight: np.ndarray  # [D, C]
    bias: np.ndarray  # [C]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if self.weight.dtype == np.float32:  # logistic: fitted (and applied) in float32 torch
            return ((torch.from_numpy((z - self.mean) / self.std) @ torch.from_numpy(self.weight))
                    + torch.from_numpy(self.bias)).numpy()
        return (((z - self.mean) / self.std) @ self.weight + self.bias).astype(np.float32)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": getattr(self, k) for k in ("mean", "std", "weight", "bias")}

    @classmethod
    def from_arrays(cls, z: Mapping[str, np.ndarray], prefix: str) -> "LinearModel":
        return cls(*(z[f"{prefix}.{k}"] for k in ("mean", "std", "weight", "bias")))


BASELINE_FILE = "baseline.npz"  # a unit's fitted baseline models, beside its result.json


def save_models(path: Path, variant: str, models: Mapping[str, LinearModel], task: Task,
                token_pool: int, speaker_norm: bool = False) -> None:
    """One unit's fitted models ({mode: LinearModel}) and what rebuilding their features needs
    (``speaker_norm``: the bag of tokens was centred per speaker, `speaker_centered`)."""
    meta = {"variant": variant, "modes": list(models), "task": task.to_dict(), "token_pool": token_pool,
            "speaker_norm": bool(speaker_norm)}
    arrays = {k: v for mode, m in models.items() for k, v in m.arrays(mode).items()}
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_models(path: Path) -> tuple[dict, dict[str, LinearModel]]:
    """(meta, {mode: LinearModel}) of a unit's `baseline.npz`."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return meta, {mode: LinearModel.from_arrays(z, mode) for mode in meta["modes"]}


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, penalty: float,
                 class_weight: np.ndarray | None = None, max_iter: int = 200) -> LinearModel:
    """Multinomial logistic regression on standardised features; → a function features → logits.

    x float32 [n, D], y int64 [n] in [0, n_classes). The penalty is ``penalty`` × ‖W‖² (bias free)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    cw = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt, weight=cw) + penalty * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearModel(mean, std, w.detach().numpy(), b.detach().numpy())


def fit_ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> LinearModel:
    """Ridge regression on standardised features, one target column at a time on the rows where it
    is known; → a function features → values. x float32 [n, D], y float32 [n, T] (NaN = missing);
    the penalty is ``penalty`` × n × ‖w‖² (so it does not scale with the number of clips)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = ((x - mean) / std).astype(np.float64)
    coef, bias = np.zeros((x.shape[1], y.shape[1])), np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        ok = ~np.isnan(y[:, j])
        if not ok.any():
            continue
        a, b = xs[ok], y[ok, j].astype(np.float64)
        bias[j] = b.mean()
        gram = a.T @ a + penalty * len(a) * np.eye(a.shape[1])
        coef[:, j] = np.linalg.solve(gram, a.T @ (b - bias[j]))

    return LinearModel(mean, std, coef, bias)


def linear_fit(task: Task, class_weight: np.ndarray | None = None, name: str = "baseline"
               ) -> tuple[Callable[[np.ndarray, np.ndarray, float], LinearModel], tuple[float, ...]]:
    """The linear model of a task and its penalties, increasing: (fit(x, y, penalty), penalties) —
    logistic regression for a single-label task, ridge regression for values."""
    if task.single_label:
        return (lambda x, t, p: fit_logistic(x, t, len(task.names), p, class_weight)), PENALTIES
    if task.values:
        return fit_ridge, RIDGE_PENALTIES
    raise ValueError(f"{name}: task {task.kind!r} has no linear model")


def run_baseline(features: Mapping[str, np.ndarray], y: np.ndarray, task: Task,
                 train: np.ndarray, val: np.ndarray, test: np.ndarray, modes: Sequence[str],
                 class_weight: np.ndarray | None = None, name: str = "baseline"
                 ) -> tuple[dict[str, dict], dict[str, tuple[np.ndarray, np.ndarray]], float,
                            dict[str, LinearModel]]:
    """Fit and test one linear model per mode: logistic regression for a single-label task, ridge
    regression for a task whose outputs are values.

    ``features``: {modality: float32 [n_clips_total, D]} indexed by table row, an all-zero row for a
    clip without it; ``train`` / ``val`` / ``test``: table rows. → ({mode: metrics}, {mode: (test
    rows used, outputs)}, mean validation score (``task.select_key``) of the chosen penalties,
    {mode: the fitted model})."""
    key = task.select_key
    fit, penalties = linear_fit(task, class_weight, name)
    metrics, outputs, vals, models = {}, {}, [], {}
    for mode in modes:
        names = ("audio", "visual") if mode == "av" else (mode,)
        if any(m not in features for m in names):
            continue

        def rows_with(rows, mode=mode):
            return usable_rows(features, rows, mode)

        def feats(rows, mode=mode):
            return mode_features(features, rows, mode)

        tr, va, te = rows_with(train), rows_with(val), rows_with(test)
        if (task.single_label and len(np.unique(y[tr])) < 2) or len(tr) < 2 or not len(te):
            log.warning("%s %s: too few training classes or clips, or no test clip; skipped", name, mode)
            continue
        best, best_score = penalties[-1], -math.inf
        for penalty in penalties if len(va) else ():
            f = fit(feats(tr), y[tr], penalty)
            score = float(task.metrics(y[va], f(feats(va))).get(key, math.nan))
            if score >= best_score:  # ties: the stronger penalty (penalties are increasing)
                best, best_score = penalty, score
        f = fit(feats(tr), y[tr], best)
        out = f(feats(te))
        metrics[mode] = {**task.metrics(y[te], out), "n_clips": int(len(te)), "penalty": best}
        outputs[mode] = (te, out)
        models[mode] = f
        if math.isfinite(best_score):
            vals.append(best_score)
    return metrics, outputs, float(np.mean(vals)) if vals else math.nan, models


def mode_names(mode: str) -> tuple[str, ...]:
    return ("audio", "visual") if mode == "av" else (mode,)


def usable_rows(features: Mapping[str, np.ndarray], rows: np.ndarray, mode: str) -> np.ndarray:
    """The rows a mode's model can score: av takes every row (an absent modality is a zero block);
    a single modality needs that modality's features (a non-zero row)."""
    if mode == "av":
        return rows
    return rows[np.all([features[m][rows].any(1) for m in mode_names(mode)], 0)]


def mode_features(features: Mapping[str, np.ndarray], rows: np.ndarray, mode: str) -> np.ndarray:
    return np.concatenate([features[m][rows] for m in mode_names(mode)], 1)
