"""Stage 1 end to end on a small corpus of real files: train, evaluate, encode, resume, refuse."""

import csv
import json
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from skimage.data import astronaut
from typer.testing import CliRunner

from vqmae_cli.main import app
from tests.conftest import write_video, write_wav
from vqmae.checkpoint import checkpoint_sha256
from vqmae.store import TokenStore

FACE = cv2.resize(astronaut()[0:260, 110:330], (128, 128))
FAST = ["--preset", "tiny", "--set", "audio_vq.steps=20", "--set", "visual_vq.steps=20",
        "--set", "audio_vq.batch_frames=64", "--set", "visual_vq.batch_frames=8",
        "--set", "audio_vq.warmup_steps=2", "--set", "visual_vq.warmup_steps=2",
        "--set", "store.segment_clips=2"]


def face_frame(seed):
    def fn(k):
        return np.roll(FACE, ((k + seed) % 7) - 3, axis=1)
    return fn


def make_corpus(root, n_video=6, n_audio=2, bad=True):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n_video):
        write_video(root / f"v{i}.mp4", n_frames=20 + 3 * i, size=128, frame_fn=face_frame(i))
        rows.append([f"v{i}.mp4", f"s{i % 3}", ["happy", "sad"][i % 2]])
    for i in range(n_audio):
        write_wav(root / f"a{i}.wav", (0.3 * rng.standard_normal(12000)).astype(np.float32))
        rows.append([f"a{i}.wav", f"s{i}", "angry"])
    if bad:
        (root / "broken.mp4").write_bytes(b"\0" * 500)
        rows.append(["broken.mp4", "s9", "sad"])
        rows.append(["gone.mp4", "s9", "sad"])  # listed, never written: skipped at scan
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "speaker", "label"])
        w.writerows(rows)
    return root / "manifest.csv"


def run_cli(args, code=0):
    """Run the CLI; `code` 1 when some inputs fail (the corpus's broken.mp4), as every command does."""
    res = CliRunner().invoke(app, args)
    assert res.exit_code == code, res.output
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    manifest = make_corpus(tmp / "corpus")
    store = tmp / "a.zarr"
    run = tmp / "run"
    res = run_cli(["tokenize", str(manifest), "--out", str(store), "--run-dir", str(run),
                   "--face", "haar", "--workers", "0", "--device", "cpu", *FAST], code=1)
    return tmp, manifest, store, run, res


def test_train_and_encode(trained):
    tmp, manifest, store, run, res = trained
    s = TokenStore.open(store)
    assert s.n_clips == 10  # 8 encoded, 1 failed, 1 skipped at scan: every input has a row
    table = s.clips
    ok = table["status"] == "ok"
    assert ok.sum() == 8 and "broken.mp4" in str(table["path"][~ok][0])
    scan_rows = [(c, p, e) for c, p, e in s.failures() if e.startswith("scan: ")]
    assert len(scan_rows) == 1 and scan_rows[0][0] == f"skipped:{scan_rows[0][1]}"
    assert scan_rows[0][1].endswith("gone.mp4") and "does not exist" in scan_rows[0][2]
    # alignment: two audio frames per video frame; audio-only clips have no visual frames
    vid = table["visual_length"] > 0
    np.testing.assert_array_equal(table["audio_length"][vid], 2 * table["visual_length"][vid])
    assert vid.sum() == 6
    for m, kind in (("audio", "audio_vqvae"), ("visual", "visual_vqvae")):
        assert s.specs[m].tokenizer_sha256 == checkpoint_sha256(run / "tokenizers" / f"{kind}.pt")
        codes = s.codes(m)
        assert codes.dtype == np.uint16 and codes.max() < s.specs[m].codebook_size
    assert s.specs["visual"].grid == (24, 24) and s.specs["audio"].grid == (64 + 4,)  # + prosody ids
    for name in ("audio_recon.png", "visual_recon.png", "audio_codebook.png", "eval.json"):
        assert (run / "tokenizers" / name).exists()
    assert (run / "metrics.jsonl").read_text().count("\n") >= 4
    failures = list(csv.reader(open(run / "failures.csv")))
    assert failures[1][0].endswith("broken.mp4") and failures[1][1] == "video"
    # every input accounted for: the listed file that does not exist is in the list too
    assert [r[1] for r in failures[1:] if "gone.mp4" in r[0]] == ["scan"]  # once, though in the store too
    assert "tokenize summary" in res.output and "inputs skipped at scan" in res.output
    # the held-out evaluation also reads the pitch and energy back from the prosody ids
    ev = json.loads((run / "tokenizers" / "eval.json").read_text())["audio"]
    assert {"ids_f0_corr", "ids_f0_within_5pct", "ids_energy_corr"} <= set(ev) and ev["ids_energy_corr"] > 0.9
    assert "audio prosody ids, the pitch and energy of their bins" in " ".join(res.output.split())


def test_second_corpus_with_same_tokenizers(trained, tmp_path):
    tmp, manifest, store, run, _ = trained
    other = make_corpus(tmp_path / "other", n_video=2, n_audio=1, bad=False)
    store2 = tmp_path / "b.zarr"
    run_cli(["tokenize", str(other), "--out", str(store2), "--tokenizers", str(run / "tokenizers"),
             "--run-dir", str(tmp_path / "run2"), "--face", "haar", "--workers", "0", *FAST])
    a, b = TokenStore.open(store), TokenStore.open(store2)
    assert {m: s.tokenizer_sha256 for m, s in a.specs.items()} == \
           {m: s.tokenizer_sha256 for m, s in b.specs.items()}
    # the same clip encoded by the same tokenizers gives the same codes
    np.testing.assert_array_equal(b.clip_codes("audio", 0), a.clip_codes("audio", 0))


def test_store_refuses_other_tokenizers(trained, tmp_path):
    tmp, manifest, store, run, _ = trained
    other_run = tmp_path / "run3"
    run_cli(["tokenize", str(manifest), "--out", str(tmp_path / "c.zarr"), "--run-dir", str(other_run),
             "--train-only", "--face", "haar", "--workers", "0", *FAST, "--set", "seed=1"], code=1)
    res = CliRunner().invoke(app, ["tokenize", str(manifest), "--out", str(store), "--tokenizers",
                                   str(other_run / "tokenizers"), "--face", "haar", "--workers", "0",
                                   "--run-dir", str(tmp_path / "r4"), *FAST])
    assert res.exit_code == 2
    assert "tokenizer_sha256" in res.output and "store has" in " ".join(res.output.split())


ENCODE_SCRIPT = """
import sys, time
from pathlib import Path
from vqmae.config import load_config
from vqmae.datasets import scan
from vqmae.checkpoint import load_tokenizers
from vqmae.encoding import encode_corpus
manifest, store, tok, delay = sys.argv[1:5]
cfg = load_config("tiny", ["face.mode=haar", "store.segment_clips=2"])
tokenizers = load_tokenizers(Path(tok), ("audio", "visual"), "cpu")
scanned = scan(manifest)
encode_corpus(scanned.clips, cfg, Path(store), tokenizers, workers=0,
              on_clip=lambda: time.sleep(float(delay)), skipped=scanned.skipped)
"""


def test_sigkill_then_rerun_equals_uninterrupted(trained, tmp_path):
    tmp, manifest, store, run, _ = trained
    killed = tmp_path / "k.zarr"
    cmd = [sys.executable, "-c", ENCODE_SCRIPT, str(manifest), str(killed), str(run / "tokenizers")]
    proc = subprocess.Popen(cmd + ["0.4"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed.parent / (killed.name + ".parts")
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in parts.glob("seg-*") if not p.name.endswith(".tmp")]:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "zarr.json").exists()  # it really was interrupted before the merge
    subprocess.run(cmd + ["0"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = TokenStore.open(store), TokenStore.open(killed)
    for col in ("clip_id", "status", "audio_start", "audio_length", "visual_start", "visual_length"):
        np.testing.assert_array_equal(a.clips[col], b.clips[col])
    for m in ("audio", "visual"):
        np.testing.assert_array_equal(a.codes(m), b.codes(m))


def test_inspect_checkpoint_and_store(trained):
    tmp, manifest, store, run, _ = trained
    res = run_cli(["inspect", str(run / "tokenizers" / "audio_vqvae.pt")])
    assert "audio_vqvae" in res.output and "vqmae-ckpt/1" in res.output and "loss/total" in res.output
    res = run_cli(["inspect", str(store)])
    assert "vqmae-tokens/1" in res.output and "failed" in res.output
    bad = tmp / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(app, ["inspect", str(bad)])
    assert res.exit_code == 2 and "bad.pt" in res.output


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_tokenizer_training_resumes_exactly(tmp_path, modality):
    import torch

    from vqmae.config import load_config
    from vqmae.framepool import FramePool
    from vqmae.stages.tokenize import train_one

    cfg = load_config("tiny", ["audio_vq.steps=8", "visual_vq.steps=8", "audio_vq.batch_frames=32",
                               "visual_vq.batch_frames=4", "audio_vq.warmup_steps=2",
                               "visual_vq.warmup_steps=2"])
    rng = np.random.default_rng(0)
    if modality == "audio":
        pool = FramePool(500, (513,), np.float32)
        pool.add((rng.random((500, 513)) * np.logspace(1, -3, 513)).astype(np.float32))
    else:
        pool = FramePool(40, (96, 96, 3), np.uint8)
        pool.add(rng.integers(0, 255, (40, 96, 96, 3), dtype=np.uint8))
    (tmp_path / "full").mkdir(); (tmp_path / "part").mkdir()
    full = train_one(modality, pool, cfg, tmp_path / "full", device="cpu", log_every=2)
    train_one(modality, pool, cfg, tmp_path / "part", device="cpu", log_every=2, max_steps=3)
    part = train_one(modality, pool, cfg, tmp_path / "part", device="cpu", log_every=2)
    a = torch.load(full, weights_only=True)
    b = torch.load(part, weights_only=True)
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.parametrize("mode", ["folder", "manifest"])
def test_hostile_corpus_every_input_accounted_for(trained, tmp_path, mode):
    """The hostile-media corpus (tests/test_hostile.py) through `vqmae tokenize` with trained
    tokenizers: every input is a store row and is encoded or listed in failures.csv with a reason."""
    import os

    from tests.test_hostile import build

    _, _, _, run, _ = trained
    root = tmp_path / "hostile"
    inputs = build(root)
    if mode == "folder":
        source, expected = [str(root), "--kind", "folder"], inputs + [root / "spk" / "cycle"]
    else:
        manifest = tmp_path / "manifest.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["path", "speaker"], *[[str(p), "spk"] for p in inputs]])
        source, expected = [str(manifest)], inputs
    store, hrun = tmp_path / "h.zarr", tmp_path / "hrun"
    res = run_cli(["tokenize", *source, "--out", str(store), "--tokenizers", str(run / "tokenizers"),
                   "--run-dir", str(hrun), "--face", "none", "--workers", "2", "--device", "cpu", *FAST], code=1)
    assert "Traceback" not in res.output
    table = TokenStore.open(store).clips
    ok = sorted(os.path.abspath(p) for p in table["path"][table["status"] == "ok"])
    failed = list(csv.DictReader(open(hrun / "failures.csv", newline="", encoding="utf-8")))
    assert all(r["reason"].strip() for r in failed)
    want = sorted(os.path.abspath(p) for p in expected)
    assert sorted(ok + [os.path.abspath(r["path"]) for r in failed]) == want
    assert sorted(os.path.abspath(p) for p in table["path"]) == want  # one store row per input
    names = {os.path.basename(p) for p in ok}
    assert {"good.mp4", "nön-äscii.mp4", "opus_voice.opus", "audio_only.mp4", "mpeg4_ac3.avi",
            "six_ch_48k_int32.wav"} <= names
