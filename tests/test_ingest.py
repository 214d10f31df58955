import csv
import json
import math

import cv2
import numpy as np
import pytest
from skimage.data import astronaut
from typer.testing import CliRunner

import vqmae.ingest as ingest_mod
from vqmae_cli.main import app
from tests.conftest import tone, write_audio_only, write_video, write_wav
from vqmae.config import load_config
from vqmae.datasets import ClipInfo
from vqmae.ingest import ClipError, ingest, load_clip

CFG = load_config("tiny", ["face.mode=haar"])
FACE = cv2.resize(astronaut()[0:260, 110:330], (128, 128))  # the astronaut's head and shoulders


def face_frame(k: int) -> np.ndarray:
    return np.roll(FACE, (k % 5) - 2, axis=1)  # a little horizontal motion


def noise_frame(k: int) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 255, (128, 128, 3), dtype=np.uint8)


def clip(path, **kw) -> ClipInfo:
    return ClipInfo(clip_id=path.stem, path=str(path), dataset="test", speaker="s1", **kw)


@pytest.fixture
def face_video(media_dir):
    return write_video(media_dir / "face.mp4", n_frames=30, size=128, frame_fn=face_frame)


def test_av_clip_is_aligned(face_video):
    data = load_clip(clip(face_video), CFG)
    assert data.faces.shape == (30, 96, 96, 3) and data.faces.dtype == np.uint8
    assert data.spec.shape == (60, 513)  # exactly two audio frames per video frame
    assert data.face_rate >= 0.95
    assert abs(data.av_offset) < 0.15  # AAC padding only; recorded, not hidden


def test_audio_padded_or_trimmed_explicitly(media_dir):
    short = write_video(media_dir / "short_audio.mp4", n_frames=25, size=128, frame_fn=face_frame,
                        audio_seconds=0.5)
    data = load_clip(clip(short), CFG)
    assert data.spec.shape == (50, 513) and data.av_offset < -0.3
    assert data.spec[-10:].sum() == 0  # the zero padding is at the end, nothing was shifted


def test_audio_only_clip(media_dir):
    path = write_wav(media_dir / "a.wav", tone(1.0))
    data = load_clip(clip(path, has_video=False), CFG)
    assert data.faces is None and math.isnan(data.face_rate) and data.spec.shape == (50, 513)


def test_streaming_two_pass_equals_buffered(face_video, monkeypatch):
    cfg = load_config("tiny", ["face.mode=haar", "video.chunk_frames=8"])
    buffered = load_clip(clip(face_video), cfg, ("visual",)).faces
    monkeypatch.setattr(ingest_mod, "FRAME_BUFFER_BYTES", 1)  # forces decoding the file twice
    np.testing.assert_array_equal(load_clip(clip(face_video), cfg, ("visual",)).faces, buffered)


def test_no_audio_stream(media_dir):
    path = write_video(media_dir / "mute.mp4", n_frames=10, size=128, frame_fn=face_frame, audio=False)
    with pytest.raises(ClipError, match=r"mute\.mp4: audio: no audio stream"):
        load_clip(clip(path), CFG)
    assert load_clip(clip(path), CFG, ("visual",)).faces.shape[0] == 10


def test_no_face(media_dir):
    path = write_video(media_dir / "noise.mp4", n_frames=10, size=128, frame_fn=noise_frame)
    with pytest.raises(ClipError, match=r"noise\.mp4: faces: no face detected"):
        load_clip(clip(path), CFG)


def test_silence(media_dir):
    path = write_wav(media_dir / "quiet.wav", np.zeros(16000, np.float32))
    with pytest.raises(ClipError, match=r"quiet\.wav: audio: audio is silent"):
        load_clip(clip(path, has_video=False), CFG)


def test_batch_lists_failures_and_keeps_going(media_dir, face_video):
    bad = media_dir / "corrupt.mp4"
    bad.write_bytes(face_video.read_bytes()[:2000])
    clips = [clip(face_video), clip(bad), clip(write_wav(media_dir / "a.wav", tone(0.5)), has_video=False)]
    got = {c.clip_id: (d, f) for c, d, f in ingest(clips, CFG, workers=2)}
    assert got["face"][0].faces.shape == (30, 96, 96, 3)
    assert got["a"][0].spec.shape == (25, 513)
    failure = got["corrupt"][1]
    assert failure.path == str(bad) and failure.stage == "video" and "corrupt" in failure.reason
    # FFmpeg's own log line, captured in the worker, becomes one line of the reason
    assert failure.reason.endswith("(decoder: no moov atom: the mp4 is truncated or was never finalised)")


def test_cli_ingest_reports(tmp_path, media_dir, face_video):
    bad = media_dir / "corrupt.mp4"
    bad.write_bytes(b"\0" * 100)
    manifest = media_dir / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "speaker", "label"])
        w.writerows([["face.mp4", "s1", "happy"], ["corrupt.mp4", "s2", "sad"]])
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["ingest", str(manifest), "--face", "haar", "--preset", "tiny",
                                   "--workers", "0", "--run-dir", str(run)])
    assert res.exit_code == 1, res.output  # some inputs failed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ok"] == 1 and summary["failed"] == 1 and summary["face_rate_frames"] >= 0.95
    failures = list(csv.reader(open(run / "failures.csv")))
    assert failures[1][0] == str(bad) and failures[1][1] == "video"
    assert (run / "faces.png").exists()
    assert "failures (1)" in res.output and "ingest summary" in res.output
    assert "not a readable media container" in failures[1][2]


def test_mp4_with_audio_only_is_read_as_an_audio_clip(tmp_path):
    """A video extension whose container has no video stream is an audio clip, not a failure."""
    path = write_audio_only(tmp_path / "voice.mp4", "aac", 16000, sample_format="fltp")
    data = load_clip(clip(path), CFG)  # has_video from the extension
    assert data.faces is None and data.n_video_frames == 0
    assert 48 <= data.n_audio_frames <= 56  # 1 s at 50 frames/s, plus the AAC encoder's padding


def test_clip_timeout_comes_from_the_config(monkeypatch, tmp_path):
    """video.clip_timeout_s bounds each clip's decoding (0: no limit); an explicit timeout wins."""
    seen = []

    def fake_map(fn, tasks, workers, timeout, on_progress=None):
        seen.append(None if timeout is None else timeout(tasks[0]))
        return iter(())

    monkeypatch.setattr(ingest_mod, "isolated_map", fake_map)
    c = [clip(tmp_path / "x.wav", has_video=False)]
    list(ingest(c, load_config("tiny", ["video.clip_timeout_s=3600"])))
    list(ingest(c, load_config("tiny", ["video.clip_timeout_s=0"])))
    list(ingest(c, CFG, timeout=5.0))
    assert seen == [3600.0, None, 5.0]
    # a file larger than LIMIT_BYTES gets proportionally longer (its size stands in for its length)
    monkeypatch.setattr(ingest_mod, "LIMIT_BYTES", 1000)
    (tmp_path / "x.wav").write_bytes(b"\0" * 4000)
    list(ingest(c, CFG, timeout=5.0))
    assert seen[-1] == 20.0


def test_long_clip_crops_spill_to_disk_and_read_back_equal(face_video, monkeypatch, tmp_path):
    """Crops beyond SPILL_BYTES go to a temporary file as they are made: read back by slices,
    ints and index arrays they equal the in-memory crops; the process that unpickles it owns and
    deletes the file, the one that pickled it no longer does."""
    import os
    import pickle

    from vqmae.framepool import FramePool
    from vqmae.ingest import FrameSpill
    from vqmae.models.tokenizers import build_tokenizer, encode_frames

    info = clip(face_video)
    in_memory = load_clip(info, CFG).faces
    monkeypatch.setattr(ingest_mod, "SPILL_BYTES", 1)
    spilled = load_clip(info, CFG).faces
    assert isinstance(spilled, FrameSpill) and os.path.getsize(spilled.path) == in_memory.nbytes
    assert len(spilled) == len(in_memory) and spilled.shape == in_memory.shape
    np.testing.assert_array_equal(spilled[3:17], in_memory[3:17])
    np.testing.assert_array_equal(spilled[-1], in_memory[-1])
    np.testing.assert_array_equal(spilled[np.array([5, 0, 5])], in_memory[[5, 0, 5]])
    model = build_tokenizer("visual_vqvae", load_config("tiny", ["visual_vq.channels=8"]))
    np.testing.assert_array_equal(encode_frames(model, "visual", spilled, "cpu", batch=7),
                                  encode_frames(model, "visual", in_memory, "cpu", batch=7))
    a, b = FramePool(64, (96, 96, 3), np.uint8, seed=0), FramePool(64, (96, 96, 3), np.uint8, seed=0)
    a.add(spilled), b.add(in_memory)
    assert a.filled == b.filled == len(in_memory)
    np.testing.assert_array_equal(a.frames[:a.filled], b.frames[:b.filled])
    received = pickle.loads(pickle.dumps(spilled))  # what a worker's result does on its way
    path = spilled.path
    del spilled  # the sender's copy no longer owns the file
    assert os.path.exists(path)
    del received  # the receiver's copy deletes it
    assert not os.path.exists(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_long_clip_reports_progress_by_chunk(media_dir, workers):
    """Each decoded chunk of frames is reported (detection pass, then crop pass) with its clip, so a
    long clip's progress can be shown and its timeout restarted."""
    path = write_video(media_dir / "v.mp4", n_frames=40, size=64)
    cfg = load_config("tiny", ["face.mode=none", "video.chunk_frames=16"])
    seen = []
    out = list(ingest([clip(path)], cfg, workers=workers,
                      on_progress=lambda c, done, total: seen.append((c.path, done, total))))
    assert out[0][2] is None and len(out[0][1].faces) == 40
    assert [d for _, d, _ in seen] == [16, 32, 40, 56, 72, 80]
    assert {t for _, _, t in seen} == {80} and {p for p, _, _ in seen} == {str(path)}
