"""Shared fixtures: small real media files written with PyAV and the stdlib `wave` module."""

from __future__ import annotations

import fractions
import wave
from pathlib import Path

import numpy as np
import pytest


def write_video(path: Path, fps: float = 25.0, n_frames: int = 50, size: int = 64, audio: bool = True,
                frame_fn=None, audio_seconds: float | None = None, faststart: bool = False,
                timestamps: list[float] | None = None) -> Path:
    """H.264 mp4 whose frame k has every pixel equal to `frame_fn(k)` (default (7 k) mod 256).

    `timestamps` (seconds) makes a variable-frame-rate file; `audio` adds an AAC 440 Hz tone.
    """
    import av

    frame_fn = frame_fn or (lambda k: np.full((size, size, 3), (7 * k) % 256, np.uint8))
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        rate = fractions.Fraction(fps).limit_denominator(1001)
        v = out.add_stream("libx264", rate=rate)
        v.width = v.height = size
        v.pix_fmt = "yuv420p"
        if timestamps is not None:
            v.codec_context.time_base = fractions.Fraction(1, 1000)
        if audio:
            a = out.add_stream("aac", rate=16000)
            a.layout = "mono"
        for k in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_fn(k), format="rgb24")
            if timestamps is not None:
                frame.pts = int(round(timestamps[k] * 1000))
                frame.time_base = fractions.Fraction(1, 1000)
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        if audio:
            secs = audio_seconds if audio_seconds is not None else n_frames / fps
            t = np.arange(int(16000 * secs)) / 16000
            x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            encode_audio(out, a, x, "flt", "mono", 16000)
    return path


def encode_audio(out, stream, samples: np.ndarray, fmt: str, layout: str, rate: int) -> None:
    """Encode `samples` ([channels, n] in PyAV's `fmt`) on an audio stream and flush it into `out`."""
    import av

    frame = av.AudioFrame.from_ndarray(samples, format=fmt, layout=layout)
    frame.sample_rate = rate
    for p in stream.encode(frame):
        out.mux(p)
    for p in stream.encode(None):
        out.mux(p)


def write_audio_only(path: Path, codec: str, rate: int, seconds: float = 1.0, sample_format: str = "flt") -> Path:
    """A 220 Hz tone encoded by PyAV with `codec` into `path`'s container (audio stream only)."""
    import av

    wave = (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    with av.open(str(path), "w") as c:
        stream = c.add_stream(codec, rate=rate)
        frame = av.AudioFrame.from_ndarray(wave[None], format=sample_format, layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            c.mux(packet)
    return path


def write_wav(path: Path, signal: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    """16-bit PCM wav from float samples in [-1, 1] ([N] or [N, channels])."""
    data = (np.clip(signal, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def tone(seconds: float, rate: int = 16000, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.6 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    d = tmp_path / "media"
    d.mkdir()
    return d


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP
    spin-waiting makes them many times slower; one thread keeps the suite fast and repeatable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
