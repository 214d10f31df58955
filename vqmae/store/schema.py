"""The token store's on-disk schema: format tag, clip-table columns, modality specs, checks.

Layout of a merged store at ``PATH``::

    zarr.json            root attributes: format "vqmae-tokens/1", vqmae_version, modalities
                         {name: {codebook_size, grid, frame_rate, tokenizer_sha256}}, config,
                         created, updated, n_clips, merged_segments
    <name>/codes         uint16 [n_frames_total, prod(grid)], clips concatenated in `index` order
    clips/<column>       one 1-D array per column, all n_clips long (see `table_columns`)

Beside it live ``PATH.parts/`` (writers' segments, see `vqmae.store.segments`) and, during a merge,
``PATH.merging/`` and ``PATH.merged`` (see `vqmae.store.merging`). Everything here is shared by the
writer, reader and merge modules: constants, errors, `ModalitySpec` and its (de)serialisation,
validation of clip records and codes, and reading a store's root attributes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

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
# root attributes


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
