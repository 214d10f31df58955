"""`vqmae reconstruct`: what a pretrained MAE predicts for masked tokens, decoded through the
store's own tokenizers (found by the paths the store recorded, sha256-checked) into PNG panels and,
for audio, WAV files to listen to."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from vqmae.checkpoint import check_parents, load_mae, store_tokenizers
from vqmae.config import Config
from vqmae.recon import predicted_codes, save_panels
from vqmae.store import TokenStore
from vqmae.windows import WindowData, batch_dict


def reconstruct(mae_path: str | Path, store_path: str | Path, out_dir: str | Path, *,
                tokenizers_dir: str | Path | None = None, n_windows: int = 2, seed: int = 0,
                masking: str | None = None, device: str = "cpu") -> list[Path]:
    """PNG panels (and, for audio, original / predicted WAVs) for the first `n_windows` validation
    windows of `store_path` (fixed masking seed); returns the paths written."""
    model, ckpt, cfg = load_mae(mae_path, device)
    store = TokenStore.open(store_path)
    check_parents(Path(mae_path), ckpt["parents"], store)
    if masking is not None:
        cfg = replace(cfg, mae=replace(cfg.mae, masking=masking))
        model.cfg = cfg.mae
    loaded = store_tokenizers(store, directory=tokenizers_dir, device=device, required=False)
    tokenizers = {m: t.model for m, t in loaded.items()}
    audio_cfg = Config.from_dict(loaded["audio"].ckpt["config"]).audio if "audio" in loaded else None
    data = WindowData(store, cfg)
    rows, starts = data.val_windows()
    if len(rows) == 0:
        rows, starts = data.plan.batch(0, n_windows)
    batch = batch_dict(data.windows(rows[:n_windows], starts[:n_windows]), device)
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = predicted_codes(model, batch, gen, {m: t.id_ranges() for m, t in tokenizers.items()})
    paths = []
    for i in range(min(n_windows, len(batch[next(iter(codes))]))):
        paths += save_panels(codes, tokenizers, out_dir, f"step{ckpt['step']}_window{i}", sample=i,
                             audio_cfg=audio_cfg)
    return paths
