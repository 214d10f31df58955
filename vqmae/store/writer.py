"""Write side of the token store: `StoreWriter` appends clips to ``PATH.parts/`` in segments.

One writer per shard may run at once; each checks its modality specs against the merged store and
``PATH.parts/meta.json`` before writing. ``StoreWriter.done`` holds what `committed_ids` reports
(merged store plus every finished segment, all shards) and the writer refuses those ids, so the
caller skips them and an interrupted tokenize run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vqmae.config import StoreConfig
from vqmae.store.reader import TokenStore
from vqmae.store.schema import (FORMAT, META, ModalitySpec, StoreError, _check_codes, _merged_path,
                                _normalize_record, _now, _read_root_attrs, _specs_from_attrs,
                                _specs_to_attrs, check_specs, parts_dir)
from vqmae.store.segments import (_create_meta, _segment_name, _write_segment, list_segments,
                                  list_tmp_segments, read_segment)

log = logging.getLogger(__name__)

class StoreWriter:
    """Appends clips to ``PATH.parts`` in segments; `merge` later folds them into the store.

    One writer per shard may run at once (shards are disjoint slices of the clip list chosen by the
    caller, e.g. ``index % n == i``). ``done`` holds every clip id already committed (merged store
    and every finished segment, all shards), so a rerun skips them.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, ModalitySpec], *,
                 shard: tuple[int, int] = (0, 1), cfg: StoreConfig = StoreConfig(),
                 config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.parts = parts_dir(self.path)
        self.specs = dict(specs)
        self.shard = (int(shard[0]), int(shard[1]))
        self.cfg = cfg
        if not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"{self.path}: bad shard {shard}: need 0 <= i < n")
        for name, spec in self.specs.items():
            if spec.name != name:
                raise ValueError(f"{self.path}: spec keyed {name!r} is named {spec.name!r}")
        if not self.specs:
            raise ValueError(f"{self.path}: a store needs at least one modality")
        if cfg.segment_clips < 1:
            raise ValueError(f"{self.path}: segment_clips must be >= 1, got {cfg.segment_clips}")
        self._check_against_store()
        self.parts.mkdir(parents=True, exist_ok=True)
        meta = _create_meta(self.parts, {"format": FORMAT, "modalities": _specs_to_attrs(self.specs),
                                         "config": config or {}, "store": dataclasses.asdict(cfg),
                                         "created": _now()})
        check_specs(self.parts / META, _specs_from_attrs(self.parts / META, meta.get("modalities")),
                    self.specs, have_name="parts")
        self._discard_stale_tmp()
        self.done: set[str] = committed_ids(self.path)
        self._seq = self._next_seq()
        self._rows: list[dict[str, Any]] = []
        self._codes: dict[str, list[np.ndarray]] = {n: [] for n in self.specs}
        self._buffered: set[str] = set()
        log.debug("%s: writer shard %s, %d clips already committed", self.path, self.shard,
                  len(self.done))

    def _check_against_store(self) -> None:
        for where in (self.path, _merged_path(self.path)):
            if (where / "zarr.json").exists():
                attrs = _read_root_attrs(where)
                check_specs(where, _specs_from_attrs(where, attrs.get("modalities")), self.specs)

    def _shard_prefix(self) -> str:
        return f"seg-{self.shard[0]}of{self.shard[1]}-"

    def _discard_stale_tmp(self) -> None:
        # Only this shard's: another shard's writer may be mid-segment right now.
        for tmp in list_tmp_segments(self.path):
            if tmp.name.startswith(self._shard_prefix()):
                log.warning("%s: discarding half-written segment %s", self.path, tmp.name)
                shutil.rmtree(tmp, ignore_errors=True)

    def _next_seq(self) -> int:
        seqs = [int(p.name.split("-")[2]) for p in list_segments(self.path)
                if p.name.startswith(self._shard_prefix())]
        return max(seqs, default=-1) + 1

    def add(self, record: Any, codes: Mapping[str, np.ndarray]) -> None:
        """Buffer one clip; ``codes[name]`` is int [T, prod(grid)], a missing modality means T=0."""
        row = self._new_row(record)
        checked = _check_codes(self.path, row["clip_id"], self.specs, codes)
        for name in self.specs:
            arr = checked.get(name, np.zeros((0, self.specs[name].n_tokens), np.uint16))
            self._codes[name].append(arr)
            row[f"{name}_length"] = int(arr.shape[0])
        row.update(status="ok", error="")
        self._push(row)

    def add_failure(self, record: Any, stage: str, reason: str) -> None:
        """Record a clip that could not be tokenized: kept in the table, never retried on resume."""
        row = self._new_row(record)
        for name in self.specs:
            row[f"{name}_length"] = 0
        row.update(status="failed", error=f"{stage}: {reason}")
        self._push(row)

    def _new_row(self, record: Any) -> dict[str, Any]:
        row = _normalize_record(record, self.path)
        cid = row["clip_id"]
        if cid in self.done or cid in self._buffered:
            raise StoreError(f"{self.path}: clip {cid!r} is already committed; skip ids in "
                             f"writer.done")
        return row

    def _push(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self._buffered.add(row["clip_id"])
        if len(self._rows) >= self.cfg.segment_clips:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered clips as one segment (no-op when nothing is buffered)."""
        if not self._rows:
            return
        codes = {}
        for name in self.specs:
            lengths = [r[f"{name}_length"] for r in self._rows]
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
            for r, s in zip(self._rows, starts):
                r[f"{name}_start"] = int(s)
            codes[name] = np.concatenate(self._codes[name]) if self._codes[name] else \
                np.zeros((0, self.specs[name].n_tokens), np.uint16)
        self.parts.mkdir(parents=True, exist_ok=True)  # a merge may have removed it meanwhile
        seg = _write_segment(self.parts, _segment_name(self.shard, self._seq), self._rows, codes)
        self._seq += 1
        self.done |= self._buffered
        log.debug("%s: committed %s (%d clips)", self.path, seg.name, len(self._rows))
        self._rows, self._buffered = [], set()
        self._codes = {n: [] for n in self.specs}

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        # Buffered clips are complete even if the caller's loop raised: keep them.
        self.close()


def committed_ids(path: str | os.PathLike) -> set[str]:
    """Clip ids in the merged store plus every finished segment (all shards)."""
    path = Path(path)
    ids: set[str] = set()
    # Segments first: one a merge deletes meanwhile is already in the store read afterwards.
    for seg in list_segments(path):
        try:
            ids.update(r["clip_id"] for r in read_segment(seg).rows)
        except StoreError:
            if seg.exists():
                raise
    for where in (_merged_path(path), path):
        if (where / "zarr.json").exists():
            ids.update(TokenStore.open(where).clips["clip_id"].tolist())
    return ids
