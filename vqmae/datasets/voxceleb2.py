"""VoxCeleb2 adapter: `idNNNNN/<youtube id>/NNNNN.mp4` (+ `aac/` audio), speakers only, no labels."""

from __future__ import annotations

import re
from pathlib import Path

from vqmae.datasets.base import (Adapter, ClipInfo, Found, MediaFile, _listdir, _media_names, _meta,
                                 _pair_streams, _Skip, iter_media)

VOX_SPEAKER = re.compile(r"^id\d+$")
VOX_VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]+$")
VOX_UTTERANCE = re.compile(r"^\d+$")
VOX_SPEAKER_DIR = re.compile(r"^id\d{5}$")  # what auto-detection recognises: the corpus's own 5 digits


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


class VoxCeleb2Adapter(Adapter):
    name = "voxceleb2"

    def detect(self, folder: Path) -> bool:
        """An `idNNNNN` folder holding at least one folder with media files in it."""
        return bool(VOX_SPEAKER_DIR.match(folder.name)) and any(
            e.is_dir() and _media_names(Path(e.path)) for e in _listdir(folder))

    def scan(self, root: Path) -> Found:
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
