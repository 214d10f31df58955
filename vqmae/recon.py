"""What the masked-token model learned, made visible: original / masked / predicted codes of a
window decoded through the stage-1 tokenizers into PNG panels (spectrograms and face frames).

The tokenizers are found through the store: `vqmae tokenize` records each tokenizer checkpoint's path
beside its sha256, and `find_tokenizers` only accepts a file whose sha256 matches the store's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vqmae.checkpoint import checkpoint_sha256, load_tokenizer
from vqmae.store import TokenStore

log = logging.getLogger(__name__)

KIND_FILES = {"audio": "audio_vqvae.pt", "visual": "visual_vqvae.pt"}


def find_tokenizers(store: TokenStore, directory: str | Path | None = None,
                    device: str = "cpu") -> dict[str, torch.nn.Module]:
    """{modality: tokenizer} whose checkpoint sha256 equals the store's; modalities without a
    matching file are left out (with a log line saying where it looked)."""
    recorded = (store.attrs.get("config") or {}).get("tokenizers", {})
    found = {}
    for m, spec in store.specs.items():
        candidates = []
        if directory is not None:
            candidates.append(Path(directory) / KIND_FILES[m])
        if m in recorded:
            candidates.append(Path(recorded[m]["path"]))
        for path in candidates:
            if path.is_file() and checkpoint_sha256(path) == spec.tokenizer_sha256:
                model, _ = load_tokenizer(path, device)
                found[m] = model.eval()
                break
        else:
            log.warning("%s: no %s tokenizer with sha256 %s… found (looked at %s): no %s panel",
                        store.path, m, spec.tokenizer_sha256[:12], [str(c) for c in candidates] or
                        "nothing recorded; pass the tokenizers directory", m)
    return found


@torch.no_grad()
def predicted_codes(model, batch: dict[str, torch.Tensor], generator: torch.Generator
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """Per modality: original codes [B, T, *grid], the patch mask unpatchified to tokens
    [B, T, *grid] (True = masked) and the codes with masked tokens replaced by the model's argmax."""
    was = model.training
    model.eval()
    out = model(batch, generator, return_logits=True)
    model.train(was)
    result = {}
    for m, logits in out.logits.items():
        lay = model.layouts[m]
        original = batch[m].reshape(batch[m].shape[0], lay.frames, *lay.grid)
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
                out_dir: str | Path, tag: str, sample: int = 0, n_frames: int = 8) -> list[Path]:
    """Write `<tag>_audio.png` / `<tag>_visual.png` for one window of the batch; returns the paths."""
    from vqmae import plots
    from vqmae.tokenize import tensor_to_faces

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for m, c in codes.items():
        if m not in tokenizers:
            continue
        tok = tokenizers[m]
        views = {k: _decode(tok, c[k][sample]).float().cpu() for k in ("original", "predicted")}
        mask = c["mask"][sample].cpu()  # [T, *grid] bool
        if m == "audio":
            # a masked token covers 513 / 64 bins: grey those bins out in the "masked" view
            n_bins = views["original"].shape[1]
            bins = torch.arange(n_bins) * mask.shape[1] // n_bins  # token index of each bin
            hidden = mask[:, bins]  # [T, F]
            floor = float(views["original"].min())
            masked = torch.where(hidden, torch.full_like(views["original"], floor), views["original"])
            paths.append(plots.spectrogram_rows(
                [views["original"].numpy(), masked.numpy(), views["predicted"].numpy()],
                ["original", "masked", "predicted"], out_dir / f"{tag}_audio.png",
                f"audio tokens, {float(mask.float().mean()):.0%} masked"))
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
    return paths


def load_mae(path: str | Path, device: str = "cpu"):
    """(model, checkpoint, config) rebuilt from a `mae` checkpoint's stored config and dims."""
    from vqmae.checkpoint import load_checkpoint
    from vqmae.config import Config
    from vqmae.mae import MAEDims, MAEModel

    ckpt = load_checkpoint(path, kind="mae")
    cfg = Config.from_dict(ckpt["config"])
    model = MAEModel(cfg.mae, MAEDims.from_dict(ckpt["extra"]["dims"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt, cfg


def reconstruct(mae_path: str | Path, store_path: str | Path, out_dir: str | Path, *,
                tokenizers_dir: str | Path | None = None, n_windows: int = 2, seed: int = 0,
                masking: str | None = None, device: str = "cpu") -> list[Path]:
    """Panels for the first `n_windows` validation windows of `store_path` (fixed masking seed)."""
    from dataclasses import replace

    from vqmae.pretrain import batch_dict, check_parents
    from vqmae.windows import WindowData

    model, ckpt, cfg = load_mae(mae_path, device)
    store = TokenStore.open(store_path)
    check_parents(Path(mae_path), ckpt["parents"], store)
    if masking is not None:
        cfg = replace(cfg, mae=replace(cfg.mae, masking=masking))
        model.cfg = cfg.mae
    tokenizers = find_tokenizers(store, tokenizers_dir, device)
    data = WindowData(store, cfg)
    rows, starts = data.val_windows()
    if len(rows) == 0:
        rows, starts = data.plan.batch(0, n_windows)
    batch = batch_dict(data.windows(rows[:n_windows], starts[:n_windows]), device)
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = predicted_codes(model, batch, gen)
    paths = []
    for i in range(min(n_windows, len(batch[next(iter(codes))]))):
        paths += save_panels(codes, tokenizers, out_dir, f"step{ckpt['step']}_window{i}", sample=i)
    return paths
