"""Prosody read off power spectrogram frames: pitch (F0) by subharmonic summation, frame energy, and
how well a reconstruction keeps both — the measure of whether audio tokens keep what emotion lives in.

    f0, strength = estimate_f0(power, cfg)            # per frame, Hz and a voicing strength
    prosody_agreement(original, decoded, cfg)         # {"f0_corr", "energy_corr", "voiced_frames"}

The F0 estimator is subharmonic summation (Hermes 1988) on the magnitude spectrum: every candidate
F0 on a 1/48-octave grid scores the compressed magnitude sampled at its first harmonics, weighted
0.84^(h-1); the best candidate wins. A frame is voiced when its best score clearly exceeds the
frame's typical score and its energy is within 35 dB of the loudest frames. It needs no waveform,
so it measures a tokenizer's decoded spectrogram directly, with the same code as the original.
"""

from __future__ import annotations

import math

import numpy as np

from vqmae.config import AudioConfig

F0_MIN, F0_MAX = 60.0, 500.0  # Hz: speaking voices, low male to high child
HARMONICS_HZ = 4000.0  # harmonics above this carry little pitch information in speech
DECAY = 0.84  # weight of harmonic h is DECAY ** (h - 1)
VOICING = 1.6  # best / median candidate score for a voiced frame
ENERGY_RANGE_DB = 35.0  # frames quieter than (loudest 1 % − this) count as silence


def _candidates() -> np.ndarray:
    n = int(math.floor(48 * math.log2(F0_MAX / F0_MIN))) + 1
    return F0_MIN * 2.0 ** (np.arange(n) / 48.0)  # [C] Hz


def shs_grid(n_bins: int, hz_per_bin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where subharmonic summation samples a spectrum of `n_bins` bins: the F0 candidates [C] (Hz),
    and per candidate and harmonic [C, H] the lower bin, the fraction towards the next one and the
    harmonic's weight (0 above `HARMONICS_HZ`)."""
    cands = _candidates()
    n_h = int(HARMONICS_HZ // F0_MIN)
    harm = cands[:, None] * np.arange(1, n_h + 1)[None, :]  # [C, H] Hz
    weight = np.where(harm <= HARMONICS_HZ, DECAY ** np.arange(n_h)[None, :], 0.0)
    pos = np.clip(harm / hz_per_bin, 0, n_bins - 1.001)
    lo = np.floor(pos).astype(np.int64)
    return cands, lo, pos - lo, weight


def frame_energy_db(power: np.ndarray) -> np.ndarray:
    """Frame energy in dB, power [N, F] → [N]."""
    return 10.0 * np.log10(np.asarray(power, np.float64).sum(1) + 1e-10)


def estimate_f0(power: np.ndarray, cfg: AudioConfig, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame F0 in Hz and voicing strength (best / median candidate score) from power frames
    [N, F] (F = n_fft // 2 + 1 bins at `cfg.sample_rate`) → (f0 [N], strength [N])."""
    power = np.asarray(power, np.float64)
    cands, lo, frac, weight = shs_grid(power.shape[1], cfg.sample_rate / cfg.n_fft)
    f0, strength = np.zeros(len(power)), np.zeros(len(power))
    for a in range(0, len(power), chunk):
        mag = np.sqrt(power[a:a + chunk])  # [n, F]
        mag = np.log1p(mag / (mag.max(1, keepdims=True) + 1e-12) * 100.0)  # compressed, per frame
        sampled = mag[:, lo] * (1 - frac) + mag[:, lo + 1] * frac  # [n, C, H]
        score = (sampled * weight).sum(-1)  # [n, C]
        best = score.argmax(1)
        f0[a:a + chunk] = cands[best]
        strength[a:a + chunk] = score.max(1) / (np.median(score, 1) + 1e-12)
    return f0, strength


def voiced(power: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """bool [N]: voiced frames (clear pitch, not silence)."""
    energy = frame_energy_db(power)
    loud = np.percentile(energy, 99) if len(energy) else 0.0
    return (strength >= VOICING) & (energy >= loud - ENERGY_RANGE_DB)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def prosody_agreement(original: np.ndarray, decoded: np.ndarray, cfg: AudioConfig) -> dict[str, float]:
    """How well `decoded` power frames [N, F] keep the pitch and energy of `original` [N, F].

    f0_corr: Pearson correlation of log F0 over the frames voiced in the original;
    energy_corr: Pearson correlation of frame energy in dB over the frames that are not silence in
    the original; f0_within_5pct: share of those voiced frames whose decoded F0 is within 5 % (an
    octave error counts as a miss); voiced_frames: how many frames the F0 figures rest on."""
    return contour_agreement(original, estimate_f0(decoded, cfg)[0], frame_energy_db(decoded), cfg)


def contour_agreement(original: np.ndarray, f0: np.ndarray, energy_db: np.ndarray, cfg: AudioConfig
                      ) -> dict[str, float]:
    """`prosody_agreement` of a pitch contour `f0` [N] in Hz (0 = unvoiced: a miss where the
    original is voiced, left out of the correlation) and an energy contour `energy_db` [N], however
    they were obtained (from decoded frames, or read from the prosody ids)."""
    f0_o, s_o = estimate_f0(original, cfg)
    v = voiced(original, s_o)
    e_o = frame_energy_db(original)
    sound = e_o >= (np.percentile(e_o, 99) if len(e_o) else 0.0) - ENERGY_RANGE_DB
    both = v & (f0 > 0)
    ratio = f0[v] / f0_o[v]
    return {"f0_corr": _pearson(np.log(f0_o[both]), np.log(f0[both])),
            "f0_within_5pct": float(np.mean(np.abs(ratio - 1) <= 0.05)) if v.any() else math.nan,
            "energy_corr": _pearson(e_o[sound], energy_db[sound]),
            "voiced_frames": int(v.sum())}
