"""`WindowData`: what pretraining iterates — the store's usable clips split into train and
validation, the sampling plan, and batches from RAM or streamed from disk."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from vqmae.config import Config
from vqmae.store import TokenStore
from vqmae.windows.geometry import (WindowBatch, WindowPlan, _check_dist, gather, make_batch, split_rows, tile_windows,
                                    usable_rows, window_geometry)
from vqmae.windows.streaming import StreamingWindows


log = logging.getLogger(__name__)


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
