"""Prosody ids: four discrete descriptors of each power-spectrogram frame, appended to the audio
VQ-VAE's spectral codes so that pitch, loudness and voice quality are one id away from the model.

Emotion in speech lives largely in pitch level and range, loudness and voice quality (the
eGeMAPS low-level descriptors: F0, loudness, harmonics-to-noise ratio, spectral slope). The spectral
codes keep them (docs/results.md, tokenizer table: F0 correlation 0.92 on held-out speech), but spread over
64 ids whose combinations a small transformer must first learn to read. Quantised prosody next to
the content codes is what prosody-aware spoken language models do (pGSLM, Kharitonov et al. 2022,
quantised log-F0 beside HuBERT units). Per frame, in this order:

    id 0  log F0: 1 unvoiced + 37 semitone bins from 60 Hz (to ≈ 490 Hz)
    id 1  frame energy: 32 bins of 2.5 dB from −20 dB (frames from a peak-normalised clip reach ≈ 45)
    id 2  harmonicity: 16 bins of the subharmonic-summation score's best / median ratio (log, 0.1)
    id 3  spectral tilt: 16 bins of 4 dB of the 1–5 kHz / 0–1 kHz energy ratio, from −50 dB

Each descriptor has its own id range after the spectral codebook (`offsets`), so the modality's
vocabulary is `codebook_size + 102`. F0 is subharmonic summation as in `vqmae.prosody.estimate_f0`
(same candidates, harmonics and weights), written in torch so the exported encoder computes it
too; voicing uses a fixed energy floor instead of the clip's loudest frames, so a frame's ids do not
depend on the frames encoded with it.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from vqmae.prosody import F0_MIN, VOICING, shs_grid

N_IDS = 4  # ids per frame
SIZES = (38, 32, 16, 16)  # vocabulary of each id
VOCAB = sum(SIZES)
ENERGY_LOW_DB, ENERGY_STEP_DB = -20.0, 2.5
VOICED_MIN_DB = 0.0  # quieter frames are unvoiced whatever their pitch score
HARM_STEP = 0.1  # log(best / median) per harmonicity bin
TILT_LOW_DB, TILT_STEP_DB = -50.0, 4.0
TILT_SPLIT_HZ, TILT_TOP_HZ = 1000.0, 5000.0


def pitch_and_energy(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prosody ids `[N, 4]` as `ProsodyIds` gives them (before a tokenizer adds its codebook size)
    → the F0 in Hz (0 where unvoiced) and the frame energy in dB at the centres of their bins."""
    ids = np.asarray(ids, np.int64)
    f0_bin, e_bin = ids[:, 0], ids[:, 1] - SIZES[0]
    f0 = np.where(f0_bin > 0, F0_MIN * 2.0 ** ((f0_bin - 1) / 12.0), 0.0)
    return f0, ENERGY_LOW_DB + ENERGY_STEP_DB * e_bin


class ProsodyIds(nn.Module):
    """Power frames `[B, n_bins]` at `sample_rate` → prosody ids `[B, 4]` int64 in `[0, VOCAB)`
    (before the tokenizer adds its codebook size)."""

    def __init__(self, n_bins: int, sample_rate: int):
        super().__init__()
        hz_per_bin = sample_rate / (2 * (n_bins - 1))
        cands, lo, frac, weight = shs_grid(n_bins, hz_per_bin)  # the numpy estimator's grid
        self.register_buffer("cands", torch.from_numpy(cands).float(), persistent=False)  # [C]
        self.register_buffer("lo", torch.from_numpy(lo).reshape(-1), persistent=False)  # [C·H]
        self.register_buffer("frac", torch.from_numpy(frac).float(), persistent=False)  # [C, H]
        self.register_buffer("weight", torch.from_numpy(weight).float(), persistent=False)  # [C, H]
        self.register_buffer("offsets", torch.tensor(list(itertools.accumulate(SIZES[:-1], initial=0))),
                             persistent=False)
        self.split = int(round(TILT_SPLIT_HZ / hz_per_bin))
        self.top = int(round(TILT_TOP_HZ / hz_per_bin))

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        with torch.autocast(power.device.type, enabled=False):  # thresholds need fp32
            return self._ids(power.float().clamp_min(0))

    def _ids(self, power: torch.Tensor) -> torch.Tensor:
        n_c, n_h = self.frac.shape
        mag = power.sqrt()
        mag = torch.log1p(mag / (mag.amax(1, keepdim=True) + 1e-12) * 100.0)  # compressed, per frame
        low = mag[:, self.lo].view(-1, n_c, n_h)
        high = mag[:, self.lo + 1].view(-1, n_c, n_h)
        score = ((low * (1 - self.frac) + high * self.frac) * self.weight).sum(-1)  # [B, C]
        best, arg = score.max(1)
        # the lower median, as `Tensor.median` gives it, through a sort: ONNX has no median operator
        median = score.sort(1).values[:, (score.shape[1] - 1) // 2]
        strength = best / (median + 1e-12)
        f0 = self.cands[arg]
        energy = 10.0 * torch.log10(power.sum(1) + 1e-10)
        voiced = (strength >= VOICING) & (energy >= VOICED_MIN_DB)
        f0_id = torch.where(voiced, (12 * torch.log2(f0 / F0_MIN)).round().clamp(0, SIZES[0] - 2) + 1,
                            torch.zeros_like(f0))
        e_id = ((energy - ENERGY_LOW_DB) / ENERGY_STEP_DB).round().clamp(0, SIZES[1] - 1)
        h_id = (strength.clamp_min(1.0).log() / HARM_STEP).round().clamp(0, SIZES[2] - 1)
        lo_e = power[:, :self.split].sum(1)
        hi_e = power[:, self.split:self.top].sum(1)
        tilt = 10.0 * torch.log10((hi_e + 1e-10) / (lo_e + 1e-10))
        t_id = ((tilt - TILT_LOW_DB) / TILT_STEP_DB).round().clamp(0, SIZES[3] - 1)
        ids = torch.stack([f0_id, e_id, h_id, t_id], 1).long()
        return ids + self.offsets
