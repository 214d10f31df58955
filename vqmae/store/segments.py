"""Segments: what writers commit under ``PATH.parts/`` before a merge folds it into the store.

Writers never touch ``PATH``. Each writer (one per shard) appends *segments* of
``StoreConfig.segment_clips`` clips under ``PATH.parts/``: a segment is built in a ``*.tmp``
directory and renamed into place when complete, so a killed writer leaves at most one half-written
``*.tmp`` that the next writer of that shard discards. A finished segment
``seg-<i>of<n>-<seq>-<rnd>/`` holds ``clips.json`` (its table rows, ``<name>_start`` relative to
the segment) and one ``<name>.npy`` per modality, uint16 [rows, prod(grid)].
``PATH.parts/meta.json`` records the modalities, config and `StoreConfig` of the first writer;
`pending` reports what no merge has folded in yet.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vqmae.store.schema import (META, SEGMENT_TABLE, ModalitySpec, StoreError, _read_root_attrs,
                                _specs_from_attrs, parts_dir)

@dataclass(frozen=True)
class Segment:
    """One finished segment directory: its table rows (starts relative to the segment)."""

    path: Path
    rows: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name

    def codes(self, modality: str) -> np.ndarray:
        """Memory-mapped codes, uint16 [rows, tokens]; only the pages a merge touches are read."""
        return np.load(self.path / f"{modality}.npy", mmap_mode="r")


def _segment_name(shard: tuple[int, int], seq: int) -> str:
    # The random suffix keeps names unique even after merged segments were deleted.
    return f"seg-{shard[0]}of{shard[1]}-{seq:06d}-{uuid.uuid4().hex[:8]}"


def _is_segment(p: Path) -> bool:
    return p.is_dir() and p.name.startswith("seg-") and not p.name.endswith(".tmp")


def list_segments(path: str | os.PathLike) -> list[Path]:
    """Finished (renamed-into-place) segment directories under ``PATH.parts``, sorted by name."""
    parts = parts_dir(path)
    if not parts.is_dir():
        return []
    return sorted(p for p in parts.iterdir() if _is_segment(p))


def list_tmp_segments(path: str | os.PathLike) -> list[Path]:
    """Half-written segments (a writer is running, or was killed while writing one)."""
    parts = parts_dir(path)
    if not parts.is_dir():
        return []
    return sorted(p for p in parts.iterdir() if p.name.startswith("seg-") and p.name.endswith(".tmp"))


def read_segment(seg: Path) -> Segment:
    try:
        rows = json.loads((seg / SEGMENT_TABLE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{seg}: damaged segment ({e})") from None
    return Segment(seg, rows)


def _write_segment(parts: Path, name: str, rows: list[dict[str, Any]],
                   codes: Mapping[str, np.ndarray]) -> Path:
    """Write files into ``name.tmp`` then rename it to ``name``: readers see all of it or nothing."""
    tmp = parts / f"{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for modality, arr in codes.items():
        with open(tmp / f"{modality}.npy", "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
    with open(tmp / SEGMENT_TABLE, "w") as f:
        json.dump(rows, f)
        f.flush()
        os.fsync(f.fileno())
    final = parts / name
    os.rename(tmp, final)
    _fsync_dir(parts)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# parts metadata


def _read_meta(parts: Path) -> dict[str, Any] | None:
    try:
        return json.loads((parts / META).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{parts / META}: damaged parts metadata ({e})") from None


def _create_meta(parts: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Create meta.json unless another writer already did; return whichever won."""
    tmp = parts / f".{META}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    try:
        os.link(tmp, parts / META)  # fails if it exists: create-if-absent in one step
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    existing = _read_meta(parts)
    assert existing is not None
    return existing


# ----------------------------------------------------------------------------------------------
# pending


@dataclass(frozen=True)
class PendingInfo:
    """What writers committed under ``PATH.parts`` that no merge has folded in yet."""

    segments: list[str]
    n_clips: int
    n_failed: int
    n_tmp: int
    specs: dict[str, ModalitySpec] | None


def pending(path: str | os.PathLike) -> PendingInfo:
    """Unmerged finished segments (minus any a crashed merge already folded in) and tmp dirs."""
    path = Path(path)
    merged: set[str] = set()
    if (path / "zarr.json").exists():
        merged = set(_read_root_attrs(path).get("merged_segments", []))
    segs = [read_segment(s) for s in list_segments(path) if s.name not in merged]
    meta = _read_meta(parts_dir(path)) if parts_dir(path).is_dir() else None
    specs = _specs_from_attrs(parts_dir(path) / META, meta.get("modalities")) if meta else None
    rows = [r for s in segs for r in s.rows]
    return PendingInfo([s.name for s in segs], len(rows),
                       sum(r["status"] == "failed" for r in rows),
                       len(list_tmp_segments(path)), specs)
