"""What every part of fine-tuning shares: the backbone a unit starts from, windows of labelled clips,
training crops of whole clips, and clip scoring (every non-overlapping window of a clip through the
encoder, the window vectors pooled into one clip vector by the model's learned clip pooling, then
the head)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from vqmae.checkpoint import check_parents, checkpoint_sha256, load_checkpoint, store_parents
from vqmae.config import Config, MAEConfig, mae_modalities
from vqmae.models.classifier import EmotionModel, clip_and_window_outputs, drop_modality
from vqmae.models.layout import MAEDims
from vqmae.store import TokenStore
from vqmae.utils import autocast_context
from vqmae.windows import batch_dict, make_batch, tile_windows, window_geometry

CKPT_NAME = "classifier.pt"


VARIANTS = ("pretrained", "probe", "scratch", "tokens", "egemaps", "student", "audio_labels")
BASELINES = ("tokens", "egemaps")  # linear models of per-clip features, not trained by `Fit`
LINEAR = ("probe", *BASELINES)  # fitted by a linear regression: single-label or value tasks only


EVAL_MODES = ("av", "audio", "visual")


class FinetuneError(RuntimeError):
    """A run that must not start or continue (no labels, MAE / store mismatch, other config)."""


class ClipWindows:
    """Windows of codes for fine-tuning, read from a store held in RAM.

    ``names`` are the backbone's modalities; a clip is usable when it has frames of at least one.
    """

    def __init__(self, store: TokenStore, names: tuple[str, ...], window_seconds: float):
        self.store = store
        self.names = names
        mode = "av" if len(names) == 2 else names[0]
        self.geom = window_geometry(store.specs, mode, window_seconds)
        self.specs = {m: store.specs[m] for m in names}
        self.length = {m: np.asarray(store.clips[f"{m}_length"], np.int64) for m in names}
        self.steps = np.max([-(-self.length[m] // self.geom.ratio[m]) for m in names], axis=0)
        for m in names:
            store.codes(m)  # load once

    def usable(self) -> np.ndarray:
        ok = self.store.clips["status"] == "ok"
        return np.flatnonzero(ok & (self.steps > 0)).astype(np.int64)

    def has(self, m: str, rows: np.ndarray) -> np.ndarray:
        return self.length[m][rows] > 0

    def batch(self, rows: np.ndarray, starts: np.ndarray, device: str) -> dict[str, torch.Tensor]:
        """rows [B] table rows, starts [B] in window-grid steps → the model's batch dict."""
        parts = {m: self.store.read_windows(m, rows, starts * self.geom.ratio[m], self.geom.frames[m])
                 for m in self.names}
        return batch_dict(make_batch(rows, starts, parts, self.specs), device)

    def tiles(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every clip's non-overlapping windows from frame 0 → (rows [n], starts [n])."""
        return tile_windows(rows, self.steps[rows], self.geom.window_steps)

    def crop_windows(self, rows: np.ndarray, starts: np.ndarray, max_windows: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training crops — clip ``rows`` [B] from ``starts`` [B] (steps), at most ``max_windows``
        consecutive windows each, none starting past the clip's end → (window rows [n], window
        starts [n], each window's crop index [n] into the B crops)."""
        ws = self.geom.window_steps
        left = np.maximum(self.steps[rows] - starts, 1)
        count = np.minimum(-(-left // ws), max_windows).astype(np.int64)  # [B] ≥ 1
        crop = np.repeat(np.arange(len(rows)), count)
        first = np.cumsum(count) - count
        offset = (np.arange(len(crop)) - first[crop]) * ws
        return np.asarray(rows, np.int64)[crop], (np.asarray(starts, np.int64)[crop] + offset), crop


def restrict(batch: Mapping[str, torch.Tensor], mode: str, names: Sequence[str]) -> dict:
    """Keep only the modalities of eval mode ``mode`` (av, audio, visual) present."""
    out = dict(batch)
    for m in names:
        if mode != "av" and m != mode:
            out = drop_modality(out, m)
    return out


@torch.no_grad()
def pooled_windows(model: EmotionModel, data: ClipWindows, rows: np.ndarray, mode: str, device: str,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Every non-overlapping window of clips ``rows`` in eval mode ``mode`` through the encoder
    and pooling → (pooled float32 `[n_windows, M, D]`, present `[n_windows, M]`, window clip
    position int64 `[n_windows]` into ``rows``), on ``device``."""
    was = model.training
    model.eval()
    win_rows, win_starts = data.tiles(rows)
    pos = np.searchsorted(rows, win_rows) if np.all(np.diff(rows) > 0) else \
        np.array([np.flatnonzero(rows == r)[0] for r in win_rows], np.int64)
    xs, ps = [], []
    with autocast_context(device):
        for a in range(0, len(win_rows), batch_size):
            b = data.batch(win_rows[a:a + batch_size], win_starts[a:a + batch_size], device)
            x, p = model.pooled(restrict(b, mode, data.names))
            xs.append(x.float())
            ps.append(p)
    model.train(was)
    m, d = len(model.names), model.out.in_features // len(model.names)
    x = torch.cat(xs) if xs else torch.zeros(0, m, d, device=device)
    p = torch.cat(ps) if ps else torch.zeros(0, m, dtype=torch.bool, device=device)
    return x, p, pos


@torch.no_grad()
def pooled_clips(model: EmotionModel, data: ClipWindows, rows: np.ndarray, mode: str, device: str,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Clip vectors of clips ``rows`` in eval mode ``mode``: every window through the encoder and
    pooling, then the model's clip pooling → (clip vectors float32 `[n_clips, M, D]`, present
    `[n_clips, M]`, window vectors `[n_windows, M, D]`, window present, window clip position
    int64 `[n_windows]` into ``rows``)."""
    x, p, pos = pooled_windows(model, data, rows, mode, device, batch_size)
    was = model.training
    model.eval()
    with autocast_context(device):
        cx, cp = model.clip_pooled(x, p, torch.from_numpy(pos).to(x.device), len(rows))
    model.train(was)
    return cx.float(), cp, x, p, pos


@torch.no_grad()
def predict_clips(model: EmotionModel, data: ClipWindows, rows: np.ndarray, mode: str,
                  device: str, batch_size: int, groups: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic clip scores: every window of every clip, window vectors pooled per clip by
    the model's clip pooling, then the head.

    ``groups`` (int64 per store row, e.g. speaker ids): with a speaker-normalised model each group's
    mean clip vector is taken over these rows (in this ``mode``) and subtracted; without it the
    model's stored mean is used.

    → (clip outputs float32 [n_clips, C], window outputs [n_windows, C] (the head on each window
    alone, normalised by its clip's group mean), window clip position int64 [n_windows] into
    ``rows``)."""
    was = model.training
    model.eval()
    x, present, pos = pooled_windows(model, data, rows, mode, device, batch_size)
    group = None
    if groups is not None:  # dense ids of the scored rows' groups
        inverse = np.unique(np.asarray(groups)[rows], return_inverse=True)[1].astype(np.int64)
        group = torch.from_numpy(inverse).to(x.device)
    with autocast_context(device):
        clip, win = clip_and_window_outputs(model, x, present, torch.from_numpy(pos).to(x.device),
                                            len(rows), group, batch_size)
    clip, win = clip.numpy(), win.numpy()
    model.train(was)
    return clip.astype(np.float32), win, pos


@dataclass
class Backbone:
    """What every unit builds its encoder from."""

    mae_cfg: MAEConfig
    dims: MAEDims
    names: tuple[str, ...]
    state: dict[str, torch.Tensor] | None  # the pretrained MAE's state dict (None: no MAE)
    parents: dict[str, str]  # tokenizer sha256s (+ the MAE's)
    mae_path: str | None


def load_backbone(store: TokenStore, cfg: Config, mae: str | Path | None) -> Backbone:
    """The MAE's config, dims and weights (checked against the store's tokenizers), or — without an
    MAE — today's `cfg.mae` on the store's dims (from-scratch runs only)."""
    parents = store_parents(store)
    if mae is None:
        if {"pretrained", "probe"} & set(cfg.finetune.inits) or cfg.finetune.distill:
            raise FinetuneError("a pretrained MAE is needed (--mae mae.pt) for the 'pretrained', "
                                "'probe' and distillation variants; use --from-scratch to train "
                                "without one")
        dims = MAEDims.from_specs(store.specs, cfg.mae)
        mode = mae_modalities(cfg.mae.modalities, store.specs)
        names = ("audio", "visual") if mode == "av" else (mode,)
        return Backbone(cfg.mae, dims, names, None, parents, None)
    path = Path(mae)
    ckpt = load_checkpoint(path, kind="mae")
    try:
        check_parents(path, ckpt["parents"], store)
    except Exception as e:
        raise FinetuneError(str(e)) from None
    mae_cfg = Config.from_dict(ckpt["config"]).mae
    dims = MAEDims.from_dict(ckpt["extra"]["dims"])
    store_dims = MAEDims.from_specs({m: s for m, s in store.specs.items() if dims.get(m)}, mae_cfg)
    for m in ("audio", "visual"):
        if dims.get(m) is not None and store_dims.get(m) != dims.get(m):
            raise FinetuneError(f"{path}: {m} codes of the MAE are {dims.get(m)}, the store "
                                f"{store.path} has {store_dims.get(m)}")
    mode = mae_modalities(mae_cfg.modalities, [m for m in ("audio", "visual") if dims.get(m) is not None])
    names = ("audio", "visual") if mode == "av" else (mode,)
    parents = {**ckpt["parents"], "mae": checkpoint_sha256(path)}
    return Backbone(mae_cfg, dims, names, ckpt["state_dict"], parents, str(path.resolve()))
