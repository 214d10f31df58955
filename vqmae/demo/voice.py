"""Voice of the demo corpus: a source-filter speech synthesiser driven by an emotion profile.

Rosenberg glottal pulses at an f0 contour plus aspiration noise, through Klatt formant resonators,
one vowel per syllable; each emotion sets pitch level and range, syllable rate, loudness, phonation
(open quotient, breathiness, jitter, shimmer) and pauses. `frame_energy` and `mouth_opening` turn
the finished audio into the per-frame jaw opening that the face renderer follows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from vqmae.demo.profiles import Emotion, Speaker

# Vowel formants (Hz, adult male, Peterson & Barney) and bandwidths for the Klatt cascade.
_VOWELS = np.array([[730, 1090, 2440, 3300], [530, 1840, 2480, 3300], [270, 2290, 3010, 3500],
                    [570, 840, 2410, 3300], [300, 870, 2240, 3300], [660, 1720, 2410, 3300],
                    [490, 1350, 1690, 3300]], dtype=np.float64)
_BANDWIDTHS = np.array([80.0, 100.0, 140.0, 200.0, 300.0])
_F5 = 4500.0  # fixed fifth formant: keeps energy above 4 kHz that the 4-pole cascade would cut


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

