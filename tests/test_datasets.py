"""Dataset adapters on fabricated trees that follow each corpus's real naming scheme.

Only names are read, so media files are empty; the CSV manifests are real CSV text.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from vqmae.datasets import (
    ADAPTERS,
    EMOTIONS,
    Adapter,
    ClipInfo,
    DatasetError,
    ScanResult,
    canonical_emotion,
    detect_kind,
    iter_media,
    scan,
)


def make_tree(root: Path, files: list[str], order_seed: int | None = None) -> Path:
    """Create empty files (optionally in a shuffled creation order) under `root`."""
    files = list(files)
    if order_seed is not None:
        random.Random(order_seed).shuffle(files)
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    return root


def by_id(result: ScanResult) -> dict[str, ClipInfo]:
    return {c.clip_id: c for c in result.clips}


def reasons(result: ScanResult, root: Path) -> dict[str, str]:
    return {os.path.relpath(p, root).replace(os.sep, "/"): r for p, r in result.skipped}


# ------------------------------------------------------------------------------------ RAVDESS

RAVDESS_FILES = [
    "Actor_01/01-01-05-02-01-01-01.mp4",                     # audiovisual speech angry strong
    "Actor_01/01-02-03-01-02-02-01.mp4",                     # audiovisual song happy
    "Actor_02/01-01-08-01-01-02-02.mp4",                     # surprised, female actor
    "Actor_01/02-01-05-02-01-01-01.mp4",                     # video-only
    "Audio_Speech_Actors_01-24/Actor_01/03-01-01-01-01-01-01.wav",  # audio-only neutral
    "Actor_01/01-01-09-01-01-01-01.mp4",                     # emotion 09
    "Actor_01/01-01-05-01.mp4",                              # too few fields
    "Actor_01/01-01-01-02-01-01-01.mp4",                     # neutral cannot be strong
    "Actor_02/01-01-04-01-01-01-03.mp4",                     # actor 03 inside Actor_02
    "Actor_02/03-01-04-01-01-01-02.mp4",                     # audio-only modality as .mp4
    "Actor_02/.01-01-04-01-01-01-02.mp4",                    # hidden: ignored
    "Actor_02/notes.txt",                                    # not media: ignored
]


def test_ravdess_clips_labels_meta_and_skips(tmp_path):
    root = make_tree(tmp_path / "ravdess", RAVDESS_FILES)
    result = scan(root, "ravdess")
    clips = by_id(result)
    assert list(clips) == [
        "Actor_01/01-01-05-02-01-01-01",
        "Actor_01/01-02-03-01-02-02-01",
        "Actor_02/01-01-08-01-01-02-02",
        "Audio_Speech_Actors_01-24/Actor_01/03-01-01-01-01-01-01",
    ]
    angry = clips["Actor_01/01-01-05-02-01-01-01"]
    assert angry == ClipInfo(
        clip_id="Actor_01/01-01-05-02-01-01-01", path=str(root / "Actor_01/01-01-05-02-01-01-01.mp4"),
        dataset="ravdess", speaker="01", label="angry", labels=("angry",), has_video=True,
        meta=(("gender", "male"), ("intensity", "strong"), ("modality", "audiovisual"),
              ("repetition", "01"), ("statement", "01"), ("vocal_channel", "speech")))
    song = dict(clips["Actor_01/01-02-03-01-02-02-01"].meta)
    assert clips["Actor_01/01-02-03-01-02-02-01"].label == "happy"
    assert (song["vocal_channel"], song["statement"], song["repetition"]) == ("song", "02", "02")
    female = clips["Actor_02/01-01-08-01-01-02-02"]
    assert (female.speaker, female.label, dict(female.meta)["gender"]) == ("02", "surprised", "female")
    audio = clips["Audio_Speech_Actors_01-24/Actor_01/03-01-01-01-01-01-01"]
    assert (audio.has_video, audio.label, audio.speaker, audio.audio_path) == (False, "neutral", "01", None)
    assert audio.path.endswith(".wav") and os.path.isabs(audio.path)
    assert dict(audio.meta)["modality"] == "audio-only"

    assert reasons(result, root) == {
        "Actor_01/02-01-05-02-01-01-01.mp4":
            "video-only (modality 02, no audio track); pass include_video_only=True to keep it",
        "Actor_01/01-01-09-01-01-01-01.mp4": "emotion 09 is not 01..08",
        "Actor_01/01-01-05-01.mp4": "not a RAVDESS name MM-VC-EE-II-SS-RR-AA (seven 2-digit fields)",
        "Actor_01/01-01-01-02-01-01-01.mp4": "neutral (01) has no strong intensity (02) in RAVDESS",
        "Actor_02/01-01-04-01-01-01-03.mp4": "actor 03 in the name but the file is in Actor_02",
        "Actor_02/03-01-04-01-01-01-02.mp4": "modality 03 (audio-only) does not match a .mp4 file",
    }


def test_ravdess_every_emotion_code_maps_in_order(tmp_path):
    files = [f"Actor_03/01-01-{i:02d}-01-01-01-03.mp4" for i in range(1, 9)]
    result = scan(make_tree(tmp_path, files), "ravdess")
    assert [c.label for c in result.clips] == list(EMOTIONS)
    assert {c.speaker for c in result.clips} == {"03"}


def test_ravdess_options(tmp_path):
    root = make_tree(tmp_path, RAVDESS_FILES)
    speech = by_id(scan(root, "ravdess", speech_only=True))
    assert "Actor_01/01-02-03-01-02-02-01" not in speech and len(speech) == 3
    assert reasons(scan(root, "ravdess", speech_only=True), root)[
        "Actor_01/01-02-03-01-02-02-01.mp4"] == "song (vocal channel 02) excluded by speech_only=True"
    with_video_only = by_id(scan(root, "ravdess", include_video_only=True))
    clip = with_video_only["Actor_01/02-01-05-02-01-01-01"]
    assert clip.has_video and dict(clip.meta)["modality"] == "video-only"


# ------------------------------------------------------------------------------------ CREMA-D

CREMAD_FILES = [
    "VideoFlash/1001_DFA_ANG_XX.flv",
    "AudioWAV/1001_DFA_ANG_XX.wav",
    "AudioMP3/1001_DFA_ANG_XX.mp3",       # second audio copy → duplicate
    "VideoFlash/1002_IEO_HAP_HI.mp4",     # video only
    "AudioWAV/1003_TIE_SAD_LO.wav",       # audio only
    "AudioWAV/1003_TIE_FOO_LO.wav",       # unknown emotion
    "AudioWAV/1003_XYZ_SAD_LO.wav",       # unknown sentence
    "AudioWAV/1003_TIE_SAD_ZZ.wav",       # unknown level
    "AudioWAV/readme.wav",                # not a CREMA-D name
    "processedResults/tabulatedVotes.csv",  # not media: ignored
]


def test_cremad_pairs_video_and_audio_trees(tmp_path):
    root = make_tree(tmp_path / "CREMA-D", CREMAD_FILES)
    result = scan(root, "cremad")
    clips = by_id(result)
    assert list(clips) == ["AudioWAV/1003_TIE_SAD_LO", "VideoFlash/1001_DFA_ANG_XX",
                           "VideoFlash/1002_IEO_HAP_HI"]
    both = clips["VideoFlash/1001_DFA_ANG_XX"]
    assert both == ClipInfo(
        clip_id="VideoFlash/1001_DFA_ANG_XX", path=str(root / "VideoFlash/1001_DFA_ANG_XX.flv"),
        dataset="cremad", speaker="1001", label="angry", labels=("angry",),
        audio_path=str(root / "AudioWAV/1001_DFA_ANG_XX.wav"), has_video=True,
        meta=(("level", "XX"), ("sentence", "DFA")))
    video = clips["VideoFlash/1002_IEO_HAP_HI"]
    assert (video.has_video, video.audio_path, video.label, dict(video.meta)["level"]) == (
        True, None, "happy", "HI")
    audio = clips["AudioWAV/1003_TIE_SAD_LO"]
    assert (audio.has_video, audio.audio_path, audio.path, audio.speaker, audio.label) == (
        False, None, str(root / "AudioWAV/1003_TIE_SAD_LO.wav"), "1003", "sad")
    assert reasons(result, root) == {
        "AudioMP3/1001_DFA_ANG_XX.mp3":
            f"duplicate of {root / 'AudioWAV/1001_DFA_ANG_XX.wav'} (same clip, kept that one)",
        "AudioWAV/1003_TIE_FOO_LO.wav": "emotion FOO is not one of ANG DIS FEA HAP NEU SAD",
        "AudioWAV/1003_XYZ_SAD_LO.wav":
            "sentence XYZ is not one of IEO TIE IOM IWW TAI MTI IWL ITH DFA ITS TSI WSI",
        "AudioWAV/1003_TIE_SAD_ZZ.wav": "level ZZ is not one of LO MD HI XX",
        "AudioWAV/readme.wav": "not a CREMA-D name AAAA_SSS_EMO_LVL (e.g. 1001_DFA_ANG_XX)",
    }


def test_cremad_all_six_emotions(tmp_path):
    codes = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral",
             "SAD": "sad"}
    root = make_tree(tmp_path, [f"AudioWAV/1091_ITS_{c}_MD.wav" for c in codes])
    assert {c.clip_id.split("_")[2]: c.label for c in scan(root, "cremad").clips} == codes


# ------------------------------------------------------------------------------------ eNTERFACE

ENTERFACE_FILES = [
    "subject 1/anger/sentence 1/s1_an_1.avi",
    "subject 1/happiness/sentence 5/s1_ha_5.avi",
    "subject 6/sadness/s6_sa_2.avi",                 # subject 6: no sentence level
    "subject 12/Surprise/sentence 3/s12_su_3.avi",   # folder case varies
    "subject 2/boredom/sentence 1/s2_bo_1.avi",      # not an eNTERFACE emotion
    "subject 2/fear/s2_fe.avi",                      # shallow, no sentence number in the name
    "subject 2/fear/take 1/s2_fe_1.avi",             # wrong middle folder
    "subject 2/fear/sentence 1/extra/s2_fe_1.avi",   # too deep
    "subject 3/s3.avi",                              # no emotion folder
    "loose.avi",                                     # not under a subject
    "subject 1/anger/sentence 1/Thumbs.db",          # not media: ignored
]


def test_enterface_both_depths_and_skips(tmp_path):
    root = make_tree(tmp_path / "enterface database", ENTERFACE_FILES)
    result = scan(root, "enterface")
    clips = by_id(result)
    assert list(clips) == [
        "subject 1/anger/sentence 1/s1_an_1", "subject 1/happiness/sentence 5/s1_ha_5",
        "subject 12/Surprise/sentence 3/s12_su_3", "subject 2/fear/s2_fe", "subject 6/sadness/s6_sa_2",
    ]
    got = {cid: (c.speaker, c.label, dict(c.meta).get("sentence")) for cid, c in clips.items()}
    assert got == {
        "subject 1/anger/sentence 1/s1_an_1": ("1", "angry", "1"),
        "subject 1/happiness/sentence 5/s1_ha_5": ("1", "happy", "5"),
        "subject 12/Surprise/sentence 3/s12_su_3": ("12", "surprised", "3"),
        "subject 2/fear/s2_fe": ("2", "fearful", None),
        "subject 6/sadness/s6_sa_2": ("6", "sad", "2"),
    }
    assert all(c.dataset == "enterface" and c.has_video for c in result.clips)
    assert reasons(result, root) == {
        "subject 2/boredom/sentence 1/s2_bo_1.avi":
            "emotion folder 'boredom' is not one of anger, disgust, fear, happiness, sadness, surprise",
        "subject 2/fear/take 1/s2_fe_1.avi": "folder 'take 1' is not 'sentence k'",
        "subject 2/fear/sentence 1/extra/s2_fe_1.avi":
            "expected subject N/<emotion>/[sentence k/]<file>",
        "subject 3/s3.avi": "expected subject N/<emotion>/[sentence k/]<file>",
        "loose.avi": "not under a 'subject N' folder",
    }


def test_enterface_root_may_be_one_subject(tmp_path):
    root = make_tree(tmp_path / "subject 6", ["disgust/s6_di_4.avi"])
    (clip,) = scan(root, "enterface").clips
    assert (clip.clip_id, clip.speaker, clip.label, clip.meta) == (
        "disgust/s6_di_4", "6", "disgust", (("sentence", "4"),))
    assert detect_kind(root) == "enterface"


# ------------------------------------------------------------------------------------ VoxCeleb2

VOX_FILES = [
    "dev/mp4/id00012/21Uxsk56VDQ/00001.mp4",
    "dev/aac/id00012/21Uxsk56VDQ/00001.m4a",   # pairs with the mp4 above
    "dev/aac/id00012/_-Abc_9x/00002.m4a",       # audio only
    "test/mp4/id00017/01dfn2spqyE/00001.mp4",
    "dev/mp4/id00012/00003.mp4",                # missing youtube-id level
    "dev/mp4/john/abc/00001.mp4",               # speaker folder is not idNNNNN
    "dev/mp4/id00012/21Uxsk56VDQ/clip.mp4",     # utterance is not a number
    "dev/mp4/id00012/21Uxsk56VDQ/.00001.mp4",   # hidden
]


def test_voxceleb2_speakers_pairs_and_skips(tmp_path):
    root = make_tree(tmp_path / "vox2", VOX_FILES)
    result = scan(root, "voxceleb2")
    clips = by_id(result)
    assert list(clips) == ["dev/aac/id00012/_-Abc_9x/00002", "dev/mp4/id00012/21Uxsk56VDQ/00001",
                           "test/mp4/id00017/01dfn2spqyE/00001"]
    paired = clips["dev/mp4/id00012/21Uxsk56VDQ/00001"]
    assert paired == ClipInfo(
        clip_id="dev/mp4/id00012/21Uxsk56VDQ/00001",
        path=str(root / "dev/mp4/id00012/21Uxsk56VDQ/00001.mp4"), dataset="voxceleb2",
        speaker="id00012", audio_path=str(root / "dev/aac/id00012/21Uxsk56VDQ/00001.m4a"),
        meta=(("subset", "dev"), ("utterance", "00001"), ("video_id", "21Uxsk56VDQ")))
    audio = clips["dev/aac/id00012/_-Abc_9x/00002"]
    assert (audio.has_video, audio.speaker, audio.label, audio.labels) == (False, "id00012", None, ())
    assert dict(clips["test/mp4/id00017/01dfn2spqyE/00001"].meta)["subset"] == "test"
    assert reasons(result, root) == {
        "dev/mp4/id00012/00003.mp4":
            "file sits directly in a speaker folder; expected idNNNNN/<youtube id>/NNNNN.<ext>",
        "dev/mp4/john/abc/00001.mp4":
            "speaker folder 'john' is not idNNNNN (expected idNNNNN/<youtube id>/NNNNN)",
        "dev/mp4/id00012/21Uxsk56VDQ/clip.mp4": "file name 'clip.mp4' is not NNNNN.<ext>",
    }


def test_voxceleb2_plain_layout(tmp_path):
    root = make_tree(tmp_path, ["id00001/abcdefghijk/00001.mp4", "id00002/abcdefghijk/00007.mp4"])
    result = scan(root)
    assert result.kind == "voxceleb2"
    assert [(c.clip_id, c.speaker, dict(c.meta).get("subset")) for c in result.clips] == [
        ("id00001/abcdefghijk/00001", "id00001", None), ("id00002/abcdefghijk/00007", "id00002", None)]


# ------------------------------------------------------------------------------------ CSV


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_manifest_fields(tmp_path):
    make_tree(tmp_path / "corpus", ["media/s1/a.mp4", "media/s1/b.wav", "media/s2/c.flac"])
    outside = make_tree(tmp_path / "elsewhere", ["d.mkv"]) / "d.mkv"
    manifest = write_csv(tmp_path / "corpus" / "list.csv", (
        "path,speaker,label,labels,valence,arousal,dominance,split,session\n"
        "media/s1/a.mp4,spk1,Anger,,0.5,-1,,train,A\n"
        "media/s1/b.wav,spk1,,happy;sad; happy,,,,Validation,\n"
        f"{outside},spk2,frustrated,,,,2.5e-1,TEST,B\n"
        "media/s2/c.flac,spk2,,,,,,,\n"
        "media/s2/missing.wav,spk2,sad,,,,,,\n"
    ))
    result = scan(manifest)
    assert result.kind == "csv" and result.root == str(manifest)
    clips = by_id(result)
    assert list(clips) == ["../elsewhere/d", "media/s1/a", "media/s1/b", "media/s2/c"]
    assert clips["media/s1/a"] == ClipInfo(
        clip_id="media/s1/a", path=str(tmp_path / "corpus/media/s1/a.mp4"), dataset="csv",
        speaker="spk1", label="angry", labels=("angry",), valence=0.5, arousal=-1.0, split="train",
        has_video=True, meta=(("session", "A"),))
    multi = clips["media/s1/b"]
    assert (multi.label, multi.labels, multi.split, multi.has_video, multi.meta) == (
        None, ("happy", "sad"), "val", False, ())
    own = clips["../elsewhere/d"]
    assert (own.path, own.label, own.labels, own.dominance, own.split) == (
        str(outside), "frustrated", ("frustrated",), 0.25, "test")
    bare = clips["media/s2/c"]
    assert (bare.label, bare.labels, bare.valence, bare.split, bare.has_video) == (
        None, (), None, None, False)
    assert result.skipped == [(str(tmp_path / "corpus/media/s2/missing.wav"),
                               f"listed at {manifest}:6 but does not exist")]


def test_csv_directory_with_manifest_and_single_labels_column(tmp_path):
    root = make_tree(tmp_path, ["x/1.wav"])
    write_csv(root / "manifest.csv", "Path , Speaker,labels\nx/1.wav,s,fear\n")
    (clip,) = scan(root).clips
    assert (clip.clip_id, clip.speaker, clip.label, clip.labels, clip.has_video) == (
        "x/1", "s", "fearful", ("fearful",), False)
    assert detect_kind(root) == "csv"


@pytest.mark.parametrize("text, message", [
    ("file,speaker\na.wav,s\n", "missing required column 'path' (header has file, speaker)"),
    ("path,label\na.wav,happy\n", "missing required column 'speaker' (header has path, label)"),
    ("path,speaker,path\na.wav,s,b.wav\n", "column 'path' appears more than once in the header"),
    ("", "empty file; expected a header with columns path, speaker"),
    ("path,speaker\n", "no rows below the header"),
])
def test_csv_header_errors_name_the_file(tmp_path, text, message):
    manifest = write_csv(tmp_path / "m.csv", text)
    with pytest.raises(DatasetError) as err:
        scan(manifest)
    assert str(err.value) == f"{manifest}: {message}"


@pytest.mark.parametrize("row, message", [
    ("a.wav,s,abc,,", ":3: column 'valence': 'abc' is not a finite number"),
    ("a.wav,s,nan,,", ":3: column 'valence': 'nan' is not a finite number"),
    ("a.wav,s,,,holdout", ":3: split 'holdout' is not train, val or test"),
    ("a.wav,,,,", ":3: column 'speaker' is empty"),
    ("a.wav,s,1,2", ":3: row has a different number of fields than the header (5)"),
    ("a.wav,s,1,2,train,extra", ":3: row has a different number of fields than the header (5)"),
    ("ok.wav,s,,,", ":3: "),  # duplicate of line 2: message checked below
])
def test_csv_row_errors_name_file_and_line(tmp_path, row, message):
    make_tree(tmp_path, ["ok.wav", "a.wav"])
    manifest = write_csv(tmp_path / "m.csv", f"path,speaker,valence,arousal,split\nok.wav,s,,,\n{row}\n")
    with pytest.raises(DatasetError) as err:
        scan(manifest)
    assert str(err.value).startswith(f"{manifest}{message}")
    if row.startswith("ok.wav"):
        assert str(err.value) == f"{manifest}:3: {tmp_path / 'ok.wav'} is listed again (first at {manifest}:2)"


def test_csv_label_rules(tmp_path):
    make_tree(tmp_path, ["a.wav"])
    strict = write_csv(tmp_path / "strict.csv", "path,speaker,label\na.wav,s,bored\n")
    with pytest.raises(DatasetError, match=r"strict\.csv:2: label 'bored' is not one of neutral"):
        scan(strict, strict_labels=True)
    assert scan(strict).clips[0].label == "bored"
    clash = write_csv(tmp_path / "clash.csv", "path,speaker,label,labels\na.wav,s,sad,happy;angry\n")
    with pytest.raises(DatasetError, match=r"clash\.csv:2: label 'sad' is not among labels"):
        scan(clash)


def test_csv_missing_files_error_mode_and_non_media(tmp_path):
    make_tree(tmp_path, ["a.wav", "notes.txt"])
    manifest = write_csv(tmp_path / "m.csv", "path,speaker\na.wav,s\nnotes.txt,s\ngone.mp4,s\n")
    skipped = dict(scan(manifest).skipped)
    assert skipped == {str(tmp_path / "notes.txt"): f"listed at {manifest}:3 but .txt is not a media extension",
                       str(tmp_path / "gone.mp4"): f"listed at {manifest}:4 but does not exist"}
    only_gone = write_csv(tmp_path / "g.csv", "path,speaker\na.wav,s\ngone.mp4,s\n")
    with pytest.raises(DatasetError) as err:
        scan(only_gone, missing="error")
    assert str(err.value) == f"{tmp_path / 'gone.mp4'}: listed at {only_gone}:3 but does not exist"


def test_csv_kind_needs_a_manifest(tmp_path):
    make_tree(tmp_path, ["a.wav"])
    with pytest.raises(DatasetError, match="no manifest.csv in this directory"):
        scan(tmp_path, "csv")


# ------------------------------------------------------------------------------------ folder


def test_folder_speaker_is_parent_and_collisions_keep_video(tmp_path):
    root = make_tree(tmp_path / "mine", [
        "alice/day1/hello.MP4", "alice/day1/hello.wav", "bob/x.flac", "bob/y.webm", "top.ogg",
        "bob/readme.md", ".cache/z.wav", "bob/.hidden.wav",
    ])
    result = scan(root)
    assert result.kind == "folder"
    got = [(c.clip_id, c.speaker, c.has_video, c.label) for c in result.clips]
    assert got == [("alice/day1/hello", "day1", True, None), ("bob/x", "bob", False, None),
                   ("bob/y", "bob", True, None), ("top", "mine", False, None)]
    assert result.skipped == [(str(root / "alice/day1/hello.wav"),
                               f"clip id 'alice/day1/hello' already used by {root / 'alice/day1/hello.MP4'}")]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_folder_symlink_loop_is_reported_not_followed_forever(tmp_path):
    root = make_tree(tmp_path / "r", ["s/a.wav"])
    os.symlink(root, root / "s" / "loop")
    result = scan(root, "folder")
    assert [c.clip_id for c in result.clips] == ["s/a"]
    assert result.skipped == [(str(root / "s/loop"), f"directory already scanned as {root.resolve()} (symlink)")]


# ------------------------------------------------------------------------------------ auto, errors


@pytest.mark.parametrize("files, kind", [
    (RAVDESS_FILES, "ravdess"),
    (["Video_Speech_Actor_01/Actor_01/01-01-02-01-01-01-01.mp4"], "ravdess"),
    (CREMAD_FILES, "cremad"),
    (ENTERFACE_FILES, "enterface"),
    (["enterface database/subject 6/fear/s6_fe_1.avi"], "enterface"),
    (VOX_FILES, "voxceleb2"),
    (["Actor_01/hello.mp4", "subject 1/x.wav", "id00001/00001.mp4"], "folder"),  # names alone fool nothing
    (["x.wav"], "folder"),
])
def test_auto_detection(tmp_path, files, kind):
    root = make_tree(tmp_path / "data", files)
    assert detect_kind(root) == kind
    assert scan(root).kind == kind


def test_auto_detection_refuses_an_ambiguous_tree(tmp_path):
    root = make_tree(tmp_path, ["Actor_01/01-01-02-01-01-01-01.mp4", "AudioWAV/1001_DFA_ANG_XX.wav"])
    with pytest.raises(DatasetError) as err:
        scan(root)
    assert str(err.value) == (f"{root}: layout matches several corpora (cremad, ravdess); "
                              "pass kind= explicitly")
    assert scan(root, "cremad").clips[0].speaker == "1001"


def test_root_errors_name_the_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=f"^{missing}: does not exist$"):
        scan(missing)
    empty = make_tree(tmp_path / "empty", ["readme.txt", ".x.wav"])
    with pytest.raises(DatasetError) as err:
        scan(empty)
    assert str(err.value).startswith(f"{empty}: no media files found (video: .mp4 ")
    bad = make_tree(tmp_path / "bad", ["Actor_01/x.mp4", "Actor_01/y.mp4"])
    with pytest.raises(DatasetError) as err:
        scan(bad, "ravdess")
    assert str(err.value) == (f"{bad}: no usable ravdess clips; 2 file(s) skipped, first: "
                              f"{bad / 'Actor_01/x.mp4'}: not a RAVDESS name MM-VC-EE-II-SS-RR-AA "
                              "(seven 2-digit fields)")
    with pytest.raises(DatasetError, match="unknown dataset kind 'iemocap'; expected auto or one of ravdess"):
        scan(bad, "iemocap")
    with pytest.raises(DatasetError, match="unknown option.s. speechonly for the ravdess adapter; "
                                           "known: speech_only, include_video_only"):
        scan(bad, "ravdess", speechonly=True)
    with pytest.raises(DatasetError, match="expected a dataset directory or a .csv manifest"):
        scan(make_tree(tmp_path, ["f.wav"]) / "f.wav")


def test_adapter_table_and_emotions():
    assert sorted(ADAPTERS) == sorted(["ravdess", "cremad", "enterface", "voxceleb2", "csv", "folder"])
    assert EMOTIONS == ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
    assert [canonical_emotion(x) for x in ("ANG", " Happiness", "fear", "surprise", "neu")] == [
        "angry", "happy", "fearful", "surprised", "neutral"]
    with pytest.raises(KeyError, match="unknown emotion 'bored'"):
        canonical_emotion("bored")


def test_a_new_adapter_is_one_class_plus_its_registry_entry(tmp_path, monkeypatch):
    """The extension point: an `Adapter` subclass entered in `ADAPTERS` is scanned, option-checked,
    de-duplicated and auto-detected like the built-in ones; without the entry the kind is unknown."""

    class ToyAdapter(Adapter):
        name = "toy"

        def detect(self, folder):
            return folder.name == "TOY_CORPUS"

        def scan(self, root, *, speaker="anon"):
            skipped = []
            clips = [ClipInfo(clip_id=m.clip_id, path=m.path, dataset="toy", speaker=speaker,
                              has_video=m.is_video) for m in iter_media(root, skipped)]
            return clips, skipped

    root = make_tree(tmp_path / "data", ["TOY_CORPUS/b.wav", "TOY_CORPUS/a.mp4", "TOY_CORPUS/a.wav"])
    assert detect_kind(root) == "folder"
    monkeypatch.setitem(ADAPTERS, ToyAdapter.name, ToyAdapter)
    result = scan(root, kind="toy", speaker="s1")
    assert result.kind == "toy"
    assert [(c.clip_id, c.dataset, c.speaker, c.has_video) for c in result.clips] == [
        ("TOY_CORPUS/a", "toy", "s1", True), ("TOY_CORPUS/b", "toy", "s1", False)]
    assert result.skipped == [(str(root / "TOY_CORPUS/a.wav"),
                               f"clip id 'TOY_CORPUS/a' already used by {root / 'TOY_CORPUS/a.mp4'}")]
    assert detect_kind(root) == "toy" and scan(root).kind == "toy"
    with pytest.raises(DatasetError, match="unknown option.s. speakr for the toy adapter; known: speaker$"):
        scan(root, "toy", speakr="x")
    with pytest.raises(DatasetError, match="the toy adapter expects a directory$"):
        scan(root / "TOY_CORPUS" / "b.wav", "toy")
    monkeypatch.undo()
    assert "toy" not in ADAPTERS and detect_kind(root) == "folder"
    with pytest.raises(DatasetError, match="unknown dataset kind 'toy'"):
        scan(root, "toy")


# ------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("files, kind", [(RAVDESS_FILES, "ravdess"), (CREMAD_FILES, "cremad"),
                                         (ENTERFACE_FILES, "enterface"), (VOX_FILES, "voxceleb2")])
def test_same_tree_same_list(tmp_path, files, kind):
    """Creation order and location do not matter: ids, fields and skips are identical and sorted."""
    a = scan(make_tree(tmp_path / "a" / "corpus", files, order_seed=1), kind)
    b = scan(make_tree(tmp_path / "b" / "corpus", files, order_seed=2), kind)
    assert [c.clip_id for c in a.clips] == sorted(c.clip_id for c in a.clips)
    assert len({c.clip_id for c in a.clips}) == len(a.clips)
    strip = lambda r, root: [c.to_dict() | {"path": os.path.relpath(c.path, root),
                                            "audio_path": c.audio_path and os.path.relpath(c.audio_path, root)}
                             for c in r.clips]
    assert strip(a, a.root) == strip(b, b.root)
    assert [(os.path.relpath(p, a.root), r.replace(a.root, "")) for p, r in a.skipped] == \
           [(os.path.relpath(p, b.root), r.replace(b.root, "")) for p, r in b.skipped]
    assert scan(a.root, kind) == a


def test_clipinfo_dict_round_trip_and_summary(tmp_path):
    result = scan(make_tree(tmp_path, CREMAD_FILES), "cremad")
    for clip in result.clips:
        assert ClipInfo.from_dict(clip.to_dict()) == clip
    assert result.summary() == {"kind": "cremad", "n_clips": 3, "n_audio_only": 1, "n_speakers": 3,
                                "labels": {"angry": 1, "happy": 1, "sad": 1}, "n_skipped": 5}
    shutil.rmtree(tmp_path / "AudioWAV")
    assert scan(tmp_path, "cremad").clips[0].audio_path == str(tmp_path / "AudioMP3/1001_DFA_ANG_XX.mp3")


def test_csv_bad_encoding_and_bad_option_value(tmp_path):
    manifest = tmp_path / "latin.csv"
    manifest.write_bytes("path,speaker\nf\xe9te.wav,s\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=f"^{manifest}: not UTF-8 text"):
        scan(manifest)
    with pytest.raises(DatasetError, match=r"missing='sometimes'; expected 'skip' or 'error'"):
        scan(manifest, missing="sometimes")


def test_scan_logs_detection_and_summary(tmp_path, caplog, capsys):
    root = make_tree(tmp_path, ["Actor_05/03-01-06-01-02-01-05.wav"])
    with caplog.at_level("INFO", logger="vqmae.datasets"):
        result = scan(root)
    assert f"{root}: detected a ravdess corpus" in caplog.text
    assert "'n_audio_only': 1" in caplog.text
    assert capsys.readouterr().out == ""
    assert result.clips[0].label == "fearful" and dict(result.clips[0].meta)["gender"] == "male"


def test_folder_scan_skips_and_lists_hostile_entries(tmp_path):
    """Link loops, self-links, dangling links, a directory named like a media file and a link back
    up the tree never crash a folder scan: each is skipped with its reason; real files are found."""
    root = tmp_path / "corpus"
    make_tree(root, ["spk1/ok.wav"])
    os.symlink(root / "loop_b.mp4", root / "loop_a.mp4")
    os.symlink(root / "loop_a.mp4", root / "loop_b.mp4")
    os.symlink(root / "self.mp4", root / "self.mp4")
    os.symlink(root / "missing.wav", root / "dangling.wav")
    (root / "folder.mp4").mkdir()
    os.symlink(root, root / "spk1" / "up")  # a directory cycle
    skipped: list[tuple[str, str]] = []
    found = [m.rel for m in iter_media(root, skipped)]
    assert found == [("spk1", "ok.wav")]
    reasons = {Path(p).name: r for p, r in skipped}
    assert "loop" in reasons["loop_a.mp4"] and "loop" in reasons["loop_b.mp4"] and "loop" in reasons["self.mp4"]
    assert "dangling" in reasons["dangling.wav"]
    assert "directory named like a media file" in reasons["folder.mp4"]
    assert "already scanned" in reasons["up"]
    result = scan(root, kind="folder")  # the adapter reports them too, and does not raise
    assert len(result.clips) == 1 and {Path(p).name for p, _ in result.skipped} >= {"loop_a.mp4", "self.mp4"}


def test_manifest_rows_pointing_at_link_loops_say_so(tmp_path):
    root = tmp_path / "m"
    make_tree(root, ["ok.wav"])
    os.symlink(root / "b.wav", root / "a.wav")
    os.symlink(root / "a.wav", root / "b.wav")
    os.symlink(root / "gone.wav", root / "dangling.wav")
    (root / "manifest.csv").write_text("path,speaker\nok.wav,s1\na.wav,s1\ndangling.wav,s1\nmissing.wav,s1\n")
    result = scan(root / "manifest.csv")
    assert [c.path.endswith("ok.wav") for c in result.clips] == [True]
    reasons = {Path(p).name: r for p, r in result.skipped}
    assert "symlink loop" in reasons["a.wav"] and "dangling symlink" in reasons["dangling.wav"]
    assert "does not exist" in reasons["missing.wav"]
