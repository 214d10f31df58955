"""Window geometry, the train / validation split of clips, batches of windows and the sampling plan:
everything about windows that is a pure function of the store's table and a seed (never of codes,
except `gather` / `make_batch`, which cut them out). See `vqmae.windows` for the rules."""


from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vqmae.config import mae_modalities
from vqmae.store import ModalitySpec


log = logging.getLogger(__name__)

MODES: dict[str, tuple[str, ...]] = {"av": ("visual", "audio"), "audio": ("audio",),
                                     "visual": ("visual",)}


# ----------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class WindowGeometry:
    """How long a window is in each modality and on which time grid windows start.

    ``frames[m]`` frames of modality ``m`` per window; one step = ``ratio[m]`` frames of ``m``;
    ``window_steps`` steps per window.
    """

    modalities: tuple[str, ...]
    frames: dict[str, int]
    ratio: dict[str, int]
    step_rate: float
    window_steps: int

    def clip_steps(self, lengths: Mapping[str, np.ndarray]) -> np.ndarray:
        """Clip durations in steps, int64 [n]: the longest modality, partial steps rounded up."""
        return np.max([-(-np.asarray(lengths[m], np.int64) // self.ratio[m])
                       for m in self.modalities], axis=0)


def _whole(x: float, what: str) -> int:
    n = round(x)
    if n < 1 or abs(x - n) > 1e-6:
        raise ValueError(f"{what} = {x:g} is not a positive whole number")
    return int(n)


def window_geometry(specs: Mapping[str, ModalitySpec], mode: str,
                    window_seconds: float) -> WindowGeometry:
    """Frames per window from the window length and each modality's frame rate, checked whole.
    `mode` "auto" takes the modalities the store has (`vqmae.config.mae_modalities`)."""
    mode = mae_modalities(mode, specs)
    if mode not in MODES:
        raise ValueError(f"unknown modalities mode {mode!r}; choose one of {sorted(MODES)}")
    names = MODES[mode]
    missing = [m for m in names if m not in specs]
    if missing:
        raise ValueError(f"mode {mode!r} needs {list(names)} but the store has only "
                         f"{sorted(specs)}")
    step_rate = min(specs[m].frame_rate for m in names)
    frames = {m: _whole(window_seconds * specs[m].frame_rate, f"{m} frames per window "
                        f"({window_seconds:g} s × {specs[m].frame_rate:g} fps)") for m in names}
    ratio = {m: _whole(specs[m].frame_rate / step_rate,
                       f"{m} frame rate / {step_rate:g} fps (audio/visual alignment)")
             for m in names}
    steps = _whole(window_seconds * step_rate, f"window steps ({window_seconds:g} s)")
    return WindowGeometry(names, frames, ratio, step_rate, steps)


# ----------------------------------------------------------------------------------------------
# clips and split


def usable_rows(clips: Mapping[str, np.ndarray], geom: WindowGeometry) -> np.ndarray:
    """Table rows with status ok and frames in every requested modality, int64 [n]."""
    ok = clips["status"] == "ok"
    for m in geom.modalities:
        ok &= clips[f"{m}_length"] > 0
    return np.flatnonzero(ok).astype(np.int64)


def _hash_unit(seed: int, clip_ids: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per clip id, fixed by (seed, id), float64 [n]."""
    out = np.empty(len(clip_ids), np.float64)
    for i, cid in enumerate(clip_ids.tolist()):
        digest = hashlib.blake2b(f"{seed}\0{cid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0 ** 64
    return out


def split_rows(clips: Mapping[str, np.ndarray], rows: np.ndarray, val_fraction: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-clip train/validation split of ``rows`` → (train [n_t], val [n_v]), sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} must lie in [0, 1)")
    rows = np.asarray(rows, np.int64)
    u = _hash_unit(seed, clips["clip_id"][rows])
    is_val = u < val_fraction
    if val_fraction > 0 and not is_val.any() and len(rows) > 1:
        is_val[np.argmin(u)] = True  # a tiny store still gets a validation clip
    return rows[~is_val], rows[is_val]


# ----------------------------------------------------------------------------------------------
# batches


@dataclass
class WindowBatch:
    """One batch of windows; only the requested modalities are set.

    visual int64 [B, Tv, H, W] (Tv = 50, 24 × 24 by default), visual_valid bool [B, Tv];
    audio int64 [B, Ta, F] (Ta = 100, F = 64), audio_valid bool [B, Ta]; rows int64 [B] clip-table
    rows; starts int64 [B] window starts in grid steps (modality m starts at frame
    ``starts × geometry.ratio[m]``, at ``starts / step_rate`` seconds). Padded frames hold code 0.
    """

    rows: torch.Tensor
    starts: torch.Tensor
    visual: torch.Tensor | None = None
    visual_valid: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    audio_valid: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def _map(self, fn: Any) -> "WindowBatch":
        return WindowBatch(**{k: None if v is None else fn(v) for k, v in vars(self).items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "WindowBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "WindowBatch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map(lambda t: t.pin_memory())


def gather(src: np.ndarray, first: np.ndarray, avail: np.ndarray,
           n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """One vectorised gather of B windows from codes in RAM → (uint16 [B, L, K], bool [B, L]).

    src uint16 [N, K]; first [B] is the row of ``src`` holding each window's first frame and
    avail [B] how many frames of the clip remain from there (frames past it are padding).
    """
    valid = np.arange(n_frames) < np.asarray(avail, np.int64)[:, None]  # [B, L]
    if not len(src):
        return np.zeros(valid.shape + src.shape[1:], np.uint16), valid
    index = np.where(valid, np.asarray(first, np.int64)[:, None] + np.arange(n_frames), 0)
    out = src[index]  # [B, L, K]
    out[~valid] = 0
    return out, valid


def _to_tensor(codes: np.ndarray, grid: tuple[int, ...]) -> torch.Tensor:
    """uint16 [B, L, K] → int64 [B, L, *grid].

    Widened by numpy: torch's uint16 → int64 cast took 53 ms per paper-sized visual batch here,
    numpy's 8.7 ms (the gather itself 2 ms).
    """
    return torch.from_numpy(codes.astype(np.int64)).view(*codes.shape[:2], *grid)


def make_batch(rows: np.ndarray, starts: np.ndarray,
               parts: Mapping[str, tuple[np.ndarray, np.ndarray]],
               specs: Mapping[str, ModalitySpec]) -> WindowBatch:
    """rows [B], starts [B] (steps), ``parts[m]`` = (codes uint16 [B, L, K], valid bool [B, L])."""
    kw: dict[str, torch.Tensor] = {}
    for m, (codes, valid) in parts.items():
        kw[m] = _to_tensor(codes, specs[m].grid)
        kw[f"{m}_valid"] = torch.from_numpy(np.ascontiguousarray(valid))
    return WindowBatch(rows=torch.from_numpy(np.asarray(rows, np.int64).copy()),
                       starts=torch.from_numpy(np.asarray(starts, np.int64).copy()), **kw)


# ----------------------------------------------------------------------------------------------
# the sampling plan (pure: depends on the table and seed only, never on the codes)


@dataclass
class WindowPlan:
    """Training windows of ``rows`` as an endless sequence; see the module docstring.

    rows int64 [n] are table rows, steps int64 [n] their durations in window-grid steps.
    """

    rows: np.ndarray
    steps: np.ndarray
    window_steps: int
    seed: int
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not len(self.rows):
            raise ValueError("no training clips to draw windows from")
        self.n_starts = np.maximum(self.steps - self.window_steps + 1, 1)  # [n]
        self.tiles = np.maximum(-(-self.steps // self.window_steps), 1)  # [n]
        self.samples_per_epoch = int(self.tiles.sum())

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch`` in order → (rows [N], starts in steps [N]), N = samples_per_epoch."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            which = rng.permutation(np.repeat(np.arange(len(self.rows)), self.tiles))  # [N]
            starts = rng.integers(0, self.n_starts[which])  # [N]
            if len(self._cache) >= 2:  # consecutive steps touch at most two epochs
                self._cache.pop(min(self._cache))
            self._cache[epoch] = (self.rows[which], starts)
        return self._cache[epoch]

    def samples(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples first .. first + count - 1 of the endless sequence → (rows, starts) [count]."""
        index = np.arange(first, first + count, dtype=np.int64)
        rows = np.empty(count, np.int64)
        starts = np.empty(count, np.int64)
        epochs = index // self.samples_per_epoch
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            e_rows, e_starts = self.epoch(e)
            pos = index[sel] % self.samples_per_epoch
            rows[sel], starts[sel] = e_rows[pos], e_starts[pos]
        return rows, starts

    def batch(self, step: int, batch_size: int, rank: int = 0,
              world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of global batch ``step`` → (rows [b], starts [b]), b = B / world."""
        per_rank = batch_size // world_size
        return self.samples(step * batch_size + rank * per_rank, per_rank)


def tile_windows(rows: np.ndarray, steps: np.ndarray,
                 window_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows covering each clip from its start → (rows [n], starts [n])."""
    tiles = np.maximum(-(-np.asarray(steps, np.int64) // window_steps), 1)
    which = np.repeat(np.arange(len(rows)), tiles)
    first = np.cumsum(tiles) - tiles  # [n_clips] index of each clip's first tile
    starts = (np.arange(len(which)) - first[which]) * window_steps
    return np.asarray(rows, np.int64)[which], starts.astype(np.int64)


def _check_dist(batch_size: int, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of world_size {world_size} "
                         f"(it is the global batch, split evenly over ranks)")




def batch_dict(batch: WindowBatch, device: str) -> dict[str, torch.Tensor]:
    """A `WindowBatch` as the model's input dict, on `device`."""
    out = {}
    for m in ("audio", "visual"):
        codes = getattr(batch, m)
        if codes is not None:
            out[m] = codes.to(device, non_blocking=True)
            out[f"{m}_valid"] = getattr(batch, f"{m}_valid").to(device, non_blocking=True)
    return out
