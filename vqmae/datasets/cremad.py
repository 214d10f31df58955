"""CREMA-D adapter: `VideoFlash/AAAA_SSS_EMO_LVL.flv` and `AudioWAV/....wav`, paired by name."""

from __future__ import annotations

import re
from pathlib import Path

from vqmae.datasets.base import (Adapter, ClipInfo, Found, MediaFile, _media_names, _meta, _pair_streams,
                                 _Skip, iter_media)

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


class CremadAdapter(Adapter):
    name = "cremad"

    def detect(self, folder: Path) -> bool:
        """A `VideoFlash` or `AudioWAV` folder holding at least one media file with a CREMA-D name."""
        return (folder.name.lower() in ("videoflash", "audiowav")
                and any(CREMAD_NAME.match(n) for n in _media_names(folder)))

    def scan(self, root: Path) -> Found:
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
