"""Deterministic demo corpus: talking-face clips whose emotion is really in the voice and the face.

`synthesize(out_dir, cfg)` writes

    OUT/video/<speaker>/<clip>.mp4   H.264 yuv420p, 25 fps, frame_size² + AAC mono audio
    OUT/audio/<speaker>/<clip>.wav   16-bit PCM mono (audio-only clips)
    OUT/manifest.csv                 path, speaker, label, valence, arousal, dominance, split
    OUT/synth.json                   format, config, seed, speakers, counts

The voice is a source-filter synthesiser (Rosenberg glottal pulses at an f0 contour plus aspiration
noise, through Klatt formant resonators, one vowel per syllable); each emotion sets pitch level and
range, syllable rate, loudness, phonation (open quotient, breathiness, jitter, shimmer) and pauses.
The face is `skimage.data.astronaut()`, re-coloured and reshaped per speaker, with per-emotion local
warps (mouth corners, brows, lids) and a jaw warp whose opening follows the audio energy of each
640-sample (40 ms) frame. A per-clip intensity scales how far a clip moves from neutral, in the
signal and in its valence / arousal / dominance, so classes overlap but stay learnable.

Every clip draws from its own RNG seeded by (seed, speaker, clip), so any number of worker processes
produce the same files as a serial run.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import logging
import multiprocessing
import os
import sys
import time
import wave
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vqmae import __version__
from vqmae.config import SynthConfig
from vqmae.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "vqmae-synth/1"
FPS = 25
MANIFEST_COLUMNS = ("path", "speaker", "label", "valence", "arousal", "dominance", "split")
AAC_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000})
ProgressFn = Callable[[int, int], None]


class SynthError(ValueError):
    """A configuration the generator cannot honour, or an output directory it must not touch."""


# --------------------------------------------------------------------------------------------------
# Emotion profiles
# --------------------------------------------------------------------------------------------------

# (x, y, dx, dy, sigma) in astronaut() pixel coordinates: content near (x, y) moves by (dx, dy).
Handle = tuple[float, float, float, float, float]


@dataclass(frozen=True)
class Emotion:
    pitch_st: float  # pitch level, semitones above the speaker's base
    range_st: float  # height of word accents, semitones
    rate: float  # syllables per second
    loud_db: float  # speech level relative to neutral
    open_quotient: float  # low = pressed / harsh (strong harmonics), high = breathy / soft
    breath: float  # aspiration noise relative to the voiced source
    jitter: float  # relative f0 perturbation
    shimmer: float  # relative per-period amplitude perturbation
    formant: float  # formant frequency scale (smiling raises, sad lowers)
    pause: float  # pause length scale between words
    tremor: float  # 6 Hz pitch tremor depth, semitones
    mouth: float  # jaw opening gain
    head: float  # head-motion amplitude gain
    jaw: float  # jaw opening held through the clip (surprise)
    vad: tuple[float, float, float]  # valence, arousal, dominance
    face: tuple[Handle, ...] = ()


# Landmarks of skimage.data.astronaut() (512 × 512), read off the image.
_EYE = ((202.0, 101.0), (247.0, 103.5))
_BROW_IN = ((216.0, 91.0), (236.0, 93.0))
_BROW_MID = ((205.0, 88.0), (247.0, 92.0))
_BROW_OUT = ((194.0, 89.0), (259.0, 95.0))
_MOUTH = ((204.0, 140.0), (244.0, 141.0))
_CHEEK = ((195.0, 127.0), (253.0, 129.0))
_UPPER_LIP = (224.0, 139.0)
_LOWER_LIP = (224.0, 154.0)
_NOSE = (224.0, 128.0)
_CHIN = (224.0, 175.0)
_FACE_CENTRE = (224.0, 120.0)
_HALF_VIEW = 100.0  # half the astronaut-pixel side shown in a frame at speaker scale 1
# Lip gap between the upper teeth and the lower lip: y = _GAP_Y - _GAP_CURVE * (dx / 20)² (smile).
_GAP_X, _GAP_Y, _GAP_CURVE, _GAP_HALF_W = 224.0, 149.0, 8.0, 21.0
_GAP_BAND = 2.0  # astronaut px of dark mouth interior painted along the gap; the jaw warp stretches it
_JAW_DROP = 9.0  # astronaut px the lower lip drops at full opening
_JAW_HALF_W = 25.0


def _pair(points, d: tuple[float, float], sigma: float) -> tuple[Handle, Handle]:
    """Mirror-symmetric handles: `d` is the displacement of the image-left point."""
    (xl, yl), (xr, yr) = points
    return (xl, yl, d[0], d[1], sigma), (xr, yr, -d[0], d[1], sigma)


def _lids(dy: float) -> tuple[Handle, Handle]:
    return _pair(((_EYE[0][0], _EYE[0][1] - 4), (_EYE[1][0], _EYE[1][1] - 4)), (0.0, dy), 4.0)


EMOTIONS: dict[str, Emotion] = {
    "neutral": Emotion(0.0, 2.5, 4.4, 0.0, 0.60, 0.06, 0.005, 0.03, 1.00, 1.0, 0.0, 1.0, 1.0, 0.0,
                       (0.0, 0.0, 0.0),
                       _pair(_MOUTH, (0.5, 2.5), 7.0)),
    "happy": Emotion(3.0, 6.0, 5.0, 2.0, 0.55, 0.04, 0.006, 0.04, 1.05, 0.9, 0.0, 1.1, 1.2, 0.0,
                     (0.7, 0.5, 0.3),
                     _pair(_MOUTH, (-2.0, -4.0), 8.0) + _pair(_CHEEK, (0.0, -2.5), 10.0)
                     + _pair(((202.0, 106.0), (247.0, 108.5)), (0.0, -1.5), 4.0)),
    "sad": Emotion(-2.5, 1.0, 3.1, -7.0, 0.75, 0.22, 0.006, 0.04, 0.96, 1.7, 0.0, 0.7, 0.6, 0.0,
                   (-0.6, -0.5, -0.4),
                   _pair(_MOUTH, (1.5, 5.0), 8.0) + _pair(_BROW_IN, (0.0, -3.5), 6.0)
                   + _pair(_BROW_OUT, (0.0, 2.0), 6.0) + _lids(1.5)
                   + ((*_LOWER_LIP, 0.0, -1.5, 6.0),)),
    "angry": Emotion(2.5, 4.0, 5.8, 7.0, 0.40, 0.06, 0.015, 0.12, 1.06, 0.7, 0.0, 1.3, 1.3, 0.0,
                     (-0.6, 0.7, 0.6),
                     _pair(_BROW_IN, (3.0, 4.5), 7.0) + _pair(_BROW_MID, (1.0, 3.0), 8.0)
                     + _pair(_MOUTH, (2.5, 1.0), 6.0) + ((*_LOWER_LIP, 0.0, -2.0, 6.0),)),
    "fearful": Emotion(5.0, 3.0, 5.5, -1.0, 0.65, 0.15, 0.02, 0.06, 1.03, 1.1, 0.5, 0.9, 1.1, 0.0,
                       (-0.6, 0.6, -0.5),
                       _pair(_BROW_IN, (1.5, -4.0), 7.0) + _pair(_BROW_OUT, (0.0, -2.0), 7.0)
                       + _lids(-1.5) + _pair(_MOUTH, (-3.0, 1.5), 7.0)),
    "surprised": Emotion(4.0, 8.0, 4.5, 3.0, 0.55, 0.06, 0.006, 0.04, 1.05, 1.0, 0.0, 1.0, 1.1, 0.35,
                         (0.3, 0.8, 0.0),
                         _pair(_BROW_IN, (0.0, -5.5), 9.0) + _pair(_BROW_OUT, (0.0, -5.0), 9.0)
                         + _lids(-1.5)),
    "disgust": Emotion(-1.0, 3.0, 3.5, -1.0, 0.55, 0.10, 0.01, 0.08, 0.98, 1.3, 0.0, 0.8, 0.9, 0.0,
                       (-0.6, 0.2, 0.3),
                       ((*_UPPER_LIP, 0.0, -2.5, 6.0), (*_NOSE, 0.0, -1.5, 6.0))
                       + _pair(_BROW_IN, (1.5, 2.5), 7.0) + _pair(_MOUTH, (0.5, 2.5), 7.0)),
    "calm": Emotion(-1.0, 1.8, 3.8, -4.0, 0.68, 0.10, 0.004, 0.03, 1.00, 1.3, 0.0, 0.8, 0.7, 0.0,
                    (0.4, -0.6, 0.1),
                    _pair(_MOUTH, (-0.5, -1.5), 7.0) + _lids(1.2)),
}

# Vowel formants (Hz, adult male, Peterson & Barney) and bandwidths for the Klatt cascade.
_VOWELS = np.array([[730, 1090, 2440, 3300], [530, 1840, 2480, 3300], [270, 2290, 3010, 3500],
                    [570, 840, 2410, 3300], [300, 870, 2240, 3300], [660, 1720, 2410, 3300],
                    [490, 1350, 1690, 3300]], dtype=np.float64)
_BANDWIDTHS = np.array([80.0, 100.0, 140.0, 200.0, 300.0])
_F5 = 4500.0  # fixed fifth formant: keeps energy above 4 kHz that the 4-pole cascade would cut


# --------------------------------------------------------------------------------------------------
# Plan: speakers and clips
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speaker:
    index: int
    name: str
    f0: float  # base pitch, Hz
    formant_scale: float  # vocal tract length: higher voices get higher formants
    rate_scale: float
    breath: float
    mirror: bool
    scale: float  # face size in the frame
    aspect: float  # horizontal stretch of the whole face
    offset: tuple[float, float]  # face position, fraction of the frame side
    skin: tuple[float, float, float]  # per-channel gains
    hair: tuple[float, float, float]
    background: tuple[tuple[float, float, float], tuple[float, float, float]]  # top, bottom RGB
    chin: float  # chin length change, astronaut px
    eye_spread: float  # eye distance change, astronaut px


@dataclass(frozen=True)
class ClipSpec:
    speaker: int
    clip: int
    kind: str  # "video" or "audio"
    label: str

    @property
    def path(self) -> str:
        name = speaker_name(self.speaker)
        ext = "mp4" if self.kind == "video" else "wav"
        return f"{self.kind}/{name}/{name}_{self.clip:03d}.{ext}"


@dataclass(frozen=True)
class ClipRecord:
    path: str
    speaker: str
    label: str
    valence: float
    arousal: float
    dominance: float
    seconds: float
    kind: str


def validate(cfg: SynthConfig) -> None:
    """Raise `SynthError` naming the first setting the generator cannot honour."""
    unknown = [e for e in cfg.emotions if e not in EMOTIONS]
    checks = [
        (cfg.n_speakers >= 1, f"synth.n_speakers={cfg.n_speakers}: need at least one speaker"),
        (cfg.clips_per_speaker >= 0 and cfg.audio_only_per_speaker >= 0,
         "synth.clips_per_speaker and synth.audio_only_per_speaker must be >= 0"),
        (cfg.clips_per_speaker + cfg.audio_only_per_speaker >= 1, "no clips requested"),
        (len(cfg.emotions) >= 1, "synth.emotions is empty"),
        (not unknown, f"synth.emotions: unknown {unknown}; known: {sorted(EMOTIONS)}"),
        (len(set(cfg.emotions)) == len(cfg.emotions), f"synth.emotions repeats a class: {cfg.emotions}"),
        (0 < cfg.min_seconds <= cfg.max_seconds,
         f"need 0 < synth.min_seconds ({cfg.min_seconds}) <= synth.max_seconds ({cfg.max_seconds})"),
        (cfg.frame_size >= 64 and cfg.frame_size % 2 == 0,
         f"synth.frame_size={cfg.frame_size}: need an even size >= 64 (yuv420p halves it)"),
        (cfg.audio_rate in AAC_RATES, f"synth.audio_rate={cfg.audio_rate}: AAC needs one of {sorted(AAC_RATES)}"),
        (cfg.seed >= 0, f"synth.seed={cfg.seed}: must be >= 0"),
        (cfg.variability >= 0, f"synth.variability={cfg.variability}: must be >= 0"),
        (0 <= cfg.expressiveness <= 4, f"synth.expressiveness={cfg.expressiveness}: must be in [0, 4]"),
        (0 <= cfg.speaker_spread <= 1, f"synth.speaker_spread={cfg.speaker_spread}: must be in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise SynthError(message)


def _rng(cfg: SynthConfig, tag: int, speaker: int, clip: int) -> np.random.Generator:
    # Fixed-length entropy: SeedSequence treats trailing zeros as absent, so [s, 1] == [s, 1, 0].
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, tag, speaker, clip]))


def clip_rng(cfg: SynthConfig, spec: ClipSpec) -> np.random.Generator:
    """The clip's own stream: its parameters, then its voice, are drawn from it in that order."""
    return _rng(cfg, 1, spec.speaker, spec.clip)


def speaker_name(index: int) -> str:
    return f"spk{index + 1:02d}"


def make_speaker(cfg: SynthConfig, index: int) -> Speaker:
    """Voice and appearance of speaker `index`; voices are spread evenly over 100-230 Hz.

    `cfg.speaker_spread` pulls every trait toward a middle speaker (the draws are the same, so a
    corpus at spread 1 is unchanged): at 0 all speakers share one face and voice."""
    rng = _rng(cfg, 0, index, 0)
    k = cfg.speaker_spread

    def toward(mid, drawn):
        return float(drawn) if k == 1 else float(mid + k * (drawn - mid))

    pos = (index + rng.uniform(0.2, 0.8)) / cfg.n_speakers  # in (0, 1), rising with the index
    hue = rng.uniform(0, 1, size=2)
    formant_noise = rng.normal(0, 0.02)
    rate, breath = rng.uniform(0.9, 1.1), rng.uniform(0.0, 0.06)
    scale, aspect = rng.uniform(0.88, 1.08), rng.uniform(0.93, 1.07)
    offset = (rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04))
    skin = rng.uniform(0.82, 1.12, size=3)
    hair = _HAIR[int(rng.integers(len(_HAIR)))]
    chin, eye_spread = rng.uniform(-3.0, 3.0), rng.uniform(-1.5, 1.5)
    pos = toward(0.5, pos)
    return Speaker(
        index=index, name=speaker_name(index), f0=float(100.0 * 2.3 ** pos),
        formant_scale=float(0.92 + 0.22 * pos + k * formant_noise),
        rate_scale=toward(1.0, rate), breath=toward(0.03, breath),
        mirror=bool(index % 2) and k >= 0.5, scale=toward(0.98, scale), aspect=toward(1.0, aspect),
        offset=(toward(0.0, offset[0]), toward(0.0, offset[1])),
        skin=tuple(toward(0.97, g) for g in skin),
        hair=tuple(toward(1.0, g) for g in hair),
        background=(_hue_rgb(hue[0], 0.35 * k, 0.85), _hue_rgb(hue[1], 0.5 * k, 0.45)),
        chin=toward(0.0, chin), eye_spread=toward(0.0, eye_spread),
    )


# Per-channel gains on the photo's light brown: dark brown, black, blonde, auburn, ash, as is.
_HAIR = ((0.55, 0.45, 0.4), (0.3, 0.28, 0.3), (1.15, 1.08, 0.85), (1.0, 0.62, 0.45), (0.85, 0.85, 0.9),
         (1.0, 1.0, 1.0))


def _hue_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    rgb = np.clip(np.abs((h * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return tuple(float(c) for c in 255 * v * (1 - s + s * rgb))


def plan(cfg: SynthConfig) -> list[ClipSpec]:
    """Every clip of the corpus (video first, then audio-only); labels cycle through the classes
    continuing from one speaker to the next, so counts stay balanced overall and per speaker."""
    n = len(cfg.emotions)
    specs = []
    for spk in range(cfg.n_speakers):
        for c in range(cfg.clips_per_speaker):
            specs.append(ClipSpec(spk, c, "video", cfg.emotions[(spk * cfg.clips_per_speaker + c) % n]))
        for j in range(cfg.audio_only_per_speaker):
            label = cfg.emotions[(spk * cfg.audio_only_per_speaker + j) % n]
            specs.append(ClipSpec(spk, cfg.clips_per_speaker + j, "audio", label))
    return specs


# --------------------------------------------------------------------------------------------------
# Per-clip parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipParams:
    n_frames: int
    intensity: float
    emo: Emotion  # the class profile moved toward neutral by `intensity`, plus per-clip jitter
    vad: tuple[float, float, float]


def clip_params(cfg: SynthConfig, spec: ClipSpec, rng: np.random.Generator) -> ClipParams:
    """Length, intensity, jittered profile and dimensional labels of one clip.

    intensity ~ U(0.55, 1.15) at variability 1 moves every cue (and valence / arousal / dominance)
    that far from neutral, so a weak angry clip sits near a strong neutral one."""
    seconds = rng.uniform(cfg.min_seconds, cfg.max_seconds)
    n_frames = max(1, int(round(seconds * FPS)))
    j = cfg.variability
    intensity = float(np.clip(1.0 + j * rng.uniform(-0.45, 0.15), 0.1, 1.5))
    gain = intensity * cfg.expressiveness  # how far the signal moves; the labels use `intensity`
    base, target = EMOTIONS["neutral"], EMOTIONS[spec.label]
    mix = {f.name: getattr(base, f.name) + gain * (getattr(target, f.name) - getattr(base, f.name))
           for f in dataclasses.fields(Emotion) if f.name not in ("vad", "face")}
    noise = rng.standard_normal(6) * j
    mix["pitch_st"] += 1.0 * noise[0]
    mix["range_st"] *= float(np.exp(0.2 * noise[1]))
    mix["rate"] *= float(np.exp(0.1 * noise[2]))
    mix["loud_db"] += 1.5 * noise[3]
    mix["open_quotient"] = float(np.clip(mix["open_quotient"] + 0.03 * noise[4], 0.3, 0.85))
    mix["pause"] *= float(np.exp(0.15 * noise[5]))
    if cfg.expressiveness > 1:  # extrapolating past the written profiles: keep them physical
        for name, (lo, hi) in _EXTRAPOLATION_LIMITS.items():
            mix[name] = float(np.clip(mix[name], lo, hi))
    face = tuple(_scaled_handle(h, gain) for h in target.face)
    emo = Emotion(**mix, vad=target.vad, face=face)
    vad = np.clip(intensity * np.array(target.vad) + 0.08 * j * rng.standard_normal(3), -1, 1)
    return ClipParams(n_frames, intensity, emo, tuple(float(round(v, 3)) for v in vad))


# Physically sensible ranges for the profile fields, so an expressiveness above 1 cannot produce
# a negative rate, a closed glottis or a folded face warp.
_EXTRAPOLATION_LIMITS = {
    "rate": (2.0, 8.0), "open_quotient": (0.3, 0.85), "breath": (0.0, 0.5), "jitter": (0.0, 0.04),
    "shimmer": (0.0, 0.25), "formant": (0.85, 1.2), "pause": (0.3, 3.0), "tremor": (0.0, 1.5),
    "mouth": (0.3, 1.8), "head": (0.2, 2.0), "jaw": (0.0, 0.6), "loud_db": (-20.0, 15.0),
    "pitch_st": (-8.0, 10.0), "range_st": (0.5, 12.0),  # accents stay upward, pitch within ~1.5 octaves
}


def _scaled_handle(h: Handle, gain: float) -> Handle:
    """A face handle's displacement times `gain`, capped at 1.5 σ: the backward map p - d·G(p)
    folds (content crosses over itself) once |d| exceeds about 1.65 σ."""
    x, y, dx, dy, s = h
    k = min(gain, 1.5 * s / max(float(np.hypot(dx, dy)), 1e-9))
    return (x, y, dx * k, dy * k, s)


# --------------------------------------------------------------------------------------------------
# Voice: source-filter synthesis
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Syllable:
    start: int  # sample of the vowel onset
    length: int  # vowel samples
    vowel: int
    stress: float
    consonant: int  # -1: none, else a fricative/burst type


def syllable_plan(n: int, fs: int, emo: Emotion, spk: Speaker, rng: np.random.Generator) -> list[Syllable]:
    """Words of 1-3 syllables separated by pauses, filling `n` samples after a short lead-in."""
    rate = emo.rate * spk.rate_scale
    t = rng.uniform(0.08, 0.2)
    end = n / fs - rng.uniform(0.08, 0.2)
    out = []
    while True:
        n_syl = int(rng.integers(1, 4))
        stressed = int(rng.integers(0, n_syl))
        for k in range(n_syl):
            dur = float(np.clip(rng.normal(1.0, 0.18), 0.6, 1.5)) / rate
            if t + dur > end:
                return out
            cons = int(rng.integers(0, 4)) if rng.random() < 0.6 else -1
            out.append(Syllable(int(t * fs), int(dur * fs), int(rng.integers(0, len(_VOWELS))),
                                1.0 + 0.35 * (k == stressed), cons))
            t += dur
        t += emo.pause * rng.uniform(0.06, 0.22)


def f0_contour(n: int, fs: int, syllables: list[Syllable], emo: Emotion, spk: Speaker,
               rng: np.random.Generator) -> np.ndarray:
    """Pitch in Hz per sample: level + declination + word accents + drift + tremor + jitter.  # [n]"""
    hop = 80
    t = np.arange(n // hop + 2) * hop / fs  # control points at 200 Hz
    dur = n / fs
    st = emo.pitch_st - 0.4 * emo.range_st * (t / dur - 0.5)
    for syl in syllables:
        if syl.stress > 1.0:
            centre = (syl.start + 0.4 * syl.length) / fs
            height = emo.range_st * rng.uniform(0.4, 1.0) * (1 if rng.random() < 0.85 else -0.6)
            st += height * np.exp(-0.5 * ((t - centre) / (0.6 * syl.length / fs)) ** 2)
    drift = np.cumsum(rng.standard_normal(len(t))) * 0.04
    st += drift - drift.mean()
    st += emo.tremor * np.sin(2 * np.pi * 6.0 * t + rng.uniform(0, 2 * np.pi))
    st += emo.jitter * 17.3 * rng.standard_normal(len(t))  # 17.3 st per unit relative f0 change
    return spk.f0 * 2.0 ** (np.interp(np.arange(n) / fs, t, st) / 12.0)


def glottal_source(f0: np.ndarray, fs: int, emo: Emotion, spk: Speaker,
                   rng: np.random.Generator) -> np.ndarray:
    """Differentiated Rosenberg pulses (with shimmer) plus pulse-synchronous aspiration.  # [n]"""
    phase = np.cumsum(f0 / fs)
    frac = phase % 1.0
    period = phase.astype(np.int64)
    tp, tn = 0.65 * emo.open_quotient, 0.35 * emo.open_quotient
    g = np.where(frac < tp, 0.5 * (1 - np.cos(np.pi * frac / tp)),
                 np.where(frac < tp + tn, np.cos(0.5 * np.pi * np.minimum(frac - tp, tn) / tn), 0.0))
    amps = 1.0 + emo.shimmer * rng.standard_normal(period[-1] + 2)
    voiced = np.diff(g, prepend=0.0) * (fs / f0) * amps[period]
    noise = np.diff(rng.standard_normal(len(f0) + 1))
    return voiced + (emo.breath + spk.breath) * 3.0 * (0.3 + g) * noise


@functools.lru_cache(maxsize=64)
def _formant_sos(formants: tuple[float, ...], fs: int) -> np.ndarray:
    """Klatt resonator cascade (unit gain at DC) as second-order sections.  # [5, 6]"""
    sos = []
    for f, bw in zip(formants + (_F5,), _BANDWIDTHS):
        f = min(f, 0.45 * fs)
        c = -np.exp(-2 * np.pi * bw / fs)
        b = 2 * np.exp(-np.pi * bw / fs) * np.cos(2 * np.pi * f / fs)
        sos.append([1 - b - c, 0.0, 0.0, 1.0, -b, -c])
    return np.array(sos)


@functools.lru_cache(maxsize=16)
def _consonant_sos(kind: int, fs: int) -> np.ndarray:
    from scipy.signal import butter

    bands = ((3500, 7000), (2000, 4000), (1200, 6000), (500, 2500))[kind]
    high = min(bands[1], 0.45 * fs)
    return butter(2, (min(bands[0], 0.5 * high), high), btype="bandpass", fs=fs, output="sos")


def _envelope(length: int, attack: float, release: float) -> np.ndarray:
    """Raised-cosine attack and release around a slowly decaying sustain.  # [length]"""
    env = np.linspace(1.0, 0.75, length)
    a, r = max(1, int(attack * length)), max(1, int(release * length))
    env[:a] *= 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, a))
    env[-r:] *= 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, r))
    return env


def synth_voice(n: int, fs: int, emo: Emotion, spk: Speaker, rng: np.random.Generator) -> np.ndarray:
    """One utterance of `n` samples, float32 in (-1, 1), level set by the emotion.  # [n]"""
    from scipy.signal import sosfilt

    syllables = syllable_plan(n, fs, emo, spk, rng)
    f0 = f0_contour(n, fs, syllables, emo, spk, rng)
    source = glottal_source(f0, fs, emo, spk, rng)
    out = np.zeros(n + fs // 10)
    scale = spk.formant_scale * np.array([emo.formant ** 1.6, emo.formant, emo.formant, 1.0])
    for syl in syllables:
        s0, s1 = syl.start, syl.start + syl.length
        seg = source[s0:s1] * _envelope(syl.length, 0.15, 0.3) * syl.stress
        sos = _formant_sos(tuple(float(f) for f in _VOWELS[syl.vowel] * scale), fs)
        ring = fs // 40  # let the resonators decay instead of cutting them off
        out[s0:s1 + ring] += sosfilt(sos, np.concatenate([seg, np.zeros(ring)]))
        if syl.consonant >= 0:
            c_len = int(rng.uniform(0.03, 0.07) * fs)
            c0 = max(0, s0 - c_len + fs // 100)
            burst = sosfilt(_consonant_sos(syl.consonant, fs), rng.standard_normal(c_len))
            out[c0:c0 + c_len] += 0.3 * syl.stress * burst * _envelope(c_len, 0.3, 0.4)
    return _set_level(out[:n], emo.loud_db)


def _set_level(x: np.ndarray, loud_db: float) -> np.ndarray:
    """Scale speech to -24 dBFS RMS (+ the emotion's offset); keep peaks below -1 dBFS."""
    active = x[np.abs(x) > 1e-4]
    rms = np.sqrt(np.mean(active ** 2)) if active.size else 1.0
    x = x * (10 ** ((-24.0 + loud_db) / 20) / max(rms, 1e-9))
    peak = np.abs(x).max(initial=0.0)
    if peak > 0.89:
        x *= 0.89 / peak
    return x.astype(np.float32)


def frame_energy(audio: np.ndarray, hop: int) -> np.ndarray:
    """RMS of each video frame's audio (`hop` samples, 640 at 16 kHz and 25 fps).  # [T]"""
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop).astype(np.float64)
    return np.sqrt((frames ** 2).mean(axis=1))


def mouth_opening(energy: np.ndarray, emo: Emotion) -> np.ndarray:
    """Jaw opening in [0, 1.3] per frame: the clip's energy relative to its loud frames.  # [T]"""
    ref = np.quantile(energy, 0.95) if energy.size else 1.0
    level = np.clip(energy / max(ref, 1e-9), 0.0, 1.0) ** 0.8
    return np.clip(emo.jaw + emo.mouth * level * (1 - emo.jaw), 0.0, 1.3)


# --------------------------------------------------------------------------------------------------
# Face
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut().astype(np.float32)  # [512, 512, 3]


def _ellipse(xx: np.ndarray, yy: np.ndarray, c: tuple[float, float], ax: tuple[float, float],
             feather: float) -> np.ndarray:
    """Soft inside-ellipse mask: 1 inside, 0 outside, a ramp about `feather` px wide."""
    r = np.sqrt(((xx - c[0]) / ax[0]) ** 2 + ((yy - c[1]) / ax[1]) ** 2)
    return np.clip((1 - r) * min(ax) / feather + 0.5, 0.0, 1.0)


@functools.lru_cache(maxsize=8)
def speaker_image(spk: Speaker) -> np.ndarray:
    """astronaut() re-coloured for one speaker, mouth interior painted along the lip gap.  # [512, 512, 3] uint8"""
    import cv2

    img = _astronaut().copy()
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]].astype(np.float32)
    face = _ellipse(xx, yy, (224.0, 128.0), (44.0, 58.0), 6.0)
    suit = _ellipse(xx, yy, (212.0, 300.0), (118.0, 150.0), 8.0)
    hair = np.clip(_ellipse(xx, yy, (227.5, 93.0), (75.0, 80.0), 6.0) - face, 0, 1)
    bg = _backdrop_mask(img) * (1 - np.maximum(face, suit))  # the photo's pale grey studio backdrop
    hair = (hair * (1 - bg))[..., None]
    img = img * (1 - hair) + img * hair * np.array(spk.hair, np.float32)
    img *= np.array(spk.skin, np.float32) ** (1 - bg[..., None])
    top, bottom = (np.array(c, np.float32) for c in spk.background)
    t = (yy / img.shape[0])[..., None]
    backdrop = (top * (1 - t) + bottom * t) * (0.8 + 0.2 * img.mean(axis=2, keepdims=True) / 200)
    bg = cv2.GaussianBlur(bg, (0, 0), 1.5)[..., None]
    img = img * (1 - bg) + backdrop * bg
    _paint_mouth(img, xx, yy)
    return np.clip(img, 0, 255).astype(np.uint8)


def _backdrop_mask(img: np.ndarray) -> np.ndarray:
    """Soft mask of bright, unsaturated pixels (the backdrop; face and suit are masked out after)."""
    hi, lo = img.max(axis=2), img.min(axis=2)
    sat = (hi - lo) / np.maximum(hi, 1.0)
    return np.clip((0.2 - sat) / 0.08, 0, 1) * np.clip((hi - 120) / 40, 0, 1)


def _paint_mouth(img: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> None:
    """Dark band just below the teeth: the jaw warp stretches it into the open mouth."""
    x0, x1, y0, y1 = 195, 254, 135, 156
    dx = xx[y0:y1, x0:x1] - _GAP_X
    d = yy[y0:y1, x0:x1] - (_GAP_Y - _GAP_CURVE * (dx / 20) ** 2)
    across = np.clip(1 - np.abs(dx) / _GAP_HALF_W, 0, 1) ** 0.5
    inside = np.clip(np.minimum(d + 0.5, _GAP_BAND + 0.5 - d), 0, 1)
    alpha = (across * inside)[..., None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + np.array([45, 12, 16], np.float32) * alpha


def _apply_handles(ax: np.ndarray, ay: np.ndarray, handles) -> tuple[np.ndarray, np.ndarray]:
    """Backward map for local moves: sample from p - d·G(p) so content near each handle moves by d."""
    ox, oy = ax.copy(), ay.copy()
    for x, y, dx, dy, s in handles:
        g = np.exp(-((ax - x) ** 2 + (ay - y) ** 2) / (2 * s * s))
        ox -= dx * g
        oy -= dy * g
    return ox, oy


def static_map(spk: Speaker, emo: Emotion, size: int, margin: int) -> np.ndarray:
    """Astronaut coordinates for every canonical pixel of a clip (placement, speaker shape,
    expression), on a grid `margin` px wider than the frame on each side.  # [S+2m, S+2m, 2] float32"""
    n = size + 2 * margin
    v, u = np.mgrid[:n, :n].astype(np.float32) - margin
    k = 2 * _HALF_VIEW / (size * spk.scale)
    cx, cy = size / 2 + spk.offset[0] * size, size / 2 + spk.offset[1] * size
    ax = _FACE_CENTRE[0] + (-1 if spk.mirror else 1) * (u - cx) * k / spk.aspect
    ay = _FACE_CENTRE[1] + (v - cy) * k
    shape = ((*_CHIN, 0.0, spk.chin, 16.0),) + _pair(_EYE, (-spk.eye_spread, 0.0), 9.0)
    ax, ay = _apply_handles(ax, ay, shape + emo.face)
    return np.stack([ax, ay], axis=-1)


def head_motion(n_frames: int, size: int, margin: int, gain: float, rng: np.random.Generator) -> np.ndarray:
    """Per-frame affine from output pixels to canonical-grid pixels: a slow sway and nod of a
    degree or two about the neck.  # [T, 2, 3]"""
    t = np.arange(n_frames)[:, None] / FPS
    freq = rng.uniform(0.15, 0.7, size=(1, 8))
    phase = rng.uniform(0, 2 * np.pi, size=(1, 8))
    waves = np.sin(2 * np.pi * freq * t + phase)  # [T, 8]
    theta = np.deg2rad(1.5 * gain) * waves[:, :2].mean(axis=1)
    shift = 0.012 * size * gain * waves[:, 2:6].reshape(-1, 2, 2).mean(axis=2)  # [T, 2]
    zoom = 1 + 0.012 * gain * waves[:, 6]
    cos, sin = np.cos(theta) / zoom, np.sin(theta) / zoom
    pivot = np.array([size / 2, 0.85 * size])
    out = np.empty((n_frames, 2, 3))
    out[:, 0, :2] = np.stack([cos, -sin], axis=1)
    out[:, 1, :2] = np.stack([sin, cos], axis=1)
    rot_pivot = np.einsum("tij,j->ti", out[:, :, :2], pivot)
    out[:, :, 2] = pivot - rot_pivot + shift + margin
    return out


def jaw_warp(amap: np.ndarray, opening: float) -> np.ndarray:
    """Drop the lower lip and jaw by `opening` (in astronaut coordinates, in place).  # [H, W, 2]"""
    ax, ay = amap[..., 0], amap[..., 1]
    dx = ax - _GAP_X
    across = np.clip(1 - (dx / _JAW_HALF_W) ** 2, 0, 1) ** 2
    drop = opening * _JAW_DROP * across
    d = ay - (_GAP_Y - _GAP_CURVE * (np.minimum(np.abs(dx), _GAP_HALF_W) / 20) ** 2)
    ramp = np.clip(d / (_GAP_BAND + drop + 1e-6), 0, 1)
    chin = d - (_CHIN[1] - _GAP_Y) - drop
    release = 1 - np.clip(chin / 28.0, 0, 1)
    amap[..., 1] = ay - drop * ramp * release ** 2 * (3 - 2 * release)
    return amap


class FaceRenderer:
    """Frames of one clip: static map → head motion → jaw warp → sample the speaker's image."""

    def __init__(self, spk: Speaker, emo: Emotion, size: int):
        self.size = size
        self.margin = max(4, size // 10)
        self.image = speaker_image(spk)
        self.map = static_map(spk, emo, size, self.margin)
        self.window = self._jaw_window()

    def _jaw_window(self) -> tuple[slice, slice]:
        """Output rows/cols that can show the jaw, whatever the head motion (pads the bounding box)."""
        inner = self.map[self.margin:-self.margin, self.margin:-self.margin]
        near = ((np.abs(inner[..., 0] - _GAP_X) < _JAW_HALF_W + 2)
                & (inner[..., 1] > _GAP_Y - 12) & (inner[..., 1] < _CHIN[1] + 40))
        rows, cols = np.nonzero(near)
        pad = self.margin
        if rows.size == 0:
            return slice(0, 0), slice(0, 0)
        return (slice(max(0, rows.min() - pad), rows.max() + pad + 1),
                slice(max(0, cols.min() - pad), cols.max() + pad + 1))

    def render(self, affine: np.ndarray, opening: float) -> np.ndarray:
        """One RGB frame.  # [S, S, 3] uint8"""
        import cv2

        amap = cv2.warpAffine(self.map, affine, (self.size, self.size),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
        rows, cols = self.window
        amap[rows, cols] = jaw_warp(amap[rows, cols], opening)
        return cv2.remap(self.image, amap[..., 0], amap[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT)


def mouth_box(cfg: SynthConfig, speaker: int) -> tuple[int, int, int, int]:
    """Output-pixel box (y0, y1, x0, x1) around the lips of `speaker`, head at rest: where the jaw
    opening shows."""
    spk = make_speaker(cfg, speaker)
    m = static_map(spk, EMOTIONS["neutral"], cfg.frame_size, 0)
    near = ((np.abs(m[..., 0] - _GAP_X) < _GAP_HALF_W - 4) & (m[..., 1] > _GAP_Y - 6)
            & (m[..., 1] < _GAP_Y + 16))
    rows, cols = np.nonzero(near)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


# --------------------------------------------------------------------------------------------------
# One clip
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    audio: np.ndarray  # [n_frames * hop] float32
    opening: np.ndarray  # [n_frames]
    params: ClipParams


def make_clip(cfg: SynthConfig, spec: ClipSpec) -> Clip:
    """Audio and per-frame mouth opening of one clip (frames are rendered while encoding)."""
    rng = clip_rng(cfg, spec)
    params = clip_params(cfg, spec, rng)
    hop = cfg.audio_rate // FPS
    spk = make_speaker(cfg, spec.speaker)
    audio = synth_voice(params.n_frames * hop, cfg.audio_rate, params.emo, spk, rng)
    return Clip(audio, mouth_opening(frame_energy(audio, hop), params.emo), params)


def render_frames(cfg: SynthConfig, spec: ClipSpec, clip: Clip):
    """Yield the clip's RGB frames.  # each [S, S, 3] uint8"""
    spk = make_speaker(cfg, spec.speaker)
    renderer = FaceRenderer(spk, clip.params.emo, cfg.frame_size)
    rng = _rng(cfg, 2, spec.speaker, spec.clip)
    motion = head_motion(len(clip.opening), cfg.frame_size, renderer.margin, clip.params.emo.head, rng)
    for affine, opening in zip(motion, clip.opening):
        yield renderer.render(affine, float(opening))


def _pcm16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """16-bit PCM mono WAV.  audio: [n] float in [-1, 1]"""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(_pcm16(audio).tobytes())
    return buf.getvalue()


def mp4_bytes(frames, audio: np.ndarray, rate: int, size: int) -> bytes:
    """H.264 yuv420p at 25 fps plus AAC mono.  frames: iterable of [S, S, 3] uint8; audio: [n]"""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as box:
        # threads=1: x264 output then depends on nothing but the frames (reproducible corpus).
        video = box.add_stream("libx264", rate=FPS, options={"preset": "superfast", "crf": "18", "threads": "1"})
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        # The fast AAC coder: 3x quicker than twoloop and closer to the source on this voice (55 dB SNR).
        sound = box.add_stream("aac", rate=rate, layout="mono", options={"aac_coder": "fast"})
        sound.bit_rate = 64000
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            box.mux(video.encode(frame))
        box.mux(video.encode())
        pcm = audio.astype(np.float32)
        for k in range(0, len(pcm), 1024):
            chunk = av.AudioFrame.from_ndarray(pcm[None, k:k + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = rate, k
            box.mux(sound.encode(chunk))
        box.mux(sound.encode())
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp name then rename: an interrupted run never leaves a half file under the final name.
    No fsync: a crash at worst loses whole clips, which a rerun with --force rewrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_clip(cfg: SynthConfig, spec: ClipSpec, out_dir: str | os.PathLike) -> ClipRecord:
    """Synthesise one clip and write its media file under `out_dir`."""
    clip = make_clip(cfg, spec)
    if spec.kind == "video":
        data = mp4_bytes(render_frames(cfg, spec, clip), clip.audio, cfg.audio_rate, cfg.frame_size)
    else:
        data = wav_bytes(clip.audio, cfg.audio_rate)
    _write_atomic(Path(out_dir) / spec.path, data)
    v, a, d = clip.params.vad
    return ClipRecord(spec.path, speaker_name(spec.speaker), spec.label, v, a, d,
                      clip.params.n_frames / FPS, spec.kind)


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one clip per process already fills the cores


def _job(args: tuple[SynthConfig, ClipSpec, str]) -> ClipRecord:
    cfg, spec, out_dir = args
    try:
        return write_clip(cfg, spec, out_dir)
    except Exception as e:
        raise SynthError(f"{Path(out_dir) / spec.path}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------


def synthesize(out_dir: str | os.PathLike, cfg: SynthConfig, workers: int | None = None,
               progress: ProgressFn | None = None, overwrite: bool = False) -> Path:
    """Write the corpus under `out_dir` and return the manifest path.

    `workers`: processes (default: CPU count; <= 1 runs in this process). `progress(done, total)` is
    called after each clip. A non-empty `out_dir` is refused unless `overwrite`; then clips of an
    earlier corpus that this one does not contain are removed (only .mp4/.wav under video/, audio/).
    """
    validate(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SynthError(f"{out}: directory is not empty (pass --force / overwrite=True to write into it)")
    specs = plan(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, {s.path for s in specs})
    t0 = time.perf_counter()
    records = _run_jobs(cfg, specs, out, workers, progress)
    records.sort(key=lambda r: r.path)
    manifest = out / "manifest.csv"
    atomic_write_bytes(manifest, manifest_bytes(records))
    atomic_write_json(out / "synth.json", _summary(cfg, records))
    log.info("synth: %d clips (%.1f s of media) in %s, %.1f s", len(records),
             sum(r.seconds for r in records), out, time.perf_counter() - t0)
    return manifest


def _remove_stale(out: Path, keep: set[str]) -> None:
    for sub in ("video", "audio"):
        for f in sorted((out / sub).rglob("*")) if (out / sub).is_dir() else []:
            rel = f.relative_to(out).as_posix()
            stale = f.suffix in (".mp4", ".wav") and rel not in keep
            if f.is_file() and (stale or f.name.endswith(".tmp")):
                f.unlink()
    for name in ("manifest.csv", "synth.json"):
        (out / name).unlink(missing_ok=True)  # a corpus without a manifest is visibly incomplete


def _run_jobs(cfg: SynthConfig, specs: list[ClipSpec], out: Path, workers: int | None,
              progress: ProgressFn | None) -> list[ClipRecord]:
    workers = min((os.cpu_count() or 1) if workers is None else workers, len(specs))
    jobs = [(cfg, s, str(out)) for s in specs]
    records: list[ClipRecord] = []

    def done(record: ClipRecord) -> None:
        records.append(record)
        if progress:
            progress(len(records), len(specs))

    if workers <= 1:
        for job in jobs:
            done(_job(job))
        return records
    # An executor, unlike Pool, fails instead of respawning workers that die while starting up.
    try:
        with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_worker_init) as pool:
            futures = [pool.submit(_job, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    done(future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool as e:
        raise SynthError(f"{out}: a worker process died ({e}); a script that calls synthesize() must "
                         "do so under `if __name__ == '__main__':` (spawned workers import it), "
                         "or pass workers=1") from None
    return records


def _mp_context() -> multiprocessing.context.BaseContext:
    """spawn everywhere. fork was faster to start but deadlocked when the parent had already run
    threaded code (torch's OpenMP pool, OpenCV's parallel_for, zarr's event loop): a child inherits
    their locks held and hangs in cv2/numpy calls (seen in the test suite). Spawned workers re-import
    the caller's __main__ (a couple of seconds via the CLI), hence the `__main__` guard."""
    return multiprocessing.get_context("spawn")


def manifest_bytes(records: list[ClipRecord]) -> bytes:
    """The CSV-manifest format (DESIGN.md §5): path relative to the corpus root, split left empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for r in records:
        writer.writerow([r.path, r.speaker, r.label, f"{r.valence:.3f}", f"{r.arousal:.3f}",
                         f"{r.dominance:.3f}", ""])
    return buf.getvalue().encode()


def _summary(cfg: SynthConfig, records: list[ClipRecord]) -> dict:
    def count(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in records:
            out[getattr(r, key)] = out.get(getattr(r, key), 0) + 1
        return dict(sorted(out.items()))

    return {
        "format": FORMAT,
        "version": __version__,
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "n_clips": len(records),
        "n_video": sum(r.kind == "video" for r in records),
        "n_audio": sum(r.kind == "audio" for r in records),
        "total_seconds": round(sum(r.seconds for r in records), 2),
        "per_label": count("label"),
        "per_speaker": count("speaker"),
        "speakers": [dataclasses.asdict(make_speaker(cfg, i)) for i in range(cfg.n_speakers)],
    }


def read_summary(out_dir: str | os.PathLike) -> dict:
    """The `synth.json` of a corpus written by `synthesize`."""
    import json

    path = Path(out_dir) / "synth.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SynthError(f"{path}: cannot read ({e})") from None
    if data.get("format") != FORMAT:
        raise SynthError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    return data
