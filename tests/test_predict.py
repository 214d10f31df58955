"""`vqmae predict` on real media: real (tiny) tokenizers, a store they encoded, and a classifier that
`vqmae.stages.finetune` wrote; scores checked against stage 3's own clip scoring of the store's codes."""

from __future__ import annotations

import csv
import os
import io
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import typer
from rich.console import Console
from skimage.data import astronaut
from typer.testing import CliRunner

from vqmae_cli.predict import predict as predict_cmd
from tests.conftest import write_video, write_wav
from vqmae.checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
from vqmae.config import load_config
from vqmae.datasets import scan
from vqmae.stages.finetune import finetune
from vqmae.stages.finetune.data import ClipWindows, predict_clips
from vqmae.media import read_audio
from vqmae.stages.predict import InputError, PredictError, Predictor
from vqmae.store import TokenStore
from vqmae.checkpoint import load_tokenizers
from vqmae.encoding import encode_corpus
from vqmae.stages.tokenize import train_tokenizers

FACE = cv2.resize(astronaut()[0:260, 110:330], (128, 128))
CFG = ["face.mode=haar", "audio_vq.steps=6", "visual_vq.steps=6", "audio_vq.batch_frames=64",
       "visual_vq.batch_frames=8", "audio_vq.warmup_steps=1", "visual_vq.warmup_steps=1",
       "mae.width=32", "mae.heads=2", "mae.encoder_depth=1", "mae.head_dim=8", "mae.window_seconds=0.4",
       "finetune.inits=scratch", "finetune.folds=3", "finetune.epochs=2", "finetune.batch_size=8",
       "finetune.eval_modalities=av", "finetune.dropout=0.1", "store.segment_clips=4"]


def face_frames(shift):
    return lambda k: np.roll(FACE, ((k + shift) % 7) - 3, axis=1)


def noise(seconds, seed):
    return (0.3 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """3 speakers × (2 face videos + 1 wav) → tokenizers → store → a 3-fold scratch fine-tuning run."""
    tmp = tmp_path_factory.mktemp("pred")
    corpus = tmp / "corpus"
    corpus.mkdir()
    rows = []
    for s in range(3):
        for j in range(2):
            name = f"v{s}{j}.mp4"
            write_video(corpus / name, n_frames=22 + 5 * j + 2 * s, size=128, frame_fn=face_frames(s + j))
            rows.append(f"{name},spk{s},{['happy', 'sad'][j]}")
        write_wav(corpus / f"a{s}.wav", noise(0.7 + 0.2 * s, s))
        rows.append(f"a{s}.wav,spk{s},sad")
    (corpus / "manifest.csv").write_text("path,speaker,label\n" + "\n".join(rows) + "\n")
    clips = scan(corpus / "manifest.csv").clips
    cfg = load_config("tiny", CFG)
    train_tokenizers(clips, cfg, tmp / "tok", workers=0, heldout_fraction=0.0)
    toks = load_tokenizers(tmp / "tok" / "tokenizers", ("audio", "visual"), "cpu")
    encode_corpus(clips, cfg, tmp / "s.zarr", toks, workers=0)
    finetune(tmp / "s.zarr", cfg, tmp / "ft")
    ckpt = tmp / "ft" / "units" / "scratch" / "frac1" / "fold0" / "classifier.pt"
    return tmp, corpus, ckpt, Predictor.load(ckpt)


def _store_scores(predictor, store, rows, mode):
    data = ClipWindows(store, predictor.modalities, 0.4)
    out, _, _ = predict_clips(predictor.model, data, rows, mode, "cpu", 4)
    return torch.softmax(torch.from_numpy(out), -1).numpy()


def test_model_is_rebuilt_from_the_checkpoint(setup):
    tmp, _, ckpt, p = setup
    stored = load_checkpoint(ckpt, kind="classifier")
    state = p.model.state_dict()
    assert set(state) == set(stored["state_dict"])
    assert all(torch.equal(state[k], stored["state_dict"][k]) for k in state)
    assert p.task_kind == "classify" and p.names == ("happy", "sad")
    assert p.modalities == ("audio", "visual")
    assert p.geom.frames == {"visual": 10, "audio": 20}  # the MAE's 0.4 s window, not today's 2 s
    assert {m: t.sha256 for m, t in p.tokenizers.items()} == \
           {m: stored["parents"][f"{m}_tokenizer"] for m in ("audio", "visual")}


def test_media_scores_equal_stage3_scores_of_the_store_codes(setup):
    """Decoding + encoding a file and scoring it gives predict_clips' scores of its store codes
    (same windows, same averaging); predict_many batching windows across files gives the same."""
    tmp, corpus, _, p = setup
    store = TokenStore.open(tmp / "s.zarr")
    rows = np.flatnonzero(store.clips["status"] == "ok")
    assert len(rows) == 9
    expected = _store_scores(p, store, rows, "av")
    paths = [str(x) for x in store.clips["path"][rows]]
    many = p.predict_many([corpus], batch_windows=5)
    assert not many.failures and [x.path for x in many.predictions] == sorted(paths)
    by_path = {x.path: x for x in many.predictions}
    for path, row, want in zip(paths, rows, expected):
        one = p.predict(path)
        np.testing.assert_allclose(one.scores, want, atol=1e-5)
        np.testing.assert_allclose(by_path[path].scores, want, atol=1e-5)
        assert one.scores.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(one.window_scores.sum(1), 1.0, atol=1e-6)
        assert one.top == p.names[int(np.argmax(want))]
        video = path.endswith(".mp4")
        assert one.modality == ("av" if video else "audio") and one.warnings == []
        n_vis = int(store.clips["visual_length"][row])
        n_steps = n_vis if video else -(-int(store.clips["audio_length"][row]) // 2)
        n_windows = -(-n_steps // 10)
        np.testing.assert_allclose(one.starts, np.arange(n_windows) * 0.4)
        assert one.window_scores.shape == (n_windows, 2) and one.duration == pytest.approx(n_steps / 25)


def test_same_speaker_scores_equal_stage3_speaker_normalised_scores(setup):
    """--same-speaker over one speaker's files scores them as fine-tuning scored a test speaker:
    that speaker's own mean features (per presence pattern: its videos AV, its wav audio alone) are
    subtracted; the default (the training speakers' stored mean) gives other scores."""
    tmp, corpus, _, p = setup
    assert p.speaker_norm
    store = TokenStore.open(tmp / "s.zarr")
    rows = np.flatnonzero((store.clips["status"] == "ok") & (store.clips["speaker"] == "spk1"))
    assert len(rows) == 3
    data = ClipWindows(store, p.modalities, 0.4)
    out, _, _ = predict_clips(p.model, data, rows, "av", "cpu", 4, groups=np.zeros(store.n_clips, np.int64))
    want = torch.softmax(torch.from_numpy(out), -1).numpy()
    paths = [str(x) for x in store.clips["path"][rows]]
    got = p.predict_many(paths, same_speaker=True, batch_windows=3)
    assert not got.failures and [x.path for x in got.predictions] == paths
    for g, w in zip(got.predictions, want):
        np.testing.assert_allclose(g.scores, w, atol=1e-5)
    # several speakers at once, as stage 3 scores a fold's test speakers: each by its own mean
    two = np.flatnonzero((store.clips["status"] == "ok") & np.isin(store.clips["speaker"], ["spk1", "spk2"]))
    speaker_id = np.unique([str(x) for x in store.clips["speaker"].tolist()], return_inverse=True)[1]
    both, _, _ = predict_clips(p.model, data, two, "av", "cpu", 4, groups=speaker_id)
    for spk in ("spk1", "spk2"):
        mine = store.clips["speaker"][two] == spk
        each = p.predict_many([str(x) for x in store.clips["path"][two[mine]]], same_speaker=True)
        np.testing.assert_allclose([x.scores for x in each.predictions],
                                   torch.softmax(torch.from_numpy(both[mine]), -1).numpy(), atol=1e-5)
    alone = p.predict_many(paths)
    assert not np.allclose([x.scores for x in alone.predictions], want, atol=1e-3)
    np.testing.assert_allclose([x.scores for x in alone.predictions], _store_scores(p, store, rows, "av"),
                               atol=1e-5)


def test_codes_input_equals_stage3_in_every_mode(setup):
    tmp, _, _, p = setup
    store = TokenStore.open(tmp / "s.zarr")
    rows = np.flatnonzero((store.clips["status"] == "ok") & (store.clips["visual_length"] > 0))[:3]
    for mode in ("audio", "visual"):
        want = _store_scores(p, store, rows, mode)
        for row, w in zip(rows, want):
            codes = {m: store.clip_codes(m, row) for m in ("audio", "visual")}
            got = p.predict(codes, modality=mode)
            np.testing.assert_allclose(got.scores, w, atol=1e-5)
            assert got.modality == mode
    spec = store.specs["audio"]
    bad = {"audio": np.full((20, *spec.grid), 9999, np.int64)}
    with pytest.raises(InputError, match=rf"audio codes outside \[0, {spec.codebook_size}\)"):
        p.predict(bad)


def test_array_inputs_match_files(setup, tmp_path):
    tmp, corpus, _, p = setup
    wave = read_audio(str(corpus / "a1.wav"), 16000)
    np.testing.assert_allclose(p.predict({"audio": wave}).scores, p.predict(corpus / "a1.wav").scores,
                               atol=1e-6)
    from vqmae.ingest import load_clip
    from vqmae.stages.predict.results import _clip_info

    data = load_clip(_clip_info(corpus / "v10.mp4", 0), p.cfg)
    np.testing.assert_allclose(p.predict({"faces": data.faces}).scores,
                               p.predict(corpus / "v10.mp4", modality="visual").scores, atol=1e-6)
    with pytest.raises(InputError, match=r"faces: expected uint8 \[T, 96, 96, 3\]"):
        p.predict({"faces": np.zeros((4, 64, 64, 3), np.uint8)})


def test_audio_mode_ignores_the_video(setup, tmp_path):
    """Two files with the same soundtrack and different faces: same audio-mode scores, different
    audiovisual ones."""
    _, _, _, p = setup
    a = write_video(tmp_path / "a.mp4", n_frames=30, size=128, frame_fn=face_frames(0))
    b = write_video(tmp_path / "b.mp4", n_frames=30, size=128,
                    frame_fn=lambda k: np.ascontiguousarray(FACE[:, ::-1]) // 2)
    pa, pb = p.predict(a, modality="audio"), p.predict(b, modality="audio")
    assert pa.modality == pb.modality == "audio"
    np.testing.assert_array_equal(pa.scores, pb.scores)
    assert not np.allclose(p.predict(a).scores, p.predict(b).scores, atol=1e-6)


def test_no_face_falls_back_to_audio_with_a_warning(setup, tmp_path):
    _, _, _, p = setup
    blank = write_video(tmp_path / "blank.mp4", n_frames=25, size=128)  # uniform grey frames
    got = p.predict(blank)
    assert got.modality == "audio" and len(got.warnings) == 1
    assert "no face found" in got.warnings[0] and "audio alone" in got.warnings[0]
    want = p.predict(blank, modality="audio")
    np.testing.assert_array_equal(got.scores, want.scores)
    with pytest.raises(InputError, match="blank.mp4.*no face"):
        p.predict(blank, modality="visual")
    with pytest.raises(InputError, match="blank.mp4.*no face"):
        p.predict(blank, modality="av")


def test_bad_files_are_reported_by_name_and_the_others_scored(setup, tmp_path):
    _, corpus, _, p = setup
    (tmp_path / "broken.mp4").write_bytes(b"\0" * 500)
    (tmp_path / "notes.txt").write_text("hi")
    silent = write_wav(tmp_path / "silent.wav", np.zeros(8000, np.float32))
    paths = [corpus / "v00.mp4", tmp_path / "broken.mp4", tmp_path / "missing.wav",
             tmp_path / "notes.txt", silent, corpus / "a0.wav"]
    res = p.predict_many(paths)
    assert [x.path for x in res.predictions] == [str(corpus / "v00.mp4"), str(corpus / "a0.wav")]
    reasons = {f.path.rsplit("/", 1)[-1]: (f.stage, f.reason) for f in res.failures}
    assert set(reasons) == {"broken.mp4", "missing.wav", "notes.txt", "silent.wav"}
    assert reasons["broken.mp4"][0] == "video" and "not a readable media container" in reasons["broken.mp4"][1]
    assert reasons["missing.wav"] == ("scan", "no such file")
    assert "not a media file" in reasons["notes.txt"][1]
    assert reasons["silent.wav"][0] == "audio" and "silent" in reasons["silent.wav"][1].lower()
    only_bad = p.predict_many([tmp_path / "broken.mp4"])
    assert only_bad.predictions == [] and [f.stage for f in only_bad.failures] == ["video"]
    with pytest.raises(ValueError, match="modality 'both'"):
        p.predict_many(paths, modality="both")


def _retagged(src, dst, **extra):
    """A copy of checkpoint `src` with changed `extra` fields (other bytes → other sha256)."""
    ck = load_checkpoint(src)
    save_checkpoint(dst, kind=ck["kind"], model=ck["state_dict"], config=ck["config"],
                    parents=ck["parents"], step=ck["step"] + 1, extra={**ck["extra"], **extra})
    return dst


def test_tokenizer_with_another_sha_is_refused_by_name(setup, tmp_path):
    tmp, _, ckpt, _ = setup
    good = tmp / "tok" / "tokenizers"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(good / "visual_vqvae.pt", other / "visual_vqvae.pt")
    _retagged(good / "audio_vqvae.pt", other / "audio_vqvae.pt")
    with pytest.raises(PredictError) as e:
        Predictor.load(ckpt, tokenizers=other)
    msg = str(e.value)
    assert str(other / "audio_vqvae.pt") in msg and "--tokenizers" in msg
    assert checkpoint_sha256(other / "audio_vqvae.pt") in msg and checkpoint_sha256(good / "audio_vqvae.pt") in msg
    # the classifier's recorded tokenizer paths moved: refused naming the path, fixed by --tokenizers
    moved = _retagged(ckpt, tmp_path / "moved.pt", tokenizers={
        m: {"path": str(tmp_path / "gone" / f"{m}_vqvae.pt"), "sha256": "x"} for m in ("audio", "visual")})
    with pytest.raises(PredictError, match=r"gone/audio_vqvae.pt .*does not exist.*--tokenizers"):
        Predictor.load(moved)
    assert Predictor.load(moved, tokenizers=good).tokenizers["audio"].sha256 == \
        checkpoint_sha256(good / "audio_vqvae.pt")


def _cli():
    app = typer.Typer()
    app.command()(predict_cmd)
    return app


def test_cli_table_json_and_csv(setup, tmp_path, monkeypatch):
    _, corpus, ckpt, p = setup
    monkeypatch.setattr("vqmae_cli.predict.console", Console(width=200))
    (tmp_path / "broken.mp4").write_bytes(b"junk")
    out_json, out_csv = tmp_path / "out" / "r.json", tmp_path / "out" / "r.csv"
    args = [str(corpus / "v21.mp4"), str(corpus / "a2.wav"), str(tmp_path / "broken.mp4"), "--model", str(ckpt),
            "--json", str(out_json), "--csv", str(out_csv), "--timeline", "--workers", "0", "--device", "cpu"]
    res = CliRunner().invoke(_cli(), args)
    assert res.exit_code == 1, res.output  # one file failed
    assert "v21.mp4" in res.output and "broken.mp4: video:" in res.output and "2 scored, 1 failed" in res.output
    want = {x.path: x for x in (p.predict(corpus / "v21.mp4"), p.predict(corpus / "a2.wav"))}
    doc = json.loads(out_json.read_text())
    assert doc["task"] == "classify" and doc["names"] == ["happy", "sad"] and doc["model"] == str(ckpt)
    assert [d["path"] for d in doc["predictions"]] == list(want)
    for d in doc["predictions"]:
        w = want[d["path"]]
        assert d["top"] == w.top and d["modality"] == w.modality
        assert d["scores"] == pytest.approx(dict(zip(w.names, w.scores.tolist())), abs=1e-6)
        assert [t["start"] for t in d["timeline"]] == pytest.approx(w.starts.tolist())
    assert doc["failures"][0]["path"].endswith("broken.mp4") and doc["failures"][0]["stage"] == "video"
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert list(rows[0]) == ["path", "status", "start", "modality", "top", "happy", "sad", "message"]
    clip_rows = [r for r in rows if r["status"] == "ok" and r["start"] == ""]
    assert [r["path"] for r in clip_rows] == list(want)
    for r in clip_rows:
        assert float(r["happy"]) == pytest.approx(float(want[r["path"]].scores[0]), abs=1e-5)
    n_windows = sum(len(w.starts) for w in want.values())
    assert sum(1 for r in rows if r["start"] != "") == n_windows
    assert rows[-1]["status"] == "failed" and rows[-1]["message"].startswith("video: ")


def test_cli_same_speaker(setup, tmp_path, monkeypatch):
    _, corpus, ckpt, p = setup
    monkeypatch.setattr("vqmae_cli.predict.console", Console(width=200))
    files = [str(corpus / f) for f in ("v10.mp4", "v11.mp4", "a1.wav")]
    out_csv = tmp_path / "r.csv"
    base = [*files, "--model", str(ckpt), "--workers", "0", "--device", "cpu", "--csv", str(out_csv),
            "--json", str(tmp_path / "r.json")]
    res = CliRunner().invoke(_cli(), base)
    assert res.exit_code == 0 and "--same-speaker scores them" in " ".join(res.output.split()), res.output
    assert json.loads((tmp_path / "r.json").read_text())["speaker_norm"] == "training speakers"
    res = CliRunner().invoke(_cli(), [*base, "--same-speaker"])
    assert res.exit_code == 0 and "--same-speaker scores them" not in res.output, res.output
    assert json.loads((tmp_path / "r.json").read_text())["speaker_norm"] == "these files"
    want = p.predict_many(files, same_speaker=True).predictions
    rows = [r for r in csv.DictReader(io.StringIO(out_csv.read_text())) if r["start"] == ""]
    assert [r["path"] for r in rows] == files
    for r, w in zip(rows, want):
        assert float(r["sad"]) == pytest.approx(float(w.scores[1]), abs=1e-5)


def test_cli_bad_model_exits_2(setup, tmp_path):
    tmp, corpus, _, _ = setup
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    tokenizer = tmp / "tok" / "tokenizers" / "audio_vqvae.pt"
    for model, why in ((bad, "not a checkpoint"), (tokenizer, "kind is 'audio_vqvae', expected 'classifier'")):
        res = CliRunner().invoke(_cli(), [str(corpus), "--model", str(model), "--workers", "0"])
        out = " ".join(res.output.split())
        assert res.exit_code == 2 and model.name in out and why in out, out


@pytest.mark.parametrize("mode", ["folder", "files"])
def test_hostile_corpus_every_input_accounted_for(setup, tmp_path, mode):
    """The hostile-media corpus (tests/test_hostile.py) through `vqmae predict`, as a folder and as a
    list of files: each input is scored, failed or skipped with a reason, in the CSV and the summary;
    no traceback; exit code 1."""
    from tests.test_hostile import build
    from vqmae_cli.main import app

    _, _, ckpt, _ = setup
    root = tmp_path / "hostile"
    inputs = build(root)
    args = [str(root)] if mode == "folder" else [str(p) for p in inputs]
    out = tmp_path / "scores.csv"
    res = CliRunner().invoke(app, ["predict", *args, "--model", str(ckpt), "--face", "none",
                                   "--device", "cpu", "--csv", str(out)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    rows = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
    expected = inputs + ([root / "spk" / "cycle"] if mode == "folder" else [])
    assert sorted(os.path.abspath(r["path"]) for r in rows) == sorted(os.path.abspath(p) for p in expected)
    status = {os.path.basename(r["path"]): r["status"] for r in rows}
    assert all(r["message"].strip() for r in rows if r["status"] != "ok")
    for name in ("good.mp4", "comma, name.mp4", "nön-äscii.mp4", "UPPER.MP4", "opus_voice.opus",
                 "audio_only.mp4", "mpeg4_ac3.avi", "six_ch_48k_int32.wav", "stereo_8k.wav"):
        assert status[name] == "ok", (name, status[name])
    for name in ("dangling.mp4", "loop_a.mp4", "self.mp4"):
        assert status[name] == "skipped", (name, status[name])
    n = {s: sum(v == s for v in status.values()) for s in ("ok", "failed", "skipped")}
    assert f"{n['ok']} scored, {n['failed']} failed, {n['skipped']} skipped" in " ".join(res.output.split())
