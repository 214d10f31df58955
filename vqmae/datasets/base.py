"""What every dataset adapter shares: the clip record, the emotion and split vocabularies, the
media-file walk, the small helpers adapters build on, and the `Adapter` base class.

An adapter module (one per corpus) imports from here and nowhere else in the package; the registry
imports the adapters. Names starting with "_" are helpers for the adapter modules of this package,
not part of `vqmae.datasets`'s public API.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, NamedTuple

# Listed in order of preference when one clip exists in several formats.
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".flv", ".webm", ".m4v")
AUDIO_EXTS = (".wav", ".flac", ".m4a", ".ogg", ".opus", ".mp3")
MEDIA_EXTS = VIDEO_EXTS + AUDIO_EXTS

EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")

# Corpus spellings (RAVDESS, CREMA-D codes, eNTERFACE folders, common manifests) → canonical name.
EMOTION_ALIASES = {
    **{e: e for e in EMOTIONS},
    "neu": "neutral",
    "happiness": "happy", "hap": "happy", "joy": "happy",
    "sadness": "sad",
    "anger": "angry", "ang": "angry",
    "fear": "fearful", "fea": "fearful", "afraid": "fearful",
    "disgusted": "disgust", "dis": "disgust",
    "surprise": "surprised", "sur": "surprised",
}

# Split spellings → train/val/test. Here rather than in the CSV adapter (its only adapter user)
# because vqmae.folds reads the same vocabulary.
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test"}


class DatasetError(ValueError):
    """A corpus that cannot be scanned; the message names the path and what was expected."""


@dataclass(frozen=True, slots=True)
class ClipInfo:
    """One clip of a corpus: where its media lives and what the corpus says about it."""

    clip_id: str
    path: str
    dataset: str
    speaker: str
    label: str | None = None
    labels: tuple[str, ...] = ()
    valence: float | None = None
    arousal: float | None = None
    dominance: float | None = None
    split: str | None = None
    audio_path: str | None = None
    has_video: bool = True
    meta: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (labels as a list, meta as a dict); `from_dict` inverts it."""
        out = {name: getattr(self, name) for name in self.__slots__}
        out["labels"] = list(self.labels)
        out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipInfo:
        data = dict(data)
        data["labels"] = tuple(data.get("labels", ()))
        data["meta"] = tuple(sorted(data.get("meta", {}).items()))
        return cls(**data)


@dataclass
class ScanResult:
    kind: str
    root: str
    clips: list[ClipInfo]
    skipped: list[tuple[str, str]]  # (path, reason)

    def summary(self) -> dict[str, Any]:
        """Counts for logs and the CLI: clips, audio-only clips, speakers, labels, skipped files."""
        labels = Counter(c.label for c in self.clips if c.label is not None)
        return {
            "kind": self.kind,
            "n_clips": len(self.clips),
            "n_audio_only": sum(not c.has_video for c in self.clips),
            "n_speakers": len({c.speaker for c in self.clips}),
            "labels": dict(sorted(labels.items())),
            "n_skipped": len(self.skipped),
        }


class _Skip(Exception):
    """Raised by a per-file parser: the file is reported as skipped with this reason."""


Found = tuple[list[ClipInfo], list[tuple[str, str]]]


def canonical_emotion(name: str) -> str:
    """Map a corpus spelling ('ANG', 'anger', 'Happiness') to a name in `EMOTIONS`; KeyError if unknown."""
    key = name.strip().lower()
    if key not in EMOTION_ALIASES:
        raise KeyError(f"unknown emotion {name!r}; known: {', '.join(EMOTIONS)} (and their aliases)")
    return EMOTION_ALIASES[key]


# ---------------------------------------------------------------------------------------- adapter


class Adapter(ABC):
    """One corpus layout. A subclass sets `name` (the `kind=` / `--kind` value) and implements
    `scan`; it overrides `detect` (and, rarely, `detect_root`) to take part in `kind="auto"`.

    Adapters are stateless: the registry makes a fresh instance for each use.
    """

    name: ClassVar[str] = ""
    # Whether `scan` accepts a root that is a file (the CSV manifest); otherwise the root must be
    # a directory and `scan()` says so before calling the adapter.
    accepts_file: ClassVar[bool] = False

    def detect_root(self, root: Path) -> bool:
        """Whether this adapter claims `root` (an existing file or directory) outright, before any
        folder is looked at; the CSV manifest does this for `x.csv` and `dir/manifest.csv`."""
        return False

    def detect(self, folder: Path) -> bool:
        """Whether `folder` (the root, or a folder up to `DETECT_DEPTH` levels below it) is one of
        this corpus's folders. Called for every folder of a level until the adapter has said yes
        once, so check the folder's name first and list its contents only when the name fits."""
        return False

    @abstractmethod
    def scan(self, root: Path, **options: Any) -> Found:
        """(clips, skipped) of the corpus at `root`, an absolute path. The options the adapter
        takes are the keyword-only parameters of its `scan` (`def scan(self, root, *, x=1)`);
        `vqmae.datasets.scan` rejects any other option by name before calling it. Order does not
        matter: `vqmae.datasets.scan` sorts clips and skips and resolves clashing clip ids."""


# ---------------------------------------------------------------------------------------- helpers


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def is_video(name: str) -> bool:
    return _ext(name) in VIDEO_EXTS


class MediaFile(NamedTuple):
    """A media file found under a root; plain strings because a corpus can hold a million files."""

    path: str               # absolute
    rel: tuple[str, ...]    # components below the root, file name last
    stem: str
    ext: str                # lower case, with the dot

    @property
    def name(self) -> str:
        return self.rel[-1]

    @property
    def clip_id(self) -> str:
        return "/".join((*self.rel[:-1], self.stem))

    @property
    def is_video(self) -> bool:
        return self.ext in VIDEO_EXTS


def iter_media(root: Path, skipped: list[tuple[str, str]]) -> Iterator[MediaFile]:
    """Media files under `root` in sorted order. Hidden entries are ignored; symlinked directories
    are followed once (a link back into the tree would otherwise loop or duplicate clips); a
    directory that cannot be listed is reported in `skipped`."""
    seen: set[str] = set()

    def walk(d: str, rel: tuple[str, ...]) -> Iterator[MediaFile]:
        real = os.path.realpath(d)
        if real in seen:
            skipped.append((d, f"directory already scanned as {real} (symlink)"))
            return
        seen.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append((d, f"cannot list directory: {e.strerror}"))
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            stem, ext = os.path.splitext(e.name)
            media = ext.lower() in MEDIA_EXTS
            try:
                os.stat(e.path)  # follows links: a loop, a self-link or a dangling link fails here
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError as err:
                if media or e.is_symlink():
                    skipped.append((e.path, entry_error(err, e.is_symlink())))
                continue
            if is_dir:
                if media:
                    skipped.append((e.path, f"a directory named like a media file ({ext})"))
                    continue
                yield from walk(e.path, (*rel, e.name))
            elif media:
                if is_file:
                    yield MediaFile(e.path, (*rel, e.name), stem, ext.lower())
                else:
                    skipped.append((e.path, "not a regular file (a device, socket or pipe)"))

    yield from walk(str(root), ())


def entry_error(err: OSError, link: bool) -> str:
    """Why a directory entry cannot be read, in words."""
    if err.errno == errno.ELOOP:
        return "symlink loop (the link resolves to itself)"
    if err.errno == errno.ENOENT and link:
        return "dangling symlink (its target does not exist)"
    return f"cannot read: {err.strerror or err}"


def _meta(**fields_: str | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in fields_.items() if v is not None))


def _pair_streams(groups: dict[Any, list[MediaFile]], skipped: list[tuple[str, str]]
                  ) -> Iterator[tuple[Any, MediaFile | None, MediaFile | None]]:
    """For each key: the preferred video file and the preferred audio file of one clip; the other
    copies (an .mp3 next to a .wav, a second tree) are skipped as duplicates."""
    for key in sorted(groups):
        kept = []
        for want_video in (True, False):
            files = sorted((m for m in groups[key] if m.is_video == want_video),
                           key=lambda m: (MEDIA_EXTS.index(m.ext), m.path))
            for extra in files[1:]:
                skipped.append((extra.path, f"duplicate of {files[0].path} (same clip, kept that one)"))
            kept.append(files[0] if files else None)
        yield key, kept[0], kept[1]


# Directory listings for auto-detection: unlike `iter_media` they never report, since a folder
# that cannot be read simply does not confirm a layout.


def _listdir(d: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(d) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return []


def _media_names(d: Path) -> list[str]:
    return [os.path.splitext(e.name)[0] for e in _listdir(d)
            if e.is_file() and _ext(e.name) in MEDIA_EXTS]
