"""The token store: every clip's discrete codes in one Zarr v3 directory group (DESIGN.md §3).

Layout of a merged store at ``PATH``::

    zarr.json            root attributes: format "vqmae-tokens/1", vqmae_version, modalities
                         {name: {codebook_size, grid, frame_rate, tokenizer_sha256}}, config,
                         created, updated, n_clips, merged_segments
    <name>/codes         uint16 [n_frames_total, prod(grid)], clips concatenated in `index` order
    clips/<column>       one 1-D array per column, all n_clips long (see `table_columns`)

Writers never touch ``PATH``. Each writer (one per shard) appends *segments* of
``StoreConfig.segment_clips`` clips under ``PATH.parts/``: a segment is built in a ``*.tmp``
directory and renamed into place when complete, so a killed writer leaves at most one half-written
``*.tmp`` that the next writer of that shard discards. ``merge`` combines the merged store and every
finished segment into a new store built beside ``PATH`` and swapped in by renames; the names of the
segments it consumed are recorded in the new store so a merge interrupted while deleting them
neither loses nor duplicates a clip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from vqmae import __version__
from vqmae.config import StoreConfig

log = logging.getLogger(__name__)

FORMAT = "vqmae-tokens/1"
STRING = np.dtypes.StringDType()
STR_COLUMNS = ("clip_id", "path", "dataset", "speaker", "label", "labels", "split", "status",
               "error")
FLOAT_COLUMNS = ("valence", "arousal", "dominance", "face_rate")
BASE_COLUMNS = ("clip_id", "index", "path", "dataset", "speaker", "label", "labels", "split",
                "valence", "arousal", "dominance", "face_rate", "status", "error")
TABLE_CHUNK = 65536
# Rows copied per read/write during a merge: bounds its memory whatever the store size.
MERGE_BLOCK_BYTES = 64 << 20
SEGMENT_TABLE = "clips.json"
META = "meta.json"


class StoreError(Exception):
    """A missing, damaged or unknown-format token store; the message names the path and the fault."""


class StoreMismatchError(StoreError):
    """Writer and store disagree on a modality (tokenizer, codebook, grid...); names both values."""


@dataclass(frozen=True)
class ModalitySpec:
    """What produced one modality's codes: one row of ``prod(grid)`` ids < ``codebook_size``."""

    name: str
    codebook_size: int
    grid: tuple[int, ...]
    frame_rate: float
    tokenizer_sha256: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "frame_rate", float(self.frame_rate))
        if not 1 <= self.codebook_size <= 65536:
            raise ValueError(f"{self.name}: codebook_size {self.codebook_size} does not fit uint16")
        if not self.grid or min(self.grid) < 1:
            raise ValueError(f"{self.name}: grid {self.grid} must be positive sizes")
        if not self.frame_rate > 0:
            raise ValueError(f"{self.name}: frame_rate {self.frame_rate} must be positive")

    @property
    def n_tokens(self) -> int:
        return math.prod(self.grid)

    def to_dict(self) -> dict[str, Any]:
        return {"codebook_size": self.codebook_size, "grid": list(self.grid),
                "frame_rate": self.frame_rate, "tokenizer_sha256": self.tokenizer_sha256}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "ModalitySpec":
        return cls(name, int(data["codebook_size"]), tuple(data["grid"]),
                   float(data["frame_rate"]), str(data["tokenizer_sha256"]))


def table_columns(modalities: Iterable[str]) -> list[str]:
    """Clip-table columns: the base columns, then ``<name>_start`` / ``<name>_length`` per modality."""
    cols = list(BASE_COLUMNS)
    for name in modalities:
        cols += [f"{name}_start", f"{name}_length"]
    return cols


def parts_dir(path: str | os.PathLike) -> Path:
    """Where writers put their segments: ``PATH.parts`` beside the store."""
    return Path(str(path) + ".parts")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (as given to ``--shard``) → ``(i, N)`` with 0 <= i < N."""
    head, sep, tail = text.partition("/")
    try:
        i, n = int(head), int(tail)
    except ValueError:
        i, n = -1, 0
    if not sep or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/4")
    return i, n


def _merged_path(path: Path) -> Path:
    return Path(str(path) + ".merged")


def _replaced_path(path: Path) -> Path:
    return Path(str(path) + ".replaced")


def _lock_path(path: Path) -> Path:
    return Path(str(path) + ".merging")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# specs


def _specs_from_attrs(where: Path, modalities: Any) -> dict[str, ModalitySpec]:
    if not isinstance(modalities, Mapping) or not modalities:
        raise StoreError(f"{where}: 'modalities' is missing or empty")
    try:
        return {n: ModalitySpec.from_dict(n, d) for n, d in modalities.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{where}: bad modality description ({e!r})") from None


def _specs_to_attrs(specs: Mapping[str, ModalitySpec]) -> dict[str, dict[str, Any]]:
    return {n: s.to_dict() for n, s in specs.items()}


def check_specs(where: str | os.PathLike, have: Mapping[str, ModalitySpec],
                want: Mapping[str, ModalitySpec], *, have_name: str = "store",
                want_name: str = "writer") -> None:
    """Raise `StoreMismatchError` naming both values at the first field where the specs differ."""
    if sorted(have) != sorted(want):
        raise StoreMismatchError(f"{where}: modalities: {have_name} has {sorted(have)}, "
                                 f"{want_name} has {sorted(want)}")
    for name in sorted(have):
        a, b = have[name].to_dict(), want[name].to_dict()
        for key in a:
            if a[key] != b[key]:
                raise StoreMismatchError(f"{where}: {name} {key}: {have_name} has {a[key]}, "
                                         f"{want_name} has {b[key]}")


# ----------------------------------------------------------------------------------------------
# records


def _normalize_record(record: Any, where: Path) -> dict[str, Any]:
    """One clip's table row from a mapping or dataclass; keys outside the table are ignored."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        record = dataclasses.asdict(record)
    if not isinstance(record, Mapping):
        raise TypeError(f"{where}: a clip record must be a mapping or dataclass, got "
                        f"{type(record).__name__}")
    clip_id = record.get("clip_id")
    if not isinstance(clip_id, str) or not clip_id:
        raise ValueError(f"{where}: record has no clip_id (got {clip_id!r})")
    index = record.get("index")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"{where}: clip {clip_id!r}: index must be a non-negative int, "
                         f"got {index!r}")
    row: dict[str, Any] = {"clip_id": clip_id, "index": int(index)}
    for col in ("path", "dataset", "speaker", "label", "split"):
        value = record.get(col)
        row[col] = "" if value is None else str(value)
    labels = record.get("labels")
    if labels is None:
        labels = ""
    elif not isinstance(labels, str):
        labels = ";".join(str(x) for x in labels)
    row["labels"] = labels
    for col in FLOAT_COLUMNS:
        value = record.get(col)
        row[col] = math.nan if value is None else float(value)
    return row


def _check_codes(where: Path, clip_id: str, specs: Mapping[str, ModalitySpec],
                 codes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    unknown = sorted(set(codes) - set(specs))
    if unknown:
        raise ValueError(f"{where}: clip {clip_id!r}: codes for unknown modalities {unknown}; "
                         f"store has {sorted(specs)}")
    out = {}
    for name, arr in codes.items():
        spec = specs[name]
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.shape[1] != spec.n_tokens:
            raise ValueError(f"{where}: clip {clip_id!r}: {name} codes have shape "
                             f"{tuple(arr.shape)}, expected [T, {spec.n_tokens}]")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{where}: clip {clip_id!r}: {name} codes have dtype {arr.dtype}, "
                             f"expected integers")
        if arr.size and (arr.min() < 0 or arr.max() >= spec.codebook_size):
            raise ValueError(f"{where}: clip {clip_id!r}: {name} codes span [{arr.min()}, "
                             f"{arr.max()}], outside codebook [0, {spec.codebook_size})")
        out[name] = arr.astype(np.uint16, copy=False)
    return out


# ----------------------------------------------------------------------------------------------
# segments


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
# writer


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


# ----------------------------------------------------------------------------------------------
# reading


def _read_root_attrs(path: Path) -> dict[str, Any]:
    meta_file = path / "zarr.json"
    if not path.exists():
        raise StoreError(f"{path}: no such token store")
    if not path.is_dir():
        raise StoreError(f"{path}: not a token store (a file, not a Zarr directory)")
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: not a token store (no zarr.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: unreadable zarr.json ({e})") from None
    if meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
        raise StoreError(f"{path}: not a Zarr v3 group")
    attrs = meta.get("attributes") or {}
    fmt = attrs.get("format")
    if fmt != FORMAT:
        raise StoreError(f"{path}: unknown store format {fmt!r}; this vqmae reads {FORMAT!r}")
    return attrs


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
        """The whole codes array, uint16 [n_frames_total, tokens], loaded into RAM once."""
        if name not in self._loaded:
            self._loaded[name] = self._array(name)[:]
        return self._loaded[name]

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def clip_codes(self, name: str, row: int) -> np.ndarray:
        """One clip's codes, uint16 [length, tokens] (table row `row`)."""
        s, n = int(self.clips[f"{name}_start"][row]), int(self.clips[f"{name}_length"][row])
        src = self._loaded.get(name)
        return src[s:s + n] if src is not None else self._array(name)[s:s + n]

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
            block = self._array(name).oindex[uniq, :]  # [n_unique, tokens]
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
            yield arr[a:a + step]

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


# ----------------------------------------------------------------------------------------------
# merge


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
                             chunks=(chunk, spec.n_tokens))
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
            written += cut
            buf, buffered = [data[cut:]], buffered - cut
    if buffered:
        out[written:written + buffered] = np.concatenate(buf)
        written += buffered
    assert written == total, (written, total)


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
