"""Dataset adapters: a corpus directory → a sorted, deterministic list of clips (DESIGN.md §5).

Each adapter derives speaker and labels from the corpus's own naming and returns `ClipInfo`s; every
media file it cannot use is reported in `ScanResult.skipped` with a reason, never dropped silently.
Hidden entries (a name starting with ".") and non-media files are not clips and are ignored.

Conventions shared by all adapters:
- `clip_id` is the clip's primary media path relative to the scanned root, in posix form, without
  its extension (`Actor_01/01-01-05-02-01-01-01`). For a CSV manifest the root is the CSV's folder
  (files outside it get `../` ids). Two files that would share an id (`a/x.mp4` and `a/x.wav` in a
  plain folder) keep the video one; the other is skipped with a reason.
- Speakers are the corpus's own identifiers as strings: RAVDESS actor "01".."24", CREMA-D "1001",
  eNTERFACE'05 subject number "6" (leading zeros dropped), VoxCeleb2 "id00012".
- Audio-only clips have `has_video=False` and `path` pointing at the audio file. When a corpus keeps
  video and audio in separate trees (CREMA-D, VoxCeleb2 `mp4/` + `aac/`) one clip gets
  `path` = video and `audio_path` = audio.
- Labels are canonical names from `EMOTIONS`; `canonical_emotion` maps corpus spellings to them.
"""

from __future__ import annotations

import csv
import inspect
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

log = logging.getLogger(__name__)

# Listed in order of preference when one clip exists in several formats.
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".flv", ".webm", ".m4v")
AUDIO_EXTS = (".wav", ".flac", ".m4a", ".ogg", ".mp3")
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
            if e.is_dir():
                yield from walk(e.path, (*rel, e.name))
            elif e.is_file():
                stem, ext = os.path.splitext(e.name)
                if ext.lower() in MEDIA_EXTS:
                    yield MediaFile(e.path, (*rel, e.name), stem, ext.lower())

    yield from walk(str(root), ())


def _clip_id(path: Path, root: Path) -> str:
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return os.path.splitext(rel)[0]


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


# ---------------------------------------------------------------------------------------- RAVDESS

RAVDESS_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
RAVDESS_MODALITY = {"01": "audiovisual", "02": "video-only", "03": "audio-only"}
RAVDESS_CHANNEL = {"01": "speech", "02": "song"}
RAVDESS_INTENSITY = {"01": "normal", "02": "strong"}
RAVDESS_EMOTION = {f"{i + 1:02d}": e for i, e in enumerate(EMOTIONS)}
ACTOR_DIR = re.compile(r"^Actor_(\d+)$")


def _ravdess_fields(media: MediaFile, root: Path) -> dict[str, str]:
    """Decode `MM-VC-EE-II-SS-RR-AA`; raise `_Skip` naming the first field that is wrong."""
    m = RAVDESS_NAME.match(media.stem)
    if not m:
        raise _Skip("not a RAVDESS name MM-VC-EE-II-SS-RR-AA (seven 2-digit fields)")
    mm, vc, ee, ii, ss, rr, aa = m.groups()
    checks = [
        (mm in RAVDESS_MODALITY, f"modality {mm} is not 01, 02 or 03"),
        (vc in RAVDESS_CHANNEL, f"vocal channel {vc} is not 01 (speech) or 02 (song)"),
        (ee in RAVDESS_EMOTION, f"emotion {ee} is not 01..08"),
        (ii in RAVDESS_INTENSITY, f"intensity {ii} is not 01 or 02"),
        (not (ee == "01" and ii == "02"), "neutral (01) has no strong intensity (02) in RAVDESS"),
        (ss in ("01", "02"), f"statement {ss} is not 01 or 02"),
        (rr in ("01", "02"), f"repetition {rr} is not 01 or 02"),
        (aa != "00", "actor 00 does not exist (actors are numbered from 01)"),
    ]
    for ok, reason in checks:
        if not ok:
            raise _Skip(reason)
    want_audio = mm == "03"
    if media.is_video == want_audio:
        raise _Skip(f"modality {mm} ({RAVDESS_MODALITY[mm]}) does not match a {media.ext} file")
    # the root's own name counts: a root may itself be one actor's folder
    actor_dirs = [m for p in (root.name, *media.rel[:-1]) if (m := ACTOR_DIR.match(p))]
    if actor_dirs and int(actor_dirs[-1].group(1)) != int(aa):
        raise _Skip(f"actor {aa} in the name but the file is in {actor_dirs[-1].group(0)}")
    return dict(mm=mm, vc=vc, ee=ee, ii=ii, ss=ss, rr=rr, aa=aa)


def scan_ravdess(root: Path, *, speech_only: bool = False, include_video_only: bool = False) -> Found:
    """RAVDESS: `[...]/Actor_NN/MM-VC-EE-II-SS-RR-AA.{mp4,wav}` anywhere under `root`.

    Modality 01 (audiovisual .mp4) and 03 (audio-only .wav) are clips; 02 (video-only, no audio
    track) is skipped unless `include_video_only`. `speech_only` skips songs (vocal channel 02).
    The same performance downloaded as both 01-... .mp4 and 03-... .wav gives two clips (same
    speaker, so speaker folds stay clean; filter on meta["modality"] to keep one).
    """
    clips, skipped = [], []
    for media in iter_media(root, skipped):
        try:
            f = _ravdess_fields(media, root)
        except _Skip as e:
            skipped.append((media.path, str(e)))
            continue
        if f["mm"] == "02" and not include_video_only:
            skipped.append((media.path, "video-only (modality 02, no audio track); "
                                       "pass include_video_only=True to keep it"))
            continue
        if f["vc"] == "02" and speech_only:
            skipped.append((media.path, "song (vocal channel 02) excluded by speech_only=True"))
            continue
        label = RAVDESS_EMOTION[f["ee"]]
        clips.append(ClipInfo(
            clip_id=media.clip_id, path=media.path, dataset="ravdess", speaker=f["aa"],
            label=label, labels=(label,), has_video=f["mm"] != "03",
            meta=_meta(modality=RAVDESS_MODALITY[f["mm"]], vocal_channel=RAVDESS_CHANNEL[f["vc"]],
                       intensity=RAVDESS_INTENSITY[f["ii"]], statement=f["ss"],
                       repetition=f["rr"], gender="male" if int(f["aa"]) % 2 else "female"),
        ))
    return clips, skipped


# ---------------------------------------------------------------------------------------- CREMA-D

CREMAD_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
CREMAD_EMOTION = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful",
                  "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
CREMAD_LEVELS = ("LO", "MD", "HI", "XX")


def _cremad_key(media: MediaFile) -> tuple[str, str, str, str]:
    m = CREMAD_NAME.match(media.stem)
    if not m:
        raise _Skip("not a CREMA-D name AAAA_SSS_EMO_LVL (e.g. 1001_DFA_ANG_XX)")
    speaker, sentence, emo, level = m.groups()
    if sentence not in CREMAD_SENTENCES:
        raise _Skip(f"sentence {sentence} is not one of {' '.join(CREMAD_SENTENCES)}")
    if emo not in CREMAD_EMOTION:
        raise _Skip(f"emotion {emo} is not one of {' '.join(CREMAD_EMOTION)}")
    if level not in CREMAD_LEVELS:
        raise _Skip(f"level {level} is not one of {' '.join(CREMAD_LEVELS)}")
    return speaker, sentence, emo, level


def scan_cremad(root: Path) -> Found:
    """CREMA-D: `VideoFlash/AAAA_SSS_EMO_LVL.flv` (or .mp4) and `AudioWAV/....wav` anywhere under
    `root`, matched by name. Both → one clip (path = video, audio_path = audio); one → that file.
    Extra copies of a clip (AudioMP3/*.mp3 beside AudioWAV) are skipped as duplicates."""
    groups: dict[tuple[str, ...], list[MediaFile]] = {}
    skipped: list[tuple[str, str]] = []
    for media in iter_media(root, skipped):
        try:
            groups.setdefault(_cremad_key(media), []).append(media)
        except _Skip as e:
            skipped.append((media.path, str(e)))
    clips = []
    for (speaker, sentence, emo, level), video, audio in _pair_streams(groups, skipped):
        primary = video or audio
        label = CREMAD_EMOTION[emo]
        clips.append(ClipInfo(
            clip_id=primary.clip_id, path=primary.path, dataset="cremad", speaker=speaker,
            label=label, labels=(label,), has_video=video is not None,
            audio_path=audio.path if video and audio else None,
            meta=_meta(sentence=sentence, level=level),
        ))
    return clips, skipped


# ---------------------------------------------------------------------------------------- eNTERFACE

SUBJECT_DIR = re.compile(r"^subject[ _]?(\d+)$", re.IGNORECASE)
SENTENCE_DIR = re.compile(r"^sentence[ _]?(\d+)$", re.IGNORECASE)
ENTERFACE_EMOTION = {"anger": "angry", "disgust": "disgust", "fear": "fearful",
                     "happiness": "happy", "sadness": "sad", "surprise": "surprised"}


def _enterface_fields(media: MediaFile, root: Path) -> tuple[str, str, str | None]:
    """(speaker, label, sentence) from `subject N/<emotion>/[sentence k/]file`."""
    parts = (root.name, *media.rel)  # the root may itself be `subject N`
    subject_at = [i for i, p in enumerate(parts[:-1]) if SUBJECT_DIR.match(p)]
    if not subject_at:
        raise _Skip("not under a 'subject N' folder")
    rest = parts[subject_at[-1] + 1:]
    if len(rest) not in (2, 3):
        raise _Skip("expected subject N/<emotion>/[sentence k/]<file>")
    emotion = rest[0].lower()
    if emotion not in ENTERFACE_EMOTION:
        raise _Skip(f"emotion folder {rest[0]!r} is not one of {', '.join(ENTERFACE_EMOTION)}")
    if len(rest) == 3:
        m = SENTENCE_DIR.match(rest[1])
        if not m:
            raise _Skip(f"folder {rest[1]!r} is not 'sentence k'")
        sentence = str(int(m.group(1)))
    else:  # subject 6 of the real corpus has no sentence level; its names end in _k
        m = re.search(r"_(\d+)$", media.stem)
        sentence = str(int(m.group(1))) if m else None
    speaker = str(int(SUBJECT_DIR.match(parts[subject_at[-1]]).group(1)))
    return speaker, ENTERFACE_EMOTION[emotion], sentence


def scan_enterface(root: Path) -> Found:
    """eNTERFACE'05: `subject N/<emotion>/sentence k/*.avi`, or `subject N/<emotion>/*.avi` (the
    real corpus's subject 6). speaker = "N" as a plain number ("subject 06" → "6")."""
    clips, skipped = [], []
    for media in iter_media(root, skipped):
        try:
            speaker, label, sentence = _enterface_fields(media, root)
        except _Skip as e:
            skipped.append((media.path, str(e)))
            continue
        clips.append(ClipInfo(
            clip_id=media.clip_id, path=media.path, dataset="enterface", speaker=speaker,
            label=label, labels=(label,), has_video=media.is_video,
            meta=_meta(sentence=sentence),
        ))
    return clips, skipped


# ---------------------------------------------------------------------------------------- VoxCeleb2

VOX_SPEAKER = re.compile(r"^id\d+$")
VOX_VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]+$")
VOX_UTTERANCE = re.compile(r"^\d+$")


def _vox_key(media: MediaFile, root: Path) -> tuple[str, str, str]:
    parts = (root.name, *media.rel)  # the root may itself be `idNNNNN`
    if len(parts) < 3:
        raise _Skip("expected idNNNNN/<youtube id>/NNNNN.<ext>")
    speaker, video_id, utt = parts[-3], parts[-2], media.stem
    if VOX_SPEAKER.match(video_id):
        raise _Skip("file sits directly in a speaker folder; expected idNNNNN/<youtube id>/NNNNN.<ext>")
    if not VOX_SPEAKER.match(speaker):
        raise _Skip(f"speaker folder {speaker!r} is not idNNNNN (expected idNNNNN/<youtube id>/NNNNN)")
    if not VOX_VIDEO_ID.match(video_id):
        raise _Skip(f"{video_id!r} is not a YouTube id folder")
    if not VOX_UTTERANCE.match(utt):
        raise _Skip(f"file name {media.name!r} is not NNNNN.<ext>")
    return speaker, video_id, utt


def _vox_subset(media: MediaFile, root: Path) -> str | None:
    """'dev' or 'test' from the corpus's `dev/mp4/...`, `test/aac/...` folders, if present."""
    parts = (root.name, *media.rel)
    for a, b in zip(parts, parts[1:]):
        if a in ("dev", "test") and b in ("mp4", "aac", "wav"):
            return a
    return None


def scan_voxceleb2(root: Path) -> Found:
    """VoxCeleb2: `idNNNNN/<youtube id>/NNNNN.mp4`, possibly under `dev/mp4/`, `test/mp4/`; audio
    `.m4a` (or converted .wav) under `aac/`. A video and an audio file of the same
    (speaker, youtube id, utterance) are one clip. No labels; meta holds subset/video_id/utterance."""
    groups: dict[tuple[str, str, str], list[MediaFile]] = {}
    skipped: list[tuple[str, str]] = []
    for media in iter_media(root, skipped):
        try:
            groups.setdefault(_vox_key(media, root), []).append(media)
        except _Skip as e:
            skipped.append((media.path, str(e)))
    clips = []
    for (speaker, video_id, utt), video, audio in _pair_streams(groups, skipped):
        primary = video or audio
        clips.append(ClipInfo(
            clip_id=primary.clip_id, path=primary.path, dataset="voxceleb2",
            speaker=speaker, has_video=video is not None,
            audio_path=audio.path if video and audio else None,
            meta=_meta(subset=_vox_subset(primary, root), video_id=video_id, utterance=utt),
        ))
    return clips, skipped


# ---------------------------------------------------------------------------------------- CSV

CSV_REQUIRED = ("path", "speaker")
CSV_NUMBERS = ("valence", "arousal", "dominance")
CSV_KNOWN = CSV_REQUIRED + CSV_NUMBERS + ("label", "labels", "split")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test"}


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


def scan_csv(root: Path, *, missing: str = "skip", strict_labels: bool = False) -> Found:
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


def _csv_media_problem(path: Path, where: str) -> str | None:
    if not path.exists():
        return f"listed at {where} but does not exist"
    if not path.is_file():
        return f"listed at {where} but is not a file"
    if _ext(path.name) not in MEDIA_EXTS:
        return f"listed at {where} but {_ext(path.name) or 'no extension'} is not a media extension"
    return None


# ---------------------------------------------------------------------------------------- folder


def scan_folder(root: Path) -> Found:
    """Every media file under `root`, speaker = its parent folder's name, no labels."""
    clips, skipped = [], []
    for media in iter_media(root, skipped):
        speaker = media.rel[-2] if len(media.rel) > 1 else root.name
        clips.append(ClipInfo(clip_id=media.clip_id, path=media.path, dataset="folder",
                              speaker=speaker, has_video=media.is_video))
    return clips, skipped


ADAPTERS: dict[str, Callable[..., Found]] = {
    "ravdess": scan_ravdess,
    "cremad": scan_cremad,
    "enterface": scan_enterface,
    "voxceleb2": scan_voxceleb2,
    "csv": scan_csv,
    "folder": scan_folder,
}


# ---------------------------------------------------------------------------------------- detection

DETECT_DEPTH = 4  # `vox2/dev/mp4/id00012` sits three levels down; leave one spare


def _listdir(d: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(d) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return []


def _media_names(d: Path) -> list[str]:
    return [os.path.splitext(e.name)[0] for e in _listdir(d)
            if e.is_file() and _ext(e.name) in MEDIA_EXTS]


def _name_kind(name: str) -> str | None:
    """The corpus a folder name suggests; `_confirms` then checks the folder's contents."""
    if ACTOR_DIR.match(name):
        return "ravdess"
    if name.lower() in ("videoflash", "audiowav"):
        return "cremad"
    if SUBJECT_DIR.match(name):
        return "enterface"
    if re.match(r"^id\d{5}$", name):
        return "voxceleb2"
    return None


def _confirms(kind: str, d: Path) -> bool:
    if kind == "ravdess":
        return any(RAVDESS_NAME.match(n) for n in _media_names(d))
    if kind == "cremad":
        return any(CREMAD_NAME.match(n) for n in _media_names(d))
    if kind == "enterface":
        return any(e.is_dir() and e.name.lower() in ENTERFACE_EMOTION for e in _listdir(d))
    return any(e.is_dir() and _media_names(Path(e.path)) for e in _listdir(d))  # voxceleb2


def _kinds_at(level: list[Path]) -> set[str]:
    """Corpora confirmed by the folders of one level; each kind is confirmed once, so a level of
    6,000 VoxCeleb2 speaker folders costs a couple of directory listings, not 6,000."""
    found: set[str] = set()
    for d in level:
        kind = _name_kind(d.name)
        if kind is not None and kind not in found and _confirms(kind, d):
            found.add(kind)
    return found


def detect_kind(root: str | os.PathLike) -> str:
    """Guess the adapter for `root` from its layout (see `scan`). The shallowest level holding a
    recognised folder decides; two corpora recognised at that level is an error."""
    root = Path(os.path.abspath(root))
    if not root.exists():
        raise DatasetError(f"{root}: does not exist")
    if root.is_file():
        if _ext(root.name) == ".csv":
            return "csv"
        raise DatasetError(f"{root}: expected a dataset directory or a .csv manifest")
    if (root / "manifest.csv").is_file():
        return "csv"
    level = [root]
    for _ in range(DETECT_DEPTH + 1):
        found = _kinds_at(level)
        if len(found) > 1:
            raise DatasetError(f"{root}: layout matches several corpora ({', '.join(sorted(found))}); "
                               f"pass kind= explicitly")
        if found:
            return found.pop()
        level = [Path(e.path) for d in level for e in _listdir(d) if e.is_dir()]
        if not level:
            break
    return "folder"


# ---------------------------------------------------------------------------------------- scan


def _check_options(kind: str, options: dict[str, Any]) -> None:
    params = inspect.signature(ADAPTERS[kind]).parameters
    known = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DatasetError(f"unknown option(s) {', '.join(unknown)} for the {kind} adapter; "
                           f"known: {', '.join(known) or 'none'}")


def _unique_ids(clips: list[ClipInfo], skipped: list[tuple[str, str]]) -> list[ClipInfo]:
    """Sort by clip_id; where two files map to one id keep the video, skip the other with a reason."""
    kept: dict[str, ClipInfo] = {}
    for clip in sorted(clips, key=lambda c: (c.clip_id, not c.has_video, c.path)):
        if clip.clip_id in kept:
            skipped.append((clip.path, f"clip id {clip.clip_id!r} already used by "
                                       f"{kept[clip.clip_id].path}"))
            continue
        kept[clip.clip_id] = clip
    return list(kept.values())


def _no_clips_error(root: Path, kind: str, skipped: list[tuple[str, str]]) -> DatasetError:
    if not skipped:
        return DatasetError(f"{root}: no media files found (video: {' '.join(VIDEO_EXTS)}; "
                            f"audio: {' '.join(AUDIO_EXTS)})")
    path, reason = skipped[0]
    return DatasetError(f"{root}: no usable {kind} clips; {len(skipped)} file(s) skipped, "
                        f"first: {path}: {reason}")


def scan(root: str | os.PathLike, kind: str = "auto", **options: Any) -> ScanResult:
    """List the clips of the corpus at `root`, sorted by clip_id (same tree → same list).

    kind: "auto" or one of `ADAPTERS`. "auto" picks csv for a .csv file or a directory holding
    manifest.csv; ravdess for `Actor_NN` folders holding RAVDESS names; cremad for `VideoFlash` /
    `AudioWAV` folders holding CREMA-D names; enterface for `subject N` folders holding emotion
    folders; voxceleb2 for `idNNNNN` folders holding video folders with media; folder otherwise.
    options: keyword options of the chosen adapter (e.g. `speech_only=True` for ravdess,
    `missing="error"` for csv); an option the adapter does not take is an error.
    Raises DatasetError for a missing root, a root without usable media, or a bad manifest.
    """
    root_path = Path(os.path.abspath(root))
    if not root_path.exists():
        raise DatasetError(f"{root_path}: does not exist")
    if kind == "auto":
        kind = detect_kind(root_path)
        log.info("%s: detected a %s corpus", root_path, kind)
    if kind not in ADAPTERS:
        raise DatasetError(f"{root_path}: unknown dataset kind {kind!r}; expected auto or one of "
                           f"{', '.join(ADAPTERS)}")
    _check_options(kind, options)
    if kind != "csv" and not root_path.is_dir():
        raise DatasetError(f"{root_path}: the {kind} adapter expects a directory")
    clips, skipped = ADAPTERS[kind](root_path, **options)
    clips = _unique_ids(clips, skipped)
    skipped.sort()
    if not clips:
        raise _no_clips_error(root_path, kind, skipped)
    for path, reason in skipped:
        log.debug("skipped %s: %s", path, reason)
    result = ScanResult(kind=kind, root=str(root_path), clips=clips, skipped=skipped)
    log.info("%s: %s", root_path, result.summary())
    return result
