"""Shuffled frame pools for tokenizer training.

A VQ-VAE batch must mix frames from many clips: a few consecutive frames of one file would bias the
codebook towards that file. `FramePool` keeps a uniform random sample (reservoir sampling,
Vitter's algorithm R) of every frame offered to it, in bounded memory, and serves batches drawn
uniformly from it with an explicit generator.
"""

from __future__ import annotations

import numpy as np
import torch


BLOCK = 4096  # frames read at a time from frames held on disk


class FramePool:
    """A uniform sample of at most `capacity` frames of shape `frame_shape` and `dtype`."""

    def __init__(self, capacity: int, frame_shape: tuple[int, ...], dtype: np.dtype, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"frame pool capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.frames = np.empty((capacity, *frame_shape), dtype=dtype)  # [capacity, *frame_shape]
        self.source = np.full(capacity, -1, dtype=np.int64)  # which clip each slot came from
        self.filled = 0
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, frames: np.ndarray, clip: int = -1) -> None:
        """Offer every frame of one clip ([n, *frame_shape]); each frame ever offered ends up in the
        pool with equal probability capacity / seen. Frames that are not an array (a long clip's
        `vqmae.ingest.FrameSpill` on disk) are offered in blocks, never read whole."""
        if not isinstance(frames, np.ndarray):
            for lo in range(0, len(frames), BLOCK):
                self._add(frames[lo:lo + BLOCK], clip)
            return
        self._add(frames, clip)

    def _add(self, frames: np.ndarray, clip: int) -> None:
        n = len(frames)
        room = min(n, self.capacity - self.filled)
        if room:
            self.frames[self.filled:self.filled + room] = frames[:room]
            self.source[self.filled:self.filled + room] = clip
            self.filled += room
        rest = frames[room:]
        if len(rest):
            # Frame number j (0-based, over everything seen) replaces slot r ~ U[0, j] if r < capacity.
            j = self.seen + room + np.arange(len(rest))
            r = self._rng.integers(0, j + 1)
            keep = r < self.capacity
            self.frames[r[keep]] = rest[keep]
            self.source[r[keep]] = clip
        self.seen += n

    def sample(self, n: int, generator: torch.Generator) -> np.ndarray:
        """`n` frames drawn uniformly (with replacement) from the pool → [n, *frame_shape]."""
        if self.filled == 0:
            raise ValueError("frame pool is empty: no clip could be loaded for training")
        idx = torch.randint(0, self.filled, (n,), generator=generator).numpy()
        return self.frames[idx]

    @property
    def n_clips(self) -> int:
        return len(np.unique(self.source[:self.filled]))
