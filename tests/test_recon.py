"""Reconstruction panels: masked tokens predicted, visible ones kept, decoded through real tokenizers."""

import wave

import numpy as np
import torch
from typer.testing import CliRunner

from vqmae_cli.main import app
from vqmae.checkpoint import checkpoint_sha256, load_mae, save_checkpoint, store_tokenizers
from vqmae.config import load_config, resolve_modalities
from vqmae.models.tokenizers import build_tokenizer
from vqmae.recon import predicted_codes
from vqmae.stages.pretrain import pretrain
from vqmae.store import ModalitySpec, StoreWriter, TokenStore, merge
from vqmae.windows import WindowData, batch_dict

OVERRIDES = ["mae.window_seconds=0.4", "mae.width=32", "mae.heads=2", "mae.encoder_depth=1",
             "mae.decoder_depth=1", "mae.head_dim=8", "pretrain.batch_size=4", "pretrain.steps=2",
             "pretrain.warmup_steps=1", "pretrain.val_every=2", "pretrain.ckpt_every=2",
             "pretrain.val_fraction=0.3"]


def build(tmp_path):
    cfg = load_config("tiny", OVERRIDES)
    toks, specs = {}, {}
    for m, kind in (("audio", "audio_vqvae"), ("visual", "visual_vqvae")):
        model = build_tokenizer(kind, cfg)
        path = save_checkpoint(tmp_path / "tok" / f"{kind}.pt", kind=kind, model=model, config=cfg)
        toks[m] = {"path": str(path), "sha256": checkpoint_sha256(path)}
        specs[m] = ModalitySpec(m, model.codebook_size, tuple(model.grid), model.frame_rate,
                                toks[m]["sha256"])
    rng = np.random.default_rng(0)
    store = tmp_path / "s.zarr"
    with StoreWriter(store, specs, config={"tokenizers": toks}) as w:
        for i in range(6):
            tv = 12
            w.add({"clip_id": f"c{i}", "index": i}, {"audio": rng.integers(0, 256, (2 * tv, *specs["audio"].grid)),
                                                      "visual": rng.integers(0, 512, (tv, 576))})
    merge(store)
    pretrain(store, cfg, tmp_path / "run")
    return cfg, store


def test_visible_tokens_kept_masked_predicted_and_panels_written(tmp_path):
    cfg, store = build(tmp_path)
    model, ckpt, stored = load_mae(tmp_path / "run" / "mae.pt")
    assert stored == resolve_modalities(cfg, ("audio", "visual")) and stored.mae.modalities == "av"
    assert {p.name for p in (tmp_path / "run" / "recon").iterdir()} == {
        "step0000002_audio.png", "step0000002_visual.png"}  # written by the training loop itself
    s = TokenStore.open(store)
    assert set(store_tokenizers(s, required=False)) == {"audio", "visual"}
    data = WindowData(s, cfg)
    rows, starts = data.val_windows()
    batch = batch_dict(data.windows(rows[:2], starts[:2]), "cpu")
    codes = predicted_codes(model, batch, torch.Generator().manual_seed(0))
    for m, c in codes.items():
        keep = ~c["mask"]
        assert torch.equal(c["predicted"][keep], c["original"][keep])
        assert c["mask"].any() or m == "audio"
    # the audio grid is 64 spectral codes + 4 prosody ids, each with its own ids: a prediction
    # stays in its position's range (an untrained head's argmax over all 358 ids need not)
    ranges = build_tokenizer("audio_vqvae", cfg).id_ranges()
    assert ranges.shape == (68, 2) and ranges[:64].tolist() == [[0, 256]] * 64 and ranges[64:, 0].tolist() == [256, 294, 326, 342]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        c = predicted_codes(model, batch, gen, {"audio": ranges})["audio"]  # [B, T, 68] each
        inside = (c["predicted"] >= ranges[:, 0]) & (c["predicted"] < ranges[:, 1])
        assert c["mask"][..., 64:].any() and inside[c["mask"]].all()
    res = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "run" / "mae.pt"), str(store),
                                   "--out", str(tmp_path / "png"), "--windows", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "step2_window0.mp4", "step2_window0_audio.png", "step2_window0_audio_masked.wav",
        "step2_window0_audio_original.wav", "step2_window0_audio_predicted.wav", "step2_window0_visual.png"]
    # the MP4: original | masked | predicted faces side by side, every frame, with the predicted sound
    import decord

    video = decord.VideoReader(str(tmp_path / "png" / "step2_window0.mp4"))
    size = cfg.face.size
    assert video[0].shape == (size, 3 * size, 3) and len(video) == round(cfg.mae.window_seconds * cfg.video.fps)
    sound = decord.AudioReader(str(tmp_path / "png" / "step2_window0.mp4"), sample_rate=cfg.audio.sample_rate)
    assert abs(sound.shape[1] / cfg.audio.sample_rate - cfg.mae.window_seconds) < 0.1
    for view in ("original", "masked", "predicted"):  # listenable: 16-bit mono at the tokenizer's rate, not silent
        with wave.open(str(tmp_path / "png" / f"step2_window0_audio_{view}.wav")) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, cfg.audio.sample_rate)
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
        assert len(pcm) >= cfg.mae.window_seconds * cfg.audio.sample_rate * 0.9 and np.abs(pcm).max() > 1000
