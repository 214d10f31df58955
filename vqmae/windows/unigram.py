"""The per-position unigram baseline of masked-token prediction: always predicting each grid
position's most frequent training code. Pretraining must beat it to have learned context."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vqmae.store import TokenStore
from vqmae.store.integrity import check_rows, raise_if_damaged, read_rows, recorded_crcs
from vqmae.windows.geometry import WindowBatch

# Frames of one modality gathered at once by `unigram_baseline` (bounds its memory).
COUNT_BLOCK_ELEMENTS = 1 << 22

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class UnigramBaseline:
    """Always predicting the most frequent training code of each token position.

    mode int64 [n_tokens] (grid flattened: audio frequency index, visual cell row-major);
    train_accuracy over every frame of the training clips; accuracy over the valid frames of the
    windows given to `unigram_baseline` (None when none were given), and cross_entropy there (nats
    per token) of each position's code frequencies, add-one smoothed: the loss a model that ignores
    the context would reach, beside which the masked-token cross-entropy shows what the context adds
    even where the most likely code does not change.
    """

    modality: str
    mode: np.ndarray
    train_accuracy: float
    accuracy: float | None
    cross_entropy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "mode": self.mode.tolist(), "train_accuracy": self.train_accuracy,
                "accuracy": self.accuracy, "cross_entropy": self.cross_entropy}


def _frame_mask(store: TokenStore, m: str, rows: np.ndarray) -> np.ndarray:
    """bool [n_frames]: frames belonging to clips ``rows``."""
    edges = np.zeros(store.n_frames(m) + 1, np.int64)
    start = store.clips[f"{m}_start"][rows]
    np.add.at(edges, start, 1)
    np.add.at(edges, start + store.clips[f"{m}_length"][rows], -1)
    return np.cumsum(edges[:-1]) > 0


def position_counts(store: TokenStore, m: str, rows: np.ndarray) -> np.ndarray:
    """How often each code occurs at each token position over clips ``rows``, int64 [K, C]."""
    spec = store.specs[m]
    k, c = spec.n_tokens, spec.codebook_size
    mask = _frame_mask(store, m, np.asarray(rows, np.int64))
    counts = np.zeros(k * c, np.int64)
    step = max(1, COUNT_BLOCK_ELEMENTS // k)
    if store.is_loaded(m):
        arr = store.codes(m)  # checked when it was loaded
        read = lambda a, b: np.asarray(arr[a:b])  # noqa: E731
    else:  # streamed in whole chunks, each checked (a missing chunk reads as ids outside the codebook)
        chunk = store.chunk_rows(m)
        step, crcs = max(chunk, step // chunk * chunk), recorded_crcs(store, m)

        def read(a: int, b: int) -> np.ndarray:
            block = np.asarray(read_rows(store, m, a, b))
            raise_if_damaged(store, check_rows(store, m, block, a, crcs))
            return block
    for a in range(0, len(mask), step):
        sel = mask[a:a + step]
        if sel.any():
            block = read(a, a + len(sel))[sel]  # [F, K], one contiguous read per block
            counts += np.bincount((np.arange(k) * c + block).ravel(), minlength=k * c)
    return counts.reshape(k, c)


def unigram_baseline(store: TokenStore, rows: np.ndarray,
                     batches: Sequence[WindowBatch] | Iterator[WindowBatch] = (),
                     modalities: Sequence[str] | None = None) -> dict[str, UnigramBaseline]:
    """Per modality: the most frequent code per token position over training clips ``rows``
    (ties → the smallest id), its accuracy on those clips and on ``batches`` (valid frames only)."""
    names = list(modalities or store.specs)
    counts = {m: position_counts(store, m, rows) for m in names}
    modes = {m: counts[m].argmax(axis=1) for m in names}  # [K]
    log_p = {m: torch.from_numpy(np.log((counts[m] + 1.0) / (counts[m].sum(1, keepdims=True) + counts[m].shape[1])))
             for m in names}  # [K, V], add-one smoothed
    hit = dict.fromkeys(names, 0)
    seen = dict.fromkeys(names, 0)
    nll = dict.fromkeys(names, 0.0)
    for batch in batches:
        for m in names:
            codes, valid = getattr(batch, m), getattr(batch, f"{m}_valid")
            if codes is None:
                continue
            flat = codes.reshape(*codes.shape[:2], -1)  # [B, L, K]
            hits = (flat == torch.from_numpy(modes[m])).sum(-1)  # [B, L]
            hit[m] += int(hits[valid].sum())
            nll[m] -= float(log_p[m][torch.arange(flat.shape[-1]), flat.long()][valid].sum())
            seen[m] += int(valid.sum()) * flat.shape[-1]
    out = {}
    for m in names:
        total = int(counts[m].sum())
        train = float(counts[m].max(axis=1).sum() / total) if total else math.nan
        out[m] = UnigramBaseline(m, modes[m].astype(np.int64), train, hit[m] / seen[m] if seen[m] else None,
                                 nll[m] / seen[m] if seen[m] else None)
    return out
