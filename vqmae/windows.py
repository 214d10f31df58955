"""Stage-2 data path: fixed-length windows of codes drawn from a token store (DESIGN.md §3, §7).

A *window* is ``MAEConfig.window_seconds`` of one clip: 50 visual frames [50, 24, 24] and the 100
audio frames [100, 64] of the same 2 s at the default rates. Windows start on a common time grid,
the *step*, one frame of the slowest requested modality (1/25 s in ``av`` mode), so an audio window
always starts at 2 × the visual start. Frames past a clip's end are code 0 with ``valid`` False.

Decisions (documented here because the training loop relies on them):

* Usable clips: status ``ok`` with at least one frame of every requested modality. Audio-only clips
  are used in ``audio`` mode and *skipped* in ``av`` mode: a window whose visual half is all padding
  would make the coupled masking and the visual loss meaningless for that sample.
* Split: a clip is in validation when a seeded hash of its clip id falls below ``val_fraction`` (at
  least one clip when the fraction is positive). Per clip, so adding clips to a store or changing
  the mode never moves an old clip across the split.
* Training epoch: every training clip appears once per non-overlapping window that tiles it
  (``ceil(duration / window)`` times, so clips are drawn in proportion to their length, without
  replacement), each time with a start drawn uniformly over every possible start, in a random order.
  Epoch ``e`` is a pure function of ``(seed, e)``. Batches are consecutive slices of the endless
  concatenation of epochs, so ``batch(step)`` needs nothing but ``(seed, step)``: that is how a
  resumed run sees exactly the batches of an uninterrupted one, and how ``world_size`` ranks split
  one global batch: rank ``r`` takes the ``r``-th contiguous ``batch_size / world_size`` slice.
* Validation: every validation clip tiled by non-overlapping windows from frame 0 (the last one
  padded), identical on every call; ranks take every ``world_size``-th window.
* Stores whose requested codes are smaller than ``PretrainConfig.ram_limit_gb`` are loaded once
  (per process) and batches are one fancy-index gather. Larger stores stream through
  `StreamingWindows`: random groups of zarr row-chunks read contiguously, windows drawn from the
  clips inside them and shuffled in a buffer, one disjoint set of chunks per rank and worker.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vqmae.config import Config
from vqmae.store import ModalitySpec, TokenStore

log = logging.getLogger(__name__)

MODES: dict[str, tuple[str, ...]] = {"av": ("visual", "audio"), "audio": ("audio",),
                                     "visual": ("visual",)}
# Frames of one modality gathered at once by `unigram_baseline` (bounds its memory).
COUNT_BLOCK_ELEMENTS = 1 << 22


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
    """Frames per window from the window length and each modality's frame rate, checked whole."""
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


# ----------------------------------------------------------------------------------------------
# the in-RAM and validation paths


def _check_dist(batch_size: int, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of world_size {world_size} "
                         f"(it is the global batch, split evenly over ranks)")


class WindowData:
    """Everything stage 2 reads from a store: the split, training batches, validation batches.

    ``cfg.mae.modalities`` / ``window_seconds`` fix the windows, ``cfg.pretrain`` the batch size
    (global, split over ranks), ``val_fraction``, ``workers``, ``ram_limit_gb`` and
    ``stream_buffer_mb``; ``cfg.seed`` seeds the split and the sampling.
    """

    def __init__(self, store: TokenStore, cfg: Config, *, rank: int = 0, world_size: int = 1,
                 mode: str | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.batch_size = cfg.pretrain.batch_size
        _check_dist(self.batch_size, rank, world_size)
        self.per_rank = self.batch_size // world_size
        self.geom = window_geometry(store.specs, mode or cfg.mae.modalities, cfg.mae.window_seconds)
        self.specs = {m: store.specs[m] for m in self.geom.modalities}
        self.steps = self.geom.clip_steps({m: store.clips[f"{m}_length"] for m in self.specs})
        usable = usable_rows(store.clips, self.geom)
        if not len(usable):
            raise ValueError(f"{store.path}: no clip with status ok and {list(self.specs)} codes")
        self.train_rows, self.val_rows = split_rows(store.clips, usable, cfg.pretrain.val_fraction,
                                                    cfg.seed)
        self.plan = WindowPlan(self.train_rows, self.steps[self.train_rows],
                               self.geom.window_steps, cfg.seed)
        self.code_bytes = sum(store.n_frames(m) * s.n_tokens * 2 for m, s in self.specs.items())
        # the limit is per machine: torchrun starts LOCAL_WORLD_SIZE processes, each with a copy
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.in_ram = self.code_bytes < cfg.pretrain.ram_limit_gb * 2 ** 30 / local
        log.info("%s: %d usable clips (%d train, %d val), %d windows per epoch, %.2f GB of codes "
                 "%s", store.path, len(usable), len(self.train_rows), len(self.val_rows),
                 self.plan.samples_per_epoch, self.code_bytes / 2 ** 30,
                 "loaded into RAM" if self.in_ram else "streamed")

    @property
    def steps_per_epoch(self) -> float:
        return self.plan.samples_per_epoch / self.batch_size

    def windows(self, rows: np.ndarray, starts: np.ndarray) -> WindowBatch:
        """Gather windows (rows [B], starts in steps [B]) from RAM (loading the codes once)."""
        parts = {}
        for m, spec in self.specs.items():
            offset = starts * self.geom.ratio[m]  # [B] frames into the clip
            parts[m] = gather(self.store.codes(m), self.store.clips[f"{m}_start"][rows] + offset,
                              self.store.clips[f"{m}_length"][rows] - offset,
                              self.geom.frames[m])
        return make_batch(rows, starts, parts, self.specs)

    def train_batches(self, start_step: int = 0) -> Iterator[WindowBatch]:
        """Endless in-RAM training batches from global step ``start_step`` (this rank's share)."""
        step = start_step
        while True:
            yield self.windows(*self.plan.batch(step, self.batch_size, self.rank,
                                                self.world_size))
            step += 1

    def val_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's validation windows → (rows [n], starts in steps [n]), fixed."""
        rows, starts = tile_windows(self.val_rows, self.steps[self.val_rows],
                                    self.geom.window_steps)
        return rows[self.rank::self.world_size], starts[self.rank::self.world_size]

    def val_batches(self) -> Iterator[WindowBatch]:
        """Validation batches of ``batch_size / world_size`` windows (last one smaller)."""
        rows, starts = self.val_windows()
        for a in range(0, len(rows), self.per_rank):
            r, s = rows[a:a + self.per_rank], starts[a:a + self.per_rank]
            if self.in_ram:
                yield self.windows(r, s)
            else:  # one batched zarr read per modality, never per window
                yield make_batch(r, s, {m: self.store.read_windows(m, r, s * self.geom.ratio[m],
                                                                self.geom.frames[m])
                                     for m in self.specs}, self.specs)

    def streaming(self, *, start_epoch: int = 0, epochs: int | None = None,
                  drop_last: bool = True) -> "StreamingWindows":
        """The chunk-streaming dataset over this rank's training clips."""
        return StreamingWindows(self.store, self.geom, self.train_rows, seed=self.cfg.seed,
                                batch_size=self.per_rank, rank=self.rank,
                                world_size=self.world_size,
                                buffer_mb=self.cfg.pretrain.stream_buffer_mb,
                                start_epoch=start_epoch, epochs=epochs, drop_last=drop_last)

    def train_loader(self, start_step: int = 0) -> Iterator[WindowBatch]:
        """Training batches by the path the store's size calls for.

        In RAM: exactly resumable at ``start_step``. Streaming: a `DataLoader` over
        `StreamingWindows` with ``cfg.pretrain.workers`` workers, resumed at the epoch containing
        ``start_step`` (an epoch's order depends on the number of ranks and workers).
        """
        if self.in_ram:
            return self.train_batches(start_step)
        epoch = int(start_step // max(self.steps_per_epoch, 1e-9))
        workers = self.cfg.pretrain.workers
        return iter(DataLoader(self.streaming(start_epoch=epoch), batch_size=None,
                               num_workers=workers, pin_memory=torch.cuda.is_available(),
                               persistent_workers=workers > 0))


# ----------------------------------------------------------------------------------------------
# the streaming path


class StreamingWindows(IterableDataset):
    """Training windows of stores larger than RAM, read in batched contiguous chunks.

    The store's rows are cut into *blocks*: the zarr row-chunks of the modality whose chunks span
    the most seconds (a clip belongs to the block holding its first frame). Each epoch permutes the
    blocks with ``(seed, epoch)``; consumer ``c = rank × workers + worker`` of ``n`` takes blocks
    ``c, c + n, ...`` and walks them in groups of about ``buffer_mb`` of codes: one zarr read per
    contiguous run of blocks and modality, every training clip's windows drawn inside the group
    (tiles and uniform starts as `WindowPlan`, starts seeded per block, so an epoch's set of windows
    does not depend on ``world_size`` or workers), shuffled together with the previous group's
    leftovers and cut into batches of ``batch_size`` (this rank's share). Endless unless ``epochs``.
    """

    def __init__(self, store: TokenStore, geom: WindowGeometry, rows: np.ndarray, *, seed: int,
                 batch_size: int, rank: int = 0, world_size: int = 1, buffer_mb: float = 256,
                 start_epoch: int = 0, epochs: int | None = None, drop_last: bool = True) -> None:
        super().__init__()
        _check_dist(batch_size * world_size, rank, world_size)
        self.path = Path(store.path)
        self.geom = geom
        self.specs = {m: store.specs[m] for m in geom.modalities}
        self.seed, self.batch_size = seed, batch_size
        self.rank, self.world_size = rank, world_size
        self.start_epoch, self.epochs, self.drop_last = start_epoch, epochs, drop_last
        self.rows = np.asarray(rows, np.int64)
        self.start = {m: store.clips[f"{m}_start"][self.rows] for m in self.specs}  # [n] each
        self.length = {m: store.clips[f"{m}_length"][self.rows] for m in self.specs}
        self.steps = geom.clip_steps(self.length)
        self.n_starts = np.maximum(self.steps - geom.window_steps + 1, 1)
        self.tiles = np.maximum(-(-self.steps // geom.window_steps), 1)
        chunk = {m: store.chunk_rows(m) for m in self.specs}
        lead = max(self.specs, key=lambda m: chunk[m] / self.specs[m].frame_rate)
        block_of = self.start[lead] // chunk[lead]  # [n] clips are in table order
        self.blocks, self.block_first = np.unique(block_of, return_index=True)
        self.block_end = np.append(self.block_first[1:], len(self.rows))  # clip index ranges
        block_bytes = sum(chunk[lead] / self.specs[lead].frame_rate * s.frame_rate * s.n_tokens * 2
                          for s in self.specs.values())
        self.blocks_per_group = max(1, int(buffer_mb * 2 ** 20 // block_bytes))
        self._arrays: dict[str, zarr.Array] | None = None

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        n = self.world_size * workers
        if len(self.blocks) < n:
            raise ValueError(f"{self.path}: {len(self.blocks)} chunk blocks of training clips "
                             f"cannot feed {self.world_size} ranks × {workers} workers; use fewer "
                             f"workers or the in-RAM path (raise pretrain.ram_limit_gb)")
        return self.rank * workers + worker, n

    def _read(self, clip_lo: int, clip_hi: int) -> dict[str, tuple[np.ndarray, int]]:
        """Codes of clips [clip_lo, clip_hi) of ``self.rows``: one zarr slice per modality."""
        if self._arrays is None:  # opened in each worker process, never shared across a fork
            self._arrays = {m: zarr.open_array(str(self.path / m / "codes"), mode="r")
                            for m in self.specs}
        out = {}
        for m in self.specs:
            a = int(self.start[m][clip_lo])
            b = int((self.start[m][clip_lo:clip_hi] + self.length[m][clip_lo:clip_hi]).max())
            out[m] = (self._arrays[m][a:b], a)
        return out

    def _group(self, epoch: int, blocks: np.ndarray, carry: _Pending | None) -> _Pending:
        """Read one group of blocks; draw (unshuffled) every training window of its clips and
        append the windows ``carry`` left over from the previous group."""
        idx_parts, start_parts = [], []
        for b in blocks.tolist():
            lo, hi = int(self.block_first[b]), int(self.block_end[b])
            which = np.repeat(np.arange(lo, hi), self.tiles[lo:hi])
            rng = np.random.default_rng([self.seed, epoch, int(self.blocks[b])])
            idx_parts.append(which)
            start_parts.append(rng.integers(0, self.n_starts[which]))
        which, starts = np.concatenate(idx_parts), np.concatenate(start_parts)
        group = _Pending(self.rows[which], starts, {}, {}, {})
        srcs: dict[str, list[np.ndarray]] = {m: [] for m in self.specs}
        base = {m: np.zeros(len(which), np.int64) for m in self.specs}  # clip start in src
        offset = dict.fromkeys(self.specs, 0)
        for lo_b, hi_b in _runs(np.sort(blocks)):  # contiguous blocks: one read per modality
            lo, hi = int(self.block_first[lo_b]), int(self.block_end[hi_b - 1])
            sel = (which >= lo) & (which < hi)
            for m, (codes, a) in self._read(lo, hi).items():
                base[m][sel] = self.start[m][which[sel]] - a + offset[m]
                srcs[m].append(codes)
                offset[m] += len(codes)
        for m in self.specs:
            frames = starts * self.geom.ratio[m]
            group.first[m] = base[m] + frames
            group.avail[m] = self.length[m][which] - frames
        if carry is not None:  # one concatenate below copies the codes of both
            left = carry.gather(self.geom.frames)
            group.rows = np.concatenate([group.rows, left.rows])
            group.starts = np.concatenate([group.starts, left.starts])
            for m in self.specs:
                srcs[m].append(left.src[m])
                group.first[m] = np.concatenate([group.first[m], left.first[m] + offset[m]])
                group.avail[m] = np.concatenate([group.avail[m], left.avail[m]])
        for m in self.specs:
            group.src[m] = np.concatenate(srcs[m])
        return group

    def _epoch_groups(self, epoch: int, consumer: int, n: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        mine = order[consumer::n]
        g = self.blocks_per_group
        return [mine[a:a + g] for a in range(0, len(mine), g)]

    def __iter__(self) -> Iterator[WindowBatch]:
        consumer, n = self._consumer()
        pending: _Pending | None = None
        epoch = self.start_epoch
        while self.epochs is None or epoch < self.start_epoch + self.epochs:
            for k, blocks in enumerate(self._epoch_groups(epoch, consumer, n)):
                group = self._group(epoch, blocks, pending)
                rng = np.random.default_rng([self.seed, epoch, consumer, k])
                order = rng.permutation(len(group.rows))
                full = len(order) // self.batch_size * self.batch_size
                for a in range(0, full, self.batch_size):
                    yield group.batch(order[a:a + self.batch_size], self.geom.frames, self.specs)
                pending = group.select(order[full:])
            epoch += 1
        if pending is not None and len(pending.rows) and not self.drop_last:
            yield pending.batch(np.arange(len(pending.rows)), self.geom.frames, self.specs)


@dataclass
class _Pending:
    """Windows drawn but not yet batched: codes stay in ``src`` until a batch gathers them.

    rows, starts int64 [n]; per modality src uint16 [N, K], first / avail int64 [n] as `gather`.
    """

    rows: np.ndarray
    starts: np.ndarray
    src: dict[str, np.ndarray]
    first: dict[str, np.ndarray]
    avail: dict[str, np.ndarray]

    def select(self, index: np.ndarray) -> "_Pending":
        return _Pending(self.rows[index], self.starts[index], self.src,
                        {m: v[index] for m, v in self.first.items()},
                        {m: v[index] for m, v in self.avail.items()})

    def gather(self, frames: Mapping[str, int]) -> "_Pending":
        """The same windows with their codes copied out, so the group they came from can go."""
        out = _Pending(self.rows, self.starts, {}, {}, {})
        for m in self.src:
            codes, valid = gather(self.src[m], self.first[m], self.avail[m], frames[m])
            out.src[m] = codes.reshape(-1, codes.shape[-1])  # [n × L, K]
            out.first[m] = np.arange(len(self.rows), dtype=np.int64) * frames[m]
            out.avail[m] = valid.sum(1)  # valid frames are always a prefix
        return out

    def batch(self, index: np.ndarray, frames: Mapping[str, int],
              specs: Mapping[str, ModalitySpec]) -> WindowBatch:
        parts = {m: gather(self.src[m], self.first[m][index], self.avail[m][index], frames[m])
                 for m in self.src}
        return make_batch(self.rows[index], self.starts[index], parts, specs)


def _runs(sorted_ids: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers as [lo, hi) pairs."""
    if not len(sorted_ids):
        return []
    cuts = np.flatnonzero(np.diff(sorted_ids) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(sorted_ids, cuts)]


# ----------------------------------------------------------------------------------------------
# the unigram baseline


@dataclass(frozen=True)
class UnigramBaseline:
    """Always predicting the most frequent training code of each token position.

    mode int64 [n_tokens] (grid flattened: audio frequency index, visual cell row-major);
    train_accuracy over every frame of the training clips; accuracy over the valid frames of the
    windows given to `unigram_baseline` (None when none were given).
    """

    modality: str
    mode: np.ndarray
    train_accuracy: float
    accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "mode": self.mode.tolist(),
                "train_accuracy": self.train_accuracy, "accuracy": self.accuracy}


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
    arr = store.codes(m) if store.is_loaded(m) else zarr.open_array(
        str(Path(store.path) / m / "codes"), mode="r")
    for a in range(0, len(mask), step):
        sel = mask[a:a + step]
        if sel.any():
            block = np.asarray(arr[a:a + step])[sel]  # [F, K], one contiguous read per block
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
    hit = dict.fromkeys(names, 0)
    seen = dict.fromkeys(names, 0)
    for batch in batches:
        for m in names:
            codes, valid = getattr(batch, m), getattr(batch, f"{m}_valid")
            if codes is None:
                continue
            flat = codes.reshape(*codes.shape[:2], -1)  # [B, L, K]
            hits = (flat == torch.from_numpy(modes[m])).sum(-1)  # [B, L]
            hit[m] += int(hits[valid].sum())
            seen[m] += int(valid.sum()) * flat.shape[-1]
    out = {}
    for m in names:
        total = int(counts[m].sum())
        train = float(counts[m].max(axis=1).sum() / total) if total else math.nan
        out[m] = UnigramBaseline(m, modes[m].astype(np.int64), train,
                                 hit[m] / seen[m] if seen[m] else None)
    return out
