"""The data path of stages 2 and 3: fixed-length windows of codes drawn from a token store (docs/design.md §3, §7).

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

Modules: `geometry` (windows, split, batches, the plan), `data` (`WindowData`: what pretraining
iterates), `streaming` (`StreamingWindows`), `unigram` (the per-position unigram baseline).
"""

from vqmae.windows.data import WindowData
from vqmae.windows.geometry import (MODES, WindowBatch, WindowGeometry, WindowPlan, batch_dict, gather,
                                    make_batch, split_rows, tile_windows, usable_rows, window_geometry)
from vqmae.windows.streaming import StreamingWindows
from vqmae.windows.unigram import UnigramBaseline, position_counts, unigram_baseline

__all__ = ["MODES", "StreamingWindows", "UnigramBaseline", "WindowBatch", "WindowData", "WindowGeometry",
           "WindowPlan", "batch_dict", "gather", "make_batch", "position_counts", "split_rows",
           "tile_windows", "unigram_baseline", "usable_rows", "window_geometry"]
