"""From a clip of a dataset to model inputs: power-spectrogram frames and aligned 96×96 face crops.

`load_clip` is the one place that decodes media for every stage (tokenizer training, encoding,
prediction). Its contract on alignment (docs/design.md §2): a clip with video has `T` frames at 25 fps
and exactly `2T` spectrogram frames; its waveform is padded with zeros or trimmed to `T` video
frames, and the amount is recorded in `ClipData.av_offset`, never applied silently.

Failures raise `ClipError(path, stage, reason)`; `ingest` runs `load_clip` over many clips in
crash-isolated worker processes and reports each failure with its file, stage and reason.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from vqmae.audio import (NoiseSpec, SilentAudioError, add_noise, frames_for_samples, peak_normalize,
                         power_spectrogram, samples_per_video_frame)
from vqmae.config import Config
from vqmae.datasets import ClipInfo
from vqmae.faces import FaceCropper, NoFaceError
from vqmae.isolate import Outcome, isolated_map, progress
from vqmae.media import NO_VIDEO_STREAM, MediaError, decoder_note, iter_video, read_audio


log = logging.getLogger(__name__)

MODALITIES = ("audio", "visual")
# Decoded frames kept between the face-detection pass and the crop pass; longer videos are decoded
# twice instead, so memory stays bounded whatever the file's length.
FRAME_BUFFER_BYTES = 256 << 20
# Face crops beyond this size are written to a temporary file as they are made (`FrameSpill`) instead
# of being held in memory: a long clip's crops (an hour at 25 fps is 2.5 GB) never sit in RAM, in the
# decoding worker or in the process that encodes them.
SPILL_BYTES = 128 << 20


class FrameSpill:
    """uint8 frames `[n, *shape]` in a temporary file, read back in slices: ``len()``, an int, a
    slice or an index array give numpy arrays, so `encode_frames` and the frame pools take it like an
    array. The process that unpickled it (the one consuming a worker's result) owns the file and
    deletes it when the object goes; a worker that sends one disowns it."""

    def __init__(self, shape: tuple[int, ...], directory: str | None = None):
        fd, self.path = tempfile.mkstemp(prefix="vqmae-frames-", suffix=".u8", dir=directory)
        self._file = os.fdopen(fd, "wb")
        self.frame_shape, self.n = tuple(shape), 0
        self.owner: int | None = os.getpid()

    def append(self, frames: np.ndarray) -> None:
        assert frames.dtype == np.uint8 and frames.shape[1:] == self.frame_shape, frames.shape
        self._file.write(np.ascontiguousarray(frames).tobytes())
        self.n += len(frames)

    def close(self) -> "FrameSpill":
        if self._file is not None:
            self._file.close()
            self._file = None
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.frame_shape)

    @property
    def nbytes(self) -> int:
        return self.n * int(np.prod(self.frame_shape))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> np.ndarray:
        size = int(np.prod(self.frame_shape))
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.n)
            count = max(0, hi - lo)
            out = np.fromfile(self.path, np.uint8, count=count * size, offset=lo * size)
            return out.reshape(count, *self.frame_shape)[::step]
        if isinstance(key, (int, np.integer)):
            return self[int(key) % self.n: int(key) % self.n + 1][0]
        view = np.memmap(self.path, np.uint8, "r", shape=self.shape)
        return np.array(view[np.asarray(key)])

    def __getstate__(self) -> dict:
        self.close()
        state = {**self.__dict__, "_file": None}
        self.owner = None  # sent to another process: that one deletes the file
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.owner = os.getpid()

    def __del__(self) -> None:
        if getattr(self, "owner", None) == os.getpid():
            self.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


class ClipError(MediaError):
    """A clip that cannot be turned into model inputs: '<path>: <stage>: <reason>'."""

    def __init__(self, path: str, stage: str, reason: str):
        self.stage = stage
        super().__init__(path, f"{stage}: {reason}")
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.path, self.stage, self.reason))


@dataclass
class ClipData:
    clip: ClipInfo
    spec: np.ndarray | None = None  # float32 [Ta, n_bins] power; Ta = 2 × Tv when there is video
    faces: np.ndarray | FrameSpill | None = None  # uint8 [Tv, S, S, 3] RGB crops (a long clip's on disk)
    face_rate: float = math.nan  # fraction of frames where a face was detected (NaN: no video)
    n_video_frames: int = 0
    n_audio_frames: int = 0
    av_offset: float = 0.0  # seconds of audio trimmed (> 0) or zero-padded (< 0) to match the video


def parse_modalities(text: str) -> tuple[str, ...]:
    """'av' | 'audio' | 'visual' (or a comma list) → tuple of modality names."""
    names = {"av": MODALITIES, "audio": ("audio",), "visual": ("visual",)}
    if text in names:
        return names[text]
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts or any(p not in MODALITIES for p in parts):
        raise ValueError(f"modalities {text!r}: expected av, audio, visual or a comma list of {MODALITIES}")
    return parts


_CROPPERS: dict[Any, FaceCropper] = {}


def get_cropper(cfg: Config) -> FaceCropper:
    """One cropper per process and face config (the fan model is loaded once, not per clip)."""
    key = cfg.face
    if key not in _CROPPERS:
        _CROPPERS[key] = FaceCropper(cfg.face)
    return _CROPPERS[key]


def load_clip(clip: ClipInfo, cfg: Config, modalities: Sequence[str] = MODALITIES, *,
              noise: NoiseSpec | None = None) -> ClipData:
    """Decode one clip into aligned model inputs (see the module docstring for the contract).

    `noise` adds seeded noise (keyed by the clip id) to the aligned waveform before peak
    normalisation and the STFT: the audio a noise-robustness evaluation tokenizes.
    """
    out = ClipData(clip)
    want_video = "visual" in modalities and clip.has_video
    want_audio = "audio" in modalities
    if not want_video and not want_audio:
        raise ClipError(clip.path, "scan", f"clip has none of the requested modalities {tuple(modalities)}")
    if want_video:
        try:
            out.faces, out.face_rate = _load_faces(clip.path, cfg)
            out.n_video_frames = len(out.faces)
        except ClipError as e:  # a video extension holding audio only: read as an audio clip
            if not (want_audio and NO_VIDEO_STREAM in e.reason):
                raise
            log.info("%s: no video stream, read as an audio clip", clip.path)
            want_video = False
    if want_audio:
        out.spec, out.av_offset = _load_spec(clip, cfg, out.n_video_frames if want_video else None,
                                             noise=noise)
        out.n_audio_frames = len(out.spec)
    return out


def spec_from_wave(wave: np.ndarray, cfg: Config, n_video: int | None = None, *,
                   noise: NoiseSpec | None = None, key: str = "") -> tuple[np.ndarray, float]:
    """A waveform float32 [n] at ``cfg.audio.sample_rate`` → power frames float32 [Ta, F] and the
    audio − video length difference in seconds (0 without video).

    With ``n_video`` the wave is trimmed or zero-padded to exactly that many video frames
    (Ta = 2 × n_video); ``noise`` is added (keyed by ``key``, the clip id) before peak
    normalisation. Unusable audio (shorter than a hop, silent) raises ValueError with the reason.
    """
    offset = 0.0
    if n_video is not None:
        target = n_video * samples_per_video_frame(cfg.audio, cfg.video.fps)
        offset = (len(wave) - target) / cfg.audio.sample_rate
        wave = np.pad(wave, (0, max(0, target - len(wave))))[:target]
    n_frames = frames_for_samples(len(wave), cfg.audio)
    if n_frames == 0:
        raise ValueError(f"audio is shorter than one spectrogram hop ({len(wave)} samples)")
    if noise is not None:

        wave = add_noise(wave, noise, key)
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    try:  # silence is refused whether or not the level is normalised
        normalised = peak_normalize(x)
    except SilentAudioError as e:
        raise ValueError(str(e)) from None
    if cfg.audio.peak_normalize:
        x = normalised
    spec = power_spectrogram(x, cfg.audio)[:n_frames]  # [Ta, F]
    return spec.numpy().astype(np.float32, copy=False), offset


def _load_spec(clip: ClipInfo, cfg: Config, n_video: int | None, *,
               noise: NoiseSpec | None = None) -> tuple[np.ndarray, float]:
    src = clip.audio_path or clip.path
    try:
        wave = read_audio(src, cfg.audio.sample_rate)
    except MediaError as e:
        raise ClipError(e.path, "audio", e.reason) from None
    try:
        spec, offset = spec_from_wave(wave, cfg, n_video, noise=noise, key=clip.clip_id)
    except ValueError as e:
        raise ClipError(src, "audio", str(e)) from None
    if abs(offset) > 0.2:  # AAC priming + end padding alone add ~0.1 s
        log.warning("%s: audio and video lengths differ by %.3f s; audio %s to match the video",
                    src, offset, "trimmed" if offset > 0 else "zero-padded")
    return spec, offset


def _load_faces(path: str, cfg: Config) -> tuple[np.ndarray | FrameSpill, float]:
    cropper = get_cropper(cfg)
    cropper.reset()  # the cropper tracks boxes across calls: start each clip afresh
    info: dict = {}
    frames = lambda: iter_video(path, cfg.video.fps, cfg.video.chunk_frames, cfg.video.max_side, info)  # noqa: E731
    try:
        kept: list[np.ndarray] | None = []
        boxes, done = [], 0
        for chunk in frames():  # pass 1: detection, keeping the frames when the whole video fits the buffer
            boxes.append(cropper.detect(chunk))
            if kept is not None:  # a longer video is never buffered (not even its start): decoded twice
                if info["frames"] * chunk[0].nbytes <= FRAME_BUFFER_BYTES:
                    kept.append(chunk)
                else:
                    kept = None
            done += len(chunk)  # progress in frames: detection, then cropping (decoded again or not)
            progress(done, 2 * info["frames"])
        track, detected = cropper.track(np.concatenate(boxes))
        size = cfg.face.size
        spill = FrameSpill((size, size, 3)) if len(track) * size * size * 3 > SPILL_BYTES else None
        crops, lo = [], 0
        for chunk in (kept if kept is not None else frames()):  # pass 2: crops
            crop = cropper.extract(chunk, track[lo:lo + len(chunk)])
            if spill is not None:
                spill.append(crop)
            else:
                crops.append(crop)
            lo += len(chunk)
            progress(len(track) + lo, 2 * len(track))
    except MediaError as e:
        raise ClipError(e.path, "video", e.reason) from None
    except NoFaceError as e:
        raise ClipError(path, "faces", str(e)) from None
    return (spill.close() if spill is not None else np.concatenate(crops)), float(np.mean(detected))


# -- many clips --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Task:
    clip: ClipInfo
    config: dict
    modalities: tuple[str, ...]
    keep_arrays: bool
    noise: NoiseSpec | None = None


def _run_task(task: _Task) -> ClipData:
    cfg = _config_cache(task.config)
    data = load_clip(task.clip, cfg, task.modalities, noise=task.noise)
    if not task.keep_arrays:
        data.spec = data.faces = None
    return data


_CFG: dict[str, Config] = {}


def _config_cache(d: dict) -> Config:
    import json

    key = json.dumps(d, sort_keys=True)
    if key not in _CFG:
        _CFG[key] = Config.from_dict(d)
    return _CFG[key]


@dataclass
class Failure:
    path: str
    stage: str
    reason: str
    clip_id: str = ""

    @classmethod
    def from_outcome(cls, o: Outcome) -> "Failure":
        """The failure of an ingest outcome; what the decoder wrote to stderr meanwhile (FFmpeg's
        log, captured by the worker) is added to a decoding failure's reason as one line."""
        clip: ClipInfo = o.item.clip
        if isinstance(o.exception, ClipError):
            path, stage, reason = o.exception.path, o.exception.stage, o.exception.reason
        else:
            path, stage, reason = clip.path, "decode" if o.crashed else "load", o.error
        note = decoder_note(o.log) if stage in ("audio", "video", "decode", "load") else ""
        if note and note not in reason:
            reason = f"{reason} (decoder: {note})"
        return cls(path, stage, reason, clip.clip_id)


# The per-clip time limit covers files up to this size as given; a larger file gets proportionally
# more (the size stands in for the duration, which only decoding would tell): 200 MB is about 10 min
# of talking-face video at 2.5 Mb/s.
LIMIT_BYTES = 200 << 20


def clip_progress(reporter: Any, phase: str) -> Callable[[ClipInfo, int, int], None]:
    """An `on_progress` for `ingest` that shows a long clip's progress in `phase`'s progress line
    (a clip of a minute or more: 1,500 frames at 25 fps, two passes)."""
    def show(clip: ClipInfo, done: int, total: int) -> None:
        if total >= 3000:
            reporter.advance(phase, 0, clip=f"{os.path.basename(clip.path)} decoded {done / total:.0%}")
    return show


def clip_time_limit(base: float, clip: ClipInfo) -> float:
    """`base` seconds, times the clip's media size over `LIMIT_BYTES` when that is more than 1."""
    size = 0
    for path in (clip.path, clip.audio_path):
        if path:
            try:
                size += os.stat(path).st_size
            except OSError:  # missing or unreadable: decoding will say so, within the base limit
                pass
    return base * max(1.0, size / LIMIT_BYTES)


def ingest(clips: Sequence[ClipInfo], cfg: Config, modalities: Sequence[str] = MODALITIES, *,
           workers: int = 1, keep_arrays: bool = True, timeout: float | None = None,
           noise: NoiseSpec | None = None,
           on_progress: Callable[[ClipInfo, int, int], None] | None = None,
           ) -> Iterator[tuple[ClipInfo, ClipData | None, Failure | None]]:
    """Load many clips in crash-isolated worker processes; yield (clip, data, failure) as they finish.

    Exactly one of `data` / `failure` is set. `workers=0` loads in this process (no isolation).
    `noise` is passed to `load_clip` (noisy audio for robustness evaluation). A clip fails when it
    runs past its time limit without progress: `timeout` seconds (default `cfg.video.clip_timeout_s`;
    0 or None: no limit), scaled up for large files (`clip_time_limit`) and restarted by every chunk of
    video frames decoded, which also reaches `on_progress(clip, done, total)` (frames of the detection
    and crop passes), so a long clip shows its progress and is not cut off while it moves.
    """
    if timeout is None:
        timeout = cfg.video.clip_timeout_s
    timeout = timeout if timeout and timeout > 0 else None
    config = cfg.to_dict()  # one shared dict, not one copy per clip
    tasks = [_Task(c, config, tuple(modalities), keep_arrays, noise) for c in clips]
    limit = None if timeout is None else (lambda task: clip_time_limit(timeout, task.clip))  # noqa: E731
    hook = None if on_progress is None else (lambda task, done, total: on_progress(task.clip, done, total))  # noqa: E731
    for o in isolated_map(_run_task, tasks, workers=workers, timeout=limit, on_progress=hook):
        if o.ok:
            yield o.item.clip, o.value, None
        else:
            yield o.item.clip, None, Failure.from_outcome(o)
