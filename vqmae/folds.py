"""Speaker-independent evaluation folds for stage 3 (docs/design.md §6).

Every protocol splits usable clip-table rows into train / val / test with no speaker in two of them
(except a user's own clip-level split, which is taken as given): k-fold over shuffled speaker groups,
leave-one-speaker-out, or a split file. The validation speakers, used for model selection, are always
carved from the training speakers of the fold, never from its test speakers. All randomness is a
numpy Generator seeded from `seed` (and the fold index), so the same seed gives the same folds.

Also here: `stratified_subset`, nested per-class subsets of a training set for label-efficiency curves.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from vqmae.datasets import SPLIT_ALIASES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)  # eq over arrays would be ambiguous: compare fields explicitly
class Fold:
    """One evaluation fold: sorted int64 clip-table rows per part, and the speakers held out."""

    name: str                       # "fold0".. | "loso-<speaker>" | "fold-<label>" | "split"
    train: np.ndarray               # int64 [n_train] table rows, sorted
    val: np.ndarray                 # int64 [n_val]
    test: np.ndarray                # int64 [n_test]
    test_speakers: tuple[str, ...]
    val_speakers: tuple[str, ...]

    def summary(self) -> dict:
        """JSON-ready description (for a run directory): name, sizes and held-out speakers."""
        return {"name": self.name, "n_train": len(self.train), "n_val": len(self.val),
                "n_test": len(self.test), "test_speakers": list(self.test_speakers),
                "val_speakers": list(self.val_speakers)}


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _strings(x) -> np.ndarray:
    """A fixed-width unicode array from any 1-D sequence of strings; the store's columns are numpy
    StringDType (which `astype(str)` cannot cast) and may hold None for a missing value (→ "")."""
    arr = np.asarray(x)
    if arr.dtype.kind == "U" or arr.ndim != 1:
        return arr
    return np.array(["" if v is None else str(v) for v in arr.tolist()], dtype=str)


def speaker_groups(speakers: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """The unique speakers, shuffled by a Generator seeded with `seed`, dealt round-robin into k groups
    (sizes differ by at most one; each group sorted). Every speaker lands in exactly one group."""
    _check_seed(seed)
    unique = np.unique(_strings(speakers))  # sorted: input order does not matter
    if k < 2 or k > len(unique):
        raise ValueError(f"k={k} folds needs 2 <= k <= the number of speakers ({len(unique)})")
    order = np.random.default_rng(seed).permutation(len(unique))
    return [sorted(unique[order[i::k]].tolist()) for i in range(k)]


def _check_table(speaker: np.ndarray, rows: np.ndarray,
                 need_speakers: bool = True) -> tuple[np.ndarray, np.ndarray]:
    speaker = _strings(speaker)
    rows = np.asarray(rows)
    if speaker.ndim != 1 or rows.ndim != 1:
        raise ValueError(f"speaker and rows must be 1-D, got shapes {speaker.shape} and {rows.shape}")
    if len(rows) and not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be integer table rows, got dtype {rows.dtype}")
    rows = rows.astype(np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(speaker)):
        raise ValueError(f"rows span [{rows.min()}, {rows.max()}] but the table has {len(speaker)} rows")
    if len(np.unique(rows)) != len(rows):
        raise ValueError("rows holds duplicate table rows")
    missing = rows[speaker[rows] == ""]
    if need_speakers and len(missing):
        raise ValueError(f"{len(missing)} clips have no speaker (rows {missing[:5].tolist()}); "
                         "speaker-independent folds need one for every clip")
    return speaker, np.sort(rows)


def _need_three(n_speakers: int, protocol: str) -> None:
    if n_speakers < 3:
        raise ValueError(f"protocol {protocol!r} needs at least 3 speakers (test, validation and "
                         f"training), the usable clips have {n_speakers}")


def _carve_val(rest: Sequence[str], n_val: int, rng: np.random.Generator, fold: str) -> list[str]:
    """`n_val` validation speakers drawn from the non-test speakers `rest`, leaving at least one to
    train on."""
    if n_val < 1:
        raise ValueError(f"val_speakers must be >= 1 (model selection needs a validation split), "
                         f"got {n_val}")
    if n_val >= len(rest):
        raise ValueError(f"{fold}: {len(rest)} speakers remain outside the test set, too few for "
                         f"{n_val} validation speaker(s) and at least one training speaker")
    return sorted(np.asarray(rest)[rng.choice(len(rest), n_val, replace=False)].tolist())


def _fold_from_speakers(name: str, speaker: np.ndarray, rows: np.ndarray, test: Sequence[str],
                        val: Sequence[str]) -> Fold:
    spk = speaker[rows]
    in_test, in_val = np.isin(spk, list(test)), np.isin(spk, list(val))
    return Fold(name=name, train=rows[~in_test & ~in_val], val=rows[in_val], test=rows[in_test],
                test_speakers=tuple(sorted(test)), val_speakers=tuple(sorted(val)))


def _speaker_folds(speaker: np.ndarray, rows: np.ndarray, named_groups: Sequence[tuple[str, list[str]]],
                   seed: int, val_speakers: int) -> list[Fold]:
    """One fold per (name, test speakers); validation drawn by a Generator seeded with (seed, i)."""
    present = np.unique(speaker[rows]).tolist()
    folds = []
    for i, (name, test) in enumerate(named_groups):
        held_out = set(test)
        rest = [s for s in present if s not in held_out]
        val = _carve_val(rest, val_speakers, np.random.default_rng((seed, i)), name)
        folds.append(_fold_from_speakers(name, speaker, rows, test, val))
    return folds


def _safe_name(prefix: str, label: str) -> str:
    # Fold names become run sub-directories: keep them to portable file-name characters.
    return prefix + re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def _unique_names(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise ValueError(f"two {what} map to one fold name after making them file-name safe: {names}")


def make_folds(speaker: np.ndarray, rows: np.ndarray, *, protocol: str, k: int = 5, seed: int = 0,
               val_speakers: int = 1, split: np.ndarray | None = None) -> list[Fold]:
    """Folds over `rows` (int64 usable table rows) of a clip table whose speakers are `speaker`
    (str [n_table]).

    protocol "kfold": fold i tests speaker group i of `speaker_groups(speakers of rows, k, seed)`,
      validates on `val_speakers` speakers drawn (seeded by (seed, i)) from the others, trains on the rest.
    protocol "loso": one fold per speaker (sorted), named "loso-<speaker>"; validation as in kfold.
    protocol "split": a single fold "split" from `split` (str [n_table] of train / val / test); every
      row needs a label and each part must be non-empty. Speakers shared between parts are logged.
    Always: train / val / test disjoint and sorted, their union == rows.
    """
    if protocol not in ("kfold", "loso", "split"):
        raise ValueError(f"unknown protocol {protocol!r}; expected kfold, loso or split")
    speaker, rows = _check_table(speaker, rows, need_speakers=protocol != "split")
    _check_seed(seed)
    if protocol == "split":
        return [_split_fold(speaker, rows, split)]
    present = np.unique(speaker[rows]).tolist()
    _need_three(len(present), protocol)
    if protocol == "loso":
        named = [(_safe_name("loso-", s), [s]) for s in present]
        _unique_names([n for n, _ in named], "speakers")
    else:
        named = [(f"fold{i}", g) for i, g in enumerate(speaker_groups(present, k, seed))]
    return _speaker_folds(speaker, rows, named, seed, val_speakers)


def _split_fold(speaker: np.ndarray, rows: np.ndarray, split: np.ndarray | None) -> Fold:
    if split is None:
        raise ValueError("protocol 'split' needs a split array (train / val / test per table row)")
    split = _strings(split)
    if split.shape != speaker.shape:
        raise ValueError(f"split has shape {split.shape} but the table has {len(speaker)} rows")
    labels = split[rows]
    bad = ~np.isin(labels, SPLITS)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} usable clips have no train/val/test split (rows "
                         f"{rows[bad][:5].tolist()}, values {sorted(set(labels[bad].tolist()))[:5]})")
    parts = {s: rows[labels == s] for s in SPLITS}
    empty = [s for s in SPLITS if not len(parts[s])]
    if empty:
        raise ValueError(f"the split leaves {', '.join(empty)} empty among the {len(rows)} usable clips")
    spk = {s: set(speaker[parts[s]].tolist()) for s in SPLITS}
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        if shared := spk[a] & spk[b]:
            log.warning("split: %d speaker(s) in both %s and %s (e.g. %s): not speaker-independent",
                        len(shared), a, b, sorted(shared)[:3])
    return Fold(name="split", train=parts["train"], val=parts["val"], test=parts["test"],
                test_speakers=tuple(sorted(spk["test"])), val_speakers=tuple(sorted(spk["val"])))


def _label_key(label: str) -> tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def folds_from_speaker_map(speaker: np.ndarray, rows: np.ndarray, fold_of: Mapping[str, str], *,
                           seed: int, val_speakers: int) -> list[Fold]:
    """One fold per distinct label of `fold_of` ({speaker: fold label}), in label order ("2" before
    "10"), named "fold-<label>": test = that label's speakers; validation carved from the other
    speakers as in kfold. A label none of whose speakers has a usable clip is skipped (logged); a
    speaker of `rows` missing from the map is an error."""
    speaker, rows = _check_table(speaker, rows)
    _check_seed(seed)
    present = np.unique(speaker[rows]).tolist()
    unmapped = [s for s in present if s not in fold_of]
    if unmapped:
        raise ValueError(f"{len(unmapped)} speaker(s) of the usable clips have no fold in the speaker "
                         f"map: {unmapped[:20]}")
    _need_three(len(present), "speaker map")
    named = []
    for label in sorted(set(fold_of.values()), key=_label_key):
        test = [s for s in present if fold_of[s] == label]
        if test:
            named.append((_safe_name("fold-", label), test))
        else:
            log.warning("speaker map: fold %r has no speaker with usable clips; skipped", label)
    _unique_names([n for n, _ in named], "fold labels")
    if len(named) < 2:
        raise ValueError(f"the speaker map puts every usable speaker in one fold ({named[0][0]}): "
                         "nothing left to train on")
    return _speaker_folds(speaker, rows, named, seed, val_speakers)


# ------------------------------------------------------------------ user split files

@dataclass(frozen=True)
class SpeakerFoldFile:
    """Form (a) of a split file, columns `speaker,fold`: test speakers per fold label."""

    path: Path
    fold_of: dict[str, str]         # speaker → fold label

    def folds(self, speaker: np.ndarray, rows: np.ndarray, *, seed: int, val_speakers: int) -> list[Fold]:
        return folds_from_speaker_map(speaker, rows, self.fold_of, seed=seed, val_speakers=val_speakers)


@dataclass(frozen=True)
class ClipSplitFile:
    """Form (b) of a split file, columns `clip_id` or `path`, and `split`: one fixed fold."""

    path: Path
    split: np.ndarray               # str [n_table]: "train" / "val" / "test", "" for clips not listed

    def folds(self, speaker: np.ndarray, rows: np.ndarray, *, seed: int = 0,
              val_speakers: int = 1) -> list[Fold]:
        """The single "split" fold over the listed clips of `rows` (unlisted ones are dropped and
        counted in the log). `seed` and `val_speakers` are unused: the file fixes validation."""
        rows = np.asarray(rows, dtype=np.int64)
        listed = self.split[rows] != ""
        if not listed.all():
            log.warning("%s: %d of %d usable clips are not listed; they are left out",
                        self.path, int((~listed).sum()), len(rows))
        return make_folds(speaker, rows[listed], protocol="split", split=self.split)


SplitFile = SpeakerFoldFile | ClipSplitFile


def _cell(row: list[str], col: dict[str, int], name: str) -> str:
    i = col.get(name)
    return row[i].strip() if i is not None and i < len(row) else ""


def read_split_file(path: str | os.PathLike, clip_id: np.ndarray, table_path: np.ndarray) -> SplitFile:
    """Parse a user's split file (CSV with a header; column names are case-insensitive).

    (a) columns `speaker,fold` (any fold labels) → `SpeakerFoldFile` (`.fold_of`: {speaker: label}).
    (b) columns `clip_id` or `path`, and `split` → `ClipSplitFile` (`.split`: str [n_table] aligned
        with the table `clip_id` / `table_path` (str [n_table]), "" for clips not listed). `clip_id`
        is used when the column is present; a relative `path` is taken from the CSV's folder. Split
        values: train / val / test (also valid, validation, dev). A relative `path` may also be the
        unambiguous end of a stored path (e.g. `Actor_01/x.mp4`).
    Both have `.folds(speaker, rows, seed=, val_speakers=)`. Errors name the file, the line and the
    reason: missing column, empty cell, unknown split value, unknown clip, conflicting repeat.
    """
    path = Path(path)
    if len(clip_id) != len(table_path):
        raise ValueError(f"clip_id has {len(clip_id)} rows but table_path has {len(table_path)}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read split file: {e}") from e
    if not lines or not any(c.strip() for c in lines[0]):
        raise ValueError(f"{path}: line 1: empty file, expected a CSV header")
    col = {name.strip().lower(): i for i, name in enumerate(lines[0])}
    body = [(n, row) for n, row in enumerate(lines[1:], start=2) if any(c.strip() for c in row)]
    if "speaker" in col and "fold" in col:
        return SpeakerFoldFile(path, _read_speaker_folds(path, body, col))
    if "split" in col and ("clip_id" in col or "path" in col):
        return ClipSplitFile(path, _read_clip_split(path, body, col, clip_id, table_path))
    raise ValueError(f"{path}: line 1: header has columns {list(col)}; expected `speaker,fold` or "
                     "`clip_id,split` or `path,split`")


def _read_speaker_folds(path: Path, body: list[tuple[int, list[str]]], col: dict[str, int]) -> dict:
    fold_of: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, row in body:
        spk, fold = _cell(row, col, "speaker"), _cell(row, col, "fold")
        if not spk or not fold:
            raise ValueError(f"{path}: line {n}: empty {'speaker' if not spk else 'fold'}")
        if spk in fold_of and fold_of[spk] != fold:
            raise ValueError(f"{path}: line {n}: speaker {spk!r} in fold {fold!r}, but line "
                             f"{first_line[spk]} put it in fold {fold_of[spk]!r}")
        fold_of[spk] = fold
        first_line.setdefault(spk, n)
    if not fold_of:
        raise ValueError(f"{path}: no speakers listed below the header")
    return fold_of


class _ClipIndex:
    """Finds table rows by clip id, or by path: absolute, relative to the CSV's folder, or a trailing
    part of the stored (absolute) path such as `Actor_01/x.mp4` when that is unambiguous."""

    def __init__(self, by_path: bool, clip_id: np.ndarray, table_path: np.ndarray, csv_dir: Path):
        self.by_path, self.csv_dir = by_path, csv_dir
        keys = _strings(table_path if by_path else clip_id).tolist()
        self.rows: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            key = os.path.normpath(key) if by_path else key
            self.rows.setdefault(key, []).append(i)  # one source file may hold several clips
        self._tails: dict[str, set[str]] | None = None

    @property
    def tails(self) -> dict[str, set[str]]:
        """{trailing part of a stored path: stored paths}, built on the first relative miss."""
        if self._tails is None:
            self._tails = {}
            for key in self.rows:
                parts = Path(key).parts
                for j in range(1, len(parts)):
                    self._tails.setdefault(os.path.join(*parts[j:]), set()).add(key)
        return self._tails

    def find(self, key: str) -> tuple[list[int] | None, str]:
        """(rows or None, why not found)."""
        if not self.by_path:
            return self.rows.get(key), "not in the store's clip table"
        if os.path.isabs(key):
            return self.rows.get(os.path.normpath(key)), "not in the store's clip table"
        beside = os.path.normpath(self.csv_dir / key)
        if beside in self.rows:
            return self.rows[beside], ""
        matches = set(self.tails.get(os.path.normpath(key), ()))
        if len(matches) == 1:
            return self.rows[matches.pop()], ""
        if matches:
            return None, f"matches {len(matches)} stored paths (e.g. {sorted(matches)[:2]}); give more of it"
        return None, f"neither {beside!r} nor the end of any stored path"


def _read_clip_split(path: Path, body: list[tuple[int, list[str]]], col: dict[str, int],
                     clip_id: np.ndarray, table_path: np.ndarray) -> np.ndarray:
    key_col = "clip_id" if "clip_id" in col else "path"
    index = _ClipIndex(key_col == "path", clip_id, table_path, path.parent)
    split = np.full(len(clip_id), "", dtype="<U5")
    for n, row in body:
        key, value = _cell(row, col, key_col), _cell(row, col, "split")
        if not key:
            raise ValueError(f"{path}: line {n}: empty {key_col}")
        if value.lower() not in SPLIT_ALIASES:
            raise ValueError(f"{path}: line {n}: unknown split value {value!r}; expected train, val "
                             "or test")
        rows, why = index.find(key)
        if rows is None:
            raise ValueError(f"{path}: line {n}: unknown clip {key_col} {key!r}: {why}")
        target = SPLIT_ALIASES[value.lower()]
        earlier = split[rows]
        if ((earlier != "") & (earlier != target)).any():
            raise ValueError(f"{path}: line {n}: {key_col} {key!r} is {target!r} here but "
                             f"{str(earlier[earlier != ''][0])!r} on an earlier line")
        split[rows] = target
    return split


# ------------------------------------------------------------------ label-efficiency subsets

def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted int64 positions into `labels` (int [n]; -1 = no single label) keeping, per label value,
    max(1, round(fraction × count)) positions; -1 clips form one unstratified pool.

    Nested: one permutation per label value is drawn (in sorted label order) from a Generator seeded
    with `seed`, independent of `fraction`, and a prefix is kept, so the subset for a smaller fraction
    lies inside the subset for a larger one. fraction in (0, 1]; 1.0 keeps everything.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (len(labels) and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be 1-D integers, got shape {labels.shape} dtype {labels.dtype}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if len(labels) and labels.min() < -1:
        raise ValueError(f"labels must be class ids >= 0 or -1 (no single label), got {labels.min()}")
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    keep = []
    for value in np.unique(labels):
        where = np.flatnonzero(labels == value)
        order = rng.permutation(len(where))  # drawn whatever the fraction: nested prefixes
        keep.append(where[order[:max(1, round(fraction * len(where)))]])
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, np.int64)
