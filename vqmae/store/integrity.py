"""Detecting a damaged token store instead of reading the damage as codes.

Two guards, both written by the merge (`vqmae.store.merging`):

* ``<name>/codes`` is created with fill value `FILL` (65535), an id no codebook below 65536 entries
  can produce: a chunk file that has gone missing reads back as `FILL`, not as code 0.
* ``<name>/crc32`` holds the CRC-32 of every chunk's rows (uint16, C order) as written. Reading a
  whole array into RAM (`TokenStore.codes`, which training uses) and `verify_store`
  (`vqmae inspect --verify`) recompute them, so a truncated, altered or missing chunk is found,
  with the array, the chunk, its rows and the clips it holds.

A chunk whose file cannot be decompressed is reported the same way, with the file's path. Stores
written before the checksums existed have no ``crc32`` array: `verify_store` says so and checks
what it can (readable chunks, no `FILL` ids).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from vqmae.store.schema import StoreError

TokenStore = Any  # vqmae.store.reader.TokenStore (which imports this module)

FILL = 65535  # a missing codes chunk reads as this id; no codebook smaller than 65536 has it
CRC_KEY = "crc32"  # <name>/crc32: uint32 [n_chunks]


def chunk_crcs(rows: np.ndarray, chunk: int) -> np.ndarray:
    """CRC-32 of each `chunk`-row block of `rows` (uint16 [n, tokens]; the last block may be short)
    → uint32 [ceil(n / chunk)]."""
    rows = np.ascontiguousarray(rows, np.uint16)
    return np.array([zlib.crc32(rows[a:a + chunk].data) for a in range(0, len(rows), chunk)], np.uint32)


@dataclass(frozen=True)
class Damage:
    """One damaged chunk of one modality's codes."""

    modality: str
    chunk: int
    rows: tuple[int, int]  # [first, last + 1) rows of <modality>/codes
    clips: tuple[str, ...]  # clip ids with frames in those rows
    reason: str

    def describe(self, store_path: object) -> str:
        shown = ", ".join(self.clips[:5]) + (f" and {len(self.clips) - 5} more" if len(self.clips) > 5 else "")
        return (f"{store_path}: {self.modality}/codes chunk {self.chunk} (rows {self.rows[0]}-"
                f"{self.rows[1] - 1}, file {chunk_file(self.modality, self.chunk)}): {self.reason}; "
                f"clips {shown or 'none'}")


def chunk_file(name: str, chunk: int) -> str:
    """The chunk's file inside the store (Zarr v3 default key encoding, one chunk column)."""
    return f"{name}/codes/c/{chunk}/0"


def clips_in_rows(store: TokenStore, name: str, a: int, b: int) -> tuple[str, ...]:
    start = np.asarray(store.clips[f"{name}_start"], np.int64)
    end = start + np.asarray(store.clips[f"{name}_length"], np.int64)
    hit = (start < b) & (end > a) & (end > start)
    return tuple(str(c) for c in np.asarray(store.clips["clip_id"])[hit])


def recorded_crcs(store: TokenStore, name: str) -> np.ndarray | None:
    """The merge's checksums of ``name`` (None for a store written before them)."""
    try:
        node = store._group[f"{name}/{CRC_KEY}"]
    except KeyError:
        return None
    return np.asarray(node[:], np.uint32)


def check_rows(store: TokenStore, name: str, rows: np.ndarray, first: int,
               crcs: np.ndarray | None) -> list[Damage]:
    """Damage in ``rows`` (whole chunks of ``name``/codes starting at row ``first``, a chunk
    boundary): ids outside the codebook (a missing chunk reads as `FILL`) and checksum mismatches."""
    chunk = store.chunk_rows(name)
    size = store.specs[name].codebook_size
    out = []
    for i, a in enumerate(range(0, len(rows), chunk)):
        block = rows[a:a + chunk]
        k = first // chunk + i
        span = (first + a, first + a + len(block))
        reason = None
        if crcs is not None and k < len(crcs) and zlib.crc32(np.ascontiguousarray(block).data) != int(crcs[k]):
            reason = "checksum mismatch (the chunk is missing, truncated or altered)"
        if block.size and int(block.max()) >= size:
            reason = ("ids outside the codebook" if int(block.max()) != FILL or size == FILL + 1
                      else "the chunk is missing (it reads as the fill value)")
        if reason:
            out.append(Damage(name, k, span, clips_in_rows(store, name, *span), reason))
    return out


def refuse_outside_codebook(store_path: object, name: str, rows: np.ndarray, codebook_size: int,
                            where: str = "") -> np.ndarray:
    """`rows` of ``name``/codes, or a `StoreError` when they hold ids outside the codebook (a
    missing chunk reads as `FILL`, an altered one may too); `where` names the rows."""
    if rows.size and int(rows.max()) >= codebook_size:
        raise StoreError(f"damaged token store: {store_path}: {name}/codes {where}holds ids outside the "
                         f"codebook (a missing or altered chunk); run `vqmae inspect --verify "
                         f"{store_path}` for the chunks and clips")
    return rows


def read_rows(store: TokenStore, name: str, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of ``name``/codes; an unreadable chunk file is a `StoreError` naming it."""
    try:
        return store._array(name)[a:b]
    except StoreError:
        raise
    except Exception as e:  # zarr / codec errors: a truncated or corrupt chunk file
        chunk = store.chunk_rows(name)
        raise StoreError(f"{store.path}: cannot read {name}/codes rows {a}-{b - 1} (chunk files "
                         f"{chunk_file(name, a // chunk)}..{chunk_file(name, (b - 1) // chunk)}): "
                         f"{type(e).__name__}: {e}; run `vqmae inspect --verify {store.path}`") from None


def raise_if_damaged(store: TokenStore, damage: list[Damage]) -> None:
    if damage:
        more = f" (and {len(damage) - 1} more damaged chunks)" if len(damage) > 1 else ""
        raise StoreError(f"damaged token store: {damage[0].describe(store.path)}{more}. Re-encode "
                         f"those clips, or run `vqmae inspect --verify {store.path}` for the list")


def verify_store(store: TokenStore, names: Iterable[str] | None = None
                 ) -> tuple[list[Damage], list[str]]:
    """Every chunk of every (or the named) modality read and checked, one chunk at a time →
    (damaged chunks, notes such as a modality without recorded checksums)."""
    damage, notes = [], []
    for name in names or store.specs:
        crcs = recorded_crcs(store, name)
        chunk, total = store.chunk_rows(name), store.n_frames(name)
        if crcs is None:
            notes.append(f"{name}: no checksums recorded (a store written before vqmae recorded "
                         f"them): only missing chunks and unreadable files can be found")
        elif len(crcs) != -(-total // chunk):
            notes.append(f"{name}: {len(crcs)} checksums recorded for {-(-total // chunk)} chunks")
        for a in range(0, total, chunk):
            try:
                rows = store._array(name)[a:a + chunk]
            except Exception as e:
                b = min(total, a + chunk)
                damage.append(Damage(name, a // chunk, (a, b), clips_in_rows(store, name, a, b),
                                     f"unreadable ({type(e).__name__}: {e})"))
                continue
            damage += check_rows(store, name, rows, a, crcs)
    return damage, notes
