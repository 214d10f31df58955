"""Audio and visual VQ-VAE tokenizers (docs/design.md §2).

Both follow one small contract, like audiocraft's compression models:

- `encode(x) -> codes` int64 (audio `[B, 64]`, then 4 prosody ids with `audio_vq.prosody_ids`;
  visual `[B, 24, 24]`), never changes the model;
- `decode(codes) -> x_hat` (audio power `[B, 513]` > 0, visual pixels `[B, 3, 96, 96]`);
- `forward(x) -> TokenizerOutput(recon, codes, loss, metrics)` for training;
- properties `codebook_size`, `grid`, `frame_rate`, `n_tokens`, and `n_learned` (the leading ids
  per frame that the quantizer chose; any after them are computed).

The models hold no norm layers with batch statistics: training batches are shuffled frame pools
while encoding runs clip by clip, and both must see the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vqmae.config import AudioVQConfig, Config, VisualVQConfig
from vqmae.models.prosody_ids import N_IDS as PROSODY_IDS, SIZES as PROSODY_SIZES, VOCAB as PROSODY_VOCAB, ProsodyIds
from vqmae.models.quantize import QuantizedResult, VectorQuantizer
from vqmae.utils import autocast_context

# Added to power before the log: keeps log finite on digital silence (≈ −18.4 in log-power).
LOG_FLOOR = 1e-8
# Smooth-L1 transition point; pixels span 1.0, so the default beta = 1 would make it plain L2 / 2.
SMOOTH_L1_BETA = 0.1

TokenizerKind = Literal["audio_vqvae", "visual_vqvae"]


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # same shape as the input (audio: power, visual: pixels)
    codes: torch.Tensor  # [B, *grid] int64
    loss: torch.Tensor  # [] reconstruction + commitment × commit
    # detached scalars: loss/recon, loss/commit, vq/perplexity, vq/usage
    metrics: dict[str, torch.Tensor]


class _ResBlock(nn.Module):
    """x + 1×1(relu(3×3(relu(x)))) — the VQ-VAE residual unit, 1-D or 2-D."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.body = nn.Sequential(nn.ReLU(), conv(channels, channels, 3, padding=1), nn.ReLU(),
                                  conv(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _VQVAE(nn.Module):
    """Shared plumbing: quantize channel-last latents and assemble outputs and metrics."""

    quantizer: VectorQuantizer
    commitment: float
    _frame_rate: float
    grid: tuple[int, ...]  # codes per frame: a property of each tokenizer

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def code_dim(self) -> int:
        return self.quantizer.code_dim

    def id_ranges(self) -> torch.Tensor:
        """The ids each grid position can hold, `[*grid, 2]` int64 (low, high): the codebook."""
        return torch.tensor([0, self.codebook_size]).expand(*self.grid, 2)

    @property
    def frame_rate(self) -> float:
        return self._frame_rate

    @property
    def n_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def n_learned(self) -> int:
        return self.n_tokens

    def _output(self, recon: torch.Tensor, rec_loss: torch.Tensor,
                q: QuantizedResult) -> TokenizerOutput:
        loss = rec_loss + self.commitment * q.commit_loss
        metrics = {"loss/recon": rec_loss.detach(), "loss/commit": q.commit_loss.detach(),
                   "vq/perplexity": q.perplexity.detach(), "vq/usage": q.usage.detach()}
        return TokenizerOutput(recon=recon, codes=q.codes, loss=loss, metrics=metrics)

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 1 + len(self.grid) or tuple(codes.shape[1:]) != self.grid:
            grid = ", ".join(map(str, self.grid))
            raise ValueError(f"{type(self).__name__}.decode expects codes [B, {grid}], "
                             f"got {tuple(codes.shape)}")


# ------------------------------------------------------------------------------------------ audio

def audio_lengths(n_bins: int, n_tokens: int) -> list[int]:
    """Frequency lengths through the audio encoder, e.g. 513 → [513, 257, 129, 65, 64].

    Stride-2 convs (kernel 3, padding 1: L → ⌈L/2⌉) halve the axis while that stays above
    `n_tokens`; one final valid conv of kernel `L − n_tokens + 1` lands exactly on `n_tokens`.
    """
    if n_bins < n_tokens:
        raise ValueError(f"audio VQ-VAE: {n_bins} frequency bins cannot give {n_tokens} tokens")
    lengths = [n_bins]
    while (lengths[-1] + 1) // 2 >= n_tokens:
        lengths.append((lengths[-1] + 1) // 2)
    if lengths[-1] != n_tokens:
        lengths.append(n_tokens)
    return lengths


class AudioVQVAE(_VQVAE):
    """One power-spectrogram frame `[B, n_bins]` (≥ 0) ↔ `[B, n_tokens]` codes.

    The encoder sees log-power and convolves along frequency; the decoder mirrors it with transposed
    convs and predicts log-power, so `exp` gives a positive power. Loss: Itakura–Saito divergence
    (scale-invariant, the natural fit for power spectra) + commitment × commit.
    """

    def __init__(self, cfg: AudioVQConfig, n_bins: int = 513, frame_rate: float = 50.0,
                 sample_rate: int = 16000):
        super().__init__()
        self.n_bins, self.commitment, self._frame_rate = n_bins, cfg.commitment, frame_rate
        self.lengths = audio_lengths(n_bins, cfg.n_tokens)
        # Four prosody ids appended to each frame's spectral codes (vqmae.models.prosody_ids); they
        # are computed, not learned, and `decode` ignores them.
        self.prosody = ProsodyIds(n_bins, sample_rate) if cfg.prosody_ids else None
        c = cfg.channels
        enc: list[nn.Module] = [nn.Conv1d(1, c, 3, padding=1)]
        dec: list[nn.Module] = []
        for l_in, l_out in zip(self.lengths[:-1], self.lengths[1:]):
            if l_out == (l_in + 1) // 2:
                enc += [nn.ReLU(), nn.Conv1d(c, c, 3, stride=2, padding=1)]
                # L → 2L − 1 + output_padding restores l_in exactly.
                dec += [nn.ConvTranspose1d(c, c, 3, stride=2, padding=1,
                                           output_padding=l_in - (2 * l_out - 1)), nn.ReLU()]
            else:
                k = l_in - l_out + 1
                enc += [nn.ReLU(), nn.Conv1d(c, c, k)]
                dec += [nn.ConvTranspose1d(c, c, k), nn.ReLU()]
        enc += [_ResBlock(c, 1) for _ in range(cfg.n_res_blocks)]
        enc += [nn.ReLU(), nn.Conv1d(c, cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.ema_decay,
                                         dead_threshold=cfg.dead_threshold)
        self.decoder = nn.Sequential(nn.Conv1d(cfg.code_dim, c, 3, padding=1),
                                     *[_ResBlock(c, 1) for _ in range(cfg.n_res_blocks)],
                                     *reversed(dec), nn.ReLU(), nn.Conv1d(c, 1, 3, padding=1))
        # Per-bin log-power statistics of the training data (set once by `set_input_stats`): the
        # encoder sees standardised log-power and the decoder predicts in the same units, so neither
        # has to learn the ~30 dB tilt of speech spectra. Buffers: saved with the weights.
        self.register_buffer("log_mean", torch.zeros(n_bins))
        self.register_buffer("log_std", torch.ones(n_bins))

    @torch.no_grad()
    def set_input_stats(self, power: torch.Tensor) -> None:
        """Set the standardisation from representative training frames `[N, n_bins]`."""
        log_p = torch.log(power.float() + LOG_FLOOR)
        self.log_mean.copy_(log_p.mean(0))
        self.log_std.copy_(log_p.std(0).clamp_min(1e-3) if len(log_p) > 1 else torch.ones_like(self.log_std))

    @property
    def grid(self) -> tuple[int, ...]:
        return (self.lengths[-1] + (PROSODY_IDS if self.prosody is not None else 0),)

    @property
    def n_learned(self) -> int:
        return self.lengths[-1]

    @property
    def codebook_size(self) -> int:
        """The vocabulary of the codes: the spectral codebook, then the prosody ids' ranges."""
        return self.quantizer.codebook_size + (PROSODY_VOCAB if self.prosody is not None else 0)

    def id_ranges(self) -> torch.Tensor:
        """`[n_tokens, 2]`: the spectral codebook, then each prosody id's own range."""
        k = self.quantizer.codebook_size
        ranges = [(0, k)] * self.n_learned
        if self.prosody is not None:
            ranges += [(k + o, k + o + s) for o, s in zip(self.prosody.offsets.tolist(), PROSODY_SIZES)]
        return torch.tensor(ranges)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.n_bins:
            raise ValueError(f"AudioVQVAE expects power frames [B, {self.n_bins}], "
                             f"got {tuple(x.shape)}")
        z = (torch.log(x.float() + LOG_FLOOR) - self.log_mean) / self.log_std
        z = self.encoder(z.unsqueeze(1))  # [B, D, T]
        if z.shape[-1] != self.lengths[-1]:
            raise AssertionError(f"encoder produced {z.shape[-1]} positions, expected {self.lengths[-1]}")
        return z.transpose(1, 2)  # [B, T, D]

    def _log_power(self, vectors: torch.Tensor) -> torch.Tensor:
        out = self.decoder(vectors.transpose(1, 2)).squeeze(1)  # [B, T, D] → [B, n_bins]
        return out.float() * self.log_std + self.log_mean

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Power frames `[B, n_bins]` → codes `[B, n_tokens]` int64 (spectral, then prosody ids)."""
        codes = self.quantizer.encode(self._latents(x))
        if self.prosody is None:
            return codes
        return torch.cat([codes, self.prosody(x) + self.quantizer.codebook_size], 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes `[B, n_tokens]` → power `[B, n_bins]` (> 0), from the spectral codes."""
        self._check_codes(codes)
        codes = codes[:, :self.n_learned]
        return torch.exp(self._log_power(self.quantizer.codes_to_vectors(codes)).float())

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        q = self.quantizer(self._latents(x))
        log_y = self._log_power(q.quantized).float()  # [B, n_bins]
        return self._output(torch.exp(log_y), itakura_saito(x, log_y), q)


def itakura_saito(x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """Mean IS divergence `x/y − log(x/y) − 1` between power `x` and `y = exp(log_y)` (both [B, F]).

    With d = log(x + floor) − log y the term is expm1(d) − d: no division by a tiny y, and no
    cancellation when x ≈ y. Always fp32.
    """
    d = torch.log(x.float() + LOG_FLOOR) - log_y.float()
    return (torch.expm1(d) - d).mean()


# ----------------------------------------------------------------------------------------- visual

class VisualVQVAE(_VQVAE):
    """One RGB face crop `[B, 3, size, size]` in [-0.5, 0.5] ↔ `[B, size/4, size/4]` codes.

    Two stride-2 convs and a residual stack down to a `code_dim` latent per token; the decoder
    mirrors it with a residual stack and two transposed convs. Loss: smooth-L1 + commitment × commit.
    """

    def __init__(self, cfg: VisualVQConfig, size: int = 96, frame_rate: float = 25.0):
        super().__init__()
        if size % 4:
            raise ValueError(f"visual VQ-VAE: face size {size} is not divisible by 4")
        self.size, self.commitment, self._frame_rate = size, cfg.commitment, frame_rate
        c, h = cfg.channels, max(cfg.channels // 2, 1)
        res = lambda: [_ResBlock(c, 2) for _ in range(cfg.n_res_blocks)]  # noqa: E731
        self.encoder = nn.Sequential(
            nn.Conv2d(3, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, c, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), *res(), nn.ReLU(),
            nn.Conv2d(c, cfg.code_dim, 1),
        )
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.ema_decay,
                                         dead_threshold=cfg.dead_threshold)
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.code_dim, c, 3, padding=1), *res(), nn.ReLU(),
            nn.ConvTranspose2d(c, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(h, 3, 4, stride=2, padding=1),
        )

    @property
    def grid(self) -> tuple[int, ...]:
        return (self.size // 4, self.size // 4)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"VisualVQVAE expects face crops [B, 3, {self.size}, {self.size}], "
                             f"got {tuple(x.shape)}")
        return self.encoder(x).permute(0, 2, 3, 1)  # [B, D, H, W] → [B, H, W, D]

    def _pixels(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.decoder(vectors.permute(0, 3, 1, 2))  # [B, H, W, D] → [B, 3, size, size]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Face crops `[B, 3, size, size]` → codes `[B, size/4, size/4]` int64."""
        return self.quantizer.encode(self._latents(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes `[B, size/4, size/4]` → pixels `[B, 3, size, size]` (about [-0.5, 0.5])."""
        self._check_codes(codes)
        return self._pixels(self.quantizer.codes_to_vectors(codes))

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        q = self.quantizer(self._latents(x))
        recon = self._pixels(q.quantized)
        rec_loss = F.smooth_l1_loss(recon.float(), x.float(), beta=SMOOTH_L1_BETA)
        return self._output(recon, rec_loss, q)


def build_tokenizer(kind: TokenizerKind, cfg: Config) -> AudioVQVAE | VisualVQVAE:
    """The tokenizer `kind` sized by `cfg` (audio bins and frame rate, face size and fps)."""
    if kind == "audio_vqvae":
        return AudioVQVAE(cfg.audio_vq, n_bins=cfg.audio.n_bins, frame_rate=cfg.audio.frame_rate,
                          sample_rate=cfg.audio.sample_rate)
    if kind == "visual_vqvae":
        return VisualVQVAE(cfg.visual_vq, size=cfg.face.size, frame_rate=cfg.video.fps)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'audio_vqvae' or 'visual_vqvae'")


def faces_to_tensor(faces: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """uint8 [N, S, S, 3] → float [N, 3, S, S] in [-0.5, 0.5] (docs/design.md §2 pixel range)."""
    x = torch.from_numpy(np.ascontiguousarray(faces)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5)


def tensor_to_faces(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, S, S] in [-0.5, 0.5] → uint8 [N, S, S, 3]."""
    return ((x.float() + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# Frames per encoder call. A batch of 1,024 faces holds 1.2 GB of activations in the visual
# encoder's first layers; 128 keeps its peak memory under 1 GB at the same speed and the same codes
# (measured on CPU, docs/results.md "Long clips").
ENCODE_BATCH = {"audio": 1024, "visual": 128}


@torch.no_grad()
def encode_frames(model, modality: str, frames: np.ndarray, device: str,
                  batch: int | None = None) -> np.ndarray:
    """Codes for every frame, batched on `device` (`ENCODE_BATCH` frames per call by default): audio
    [T, 513] → [T, 64], faces [T, S, S, 3] → [T, H*W]; uint16."""
    batch = batch or ENCODE_BATCH[modality]
    model.eval()
    out = []
    ctx = autocast_context(device)
    for lo in range(0, len(frames), batch):
        chunk = frames[lo:lo + batch]
        x = torch.from_numpy(chunk).to(device) if modality == "audio" else faces_to_tensor(chunk, device)
        with ctx:
            codes = model.encode(x)
        out.append(codes.reshape(len(chunk), -1).to(torch.int32).cpu().numpy().astype(np.uint16))
    n_tokens = int(np.prod(model.grid))
    return np.concatenate(out) if out else np.zeros((0, n_tokens), np.uint16)


@torch.no_grad()
def decode_codes(model, modality: str, codes: np.ndarray, device: str, batch: int = 1024) -> np.ndarray:
    """Inverse of `encode_frames`: audio → power [T, 513] float32, visual → uint8 faces."""
    model.eval()
    out = []
    for lo in range(0, len(codes), batch):
        c = torch.from_numpy(codes[lo:lo + batch].astype(np.int64)).to(device)
        c = c.reshape(len(c), *model.grid)
        x = model.decode(c)
        out.append(x.float().cpu().numpy() if modality == "audio" else tensor_to_faces(x))
    return np.concatenate(out)
