"""`StreamingWindows`: windows of a store too large for RAM, read as random groups of zarr
row-chunks (contiguous reads), drawn from the clips inside them and shuffled in a buffer; one
disjoint set of chunks per rank and DataLoader worker."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from torch.utils.data import IterableDataset, get_worker_info

from vqmae.store import ModalitySpec, StoreError, TokenStore
from vqmae.store.integrity import refuse_outside_codebook
from vqmae.windows.geometry import WindowBatch, WindowGeometry, _check_dist, gather, make_batch


log = logging.getLogger(__name__)


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
            try:
                rows = self._arrays[m][a:b]
            except Exception as e:  # a truncated or corrupt chunk file
                raise StoreError(f"damaged token store: {self.path}: cannot read {m}/codes rows "
                                 f"{a}-{b - 1} ({type(e).__name__}: {e}); run `vqmae inspect "
                                 f"--verify {self.path}`") from None
            out[m] = (refuse_outside_codebook(self.path, m, rows, self.specs[m].codebook_size,
                                              f"rows {a}-{b - 1} "), a)
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
