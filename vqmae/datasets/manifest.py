"""CSV manifest adapter (kind "csv"): a .csv file, or `manifest.csv` in a directory, lists the clips
with their speaker, labels, dimensions and split; for corpora whose names carry no labels."""

from __future__ import annotations

import csv
import errno
import math
import os
from collections import Counter
from pathlib import Path

from vqmae.datasets.base import (EMOTIONS, MEDIA_EXTS, SPLIT_ALIASES, Adapter, ClipInfo, DatasetError,
                                 Found, entry_error, _ext, canonical_emotion, is_video)

CSV_REQUIRED = ("path", "speaker")
CSV_NUMBERS = ("valence", "arousal", "dominance")
CSV_KNOWN = CSV_REQUIRED + CSV_NUMBERS + ("label", "labels", "split")


def _clip_id(path: Path, root: Path) -> str:
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return os.path.splitext(rel)[0]


def _manifest_path(root: Path) -> Path:
    if root.is_dir():
        manifest = root / "manifest.csv"
        if not manifest.is_file():
            raise DatasetError(f"{root}: no manifest.csv in this directory (csv adapter)")
        return manifest
    if _ext(root.name) != ".csv":
        raise DatasetError(f"{root}: expected a .csv manifest or a directory holding manifest.csv")
    return root


def _csv_label(raw: str, where: str, strict: bool) -> str:
    try:
        return canonical_emotion(raw)
    except KeyError:
        if strict:
            raise DatasetError(f"{where}: label {raw!r} is not one of {', '.join(EMOTIONS)} "
                               f"(strict_labels=True)") from None
        return raw.strip()


def _csv_number(row: dict[str, str], col: str, where: str) -> float | None:
    raw = row.get(col, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(f"{where}: column {col!r}: {raw!r} is not a finite number")
    return value


def _csv_row(row: dict[str, str], where: str, folder: Path, strict: bool) -> tuple[Path, dict]:
    """(media path, ClipInfo fields except clip_id/path/has_video) of one manifest row."""
    cells = {k: (v or "").strip() for k, v in row.items()}
    for col in CSV_REQUIRED:
        if not cells[col]:
            raise DatasetError(f"{where}: column {col!r} is empty")
    labels = [_csv_label(x, where, strict) for x in cells.get("labels", "").split(";") if x.strip()]
    labels = list(dict.fromkeys(labels))
    label = _csv_label(cells["label"], where, strict) if cells.get("label") else None
    if label is not None and labels and label not in labels:
        raise DatasetError(f"{where}: label {label!r} is not among labels {labels}")
    if label is None and len(labels) == 1:
        label = labels[0]
    split = cells.get("split") or None
    if split is not None:
        if split.lower() not in SPLIT_ALIASES:
            raise DatasetError(f"{where}: split {split!r} is not train, val or test")
        split = SPLIT_ALIASES[split.lower()]
    extra = {k: v for k, v in cells.items() if k not in CSV_KNOWN and v}
    if label is not None and not labels:
        labels = [label]
    fields_ = dict(speaker=cells["speaker"], label=label, labels=tuple(labels), split=split,
                   meta=tuple(sorted(extra.items())),
                   **{c: _csv_number(cells, c, where) for c in CSV_NUMBERS})
    return Path(os.path.normpath(folder / cells["path"])), fields_


def _csv_header(reader: csv.DictReader, manifest: Path) -> list[str]:
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if not header:
        raise DatasetError(f"{manifest}: empty file; expected a header with columns path, speaker")
    dupes = sorted(h for h, n in Counter(header).items() if n > 1)
    if dupes:
        raise DatasetError(f"{manifest}: column {dupes[0]!r} appears more than once in the header")
    for col in CSV_REQUIRED:
        if col not in header:
            raise DatasetError(f"{manifest}: missing required column {col!r} "
                               f"(header has {', '.join(header)})")
    return header


def _csv_media_problem(path: Path, where: str) -> str | None:
    try:
        os.stat(path)
    except OSError as e:  # missing, a symlink loop, a dangling link, no permission
        if e.errno == errno.ENOENT and not os.path.islink(path):
            return f"listed at {where} but does not exist"
        return f"listed at {where} but {entry_error(e, os.path.islink(path))}"
    if path.is_dir():
        return f"listed at {where} but is a directory, not a media file"
    if not path.is_file():
        return f"listed at {where} but is not a file"
    if _ext(path.name) not in MEDIA_EXTS:
        return f"listed at {where} but {_ext(path.name) or 'no extension'} is not a media extension"
    return None


class ManifestAdapter(Adapter):
    name = "csv"
    accepts_file = True

    def detect_root(self, root: Path) -> bool:
        """A .csv file, or a directory holding manifest.csv: the manifest wins over any layout."""
        if root.is_file():
            return _ext(root.name) == ".csv"
        return (root / "manifest.csv").is_file()

    def scan(self, root: Path, *, missing: str = "skip", strict_labels: bool = False) -> Found:
        """CSV manifest (a .csv file, or `manifest.csv` in a directory).

        Columns: `path` (relative to the CSV's folder, or absolute) and `speaker` required; optional
        `label`, `labels` (";"-separated), `valence`, `arousal`, `dominance`, `split`
        (train/val/test; valid/validation/dev → val); any other column goes into `meta`. Empty cells
        are missing values. Labels are mapped to `EMOTIONS` where an alias is known and otherwise kept
        as written, unless `strict_labels` (then an unknown label is an error). A listed file that does
        not exist (or is not a media file) is skipped with a reason (`missing="skip"`, the default: one
        lost file should not stop a long run) or raises (`missing="error"`). Errors in
        the file itself (missing column, bad number, bad split, repeated path) raise `DatasetError`
        naming `file:line`.
        """
        if missing not in ("skip", "error"):
            raise DatasetError(f"{root}: missing={missing!r}; expected 'skip' or 'error'")
        manifest = _manifest_path(root)
        folder = manifest.parent
        clips, skipped = [], []
        seen: dict[Path, str] = {}
        try:
            with open(manifest, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                reader.fieldnames = _csv_header(reader, manifest)
                for row in reader:
                    where = f"{manifest}:{reader.line_num}"
                    if None in row or None in row.values():
                        raise DatasetError(f"{where}: row has a different number of fields than the "
                                           f"header ({len(reader.fieldnames)})")
                    path, fields_ = _csv_row(row, where, folder, strict_labels)
                    if path in seen:
                        raise DatasetError(f"{where}: {path} is listed again (first at {seen[path]})")
                    seen[path] = where
                    reason = _csv_media_problem(path, where)
                    if reason is not None:
                        if missing == "error":
                            raise DatasetError(f"{path}: {reason}")
                        skipped.append((str(path), reason))
                        continue
                    clips.append(ClipInfo(clip_id=_clip_id(path, folder), path=str(path), dataset="csv",
                                          has_video=is_video(path.name), **fields_))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{manifest}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise DatasetError(f"{manifest}: malformed CSV ({e})") from None
        if not seen:
            raise DatasetError(f"{manifest}: no rows below the header")
        return clips, skipped
