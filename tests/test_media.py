import numpy as np
import pytest

from tests.conftest import tone, write_audio_only, write_video, write_wav
from vqmae.media import MediaError, iter_video, read_audio, read_video, resample_indices


def source_index(frames: np.ndarray) -> np.ndarray:
    """Recover which source frame k each decoded frame shows (pixels were written as 7k mod 256)."""
    return np.round(frames[:, 8:-8, 8:-8].mean(axis=(1, 2, 3)) / 7).astype(int)


@pytest.mark.parametrize("fps", [25.0, 30.0, 30000 / 1001, 24000 / 1001])
def test_video_resampled_to_25fps_by_timestamp(media_dir, fps):
    n = 30
    path = write_video(media_dir / "v.mp4", fps=fps, n_frames=n)
    frames = read_video(path, fps=25.0)
    duration = n / fps
    assert len(frames) == int(np.floor(duration * 25 + 1e-6))
    expected = np.floor(np.arange(len(frames)) / 25 * fps + 1e-3).astype(int)
    np.testing.assert_array_equal(source_index(frames), expected)


def test_variable_frame_rate(media_dir):
    # 0.2 s at 10 fps, then 0.4 s at 50 fps: target frames follow the timestamps, not frame counts
    ts = [i * 0.1 for i in range(2)] + [0.2 + i * 0.02 for i in range(20)]
    path = write_video(media_dir / "vfr.mp4", fps=50, n_frames=len(ts), timestamps=ts, audio=False)
    frames = read_video(path, fps=25.0)
    shown = source_index(frames)
    target_t = np.arange(len(frames)) / 25
    expected = np.searchsorted(np.array(ts), target_t + 1e-6, side="right") - 1
    np.testing.assert_array_equal(shown, expected)


def test_chunks_equal_whole(media_dir):
    path = write_video(media_dir / "v.mp4", n_frames=40)
    chunks = list(iter_video(path, chunk_frames=16))
    assert [len(c) for c in chunks] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate(chunks), read_video(path))


def test_decode_time_resize(media_dir):
    path = write_video(media_dir / "v.mp4", n_frames=10, size=128)
    assert read_video(path, max_side=64).shape == (10, 64, 64, 3)


def test_resample_indices_handles_unsorted_pts():
    starts = np.array([0.0, 0.08, 0.04, 0.12])  # B-frame order in the container
    np.testing.assert_array_equal(resample_indices(starts, 25.0, 4), [0, 2, 1, 3])


def test_audio_resampled_to_16k_mono(media_dir):
    stereo = np.stack([tone(0.5, 44100), tone(0.5, 44100, 440)], axis=1)
    path = write_wav(media_dir / "a.wav", stereo, rate=44100, channels=2)
    wave = read_audio(path, 16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 8000) <= 2


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_audio_resampling_keeps_time_and_level(media_dir, rate):
    """Any source rate lands on the 16 kHz grid with no delay and the downmix's level: the output
    is the ideal 16 kHz sine of the same tone to within the resampler's ripple."""
    left, right = tone(1.0, rate), 0.5 * tone(1.0, rate)
    path = write_wav(media_dir / "a.wav", np.stack([left, right], 1), rate=rate, channels=2)
    wave = read_audio(path, 16000)
    k = np.arange(len(wave))
    ideal = 0.6 * 1.5 * np.sqrt(0.5) * np.sin(2 * np.pi * 220 * k / 16000)  # FFmpeg's stereo → mono
    assert abs(len(wave) - 16000) <= 2
    np.testing.assert_allclose(wave[400:-400], ideal[400:-400], atol=2e-3)


def test_long_audio_is_streamed(media_dir, monkeypatch):
    """Decoded frame by frame: the decoder never hands over more than one packet's samples at once."""
    import av

    sizes = []
    real = av.AudioResampler.resample

    def spy(self, frame):
        out = real(self, frame)
        sizes.extend(f.samples for f in out)
        return out

    monkeypatch.setattr(av.AudioResampler, "resample", spy)
    path = write_wav(media_dir / "long.wav", tone(30.0, 48000), rate=48000)
    wave = read_audio(path, 16000)
    assert abs(len(wave) - 30 * 16000) <= 2 and sum(sizes) == len(wave)
    assert max(sizes) < 16000  # well under a second per step, whatever the file's length


def test_audio_of_video(media_dir):
    path = write_video(media_dir / "v.mp4", n_frames=25)
    wave = read_audio(path)
    assert abs(len(wave) / 16000 - 1.0) < 0.15  # AAC priming/padding adds a few ms
    assert np.abs(wave).max() > 0.3


def test_video_without_audio_names_file(media_dir):
    path = write_video(media_dir / "silent_film.mp4", audio=False)
    with pytest.raises(MediaError, match=r"silent_film\.mp4: no audio stream"):
        read_audio(path)


@pytest.mark.parametrize("content", [b"", b"\0" * 4096, b"not a video at all" * 100])
def test_corrupt_file_names_file(media_dir, content):
    path = media_dir / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(MediaError, match=r"broken\.mp4: .*(empty|corrupt|cannot open)"):
        read_video(path)
    with pytest.raises(MediaError, match=r"broken\.mp4: "):
        read_audio(path)


def test_truncated_file_names_file(media_dir):
    full = write_video(media_dir / "full.mp4", n_frames=100, size=64)
    for cut, name in [(0.3, "head.mp4"), (0.6, "tail.mp4")]:
        data = full.read_bytes()
        path = media_dir / name
        path.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(MediaError, match=rf"{name}: "):
            read_video(path)


def test_truncated_faststart_file_fails_while_decoding(media_dir):
    full = write_video(media_dir / "fs.mp4", n_frames=100, size=64, faststart=True)
    path = media_dir / "cut.mp4"
    path.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.5)])
    try:
        frames = read_video(path)
    except MediaError as e:
        assert str(e).startswith(str(path)) and e.reason
    else:  # decord may stop at the last complete packet: then fewer frames, never garbage
        assert 0 < len(frames) < 100


def test_missing_file(media_dir):
    with pytest.raises(MediaError, match=r"nope\.wav: file does not exist"):
        read_audio(media_dir / "nope.wav")


def test_audio_file_with_no_samples(media_dir):
    path = write_wav(media_dir / "empty.wav", np.zeros(0, np.float32))
    with pytest.raises(MediaError, match=r"empty\.wav: .*(no samples|cannot open|no audio)"):
        read_audio(path)


def test_opus_audio_is_read_and_scanned(tmp_path):
    """.opus (common in web-scraped speech corpora) is an audio extension: scanned and decoded."""
    from vqmae.datasets import scan

    (tmp_path / "spk1").mkdir()
    path = write_audio_only(tmp_path / "spk1" / "clip.opus", "libopus", 48000)
    x = read_audio(path, 16000)
    assert abs(len(x) - 16000) < 400 and np.abs(x).max() > 0.1
    clips = scan(tmp_path, kind="folder").clips
    assert [c.path for c in clips] == [str(path)] and not clips[0].has_video


def test_decoder_internals_become_reasons():
    from vqmae.media import plain_reason

    assert plain_reason("Check failed: st_nb >= 0 (-1381258232 vs. 0) ERROR cannot find video stream") == \
        "no video stream in the file"
    assert "corrupt or truncated" in plain_reason("av_read_frame failed with 1094995529")
    from vqmae.media import decoder_note

    assert decoder_note("[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0] moov atom not found\n") == \
        "no moov atom: the mp4 is truncated or was never finalised"
    assert decoder_note("[h264 @ 0x1] Invalid NAL unit size (12 > 3).\n[h264 @ 0x1] Error splitting\n") == \
        "damaged video frames"
    assert decoder_note("") == decoder_note("\n  \n") == ""
    assert decoder_note("[x @ 0x2] something new\n") == "something new"
    assert plain_reason("Check failed: x == y").startswith("unsupported or damaged stream")
    assert plain_reason("some other reason") == "some other reason"


def test_unusable_timestamps_are_named():
    from vqmae.media import timestamp_problem

    start = np.arange(10) / 25.0
    good = np.stack([start, start + 0.04], 1)
    assert timestamp_problem(good, 10) is None
    assert timestamp_problem(good[[1, 0, 2, 3, 5, 4, 6, 7, 8, 9]], 10) is None  # B-frame order
    bad = good.copy()
    bad[:2, 0] = -3.85e17  # what decord returned for an MPEG-4 AVI's first frames
    assert "negative" in timestamp_problem(bad, 10)
    huge = good.copy()
    huge[-1, 1] = 1e12
    assert "span" in timestamp_problem(huge, 10)
    dup = np.zeros((10, 2))
    assert "repeat" in timestamp_problem(dup, 10)
    assert timestamp_problem(good[:5], 10) == "are missing"
    nan = good.copy()
    nan[3, 0] = np.nan
    assert "finite" in timestamp_problem(nan, 10)


def test_bad_timestamps_fall_back_to_the_stream_rate(media_dir, monkeypatch):
    """A file whose timestamps are garbage is still decoded, timed by frame index."""
    import decord

    path = write_video(media_dir / "ts.mp4", n_frames=30, fps=25)
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp",
                        lambda self, idx: np.full((len(idx), 2), -3.85e17))
    frames = read_video(path, 25.0)
    assert len(frames) == 30
