"""RAVDESS adapter: `Actor_NN/MM-VC-EE-II-SS-RR-AA.{mp4,wav}`, every label in the file name."""

from __future__ import annotations

import re
from pathlib import Path

from vqmae.datasets.base import (EMOTIONS, Adapter, ClipInfo, Found, MediaFile, _media_names, _meta,
                                 _Skip, iter_media)

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


class RavdessAdapter(Adapter):
    name = "ravdess"

    def detect(self, folder: Path) -> bool:
        """An `Actor_NN` folder holding at least one media file with a RAVDESS name."""
        return bool(ACTOR_DIR.match(folder.name)) and any(
            RAVDESS_NAME.match(n) for n in _media_names(folder))

    def scan(self, root: Path, *, speech_only: bool = False, include_video_only: bool = False) -> Found:
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
