"""Pitch and energy read off power spectrograms, and the agreement measure the tokenizer evaluation
prints: known tones recovered, noise unvoiced, a copy agrees perfectly, a flattened pitch does not."""

from __future__ import annotations

import numpy as np
import torch

from vqmae.audio import power_spectrogram
from vqmae.config import AudioConfig
from vqmae.prosody import estimate_f0, frame_energy_db, prosody_agreement, voiced

CFG = AudioConfig()
SR = CFG.sample_rate


def voice(f0: float, seconds: float = 1.0, vibrato: float = 0.1, seed: int = 0) -> np.ndarray:
    """A harmonic voice-like tone gliding ±`vibrato` around `f0` (1/h harmonic amplitudes)."""
    t = np.arange(int(SR * seconds)) / SR
    f = f0 * (1 + vibrato * np.sin(2 * np.pi * 1.5 * t))
    phase = 2 * np.pi * np.cumsum(f) / SR
    x = sum(np.sin(h * phase) / h for h in range(1, 15))
    return x + 0.01 * np.random.default_rng(seed).standard_normal(len(t)), f


def power(x: np.ndarray) -> np.ndarray:
    return power_spectrogram(torch.tensor(x, dtype=torch.float32), CFG).numpy()


def test_f0_of_harmonic_tones_within_two_percent():
    for f0 in (90.0, 150.0, 240.0, 420.0):
        x, f = voice(f0)
        est, strength = estimate_f0(power(x), CFG)
        truth = f[np.clip(np.arange(len(est)) * CFG.hop_length, 0, len(f) - 1)]
        rel = np.abs(est / truth - 1)[3:-3]  # edge frames see the signal's start and end
        assert np.median(rel) < 0.02 and np.mean(rel < 0.05) > 0.9, (f0, np.median(rel))
        assert voiced(power(x), strength)[3:-3].mean() > 0.9


def test_noise_and_silence_are_unvoiced():
    noise = np.random.default_rng(1).standard_normal(SR)
    p = power(noise)
    assert voiced(p, estimate_f0(p, CFG)[1]).mean() < 0.05
    x, _ = voice(150.0)
    x[: SR // 2] *= 1e-4  # 70 dB quieter: silence next to the voice
    p = power(x)
    v = voiced(p, estimate_f0(p, CFG)[1])
    assert v[:20].mean() < 0.1 and v[30:-3].mean() > 0.9
    np.testing.assert_allclose(frame_energy_db(p[30:31]), 10 * np.log10(p[30].astype(np.float64).sum()), rtol=1e-9)


def test_agreement_of_a_copy_and_of_a_flattened_pitch():
    x = np.concatenate([voice(f0, 0.5, seed=i)[0] for i, f0 in enumerate((110.0, 160.0, 230.0, 300.0))])
    p = power(x)
    same = prosody_agreement(p, p, CFG)
    assert same["f0_corr"] > 0.999 and same["energy_corr"] > 0.999 and same["f0_within_5pct"] == 1.0
    assert same["voiced_frames"] > 0.8 * len(p)
    flat = power(voice(180.0, len(x) / SR, vibrato=0.0)[0])[: len(p)]  # same loudness, one pitch
    moved = prosody_agreement(p, flat, CFG)
    assert not moved["f0_corr"] > 0.3 and moved["f0_within_5pct"] < 0.3  # NaN: a constant pitch


# ------------------------------------------------------------------- prosody ids of the audio codes

def test_prosody_ids_read_pitch_level_and_loudness_of_known_tones():
    """The F0 id is the semitone above 60 Hz the estimator finds; louder frames get a higher energy
    id; every id stays in its own range; frames are encoded independently of their neighbours."""
    from vqmae.models.prosody_ids import SIZES, ProsodyIds
    ids = ProsodyIds(CFG.n_bins, SR)
    offsets = np.concatenate([[0], np.cumsum(SIZES)[:-1]])
    for f0 in (110.0, 220.0):
        x, _ = voice(f0, vibrato=0.0)
        p = power(0.01 * x)[3:-3]
        got = ids(torch.from_numpy(p)).numpy()
        assert got.shape == (len(p), 4)
        for k, n in enumerate(SIZES):
            assert ((got[:, k] >= offsets[k]) & (got[:, k] < offsets[k] + n)).all()
        semitone = np.round(12 * np.log2(f0 / 60.0)) + 1
        assert np.mean(np.abs(got[:, 0] - semitone) <= 1) > 0.9
        louder = ids(torch.from_numpy(p * 100.0)).numpy()  # +20 dB: 8 bins of 2.5 dB
        assert np.median(louder[:, 1] - got[:, 1]) == 8
        alone = ids(torch.from_numpy(p[5:6])).numpy()
        assert np.array_equal(alone[0], got[5])
    noise = power(0.3 * np.random.default_rng(1).standard_normal(SR))
    assert (ids(torch.from_numpy(noise)).numpy()[:, 0] == 0).mean() > 0.9  # unvoiced id


def test_prosody_ids_agree_with_the_numpy_pitch_estimator():
    from vqmae.models.prosody_ids import ProsodyIds
    x, _ = voice(150.0, vibrato=0.2)
    p = power(0.3 * x)
    f0, strength = estimate_f0(p, CFG)
    got = ProsodyIds(CFG.n_bins, SR)(torch.from_numpy(p)).numpy()[:, 0]
    v = got > 0
    assert v.mean() > 0.8
    expected = np.clip(np.round(12 * np.log2(f0[v] / 60.0)), 0, 36) + 1
    assert np.mean(got[v] == expected) > 0.95


def test_pitch_and_energy_read_back_from_the_ids_agree_with_the_frames():
    """The tokenizer evaluation's second line: the pitch and energy the prosody ids carry (their bins'
    centres) follow the original contours; ids with the pitch column zeroed (unvoiced) miss it all."""
    from vqmae.models.prosody_ids import ProsodyIds, pitch_and_energy
    from vqmae.prosody import contour_agreement
    x = np.concatenate([voice(f0, 0.5, seed=i)[0] * a for i, (f0, a) in
                        enumerate(((110.0, 1.0), (160.0, 0.3), (230.0, 2.0), (300.0, 0.7)))])
    p = power(x)
    ids = ProsodyIds(CFG.n_bins, SR)(torch.tensor(p)).numpy()
    f0, energy = pitch_and_energy(ids)
    agree = contour_agreement(p, f0, energy, CFG)
    # semitone bins: within ±3% of the estimate; 2.5 dB energy bins
    assert agree["f0_corr"] > 0.99 and agree["f0_within_5pct"] > 0.95 and agree["energy_corr"] > 0.99
    assert agree["voiced_frames"] == prosody_agreement(p, p, CFG)["voiced_frames"] > 0.8 * len(p)
    unvoiced = ids.copy()
    unvoiced[:, 0] = 0
    none = contour_agreement(p, *pitch_and_energy(unvoiced), CFG)
    assert none["f0_within_5pct"] == 0.0 and np.isnan(none["f0_corr"])
