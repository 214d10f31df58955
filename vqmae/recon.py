"""What the masked-token model learned, made visible and audible: original / masked / predicted
codes of a window decoded through the stage-1 tokenizers into PNG panels (spectrograms and face
frames), for audio WAV files (the decoded spectrograms through Griffin-Lim phase recovery), and for
an audiovisual window an MP4: the three face views side by side, frame by frame, with the
predicted sound.

The tokenizers are found through the store: `vqmae tokenize` records each tokenizer checkpoint's path
beside its sha256, and `vqmae.checkpoint.store_tokenizers` only accepts a file whose sha256 matches the store's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vqmae.audio import griffin_lim, wav_bytes
from vqmae.config import AudioConfig
from vqmae.media import mp4_bytes
from vqmae.models.tokenizers import tensor_to_faces
from vqmae.utils import atomic_write_bytes

log = logging.getLogger(__name__)


@torch.no_grad()
def predicted_codes(model, batch: dict[str, torch.Tensor], generator: torch.Generator,
                    ranges: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per modality: original codes [B, T, *grid], the patch mask unpatchified to tokens
    [B, T, *grid] (True = masked) and the codes with masked tokens replaced by the model's argmax,
    taken within each grid position's ids where `ranges` gives them (a tokenizer's `id_ranges`:
    a spectral position never gets a prosody id)."""
    was = model.training
    model.eval()
    out = model(batch, generator, return_logits=True)
    model.train(was)
    result = {}
    for m, logits in out.logits.items():
        lay = model.layouts[m]
        original = batch[m].reshape(batch[m].shape[0], lay.frames, *lay.grid)
        if ranges is not None and m in ranges:  # [*grid, 2] → per patch slot [1, N, P, 1]
            r = ranges[m].to(logits.device).expand(1, lay.frames, *lay.grid, 2)
            lo, hi = (lay.patchify(r[..., i])[..., None] for i in (0, 1))
            ids = torch.arange(logits.shape[-1], device=logits.device)
            logits = logits.masked_fill((ids < lo) | (ids >= hi), float("-inf"))
        pred_ids = logits.argmax(-1)  # [B, N, P]
        masked = out.mask[m][..., None].expand_as(pred_ids)  # [B, N, P]
        mixed = torch.where(masked, pred_ids, lay.patchify(original))
        result[m] = {"original": original, "mask": lay.unpatchify(masked),
                     "predicted": lay.unpatchify(mixed)}
    return result


def _decode(tokenizer, codes: torch.Tensor) -> torch.Tensor:
    """codes [T, *grid] → audio power [T, F] or faces float [T, 3, S, S]."""
    return tokenizer.decode(codes.to(next(tokenizer.parameters()).device))


@torch.no_grad()
def save_panels(codes: dict[str, dict[str, torch.Tensor]], tokenizers: dict[str, torch.nn.Module],
                out_dir: str | Path, tag: str, sample: int = 0, n_frames: int = 8,
                audio_cfg: AudioConfig | None = None) -> list[Path]:
    """Write `<tag>_audio.png` / `<tag>_visual.png` for one window of the batch and, given the
    audio tokenizer's `audio_cfg`, `<tag>_audio_{original,masked,predicted}.wav` and (with both
    modalities) `<tag>.mp4`; returns the paths."""
    from vqmae import plots  # matplotlib: loaded only when a panel is drawn

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    waves: dict[str, np.ndarray] = {}
    strip: np.ndarray | None = None  # original | masked | predicted faces side by side [T, S, 3S, 3]
    for m, c in codes.items():
        if m not in tokenizers:
            continue
        tok = tokenizers[m]
        views = {k: _decode(tok, c[k][sample]).float().cpu() for k in ("original", "predicted")}
        mask = c["mask"][sample].cpu()  # [T, *grid] bool
        if m == "audio":
            # a masked token covers 513 / 64 bins: grey those bins out in the "masked" view (the
            # spectral tokens only: prosody ids after them cover no bins)
            n_bins, n_spectral = views["original"].shape[1], getattr(tok, "n_learned", mask.shape[1])
            bins = torch.arange(n_bins) * n_spectral // n_bins  # token index of each bin
            hidden = mask[:, bins]  # [T, F]
            floor = float(views["original"].min())
            masked = torch.where(hidden, torch.full_like(views["original"], floor), views["original"])
            paths.append(plots.spectrogram_rows(
                [views["original"].numpy(), masked.numpy(), views["predicted"].numpy()],
                ["original", "masked", "predicted"], out_dir / f"{tag}_audio.png",
                f"audio tokens, {float(mask.float().mean()):.0%} masked"))
            if audio_cfg is not None:
                for view, power in (("original", views["original"]), ("masked", masked),
                                    ("predicted", views["predicted"])):
                    waves[view] = _wave(power, audio_cfg)
                    path = out_dir / f"{tag}_audio_{view}.wav"
                    atomic_write_bytes(path, wav_bytes(waves[view], audio_cfg.sample_rate))
                    paths.append(path)
        else:
            frames = np.linspace(0, mask.shape[0] - 1, n_frames).round().astype(int)
            orig = tensor_to_faces(views["original"][frames])
            pred = tensor_to_faces(views["predicted"][frames])
            size = orig.shape[1]
            scale = size // mask.shape[1]
            hidden = mask[frames].repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
            masked = np.where(hidden[..., None], 128, orig).astype(np.uint8)
            paths.append(plots.image_rows([orig, masked, pred], ["original", "masked", "predicted"],
                                          out_dir / f"{tag}_visual.png",
                                          f"visual tokens, {float(mask.float().mean()):.0%} masked"))
            every = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
            all_orig = tensor_to_faces(views["original"])
            strip = np.concatenate([all_orig, np.where(every[..., None], 128, all_orig).astype(np.uint8),
                                    tensor_to_faces(views["predicted"])], axis=2)
    if strip is not None and "predicted" in waves and audio_cfg is not None:
        path = out_dir / f"{tag}.mp4"
        seconds = codes["audio"]["original"].shape[1] / audio_cfg.frame_rate  # the window's length
        fps = int(round(len(strip) / seconds))
        n = int(round(seconds * audio_cfg.sample_rate))
        sound = np.pad(waves["predicted"], (0, max(0, n - len(waves["predicted"]))))[:n]
        atomic_write_bytes(path, mp4_bytes(strip, sound, audio_cfg.sample_rate, strip.shape[2], strip.shape[1], fps))
        paths.append(path)
    return paths


def _wave(power: torch.Tensor, cfg: AudioConfig) -> np.ndarray:
    """A decoded power spectrogram [T, F] as a listenable wave: Griffin-Lim (seeded, so the same
    codes give the same file), peak-normalised to 0.9."""
    wave = griffin_lim(power, cfg).numpy()
    peak = float(abs(wave).max()) if wave.size else 0.0
    return wave * (0.9 / peak) if peak > 0 else wave
