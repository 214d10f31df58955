"""Read side of a merged token store: `TokenStore` (table and offsets in RAM, codes in batches).

`TokenStore.open` validates the format tag, the modality specs and that every clip's
``<name>_start`` / ``<name>_length`` lies inside ``<name>/codes``; codes are read from zarr on
demand or loaded into RAM once (`TokenStore.codes`), and `TokenStore.read_windows` gathers a batch
of fixed-length windows in one read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from vqmae.store.integrity import (check_rows, raise_if_damaged, read_rows, recorded_crcs,
                                   refuse_outside_codebook)
from vqmae.store.schema import (MERGE_BLOCK_BYTES, ModalitySpec, StoreError, _merged_path,
                                _read_root_attrs, _specs_from_attrs, table_columns)


class TokenStore:
    """Read side of a merged store: table and offsets in RAM, codes loaded or read in batches."""

    def __init__(self, path: Path, group: zarr.Group, attrs: dict[str, Any],
                 specs: dict[str, ModalitySpec], clips: dict[str, np.ndarray],
                 arrays: dict[str, zarr.Array]) -> None:
        self.path = path
        self.attrs = attrs
        self.specs = specs
        self.clips = clips
        self._group = group
        self._arrays = arrays
        self._loaded: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, *, load: bool | Iterable[str] = False) -> "TokenStore":
        """Open and validate a store; ``load`` = True or modality names to hold codes in RAM."""
        path = Path(path)
        if not path.exists() and _merged_path(path).exists():
            raise StoreError(f"{path}: a merge was interrupted mid-swap; run merge again")
        attrs = _read_root_attrs(path)
        specs = _specs_from_attrs(path, attrs.get("modalities"))
        group = zarr.open_group(str(path), mode="r")
        arrays = {n: _get_array(group, path, f"{n}/codes") for n in specs}
        clips = {c: _get_array(group, path, f"clips/{c}")[:] for c in table_columns(specs)}
        store = cls(path, group, attrs, specs, clips, arrays)
        store._validate()
        names = list(specs) if load is True else list(load or [])
        for name in names:
            store.codes(name)
        return store

    def _validate(self) -> None:
        n = len(self.clips["clip_id"])
        for col, arr in self.clips.items():
            if arr.ndim != 1 or len(arr) != n:
                raise StoreError(f"{self.path}: clips/{col} has {len(arr)} rows, clips/clip_id "
                                 f"has {n}")
        for name, spec in self.specs.items():
            arr = self._arrays[name]
            if arr.ndim != 2 or arr.shape[1] != spec.n_tokens or arr.dtype != np.uint16:
                raise StoreError(f"{self.path}: {name}/codes is {arr.dtype} {arr.shape}, expected "
                                 f"uint16 [rows, {spec.n_tokens}]")
            start, length = self.clips[f"{name}_start"], self.clips[f"{name}_length"]
            if n and (start.min() < 0 or length.min() < 0 or (start + length).max() > arr.shape[0]):
                raise StoreError(f"{self.path}: clips/{name}_start/_length point outside "
                                 f"{name}/codes ({arr.shape[0]} rows)")

    @property
    def n_clips(self) -> int:
        return len(self.clips["clip_id"])

    def n_frames(self, name: str) -> int:
        return int(self._array(name).shape[0])

    def hours(self, name: str) -> float:
        return self.n_frames(name) / self.specs[name].frame_rate / 3600.0

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            raise KeyError(f"{self.path}: no modality {name!r}; store has {sorted(self.specs)}")
        return self._arrays[name]

    def codes(self, name: str) -> np.ndarray:
        """The whole codes array, uint16 [n_frames_total, tokens], loaded into RAM once and checked
        against the merge's chunk checksums (`vqmae.store.integrity`): damage is a `StoreError`."""
        if name not in self._loaded:
            arr = read_rows(self, name, 0, self.n_frames(name))
            raise_if_damaged(self, check_rows(self, name, arr, 0, recorded_crcs(self, name)))
            self._loaded[name] = arr
        return self._loaded[name]

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def clip_codes(self, name: str, row: int) -> np.ndarray:
        """One clip's codes, uint16 [length, tokens] (table row `row`)."""
        s, n = int(self.clips[f"{name}_start"][row]), int(self.clips[f"{name}_length"][row])
        src = self._loaded.get(name)
        return src[s:s + n] if src is not None else self._checked(name, read_rows(self, name, s, s + n))

    def _checked(self, name: str, block: np.ndarray) -> np.ndarray:
        """Rows read from zarr, refused when they hold ids outside the codebook (a missing chunk
        reads as the fill value, `vqmae.store.integrity.FILL`)."""
        return refuse_outside_codebook(self.path, name, block, self.specs[name].codebook_size)

    def read_windows(self, name: str, rows: np.ndarray, starts: np.ndarray,
                     length: int) -> tuple[np.ndarray, np.ndarray]:
        """Gather B windows of `length` frames → codes uint16 [B, length, tokens], valid bool [B, length].

        ``rows`` [B] are clip-table rows and ``starts`` [B] frame offsets inside each clip. Frames
        past a clip's end are 0 and masked. One fancy-index from RAM when the codes are loaded,
        else ONE batched zarr read of the distinct rows.
        """
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64)
        if rows.shape != starts.shape or rows.ndim != 1:
            raise ValueError(f"rows {rows.shape} and starts {starts.shape} must both be [B]")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_clips or starts.min() < 0):
            raise IndexError(f"{self.path}: window rows must lie in [0, {self.n_clips}) and "
                             f"starts be >= 0")
        offsets = starts[:, None] + np.arange(length)  # [B, L]
        valid = offsets < self.clips[f"{name}_length"][rows][:, None]  # [B, L]
        index = np.where(valid, self.clips[f"{name}_start"][rows][:, None] + offsets, 0)  # [B, L]
        src = self._loaded.get(name)
        if not valid.any():  # also covers a modality with no frames at all
            out = np.zeros(index.shape + (self.specs[name].n_tokens,), np.uint16)
        elif src is not None:
            out = src[index]  # [B, L, tokens]
        else:
            uniq, inverse = np.unique(index[valid], return_inverse=True)
            block = self._checked(name, self._array(name).oindex[uniq, :])  # [n_unique, tokens]
            out = np.zeros(index.shape + (self.specs[name].n_tokens,), np.uint16)
            out[valid] = block[inverse]
        out[~valid] = 0
        return out, valid

    def code_counts(self, name: str) -> np.ndarray:
        """How often each code id occurs, int64 [codebook_size]; streams chunks when not loaded."""
        size = self.specs[name].codebook_size
        counts = np.zeros(size, np.int64)
        for block in self._blocks(name):
            counts += np.bincount(block.ravel(), minlength=size)[:size]
        return counts

    def _blocks(self, name: str) -> Iterator[np.ndarray]:
        if name in self._loaded:
            yield self._loaded[name]
            return
        arr = self._array(name)
        step = max(arr.chunks[0], MERGE_BLOCK_BYTES // max(1, 2 * arr.shape[1]) // arr.chunks[0]
                   * arr.chunks[0])
        for a in range(0, arr.shape[0], step):
            yield self._checked(name, read_rows(self, name, a, a + step))

    def failures(self) -> list[tuple[str, str, str]]:
        """(clip_id, path, "stage: reason") for every failed clip, in table order."""
        bad = np.flatnonzero(self.clips["status"] == "failed")
        return [(str(self.clips["clip_id"][i]), str(self.clips["path"][i]),
                 str(self.clips["error"][i])) for i in bad]

    def chunk_rows(self, name: str) -> int:
        return int(self._array(name).chunks[0])


def _get_array(group: zarr.Group, path: Path, key: str) -> zarr.Array:
    try:
        node = group[key]
    except KeyError:
        raise StoreError(f"{path}: missing array {key}") from None
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{path}: {key} is not an array")
    return node
