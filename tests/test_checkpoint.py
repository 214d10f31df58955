"""Checkpoint format vqmae-ckpt/1: weights_only roundtrip, rebuild from stored config, errors,
atomic writes."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vqmae
from vqmae.checkpoint import (FORMAT, CheckpointError, checkpoint_sha256, clean_state_dict,
                              load_checkpoint, load_tokenizer, restore_rng, save_checkpoint)
from vqmae.config import load_config
from vqmae.models.tokenizers import build_tokenizer


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: see tests/test_tokenizers.py
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg():
    # Not today's defaults: a rebuild that ignored the stored config would not fit these weights.
    return load_config("tiny", ["audio_vq.channels=16", "audio_vq.codebook_size=64"])


@pytest.fixture
def audio(cfg):
    model = build_tokenizer("audio_vqvae", cfg)
    model(torch.rand(8, 513))  # one training forward: codebook initialised from data
    return model.eval()


@pytest.fixture
def saved(tmp_path, audio, cfg):
    return save_checkpoint(tmp_path / "audio.pt", kind="audio_vqvae", model=audio, config=cfg,
                           parents={"corpus": "ab" * 32}, step=7,
                           metrics={"loss/recon": torch.tensor(0.5)})


def test_roundtrip_loads_weights_only_with_every_field(saved, audio, cfg):
    raw = torch.load(saved, weights_only=True)
    assert raw["format"] == FORMAT == "vqmae-ckpt/1"
    assert raw["kind"] == "audio_vqvae" and raw["vqmae_version"] == vqmae.__version__
    assert raw["config"] == cfg.to_dict()
    assert raw["parents"] == {"corpus": "ab" * 32}
    assert raw["step"] == 7 and raw["metrics"] == {"loss/recon": 0.5}
    assert raw["optimizer"] is None and raw["scheduler"] is None and raw["extra"] == {}
    assert set(raw["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert raw["state_dict"].keys() == audio.state_dict().keys()
    assert all(torch.equal(raw["state_dict"][k], v) for k, v in audio.state_dict().items())
    assert load_checkpoint(saved, kind="audio_vqvae")["step"] == 7


def test_load_tokenizer_rebuilds_from_stored_config_with_identical_outputs(saved, audio):
    model, ckpt = load_tokenizer(saved, "cpu", kind="audio_vqvae")
    assert not model.training and model.codebook_size == 64 + 102  # 64 codes, then the prosody ids
    assert model.encoder[0].out_channels == 16  # from the file, not from the paper/tiny defaults
    x = torch.rand(5, 513)
    with torch.no_grad():
        assert torch.equal(model.encode(x), audio.encode(x))
        codes = audio.encode(x)
        assert torch.equal(model.decode(codes), audio.decode(codes))
        assert torch.equal(model(x).recon, audio(x).recon)
    assert ckpt["config"]["audio_vq"]["channels"] == 16


def test_wrapper_prefixes_are_stripped(tmp_path, audio, cfg):
    class DataParallelLike(nn.Module):  # DDP's state dict prefix without a process group
        def __init__(self, module):
            super().__init__()
            self.module = module

    # torch.compile wraps lazily: building the wrapper compiles nothing.
    wrapped = DataParallelLike(torch.compile(audio))
    assert next(iter(wrapped.state_dict())).startswith("module._orig_mod.")
    path = save_checkpoint(tmp_path / "w.pt", kind="audio_vqvae", model=wrapped, config=cfg)
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert stored.keys() == audio.state_dict().keys()
    model, _ = load_tokenizer(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in audio.state_dict().items())
    # a compiled submodule leaves `_orig_mod` in the middle of the key
    assert list(clean_state_dict({"enc._orig_mod.w": torch.ones(1)})) == ["enc.w"]
    with pytest.raises(CheckpointError, match="collide.*'w'"):
        clean_state_dict({"module.w": torch.ones(1), "w": torch.ones(1)})


def test_wrong_kind_names_file_and_both_kinds(saved):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(saved, kind="visual_vqvae")
    msg = str(err.value)
    assert str(saved) in msg and "'audio_vqvae'" in msg and "'visual_vqvae'" in msg
    with pytest.raises(CheckpointError, match=r"audio\.pt.*'audio_vqvae', expected 'mae'"):
        load_tokenizer(saved, kind="mae")


def test_non_tokenizer_checkpoint_is_not_a_tokenizer(tmp_path, cfg):
    path = save_checkpoint(tmp_path / "mae.pt", kind="mae", model=nn.Linear(2, 2), config=cfg)
    with pytest.raises(CheckpointError,
                       match=r"mae\.pt: checkpoint kind is 'mae', expected a tokenizer"):
        load_tokenizer(path)


def test_unknown_format_names_file_and_both_formats(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": "vqmae-ckpt/99", "kind": "audio_vqvae"}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "'vqmae-ckpt/99'" in msg and "'vqmae-ckpt/1'" in msg
    torch.save({"weights": torch.ones(2)}, tmp_path / "bare.pt")  # a plain state dict, no format
    with pytest.raises(CheckpointError, match=r"bare\.pt: unknown checkpoint format None"):
        load_checkpoint(tmp_path / "bare.pt")


def test_truncated_corrupt_and_missing_files_name_the_file(tmp_path, saved):
    data = saved.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot read checkpoint \(truncated"):
        load_checkpoint(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a checkpoint \(a torch checkpoint is a zip"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint file does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_pickled_objects_are_refused_on_load(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "kind": "mae", "config": {}, "state_dict": {},
                "obj": nn.Linear(1, 1)}, path)
    with pytest.raises(CheckpointError, match=r"pickled\.pt: .*pickled Python objects.*Linear"):
        load_checkpoint(path)


def test_stored_config_from_another_version_is_an_error(tmp_path, audio, cfg):
    stale = cfg.to_dict()
    stale["audio_vq"]["retired_option"] = 3
    path = save_checkpoint(tmp_path / "old.pt", kind="audio_vqvae", model=audio, config=stale)
    with pytest.raises(CheckpointError, match=r"old\.pt: stored config.*audio_vq\.retired_option"):
        load_tokenizer(path)


def test_weights_that_do_not_fit_the_stored_config(tmp_path, audio):
    path = save_checkpoint(tmp_path / "mismatch.pt", kind="audio_vqvae", model=audio,
                           config=load_config("tiny"))  # says 32 channels, weights have 16
    with pytest.raises(CheckpointError, match=r"mismatch\.pt: weights do not fit"):
        load_tokenizer(path)


def test_save_refuses_values_weights_only_cannot_read(tmp_path, audio, cfg):
    with pytest.raises(CheckpointError, match=r"bad\.pt: checkpoint\.extra\.when is a set"):
        save_checkpoint(tmp_path / "bad.pt", kind="audio_vqvae", model=audio, config=cfg,
                        extra={"when": {1, 2}})
    with pytest.raises(CheckpointError, match="unknown checkpoint kind 'tokenizer'"):
        save_checkpoint(tmp_path / "bad.pt", kind="tokenizer", model=audio, config=cfg)
    with pytest.raises(CheckpointError, match="parent 'mae' must be a sha256 string"):
        save_checkpoint(tmp_path / "bad.pt", kind="classifier", model=audio, config=cfg,
                        parents={"mae": 123})
    assert not (tmp_path / "bad.pt").exists()


def test_interrupted_write_keeps_old_file_and_leaves_no_partial(tmp_path, monkeypatch, audio,
                                                                cfg):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, kind="audio_vqvae", model=audio, config=cfg, step=1)
    before = checkpoint_sha256(path)

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, kind="audio_vqvae", model=audio, config=cfg, step=2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "fresh.pt", kind="audio_vqvae", model=audio, config=cfg)
    assert checkpoint_sha256(path) == before and load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_optimizer_and_scheduler_state_roundtrip(tmp_path, cfg):
    model = build_tokenizer("audio_vqvae", cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(4, 513)).loss.backward()
        opt.step()
        sched.step()
    path = save_checkpoint(tmp_path / "resume.pt", kind="audio_vqvae", model=model, config=cfg,
                           optimizer=opt, scheduler=sched, step=3)
    ckpt = load_checkpoint(path)
    model2 = build_tokenizer("audio_vqvae", cfg)
    model2.load_state_dict(ckpt["state_dict"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 10))
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 3
    for (i, s1), s2 in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1), i


def test_restore_rng_replays_every_generator(saved):
    ckpt = load_checkpoint(saved)
    restore_rng(ckpt)
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    restore_rng(ckpt)
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and first[3] == again[3]
    with pytest.raises(CheckpointError, match="no RNG state"):
        restore_rng({"format": FORMAT})


def test_rng_state_is_taken_at_save_time(tmp_path, audio, cfg):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    path = save_checkpoint(tmp_path / "r.pt", kind="audio_vqvae", model=audio, config=cfg)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.rand(10), np.random.rand(10), random.random()  # move every generator on
    restore_rng(load_checkpoint(path))
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]


def test_checkpoint_sha256_is_the_file_hash(saved, tmp_path, audio, cfg):
    assert checkpoint_sha256(saved) == hashlib.sha256(Path(saved).read_bytes()).hexdigest()
    other = save_checkpoint(tmp_path / "other.pt", kind="audio_vqvae", model=audio, config=cfg,
                            step=8)
    assert checkpoint_sha256(other) != checkpoint_sha256(saved)
