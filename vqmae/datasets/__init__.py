"""Dataset adapters: a corpus directory → a sorted, deterministic list of clips (docs/design.md §5).

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

Layout: `base` (ClipInfo, vocabularies, the media walk, the `Adapter` base class), one module per
adapter (`ravdess`, `cremad`, `enterface`, `voxceleb2`, `manifest` for kind "csv", `folder`), and
`registry` (`ADAPTERS`, `detect_kind`, `scan`). A new corpus is a new module with an `Adapter`
subclass plus its line in `registry.ADAPTERS`.
"""

from vqmae.datasets.base import (
    AUDIO_EXTS,
    EMOTION_ALIASES,
    EMOTIONS,
    MEDIA_EXTS,
    SPLIT_ALIASES,
    VIDEO_EXTS,
    Adapter,
    ClipInfo,
    DatasetError,
    Found,
    MediaFile,
    ScanResult,
    canonical_emotion,
    is_video,
    iter_media,
)
from vqmae.datasets.registry import ADAPTERS, detect_kind, scan

__all__ = [
    "ADAPTERS", "AUDIO_EXTS", "EMOTION_ALIASES", "EMOTIONS", "MEDIA_EXTS", "SPLIT_ALIASES", "VIDEO_EXTS",
    "Adapter", "ClipInfo", "DatasetError", "Found", "MediaFile", "ScanResult",
    "canonical_emotion", "detect_kind", "is_video", "iter_media", "scan",
]
