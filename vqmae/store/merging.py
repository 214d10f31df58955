"""Merge: fold every finished segment under ``PATH.parts/`` into the store at ``PATH``.

``merge`` combines the merged store and every finished segment into a new store built beside
``PATH`` (in ``PATH.merging/``, which doubles as the merge lock), renamed to ``PATH.merged`` and
swapped in by renames (``PATH → PATH.replaced``, ``PATH.merged → PATH``); the names of the
segments it consumed are recorded in the new store so a merge interrupted while deleting them
neither loses nor duplicates a clip. Codes are copied in blocks of about ``MERGE_BLOCK_BYTES``
(whole chunks), so memory stays bounded whatever the store size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from vqmae import __version__
from vqmae.config import StoreConfig
from vqmae.store.reader import TokenStore
from vqmae.store.integrity import CRC_KEY, FILL, chunk_crcs
from vqmae.store.schema import (FLOAT_COLUMNS, FORMAT, MERGE_BLOCK_BYTES, META, STR_COLUMNS, STRING,
                                TABLE_CHUNK, ModalitySpec, StoreError, _merged_path, _now,
                                _read_root_attrs, _specs_from_attrs, _specs_to_attrs, check_specs,
                                parts_dir, table_columns)
from vqmae.store.segments import Segment, _read_meta, list_segments, read_segment

log = logging.getLogger(__name__)

def _replaced_path(path: Path) -> Path:
    return Path(str(path) + ".replaced")


def _lock_path(path: Path) -> Path:
    return Path(str(path) + ".merging")


@dataclass(frozen=True)
class MergeSummary:
    n_segments: int
    n_new_clips: int
    n_clips: int


def merge(path: str | os.PathLike, cfg: StoreConfig | None = None) -> MergeSummary:
    """Fold every finished segment into the store at ``path`` (creating it if needed). Idempotent.

    Clips are ordered by (index, clip_id), so any split of the work across shards merges to the
    same store. The new store is built beside ``path`` in bounded memory and swapped in by renames;
    a clip id present twice (store or segments) is an error and nothing is changed.
    ``cfg`` sets the chunk sizes; default: the first writer's, else the existing store's.
    """
    path = Path(path)
    with _MergeLock(path):
        _finish_interrupted_swap(path)
        old = TokenStore.open(path) if (path / "zarr.json").exists() else None
        if old is not None:
            _drop_merged_segments(path, old)
        segments = [read_segment(s) for s in list_segments(path)]
        if not segments:
            if old is None:
                raise StoreError(f"{path}: nothing to merge: no token store and no finished "
                                 f"segments in {parts_dir(path)}")
            _cleanup_parts(path)
            return MergeSummary(0, 0, old.n_clips)
        meta = _read_meta(parts_dir(path)) or {}
        specs = _merge_specs(path, old, meta)
        cfg = cfg or _merge_cfg(meta, old)
        table, sources = _merged_table(path, old, segments, specs)
        attrs = _merged_attrs(old, meta, specs, len(table["clip_id"]), segments)
        build = _lock_path(path) / "store"
        _build_store(build, attrs, specs, table, sources, old, segments, cfg)
        os.rename(build, _merged_path(path))
        _finish_interrupted_swap(path)
        n_new = sum(len(s.rows) for s in segments)
        log.info("%s: merged %d segments (%d clips) -> %d clips", path, len(segments), n_new,
                 attrs["n_clips"])
        return MergeSummary(len(segments), n_new, attrs["n_clips"])


class _MergeLock:
    """``PATH.merging/`` doubles as a lock (mkdir is atomic) and the build directory."""

    def __init__(self, path: Path) -> None:
        self.dir = _lock_path(path)

    def __enter__(self) -> "_MergeLock":
        try:
            self.dir.mkdir()
        except FileExistsError:
            if not self._stale():
                raise StoreError(f"{self.dir}: another merge is running ({self._owner()}); remove "
                                 f"this directory if it is not") from None
            log.warning("%s: removing the leftovers of a crashed merge", self.dir)
            shutil.rmtree(self.dir)
            self.dir.mkdir()
        (self.dir / "owner.json").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "time": _now()}))
        return self

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "owner.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _stale(self) -> bool:
        owner = self._owner()
        if owner.get("host") != socket.gethostname():
            # Unknown owner (crashed before writing owner.json) counts as stale after a minute.
            return not owner and time.time() - self.dir.stat().st_mtime > 60
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
        return False

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _finish_interrupted_swap(path: Path) -> None:
    """Complete (or roll forward) the rename dance ``path → .replaced``, ``.merged → path``."""
    merged, replaced = _merged_path(path), _replaced_path(path)
    if merged.exists():
        if path.exists():
            if replaced.exists():
                shutil.rmtree(replaced)
            os.rename(path, replaced)
        os.rename(merged, path)
    if replaced.exists():
        if path.exists():
            shutil.rmtree(replaced)
        else:  # cannot happen through merge(); never lose the only copy
            os.rename(replaced, path)
    if (path / "zarr.json").exists():
        _drop_merged_segments(path, None)
        _cleanup_parts(path)


def _drop_merged_segments(path: Path, store: TokenStore | None) -> None:
    attrs = store.attrs if store is not None else _read_root_attrs(path)
    for name in attrs.get("merged_segments", []):
        seg = parts_dir(path) / name
        if seg.exists():
            shutil.rmtree(seg)


def _cleanup_parts(path: Path) -> None:
    """Remove ``PATH.parts`` once no segment (finished or in progress) is left in it."""
    parts = parts_dir(path)
    if not parts.is_dir() or any(p.name.startswith("seg-") for p in parts.iterdir()):
        return
    (parts / META).unlink(missing_ok=True)
    for p in parts.iterdir():
        if p.name.startswith(f".{META}."):
            p.unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:  # a writer just put something there
        pass


def _merge_specs(path: Path, old: TokenStore | None, meta: dict[str, Any]) -> dict[str, ModalitySpec]:
    meta_specs = _specs_from_attrs(parts_dir(path) / META, meta.get("modalities")) if meta else None
    if old is not None and meta_specs is not None:
        check_specs(path, old.specs, meta_specs, have_name="store", want_name="parts")
    specs = old.specs if old is not None else meta_specs
    if specs is None:
        raise StoreError(f"{parts_dir(path)}: segments but no {META}; cannot tell the modalities")
    return specs


def _merge_cfg(meta: dict[str, Any], old: TokenStore | None) -> StoreConfig:
    """Chunking of the merged store: the writers' StoreConfig, else the existing store's chunks."""
    known = {f.name for f in dataclasses.fields(StoreConfig)}
    if "store" in meta:
        return StoreConfig(**{k: v for k, v in meta["store"].items() if k in known})
    if old is not None:
        rows = {f"{n}_chunk_rows": old.chunk_rows(n) for n in old.specs}
        return StoreConfig(**{k: v for k, v in rows.items() if k in known})
    return StoreConfig()


def _merged_table(path: Path, old: TokenStore | None, segments: list[Segment],
                  specs: Mapping[str, ModalitySpec]
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All clips ordered by (index, clip_id); returns the new table and each row's source.

    Source -1 is the old store, k >= 0 is ``segments[k]``; ``<name>_start`` of the returned table
    is the new global offset, the source offset is kept under ``_src_<name>_start``.
    """
    cols = table_columns(specs)
    parts: dict[str, list[np.ndarray]] = {c: [] for c in cols}
    source = []
    if old is not None:
        for c in cols:
            parts[c].append(old.clips[c])
        source.append(np.full(old.n_clips, -1))
    for k, seg in enumerate(segments):
        for c in cols:
            values = [r.get(c, "") if c in STR_COLUMNS else r[c] for r in seg.rows]
            parts[c].append(_column_array(c, values))
        source.append(np.full(len(seg.rows), k))
    table = {c: _column_array(c, np.concatenate(v) if v else []) for c, v in parts.items()}
    source = np.concatenate(source) if source else np.zeros(0, int)
    _check_duplicates(path, table["clip_id"], source, segments)
    order = np.lexsort((table["clip_id"], table["index"]))
    table = {c: v[order] for c, v in table.items()}
    source = source[order]
    for name in specs:
        table[f"_src_{name}_start"] = table[f"{name}_start"]
        lengths = table[f"{name}_length"]
        table[f"{name}_start"] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) \
            if len(lengths) else np.zeros(0, np.int64)
    return table, source


def _column_array(col: str, values: Any) -> np.ndarray:
    if col in STR_COLUMNS:
        return np.asarray(values, dtype=STRING)
    if col in FLOAT_COLUMNS:
        return np.asarray(values, dtype=np.float32)
    return np.asarray(values, dtype=np.int64)


def _check_duplicates(path: Path, ids: np.ndarray, source: np.ndarray,
                      segments: list[Segment]) -> None:
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        i, j = order[dup[0]], order[dup[0] + 1]
        where = [("the merged store" if source[x] < 0 else f"segment {segments[source[x]].name}")
                 for x in (i, j)]
        raise StoreError(f"{path}: clip {str(ids[i])!r} committed twice ({where[0]} and "
                         f"{where[1]}; {dup.size} duplicate ids in all): remove one copy from "
                         f"{parts_dir(path)} and merge again")


def _merged_attrs(old: TokenStore | None, meta: dict[str, Any], specs: Mapping[str, ModalitySpec],
                  n_clips: int, segments: list[Segment]) -> dict[str, Any]:
    base = old.attrs if old is not None else {}
    return {"format": FORMAT, "vqmae_version": __version__, "modalities": _specs_to_attrs(specs),
            "config": base.get("config", meta.get("config", {})),
            "created": base.get("created", meta.get("created", _now())), "updated": _now(),
            "n_clips": n_clips, "merged_segments": [s.name for s in segments]}


def _chunk_rows(cfg: StoreConfig, name: str, n_tokens: int) -> int:
    rows = getattr(cfg, f"{name}_chunk_rows", None)
    return int(rows) if rows else max(1, (512 << 10) // (2 * n_tokens))


def _build_store(build: Path, attrs: dict[str, Any], specs: Mapping[str, ModalitySpec],
                 table: dict[str, np.ndarray], source: np.ndarray, old: TokenStore | None,
                 segments: list[Segment], cfg: StoreConfig) -> None:
    group = zarr.open_group(str(build), mode="w")
    n = len(table["clip_id"])
    for col in table_columns(specs):
        arr = table[col]
        z = group.create_array(f"clips/{col}", shape=(n,), chunks=(max(1, min(n, TABLE_CHUNK)),),
                               dtype=str if col in STR_COLUMNS else arr.dtype)
        if n:
            z[:] = arr
    for name, spec in specs.items():
        _copy_codes(group, name, spec, table, source, old, segments,
                    _chunk_rows(cfg, name, spec.n_tokens))
    group.attrs.update(attrs)  # last: a store without its attrs is never mistaken for complete


def _copy_codes(group: zarr.Group, name: str, spec: ModalitySpec, table: dict[str, np.ndarray],
                source: np.ndarray, old: TokenStore | None, segments: list[Segment],
                chunk: int) -> None:
    """Stream one modality's rows into the new array in output order, in bounded-size blocks."""
    lengths = table[f"{name}_length"]
    total = int(lengths.sum())
    out = group.create_array(f"{name}/codes", shape=(total, spec.n_tokens), dtype=np.uint16,
                             chunks=(chunk, spec.n_tokens), fill_value=FILL)
    crcs: list[np.ndarray] = []  # per chunk, as written (writes start on chunk boundaries)
    block = max(chunk, MERGE_BLOCK_BYTES // (2 * spec.n_tokens) // chunk * chunk)
    mmaps: dict[int, np.ndarray] = {}

    def read(src: int, a: int, b: int) -> np.ndarray:
        if src < 0:
            return old._array(name)[a:b]  # type: ignore[union-attr]
        if src not in mmaps:
            mmaps[src] = segments[src].codes(name)
        return np.asarray(mmaps[src][a:b])

    buf: list[np.ndarray] = []
    buffered, written = 0, 0
    for src, a, b in _runs(source, table[f"_src_{name}_start"], lengths, block):
        buf.append(read(src, a, b))
        buffered += b - a
        if buffered >= block:  # write whole chunks only, carry the remainder
            data = np.concatenate(buf)
            cut = buffered // chunk * chunk
            out[written:written + cut] = data[:cut]
            crcs.append(chunk_crcs(data[:cut], chunk))
            written += cut
            buf, buffered = [data[cut:]], buffered - cut
    if buffered:
        data = np.concatenate(buf)
        out[written:written + buffered] = data
        crcs.append(chunk_crcs(data, chunk))
        written += buffered
    assert written == total, (written, total)
    crc = np.concatenate(crcs) if crcs else np.zeros(0, np.uint32)
    z = group.create_array(f"{name}/{CRC_KEY}", shape=crc.shape, chunks=(max(1, len(crc)),), dtype=np.uint32)
    if len(crc):
        z[:] = crc


def _runs(source: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
          max_rows: int) -> Iterator[tuple[int, int, int]]:
    """Coalesce consecutive clips contiguous in one source into (source, a, b) row ranges."""
    cur: list[int] | None = None
    for src, s, n in zip(source.tolist(), starts.tolist(), lengths.tolist()):
        if n == 0:
            continue
        if cur is not None and cur[0] == src and cur[2] == s:
            cur[2] = s + n
        else:
            if cur is not None:
                yield from _split(cur, max_rows)
            cur = [src, s, s + n]
    if cur is not None:
        yield from _split(cur, max_rows)


def _split(run: list[int], max_rows: int) -> Iterator[tuple[int, int, int]]:
    src, a, b = run
    for x in range(a, b, max_rows):
        yield src, x, min(b, x + max_rows)
