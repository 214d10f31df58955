"""A linear head fitted to convergence on a model's frozen clip vectors: the ``probe`` variant and
``finetune.head_init=fit`` (LP-FT: fit the head first, then fine-tune everything)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from vqmae.models.classifier import EmotionModel, clip_table
from vqmae.stages.finetune import baseline
from vqmae.stages.finetune.data import ClipWindows, pooled_clips
from vqmae.tasks import Task

log = logging.getLogger(__name__)


def fit_head(model: EmotionModel, data: ClipWindows, y: np.ndarray, group: np.ndarray, task: Task,
             train: np.ndarray, val: np.ndarray, class_weight: np.ndarray | None, batch_size: int,
             device: str) -> float:
    """Fit ``model.out`` to convergence on the model's clip vectors of ``train`` as they reach it
    (speaker-centred, through the head's norm; the encoder and pooling as they are): logistic
    regression (ridge for values), penalty chosen on ``val``; the fitted standardisation is folded
    into the layer. ``y`` and ``group`` (speaker ids) are per store row. → the validation score
    (``task.select_key``; NaN without validation clips)."""
    was = model.training
    model.eval()
    z_tr, r_tr = design(model, data, group, train, batch_size, device)
    z_va, r_va = design(model, data, group, val, batch_size, device)
    fit, penalties = baseline.linear_fit(task, class_weight)
    key = task.select_key
    best, best_score = penalties[-1], -math.inf
    for penalty in penalties if len(r_va) else ():
        score = float(task.metrics(y[r_va], fit(z_tr, y[r_tr], penalty)(z_va)).get(key, math.nan))
        if score >= best_score:  # ties: the stronger penalty (penalties are increasing)
            best, best_score = penalty, score
    lin = fit(z_tr, y[r_tr], best)
    with torch.no_grad():  # outputs = ((z - mean) / std) @ W + b, as one linear layer
        w = np.asarray(lin.weight / lin.std[:, None], np.float32)
        b = np.asarray(lin.bias - (lin.mean / lin.std) @ lin.weight, np.float32)
        model.out.weight.copy_(torch.from_numpy(w.T).to(model.out.weight.device))
        model.out.bias.copy_(torch.from_numpy(b).to(model.out.bias.device))
    model.train(was)
    log.info("head fitted: penalty %g, validation %s %.3f", best, key, best_score)
    return best_score if math.isfinite(best_score) else math.nan


def design(model: EmotionModel, data: ClipWindows, group: np.ndarray, rows: np.ndarray,
           batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """The head's inputs for clips ``rows`` in every presentation (audiovisual, and each modality
    alone when there are two, as modality dropout presents them), each speaker's mean over its own
    clips subtracted → (float32 [n, M × D], the store row of each)."""
    names = data.names
    zs, used = [np.zeros((0, model.out.in_features), np.float32)], [np.zeros(0, np.int64)]
    for mode in (["av", *names] if len(names) == 2 else [names[0]]):
        r = rows if mode == "av" else rows[data.has(mode, rows)]
        if not len(r):
            continue
        x, p, _, _, _ = pooled_clips(model, data, r, mode, device, batch_size)
        g = torch.from_numpy(np.unique(group[r], return_inverse=True)[1].astype(np.int64)).to(x.device)
        with torch.no_grad():
            z = model.norm(model.centered(x, p, clip_table(model, x, p, g), g))
        zs.append(z.float().cpu().numpy())
        used.append(r)
    return np.concatenate(zs), np.concatenate(used)
