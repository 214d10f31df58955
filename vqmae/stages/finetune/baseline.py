"""Bag-of-tokens baseline for stage 3: per-position code histograms → L2 logistic regression.

A demanding reader of a fine-tuning table asks whether the transformer beats the simplest model of
the same codes. This one sees each clip as, per modality, how often each code id occurs at each
(pooled) grid position over all the clip's frames, standardises those frequencies with the training
clips' statistics and fits a multinomial logistic regression with an L2 penalty (L-BFGS, to
convergence). The penalty is chosen on the fold's validation speakers, like the transformer's
epoch. One model is fitted per test modality (av: both histograms side by side; audio; visual), on
the training clips that have that modality. Classification only.

Feature size per modality: (grid positions / pool^dims) × codebook size — 36 × 512 for the visual
24 × 24 grid at pool 4, 16 × 256 for the 64 audio tokens; float32, one row per clip.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vqmae.store import TokenStore

log = logging.getLogger(__name__)

PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)  # L2 weights tried on the validation speakers


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


def _pooled_positions(grid: tuple[int, ...], pool: int) -> np.ndarray:
    if pool < 1:
        raise ValueError(f"pool={pool} must be >= 1")
    idx = np.indices(grid).reshape(len(grid), -1) // pool  # [dims, tokens]
    sizes = [-(-g // pool) for g in grid]
    return np.ravel_multi_index(tuple(idx), sizes).astype(np.int64)


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, penalty: float,
                 class_weight: np.ndarray | None = None, max_iter: int = 200
                 ) -> Callable[[np.ndarray], np.ndarray]:
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
    w_, b_ = w.detach(), b.detach()

    def logits(z: np.ndarray) -> np.ndarray:
        return ((torch.from_numpy((z - mean) / std) @ w_) + b_).numpy()

    return logits


def run_baseline(features: Mapping[str, np.ndarray], y: np.ndarray, n_classes: int,
                 train: np.ndarray, val: np.ndarray, test: np.ndarray, modes: Sequence[str],
                 score: Callable[[np.ndarray, np.ndarray], dict], class_weight: np.ndarray | None = None
                 ) -> tuple[dict[str, dict], dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Fit and test one model per mode.

    ``features``: {modality: float32 [n_clips_total, D]} indexed by table row; ``train`` / ``val`` /
    ``test``: table rows; ``score(y, logits)`` → metrics dict with "uar". → ({mode: metrics},
    {mode: (test rows used, logits)}, mean validation UAR of the chosen penalties)."""
    metrics, outputs, vals = {}, {}, []
    for mode in modes:
        names = ("audio", "visual") if mode == "av" else (mode,)
        if any(m not in features for m in names):
            continue

        def rows_with(rows, names=names):
            return rows[np.all([features[m][rows].any(1) for m in names], 0)] if mode != "av" else rows

        def feats(rows, names=names):
            return np.concatenate([features[m][rows] for m in names], 1)

        tr, va, te = rows_with(train), rows_with(val), rows_with(test)
        if len(np.unique(y[tr])) < 2 or not len(te):
            log.warning("token baseline %s: too few training classes or no test clip; skipped", mode)
            continue
        best, best_uar = PENALTIES[-1], -math.inf
        for penalty in PENALTIES if len(va) else ():
            f = fit_logistic(feats(tr), y[tr], n_classes, penalty, class_weight)
            uar = float(score(y[va], f(feats(va))).get("uar", math.nan))
            if uar >= best_uar:  # ties: the stronger penalty (PENALTIES is increasing)
                best, best_uar = penalty, uar
        f = fit_logistic(feats(tr), y[tr], n_classes, best, class_weight)
        out = f(feats(te))
        metrics[mode] = {**score(y[te], out), "n_clips": int(len(te)), "penalty": best}
        outputs[mode] = (te, out)
        if math.isfinite(best_uar):
            vals.append(best_uar)
    return metrics, outputs, float(np.mean(vals)) if vals else math.nan
