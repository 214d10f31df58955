"""The demo corpus: real media files, deterministic, with the emotion measurably in voice and face."""

from __future__ import annotations

import csv
import dataclasses
import json
import wave
from pathlib import Path

import cv2
import decord
import numpy as np
import pytest
from typer.testing import CliRunner

from vqmae_cli.main import app
from vqmae import demo as S
from vqmae.config import SynthConfig
from vqmae.demo import profiles

HOP = 640  # 16 kHz / 25 fps

# Two speakers, one clip per class each, two audio-only clips per speaker.
SMALL = SynthConfig(n_speakers=2, clips_per_speaker=4, audio_only_per_speaker=2, min_seconds=1.2,
                    max_seconds=1.8, frame_size=128, seed=3)
# Audio only, six clips per class over three voices: enough to compare class means.
VOICES = SynthConfig(n_speakers=3, clips_per_speaker=0, audio_only_per_speaker=8, min_seconds=1.5,
                     max_seconds=2.0, seed=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    S.synthesize(out, SMALL, workers=1)
    return out


@pytest.fixture(scope="module")
def rows(corpus) -> list[dict]:
    with open(corpus / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _expected_frames(cfg: SynthConfig, row: dict) -> int:
    spec = next(s for s in S.plan(cfg) if s.path == row["path"])
    return S.clip_params(cfg, spec, S.clip_rng(cfg, spec)).n_frames


def _audio(path: Path) -> np.ndarray:
    return decord.AudioReader(str(path), sample_rate=16000, mono=True)[:].asnumpy()[0]  # [n]


def _video(path: Path) -> np.ndarray:
    return decord.VideoReader(str(path))[:].asnumpy()  # [T, H, W, 3]


def _f0(x: np.ndarray, fs: int = 16000) -> np.ndarray:
    """Autocorrelation pitch of each voiced 40 ms frame (Hz).  # [n_voiced]"""
    out = []
    for s in range(0, len(x) - HOP, HOP // 2):
        w = x[s:s + HOP] - x[s:s + HOP].mean()
        if np.sqrt(np.mean(w ** 2)) < 0.01:
            continue
        ac = np.correlate(w, w, "full")[HOP - 1:]
        lo, hi = fs // 450, fs // 70
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.4 * ac[0]:
            out.append(fs / lag)
    return np.array(out)


# -- layout and formats ------------------------------------------------------------------------------


def test_manifest_columns_and_values(corpus, rows):
    header = (corpus / "manifest.csv").read_text().splitlines()[0]
    assert header == "path,speaker,label,valence,arousal,dominance,split"
    assert len(rows) == 12 and [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    for r in rows:
        name = r["path"].split("/")[-1]
        kind = "video" if name.endswith(".mp4") else "audio"
        assert r["path"] == f"{kind}/{r['speaker']}/{name}" and (corpus / r["path"]).is_file()
        assert r["split"] == ""
        assert all(-1 <= float(r[k]) <= 1 for k in ("valence", "arousal", "dominance"))
    assert {r["speaker"] for r in rows} == {"spk01", "spk02"}
    video = [r for r in rows if r["path"].endswith(".mp4")]
    assert sorted(r["label"] for r in video) == sorted(SMALL.emotions * 2)  # balanced
    assert not list(corpus.rglob("*.tmp"))


def test_dimensions_follow_the_circumplex():
    cfg = dataclasses.replace(VOICES, n_speakers=2, audio_only_per_speaker=40)
    by_label: dict[str, list] = {}
    for spec in S.plan(cfg):
        p = S.clip_params(cfg, spec, S.clip_rng(cfg, spec))
        by_label.setdefault(spec.label, []).append(p.vad)
    mean = {k: np.mean(v, axis=0) for k, v in by_label.items()}  # [3] valence, arousal, dominance
    assert mean["happy"][0] > 0.3 and mean["happy"][1] > 0.3
    assert mean["sad"][0] < -0.3 and mean["sad"][1] < -0.3
    assert mean["angry"][0] < -0.3 and mean["angry"][1] > 0.3 and mean["angry"][2] > 0.3
    assert np.all(np.abs(mean["neutral"]) < 0.1)
    # Clips of one class spread (jitter, intensity) but keep their signs.
    happy = np.array(by_label["happy"])
    assert happy[:, 1].std() > 0.05 and (happy[:, 0] > 0).mean() > 0.9


def test_synth_json_records_config_and_seed(corpus):
    meta = json.loads((corpus / "synth.json").read_text())
    assert meta["format"] == "vqmae-synth/1" and meta["seed"] == 3
    assert SynthConfig(**{**meta["config"], "emotions": tuple(meta["config"]["emotions"])}) == SMALL
    assert meta["n_clips"] == 12 and meta["n_video"] == 8 and meta["n_audio"] == 4
    assert meta["per_speaker"] == {"spk01": 6, "spk02": 6}
    assert len(meta["speakers"]) == 2 and meta["speakers"][0]["f0"] < meta["speakers"][1]["f0"]


def test_video_files_decode_with_expected_length(corpus, rows):
    import av

    for r in [r for r in rows if r["path"].endswith(".mp4")][:4]:
        path = corpus / r["path"]
        n = _expected_frames(SMALL, r)
        vr = decord.VideoReader(str(path))
        assert abs(len(vr) - n) <= 1 and vr.get_avg_fps() == 25.0
        assert vr[0].shape == (128, 128, 3)
        audio = _audio(path)
        assert abs(len(audio) / 16000 - n / 25) < 0.1
        with av.open(str(path)) as box:
            v, a = box.streams.video[0], box.streams.audio[0]
            assert (v.codec_context.name, v.codec_context.pix_fmt) == ("h264", "yuv420p")
            assert (a.codec_context.name, a.codec_context.sample_rate, a.codec_context.channels) == ("aac", 16000, 1)


def test_wav_files_are_16bit_mono_and_below_clipping(corpus, rows):
    for r in [r for r in rows if r["path"].endswith(".wav")]:
        path = corpus / r["path"]
        with wave.open(str(path)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
            n = w.getnframes()
            pcm = np.frombuffer(w.readframes(n), "<i2")
        assert n == _expected_frames(SMALL, r) * HOP  # whole video frames of audio
        assert len(_audio(path)) == n
        assert 1000 < np.abs(pcm).max() < 0.9 * 32767


# -- determinism -------------------------------------------------------------------------------------


def test_parallel_equals_serial_and_same_seed_same_arrays(corpus, rows, tmp_path):
    other = tmp_path / "parallel"
    S.synthesize(other, SMALL, workers=2)
    assert (other / "manifest.csv").read_bytes() == (corpus / "manifest.csv").read_bytes()
    for r in rows:
        a, b = corpus / r["path"], other / r["path"]
        np.testing.assert_array_equal(_audio(a), _audio(b))
        if a.suffix == ".mp4":
            np.testing.assert_array_equal(_video(a), _video(b))


def test_seed_changes_the_corpus():
    spec = S.plan(SMALL)[0]
    a = S.make_clip(SMALL, spec).audio
    b = S.make_clip(dataclasses.replace(SMALL, seed=4), spec).audio
    np.testing.assert_array_equal(a, S.make_clip(SMALL, spec).audio)
    assert len(a) != len(b) or not np.array_equal(a, b)


# -- emotion in the signal ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voice_stats(tmp_path_factory) -> dict[str, np.ndarray]:
    """Per class, per clip: [rms, mean pitch in semitones re 100 Hz, pitch spread], decoded audio."""
    out = tmp_path_factory.mktemp("voices")
    S.synthesize(out, VOICES, workers=1)
    stats: dict[str, list] = {}
    with open(out / "manifest.csv", newline="") as f:
        for r in csv.DictReader(f):
            x = _audio(out / r["path"])
            semis = 12 * np.log2(_f0(x) / 100.0)
            rms = np.sqrt(np.mean(x[np.abs(x) > 1e-3] ** 2))
            stats.setdefault(r["label"], []).append((rms, semis.mean(), semis.std()))
    return {k: np.array(v) for k, v in stats.items()}


def test_classes_differ_in_loudness(voice_stats):
    rms = {k: v[:, 0].mean() for k, v in voice_stats.items()}
    assert rms["angry"] > rms["happy"] > rms["neutral"] > rms["sad"]
    assert rms["angry"] > 2.5 * rms["sad"]


def test_classes_differ_in_pitch(voice_stats):
    level = {k: v[:, 1].mean() for k, v in voice_stats.items()}
    spread = {k: v[:, 2].mean() for k, v in voice_stats.items()}
    assert level["happy"] > level["neutral"] + 1.5 > level["sad"] + 3
    assert level["angry"] > level["sad"] + 3
    assert spread["happy"] > 1.5 * spread["sad"]


def test_classes_overlap_clip_to_clip(voice_stats):
    """Learnable, not trivial: per-clip jitter makes neighbouring classes overlap in pitch."""
    happy, angry = voice_stats["happy"][:, 1], voice_stats["angry"][:, 1]
    assert happy.min() < angry.max()


def test_mouth_follows_audio_energy(corpus, rows):
    for r in [r for r in rows if r["path"].endswith(".mp4")]:
        path = corpus / r["path"]
        frames = _video(path).astype(np.float32)
        n = len(frames)
        audio = _audio(path)[: n * HOP]
        energy = np.sqrt((audio.reshape(n, HOP) ** 2).mean(axis=1))  # [T]
        y0, y1, x0, x1 = S.mouth_box(SMALL, int(r["speaker"][3:]) - 1)
        mouth = frames[:, y0 - 2:y1 + 2, x0 - 2:x1 + 2]
        closed = mouth[energy <= np.quantile(energy, 0.2)].mean(axis=0)
        motion = np.abs(mouth - closed).mean(axis=(1, 2, 3))  # [T]
        assert np.corrcoef(motion, energy)[0, 1] > 0.5, r["path"]


def test_expression_changes_the_upper_face():
    """At rest (no head motion, mouth closed) angry brows differ from neutral far more than two
    neutral intensities differ from each other."""
    size = 128
    spk = S.make_speaker(SMALL, 0)

    def rest(emo: S.Emotion) -> np.ndarray:
        r = S.FaceRenderer(spk, emo, size)
        eye = np.array([[1.0, 0, r.margin], [0, 1.0, r.margin]])
        return r.render(eye, 0.0).astype(np.float32)[: size // 2]  # [S/2, S, 3] upper half

    neutral = S.EMOTIONS["neutral"]
    weaker = dataclasses.replace(neutral, face=tuple((x, y, 0.7 * dx, 0.7 * dy, s) for x, y, dx, dy, s in neutral.face))
    base = rest(neutral)
    assert np.abs(rest(S.EMOTIONS["angry"]) - base).mean() > 10 * max(np.abs(rest(weaker) - base).mean(), 0.05)


def test_speakers_look_different(corpus, rows):
    firsts = {}
    for r in rows:
        if r["path"].endswith(".mp4") and r["speaker"] not in firsts:
            firsts[r["speaker"]] = _video(corpus / r["path"])[0].astype(np.float32)
    a, b = firsts.values()
    assert np.abs(a - b).mean() > 20


def test_haar_finds_the_face(corpus, rows):
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    for r in [r for r in rows if r["path"].endswith(".mp4")][::2]:
        frames = _video(corpus / r["path"])
        found = [len(cascade.detectMultiScale(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), 1.1, 5)) > 0 for f in frames]
        assert np.mean(found) >= 0.95, r["path"]


# -- errors and the output directory -----------------------------------------------------------------


def test_non_empty_directory_is_refused_then_overwritten(tmp_path):
    cfg = dataclasses.replace(SMALL, n_speakers=1, clips_per_speaker=0, audio_only_per_speaker=2)
    out = tmp_path / "c"
    (out / "audio" / "spk07").mkdir(parents=True)
    stale = out / "audio" / "spk07" / "spk07_000.wav"
    stale.write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(S.SynthError, match=rf"{out}: directory is not empty"):
        S.synthesize(out, cfg, workers=1)
    manifest = S.synthesize(out, cfg, workers=1, overwrite=True)
    assert not stale.exists() and (out / "notes.txt").read_text() == "mine"
    listed = [r["path"] for r in csv.DictReader(open(manifest, newline=""))]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.wav")) == listed


@pytest.mark.parametrize("change, message", [
    ({"emotions": ("happy", "bored")}, r"unknown \['bored'\]"),
    ({"frame_size": 127}, "frame_size=127"),
    ({"min_seconds": 3.0, "max_seconds": 2.0}, "min_seconds"),
    ({"audio_rate": 16001}, "audio_rate=16001"),
    ({"speaker_spread": 1.5}, r"speaker_spread=1.5: must be in \[0, 1\]"),
    ({"expressiveness": -1.0}, r"expressiveness=-1.0: must be in \[0, 4\]"),
    ({"expressiveness": float("inf")}, r"expressiveness=inf: must be in \[0, 4\]"),
])
def test_bad_config_is_refused(tmp_path, change, message):
    with pytest.raises(S.SynthError, match=message):
        S.synthesize(tmp_path / "x", dataclasses.replace(SMALL, **change))
    assert not (tmp_path / "x").exists()


# -- CLI ---------------------------------------------------------------------------------------------


def test_cli_writes_corpus_and_refuses_non_empty(tmp_path):
    out = tmp_path / "demo"
    args = ["synth", str(out), "--preset", "tiny", "--set", "synth.n_speakers=1",
            "--set", "synth.clips_per_speaker=2", "--set", "synth.audio_only_per_speaker=1", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 clips (2 video, 1 audio-only)" in result.output and "spk01" in result.output
    assert len(list(csv.DictReader(open(out / "manifest.csv")))) == 3
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.output
    forced = CliRunner().invoke(app, args + ["--force"])
    assert forced.exit_code == 0, forced.output
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "y"), "--set", "synth.frame_size=abc"])
    assert bad.exit_code == 2 and "synth.frame_size" in bad.output


def test_speaker_spread_zero_gives_one_face_and_voice_and_one_keeps_the_draws():
    def traits(cfg, i):
        d = dataclasses.asdict(S.make_speaker(cfg, i))
        return {k: v for k, v in d.items() if k not in ("index", "name")}

    same = SynthConfig(n_speakers=4, speaker_spread=0.0)
    assert all(traits(same, i) == traits(same, 0) for i in range(1, 4))
    full, half = SynthConfig(n_speakers=4), SynthConfig(n_speakers=4, speaker_spread=0.5)
    f0 = [S.make_speaker(c, i).f0 for c in (full, half) for i in range(4)]
    assert np.ptp(f0[4:]) < 0.6 * np.ptp(f0[:4])  # half the spread (in log pitch) → a narrower range
    assert [S.make_speaker(full, i).mirror for i in range(4)] == [False, True, False, True]
    assert all(S.make_speaker(full, i).hair in profiles._HAIR for i in range(4))  # the draws, untouched


def test_expressiveness_moves_the_signal_not_the_labels():
    spec = S.ClipSpec(0, 0, "video", "sad")
    one, two = (S.clip_params(SynthConfig(variability=0.0, expressiveness=e), spec, np.random.default_rng(0))
                for e in (1.0, 2.0))
    neutral = S.EMOTIONS["neutral"]
    assert two.vad == one.vad  # the labels keep the class's own values
    assert abs(two.emo.pitch_st - neutral.pitch_st) == pytest.approx(2 * abs(one.emo.pitch_st - neutral.pitch_st))
    assert two.emo.breath > one.emo.breath > neutral.breath
    for h1, h2 in zip(one.emo.face, two.emo.face):
        mag1, mag2, sigma = np.hypot(h1[2], h1[3]), np.hypot(h2[2], h2[3]), h2[4]
        assert mag2 == pytest.approx(min(2 * mag1, 1.5 * sigma))  # capped below a folding warp
    wild = S.clip_params(SynthConfig(variability=0.0, expressiveness=4.0), spec, np.random.default_rng(0))
    assert 0.3 <= wild.emo.open_quotient <= 0.85 and 2.0 <= wild.emo.rate and wild.emo.pause <= 3.0
    assert wild.emo.range_st >= 0.5 and wild.emo.pitch_st >= -8.0  # sad: accents never turn over
    fear = S.clip_params(SynthConfig(variability=0.0, expressiveness=4.0), S.ClipSpec(0, 0, "video", "fearful"),
                         np.random.default_rng(0))
    assert fear.emo.pitch_st <= 10.0


def test_global_quiet_and_log_file(tmp_path):
    """`vqmae --quiet --log-file F synth ...`: no progress or info lines on the console, the final
    summary still printed; F holds the timestamped progress lines and log records."""
    log = tmp_path / "run.log"
    args = ["synth", str(tmp_path / "d"), "--preset", "tiny", "--set", "synth.n_speakers=1",
            "--set", "synth.clips_per_speaker=2", "--set", "synth.audio_only_per_speaker=1", "--workers", "1"]
    loud = CliRunner().invoke(app, args)
    quiet = CliRunner().invoke(app, ["--quiet", "--log-file", str(log), *args[:1], str(tmp_path / "q"), *args[2:]])
    assert loud.exit_code == quiet.exit_code == 0, quiet.output
    assert "3 clips (2 video, 1 audio-only)" in quiet.output
    progress = [x for x in loud.output.splitlines() if ": started" in x or ": done" in x]
    assert progress and not [x for x in quiet.output.splitlines() if ": started" in x or ": done" in x]
    lines = log.read_text().splitlines()
    assert any(" PROGRESS " in x and ": done" in x for x in lines)
    assert all(x[:4].isdigit() and x[10] == " " for x in lines)  # every line starts with its time
