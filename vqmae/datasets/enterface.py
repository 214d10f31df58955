"""eNTERFACE'05 adapter: `subject N/<emotion>/[sentence k/]*.avi`, labels from the folder names."""

from __future__ import annotations

import re
from pathlib import Path

from vqmae.datasets.base import Adapter, ClipInfo, Found, MediaFile, _listdir, _meta, _Skip, iter_media

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


class EnterfaceAdapter(Adapter):
    name = "enterface"

    def detect(self, folder: Path) -> bool:
        """A `subject N` folder holding at least one eNTERFACE emotion folder."""
        return bool(SUBJECT_DIR.match(folder.name)) and any(
            e.is_dir() and e.name.lower() in ENTERFACE_EMOTION for e in _listdir(folder))

    def scan(self, root: Path) -> Found:
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
