"""Audio features: peak normalisation, power STFT frames and their inverse (docs/design.md §2).

Spectrograms are time-major, `[..., n_frames, n_bins]`, because the audio tokenizer encodes one
frame at a time. At the defaults one second of 16 kHz audio gives 50 frames of 513 bins, exactly two
audio frames per 25 fps video frame.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqmae.config import AudioConfig

# Samples below this peak are treated as silence: normalising them would only amplify noise.
SILENCE_PEAK = 1e-4


class SilentAudioError(ValueError):
    """The waveform has no signal to normalise."""


def exact_div(x: int, y: int) -> int:
    if x % y:
        raise ValueError(f"{x} is not divisible by {y}")
    return x // y


def samples_per_video_frame(cfg: AudioConfig, fps: float) -> int:
    """Audio samples covered by one video frame (640 at 16 kHz / 25 fps); must be whole hops."""
    spf = cfg.sample_rate / fps
    if spf != int(spf):
        raise ValueError(f"sample_rate {cfg.sample_rate} / fps {fps} is not an integer")
    exact_div(int(spf), cfg.hop_length)
    return int(spf)


def peak_normalize(wave: torch.Tensor) -> torch.Tensor:
    """Scale `wave` [..., N] so its absolute peak is 1; raises SilentAudioError on silence."""
    peak = wave.abs().amax(dim=-1, keepdim=True)
    if bool((peak < SILENCE_PEAK).any()):
        raise SilentAudioError(f"audio is silent (peak amplitude {float(peak.min()):.2e})")
    return wave / peak


def _window(cfg: AudioConfig, device: torch.device) -> torch.Tensor:
    return torch.hann_window(cfg.win_length, device=device)


def power_spectrogram(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """Power STFT of `wave` [..., N] → [..., N // hop + 1, n_bins] (center=True, Hann window).

    Computed in fp32 whatever the ambient autocast, since the inverse and the IS loss are sensitive.
    """
    lead = wave.shape[:-1]
    flat = wave.reshape(-1, wave.shape[-1]).float()  # [B, N]
    if flat.shape[-1] // cfg.hop_length + 1 > STFT_CHUNK_FRAMES:
        return _chunked_power(flat, cfg).reshape(*lead, -1, cfg.n_fft // 2 + 1)
    spec = torch.stft(
        flat, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
        window=_window(cfg, flat.device), center=True, pad_mode="reflect", return_complex=True,
    )  # [B, F, T]
    power = spec.real.square() + spec.imag.square()
    return power.transpose(1, 2).reshape(*lead, power.shape[-1], power.shape[1])


# A longer wave is transformed STFT_CHUNK_FRAMES frames at a time (41 s at 50 frames/s) into a
# preallocated output: the complex spectrogram, its framing copies and a padded copy of a long clip
# never exist whole, only the power does.
STFT_CHUNK_FRAMES = 2048


def _chunked_power(flat: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """`power_spectrogram` of [B, N] in chunks of frames: frame k covers samples
    [k·hop − n_fft/2, k·hop + n_fft/2) with the reflect padding `center=True` applies at both ends,
    exactly as the one-shot transform frames them."""
    half, hop, n = cfg.n_fft // 2, cfg.hop_length, flat.shape[-1]
    n_frames = n // hop + 1
    window = _window(cfg, flat.device)
    out = torch.empty(flat.shape[0], n_frames, cfg.n_fft // 2 + 1, dtype=flat.dtype, device=flat.device)
    for lo in range(0, n_frames, STFT_CHUNK_FRAMES):
        hi = min(n_frames, lo + STFT_CHUNK_FRAMES)
        a, b = lo * hop - half, (hi - 1) * hop + cfg.n_fft - half  # samples the frames cover
        ext_lo, ext_hi = max(0, a - half), min(n, b + half)  # with enough beyond them to reflect
        seg = flat[:, ext_lo:ext_hi]
        left, right = max(0, -a), max(0, b - n)
        if left or right:
            seg = torch.nn.functional.pad(seg[:, None], (left, right), mode="reflect")[:, 0]
        start = a - (ext_lo - left)
        spec = torch.stft(seg[:, start:start + b - a], cfg.n_fft, hop_length=hop, win_length=cfg.win_length,
                          window=window, center=False, return_complex=True)  # [B, F, hi - lo]
        out[:, lo:hi] = (spec.real.square() + spec.imag.square()).transpose(1, 2)
    return out


def stft_phase(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """Phase of the STFT of `wave` [N] → [n_frames, n_bins], for inversion with a known phase."""
    spec = torch.stft(
        wave.float(), cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
        window=_window(cfg, wave.device), center=True, pad_mode="reflect", return_complex=True,
    )
    return spec.angle().transpose(0, 1)


def inverse_power(power: torch.Tensor, phase: torch.Tensor, cfg: AudioConfig,
                  length: int | None = None) -> torch.Tensor:
    """Waveform from power [T, F] and phase [T, F] (both time-major) → [N]."""
    spec = torch.polar(power.clamp_min(0).sqrt().float(), phase.float()).transpose(0, 1)  # [F, T]
    return torch.istft(spec, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                       window=_window(cfg, power.device), center=True, length=length)


def griffin_lim(power: torch.Tensor, cfg: AudioConfig, n_iter: int | None = None,
                length: int | None = None, seed: int = 0) -> torch.Tensor:
    """Estimate a waveform [N] from a power spectrogram [T, F] by Griffin-Lim phase recovery.

    Uses the "fast" momentum variant (Perraudin et al. 2013, momentum 0.99) so a few dozen
    iterations give listenable reconstructions of tokenizer outputs.
    """
    n_iter = cfg.griffin_lim_iters if n_iter is None else n_iter
    mag = power.clamp_min(0).sqrt().float().transpose(0, 1)  # [F, T]
    window = _window(cfg, power.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    angles = torch.polar(torch.ones_like(mag), 2 * torch.pi * torch.rand(mag.shape, generator=gen).to(mag))
    prev = torch.zeros_like(angles)
    kw = dict(n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=window,
              center=True)
    n_samples = length or (mag.shape[1] - 1) * cfg.hop_length
    for _ in range(n_iter):
        wave = torch.istft(mag * angles, length=n_samples, **kw)
        rebuilt = torch.stft(wave, pad_mode="reflect", return_complex=True, **kw)
        angles = rebuilt - (0.99 / 1.99) * prev
        prev = rebuilt
        angles = angles / angles.abs().clamp_min(1e-16)
    return torch.istft(mag * angles, length=n_samples, **kw)


def frames_for_samples(n_samples: int, cfg: AudioConfig) -> int:
    """Spectrogram frames kept for a waveform of `n_samples`: one per full hop (the trailing
    center-padding frame is dropped so that frames = 2 × video frames exactly)."""
    return n_samples // cfg.hop_length


NOISE_KINDS = ("white", "pink")


@dataclass(frozen=True)
class NoiseSpec:
    """Additive noise at `snr_db` (signal-to-noise power ratio over the whole clip, in dB)."""

    snr_db: float
    kind: str = "white"  # or "pink" (power ∝ 1/f)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"noise kind {self.kind!r}: expected one of {NOISE_KINDS}")
        if not math.isfinite(self.snr_db):
            raise ValueError(f"noise snr_db must be finite, got {self.snr_db}")

    def record(self, source: str | os.PathLike) -> dict[str, Any]:
        """The `attrs["noise"]` of a noisy store made from `source` (its absolute path)."""
        return {"snr_db": float(self.snr_db), "kind": self.kind, "seed": int(self.seed),
                "source": str(Path(source).resolve())}


def noise_generator(spec: NoiseSpec, key: str) -> np.random.Generator:
    """A Generator seeded from (spec.seed, key) through blake2b: unlike `hash()`, the same in every
    process (PYTHONHASHSEED) and on every machine."""
    digest = hashlib.blake2b(f"{int(spec.seed)}\0{key}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def draw_noise(n: int, spec: NoiseSpec, key: str) -> np.ndarray:
    """Unscaled zero-mean noise, float64 [n]: white Gaussian, or that draw shaped to a 1/f power
    spectrum in the frequency domain (amplitude ∝ f^-1/2, no DC)."""
    white = noise_generator(spec, key).standard_normal(n)  # [n]
    if spec.kind == "white":
        return white
    freqs = np.fft.rfftfreq(n)  # [n//2 + 1] cycles per sample
    gain = np.zeros_like(freqs)
    gain[1:] = freqs[1:] ** -0.5
    return np.fft.irfft(np.fft.rfft(white) * gain, n)  # [n]


def add_noise(wave: np.ndarray, spec: NoiseSpec, key: str) -> np.ndarray:
    """`wave` float [n] plus noise scaled so 10·log10(P_signal / P_noise) == spec.snr_db, where P is
    the mean power over the whole clip; float32 [n]. `key` (the clip id) picks the noise draw.

    Raises ValueError on a silent wave (peak below `audio.SILENCE_PEAK`: the SNR is undefined, and
    the clean encoding refuses it too), a non-finite one, or one shorter than 2 samples."""
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"clip {key!r}: expected a 1-D waveform of at least 2 samples, got shape "
                         f"{tuple(np.shape(wave))}")
    if not np.isfinite(x).all():
        raise ValueError(f"clip {key!r}: waveform has non-finite samples")
    peak = float(np.abs(x).max())
    if peak < SILENCE_PEAK:
        raise ValueError(f"clip {key!r}: audio is silent (peak amplitude {peak:.2e}): no SNR "
                         f"can be set")
    noise = draw_noise(len(x), spec, key)  # [n]
    p_signal, p_noise = np.mean(x ** 2), np.mean(noise ** 2)
    noise *= math.sqrt(p_signal / (p_noise * 10.0 ** (spec.snr_db / 10.0)))
    return (x + noise).astype(np.float32)


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
