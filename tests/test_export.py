"""`vqmae export`: TorchScript files of a real (tiny) fine-tuned classifier and its tokenizers, run
in a process where vqmae cannot be imported, checked against the eager models and `vqmae predict`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from vqmae_cli.export import export as export_cmd
from vqmae.checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
from vqmae.config import load_config
from vqmae.stages.export import (CLASSIFIER_FILE, FORMAT, TOLERANCE, ExportError, _difference, _Target,
                          classifier_inputs, export_model)
from vqmae.stages.finetune import finetune
from vqmae.stages.predict import Predictor
from vqmae.store import ModalitySpec, StoreWriter, merge
from vqmae.models.tokenizers import encode_frames
from vqmae.models.tokenizers import build_tokenizer
from vqmae.utils import sha256_file

# Small but real: 513-bin spectrogram frames → 16 spectral ids (codebook 32) + 4 prosody ids (102 more
# ids, so that they are exported too); 32 × 32 faces → 8 × 8 visual ids (codebook 64); 0.4 s windows = 20 audio + 10 visual
# frames.
CFG = ["audio_vq.n_tokens=16", "audio_vq.codebook_size=32", "audio_vq.channels=8", "audio_vq.prosody_ids=true",
       "visual_vq.channels=8", "visual_vq.codebook_size=64", "face.size=32", "mae.window_seconds=0.4",
       "mae.width=32", "mae.heads=2", "mae.encoder_depth=1", "mae.decoder_depth=1", "mae.head_dim=8",
       "finetune.inits=scratch", "finetune.folds=3", "finetune.epochs=1", "finetune.batch_size=8",
       "finetune.eval_modalities=av"]
TA, TV, K_A, CB_A, GRID_V = 20, 10, 16 + 4, 32 + 102, (8, 8)
# torch 2.14 deprecates torch.jit.load; loading the files with it is the point here
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")

# Runs the exported files with torch alone (argv: export dir, calls file). Any import of vqmae or
# cli fails. Also scores one clip from raw arrays following export.json only (README example).
PLAIN = r'''
import hashlib, importlib.abc, json, sys
from pathlib import Path


class NoVqmae(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("vqmae", "vqmae_cli"):
            raise ImportError(f"the exported files needed {name}")


sys.meta_path.insert(0, NoVqmae())
import torch

torch.set_num_threads(1)
torch.set_grad_enabled(False)
out, calls_path = Path(sys.argv[1]), Path(sys.argv[2])
meta = json.loads((out / "export.json").read_text())
for name, info in meta["files"].items():
    assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"], name
ts = {name: torch.jit.load(str(out / name)) for name, info in meta["files"].items()
      if info["format"] == "torchscript"}
calls = torch.load(calls_path)
results = {key: ts[name](*args) for key, (name, args) in calls["direct"].items()}
# the same calls through the ONNX files in onnxruntime, inputs fed by the names export.json gives
import onnxruntime

for key, (name, args) in calls["direct"].items():
    if key == "flat":  # the ONNX graph takes the grid shape only
        continue
    name = name.replace(".ts", ".onnx")
    sess = onnxruntime.InferenceSession(str(out / name))
    names = [x["name"] for x in meta["files"][name]["inputs"]]
    feed = {n: a.numpy() for n, a in zip(names, args) if n in {i.name for i in sess.get_inputs()}}
    results["onnx_" + key] = torch.from_numpy(sess.run(None, feed)[0])


def clip_scores(wave, faces):
    a = meta["features"]["audio"]
    fit = len(faces) * a["sample_rate"] // int(meta["features"]["visual"]["fps"])  # the recipe's first step
    wave = torch.nn.functional.pad(wave, (0, max(0, fit - len(wave))))[:fit]
    if a["peak_normalize"]:
        wave = wave / wave.abs().max()
    s = torch.stft(wave, a["n_fft"], a["hop_length"], a["win_length"],
                   torch.hann_window(a["win_length"]), center=True, pad_mode="reflect",
                   return_complex=True)
    power = (s.real ** 2 + s.imag ** 2).T[: len(wave) // a["hop_length"]]  # [Ta, n_bins]
    codes = {"audio": ts["audio_encoder.ts"](power), "visual": ts["visual_encoder.ts"](faces)}
    frames = meta["window"]["frames"]
    n_win = max(-(-len(codes[m]) // frames[m]) for m in meta["modalities"])
    inputs = []
    for m in meta["modalities"]:
        c, t = codes[m], frames[m]
        pad = c.new_zeros((n_win * t - len(c), *c.shape[1:]))
        inputs += [torch.cat([c, pad]).reshape(n_win, t, *c.shape[1:]),
                   (torch.arange(n_win * t) < len(c)).reshape(n_win, t)]
    return torch.softmax(ts["classifier.ts"](*inputs)[0], -1)


for key in [k for k in calls if k.startswith("clip")]:
    results[key] = clip_scores(*calls[key])
assert not [m for m in sys.modules if m.split(".")[0] in ("vqmae", "vqmae_cli")]
torch.save(results, calls_path.with_suffix(".out.pt"))
'''


def _tokenizers(directory, cfg, seed=0):
    """Real tokenizers of the config's sizes (randomly initialised: encoding is what is exported)."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for m, kind in (("audio", "audio_vqvae"), ("visual", "visual_vqvae")):
        model = build_tokenizer(kind, cfg)
        if m == "audio":
            model.set_input_stats(torch.exp(3 * torch.randn(256, cfg.audio.n_bins) - 6))
        out[m] = save_checkpoint(directory / f"{kind}.pt", kind=kind, model=model, config=cfg)
    return out


def _store(path, toks):
    """12 clips of 3 speakers (the last of each audio-only) in codes of `toks`, paths recorded."""
    sha = {m: checkpoint_sha256(p) for m, p in toks.items()}
    specs = {"audio": ModalitySpec("audio", CB_A, (K_A,), 50.0, sha["audio"]),
             "visual": ModalitySpec("visual", 64, GRID_V, 25.0, sha["visual"])}
    rng = np.random.default_rng(0)
    record = {"tokenizers": {m: {"path": str(p), "sha256": sha[m]} for m, p in toks.items()}}
    with StoreWriter(path, specs, config=record) as w:
        for n in range(12):
            tv = int(rng.integers(8, 25))
            codes = {"audio": rng.integers(0, CB_A, (2 * tv, K_A))}
            if n % 4 != 3:
                codes["visual"] = rng.integers(0, 64, (tv, 64))
            w.add({"clip_id": f"c{n}", "index": n, "speaker": f"spk{n // 4}",
                   "label": ["happy", "sad"][n % 2]}, codes)
    merge(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Tokenizers → store → `vqmae.stages.finetune` classifiers (audiovisual and audio-only) → export."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config("tiny", CFG)
    toks = _tokenizers(tmp / "tok", cfg)
    store = _store(tmp / "s.zarr", toks)
    finetune(store, cfg, tmp / "ft_av")
    finetune(store, load_config("tiny", CFG + ["mae.modalities=audio"]), tmp / "ft_audio")
    unit = ("units", "scratch", "frac1", "fold0", "classifier.pt")
    av, audio = tmp.joinpath("ft_av", *unit), tmp.joinpath("ft_audio", *unit)
    result = export_model(av, tmp / "out")
    return tmp, av, audio, toks, result


def _plain(out_dir, calls, tmp_path):
    """Run PLAIN on `calls` in a fresh interpreter; its results."""
    script, calls_path = tmp_path / "plain.py", tmp_path / "calls.pt"
    script.write_text(PLAIN)
    torch.save(calls, calls_path)
    res = subprocess.run([sys.executable, str(script), str(out_dir), str(calls_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(calls_path.with_suffix(".out.pt"))


def _lengths(audio, visual=None):
    return {"audio": audio} if visual is None else {"audio": audio, "visual": visual}


def _eager(model, x):
    batch = {}
    for i, m in enumerate(model.names):
        batch[m], batch[f"{m}_valid"] = x[2 * i], x[2 * i + 1]
    with torch.no_grad():  # the windows of one clip → the clip's outputs [1, C]
        return model(batch, clip=torch.zeros(len(x[0]), dtype=torch.long, device=x[0].device), n_clips=1)


def test_exported_files_match_eager_models_without_vqmae(built, tmp_path):
    """Batch sizes not used at export (6, 4, 7), padded windows, each modality absent, flat visual rows:
    classifier outputs within 1e-4 of the eager EmotionModel, encoder codes equal to vqmae's."""
    tmp, av, _, _, result = built
    p = Predictor.load(av)
    gen = torch.Generator().manual_seed(7)
    mixed = classifier_inputs(p.model, 6, gen, "cpu", _lengths([20, 11, 20, 0, 0, 20], [10, 6, 0, 10, 0, 3]))
    audio_only = classifier_inputs(p.model, 4, gen, "cpu", _lengths([20, 3, 14, 20], [0, 0, 0, 0]))
    flat = (*mixed[:2], mixed[2].reshape(6, TV, 64), mixed[3])
    power = torch.exp(3 * torch.randn(7, 513, generator=gen) - 6)
    faces = torch.randint(0, 256, (7, 32, 32, 3), generator=gen, dtype=torch.uint8)
    direct = {"mixed": (CLASSIFIER_FILE, mixed), "audio_only": (CLASSIFIER_FILE, audio_only),
              "flat": (CLASSIFIER_FILE, flat), "audio_codes": ("audio_encoder.ts", (power,)),
              "visual_codes": ("visual_encoder.ts", (faces,))}
    got = _plain(result.out_dir, {"direct": direct}, tmp_path)
    for key in ("mixed", "audio_only"):
        want = _eager(p.model, direct[key][1])
        assert got[key].shape == want.shape == (1, 2) and got[key].dtype == torch.float32
        assert (got[key] - want).abs().max() <= TOLERANCE
    # an absent modality really is absent: the learned `absent` vector, whatever its codes say
    scrambled = (*audio_only[:2], torch.randint(0, 64, audio_only[2].shape), audio_only[3])
    assert (got["audio_only"] - _eager(p.model, scrambled)).abs().max() <= TOLERANCE
    assert torch.equal(got["flat"], got["mixed"])
    for key in set(direct) - {"flat"}:  # onnxruntime on the .onnx files: the same outputs (codes: exactly)
        assert got["onnx_" + key].shape == got[key].shape and got["onnx_" + key].dtype == got[key].dtype
        assert (got["onnx_" + key].double() - got[key].double()).abs().max() <= (TOLERANCE if "codes" not in key else 0)
    for m, x in (("audio", power), ("visual", faces)):
        want = encode_frames(p.tokenizers[m].model, m, x.numpy(), "cpu")  # uint16 [N, K]
        codes = got[f"{m}_codes"]
        assert codes.dtype == torch.int64 and tuple(codes.shape[1:]) == p.tokenizers[m].model.grid
        np.testing.assert_array_equal(codes.reshape(len(x), -1).numpy(), want)


def test_plain_pytorch_pipeline_reproduces_vqmae_predict(built, tmp_path):
    """Wave + faces → codes → the clip's windows → softmax of the clip's outputs with torch and export.json alone gives
    `Predictor.predict`'s scores for the same arrays."""
    _, av, _, _, result = built
    rng = np.random.default_rng(3)
    n_video = 23  # 3 windows of 10 frames, the last one padded
    faces = rng.integers(0, 256, (n_video, 32, 32, 3), dtype=np.uint8)
    # audio exactly as long as the video, 0.14 s longer (as mp4 audio often is) and 0.1 s shorter
    calls, want = {"direct": {}}, {}
    for extra in (0, 2240, -1600):
        wave = (0.3 * rng.standard_normal(n_video * 640 + extra)).astype(np.float32)
        pred = Predictor.load(av).predict({"audio": wave, "faces": faces})
        assert pred.modality == "av" and len(pred.starts) == 3
        calls[f"clip{extra}"], want[f"clip{extra}"] = (torch.from_numpy(wave), torch.from_numpy(faces)), pred.scores
    got = _plain(result.out_dir, calls, tmp_path)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key], atol=1e-5, err_msg=key)


def test_export_json_describes_every_file(built):
    tmp, av, _, toks, result = built
    out = result.out_dir
    doc = json.loads((out / "export.json").read_text())
    assert doc == result.manifest
    assert list(result.files) == ["classifier.ts", "classifier.onnx", "audio_encoder.ts", "audio_encoder.onnx",
                                  "visual_encoder.ts", "visual_encoder.onnx", "export.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(result.files)
    ckpt = load_checkpoint(av, kind="classifier")
    assert doc["format"] == FORMAT and doc["torch_version"] == torch.__version__ and doc["device"] == "cpu"
    assert doc["source"] == {"path": str(av.resolve()), "sha256": sha256_file(av)}
    assert doc["task"] == {"kind": "classify", "names": ["happy", "sad"], "activation": "softmax"}
    assert doc["modalities"] == ["audio", "visual"]
    assert {m: t["sha256"] for m, t in doc["tokenizers"].items()} == \
           {m: ckpt["parents"][f"{m}_tokenizer"] for m in ("audio", "visual")}
    assert {m: t["path"] for m, t in doc["tokenizers"].items()} == \
           {m: str(p.resolve()) for m, p in toks.items()}
    assert doc["window"]["seconds"] == pytest.approx(0.4)
    assert doc["window"]["frames"] == {"audio": TA, "visual": TV}
    assert doc["window"]["frames_per_step"] == {"audio": 2, "visual": 1}
    a = doc["features"]["audio"]
    assert (a["sample_rate"], a["n_fft"], a["win_length"], a["hop_length"], a["n_bins"]) == \
           (16000, 1024, 1024, 320, 513)
    assert doc["features"]["visual"]["face_size"] == 32 and doc["features"]["visual"]["fps"] == 25.0
    files = doc["files"]
    for name, info in files.items():
        assert info["sha256"] == sha256_file(out / name) and info["bytes"] == (out / name).stat().st_size
    sig = [(x["name"], x["dtype"], x["shape"]) for x in files["classifier.ts"]["inputs"]]
    assert sig == [("audio", "int64", ["B", TA, K_A]), ("audio_valid", "bool", ["B", TA]),
                   ("visual", "int64", ["B", TV, *GRID_V]), ("visual_valid", "bool", ["B", TV])]
    assert files["classifier.ts"]["outputs"][0]["shape"] == [1, 2]
    def io(name):
        return [(x["dtype"], x["shape"]) for x in files[name]["inputs"] + files[name]["outputs"]]

    assert io("audio_encoder.ts") == [("float32", ["N", 513]), ("int64", ["N", K_A])]
    assert io("visual_encoder.ts") == [("uint8", ["N", 32, 32, 3]), ("int64", ["N", *GRID_V])]
    for name in ("classifier", "audio_encoder", "visual_encoder"):  # each ONNX file mirrors its .ts
        assert files[f"{name}.ts"]["format"] == "torchscript" and files[f"{name}.onnx"]["format"] == "onnx"
        assert io(f"{name}.onnx") == io(f"{name}.ts")
        assert doc["check"]["max_abs_diff"][f"{name}.onnx"] <= (TOLERANCE if name == "classifier" else 0)
    assert "flat" not in json.dumps(files["classifier.onnx"]["inputs"])
    assert set(doc["run"]) == {"torchscript", "onnx"}
    check = doc["check"]
    assert check["trace_batch"] not in check["check_batches"]
    assert not {6, 4, 7} & {check["trace_batch"], *check["check_batches"]}  # the sizes tested above
    assert set(check["max_abs_diff"]) == set(files)
    assert check["max_abs_diff"]["classifier.ts"] <= TOLERANCE
    assert check["max_abs_diff"]["audio_encoder.ts"] == check["max_abs_diff"]["visual_encoder.ts"] == 0.0
    # the encoder files carry no decoder weights
    enc = torch.jit.load(str(out / "visual_encoder.ts"))
    assert not [k for k in enc.state_dict() if ".decoder." in k]


def test_audio_only_classifier_replaces_an_av_export(built, tmp_path):
    tmp, _, audio, _, result = built
    out = tmp_path / "out"
    shutil.copytree(result.out_dir, out)
    res = export_model(audio, out)
    assert list(res.files) == ["classifier.ts", "classifier.onnx", "audio_encoder.ts", "audio_encoder.onnx",
                               "export.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(res.files)
    assert res.manifest["modalities"] == ["audio"] and list(res.manifest["features"]) == ["audio"]
    assert [x["name"] for x in res.manifest["files"]["classifier.ts"]["inputs"]] == ["audio", "audio_valid"]
    model = Predictor.load(audio).model
    x = classifier_inputs(model, 6, torch.Generator().manual_seed(2), "cpu", _lengths([20, 1, 7, 20, 0, 13]))
    ts = torch.jit.load(str(out / "classifier.ts"))
    assert (ts(*x) - _eager(model, x)).abs().max() <= TOLERANCE


def test_tokenizers_directory_is_sha_checked(built, tmp_path):
    tmp, av, _, toks, _ = built
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in toks.values():
        shutil.copy(p, moved / p.name)
    res = export_model(av, tmp_path / "a", tokenizers=moved)
    assert res.manifest["tokenizers"]["audio"]["path"] == str((moved / "audio_vqvae.pt").resolve())
    other = _tokenizers(tmp_path / "other", load_config("tiny", CFG), seed=1)
    with pytest.raises(ExportError, match=r"audio_vqvae\.pt: audio tokenizer sha256 \w+ is not the one"):
        export_model(av, tmp_path / "b", tokenizers=other["audio"].parent)
    (moved / "visual_vqvae.pt").unlink()
    with pytest.raises(ExportError, match=r"moved: no visual_vqvae\.pt \(the visual tokenizer of .*classifier\.pt\)"):
        export_model(av, tmp_path / "c", tokenizers=moved)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_check_refuses_an_export_that_differs(built):
    """The export-time check raises, naming the file, beyond the tolerance (codes: any change)."""
    _, av, _, _, result = built
    ts = torch.jit.load(str(result.out_dir / CLASSIFIER_FILE))
    x = classifier_inputs(Predictor.load(av).model, 2, torch.Generator().manual_seed(0), "cpu")
    off = _Target(ts, x, lambda g: [], lambda *a: ts(*a) + 2 * TOLERANCE, exact=False)
    with pytest.raises(ExportError, match=r"classifier\.ts: exported output differs from the eager model by 0\.0002"):
        _difference(CLASSIFIER_FILE, off, ts, x)
    assert _difference(CLASSIFIER_FILE, _Target(ts, x, lambda g: [], lambda *a: ts(*a) + TOLERANCE / 2, False),
                       ts, x) <= TOLERANCE


def _cli():
    app = typer.Typer()
    app.command()(export_cmd)
    return app


def test_cli_summary_and_errors(built, tmp_path, monkeypatch):
    tmp, av, _, toks, _ = built
    monkeypatch.setattr("vqmae_cli.export.console", Console(width=200))
    res = CliRunner().invoke(_cli(), [str(av), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    for name in ("classifier.ts", "audio_encoder.ts", "visual_encoder.ts", "export.json",
                 "audio int64 [B, 20, 20]", "faces uint8 [N, 32, 32, 3]"):
        assert name in res.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for path, why in ((tmp_path / "missing.pt", "checkpoint file does not exist"),
                      (bad, "not a checkpoint"),
                      (toks["audio"], "kind is 'audio_vqvae', expected 'classifier'")):
        res = CliRunner().invoke(_cli(), [str(path), "--out", str(tmp_path / "never")])
        out = " ".join(res.output.split())
        assert res.exit_code == 2 and f"error: {path}" in out and why in out, out
    assert not (tmp_path / "never").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = CliRunner().invoke(_cli(), [str(av), "--out", str(blocker / "sub")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and f"error: {blocker / 'sub'}: cannot write the export there" in out, out


def test_reexport_removes_the_manifest_before_replacing_files(built, tmp_path, monkeypatch):
    """An export interrupted while writing leaves no export.json that describes other files."""
    _, av, _, _, _ = built
    out = tmp_path / "exp"
    export_model(av, out)
    assert (out / "export.json").exists()

    def boom(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vqmae.stages.export.atomic_write_bytes", boom)
    with pytest.raises(ExportError, match="cannot write the export there"):
        export_model(av, out)
    assert not (out / "export.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_export_matches_eager_on_cuda(built, tmp_path):
    _, av, _, _, _ = built
    res = export_model(av, tmp_path / "gpu", device="cuda")
    assert res.manifest["device"] == "cuda" and res.max_abs_diff["classifier.ts"] <= TOLERANCE
    p = Predictor.load(av, device="cuda")
    x = classifier_inputs(p.model, 9, torch.Generator().manual_seed(5), "cuda", _lengths([20, 5, 0] * 3, [10, 0, 4] * 3))
    ts = torch.jit.load(str(tmp_path / "gpu" / "classifier.ts"), map_location="cuda")
    got = ts(*x)
    assert got.device.type == "cuda" and (got - _eager(p.model, x)).abs().max() <= TOLERANCE


def test_onnx_forms_of_sort_and_pooling_equal_the_eager_ones(monkeypatch):
    """The two operations with an ONNX-only form give the eager results: the stable sort of whole
    keys, and the clip pooling's sums for several clips (mean and attention)."""
    from vqmae.models.classifier import _segment_pool_dense, segment_pool
    from vqmae.models.masking import order_by_key

    gen = torch.Generator().manual_seed(0)
    key = torch.randint(0, 3, (4, 30), generator=gen).float()
    stable = order_by_key(key)
    x, score = torch.randn(11, 6, generator=gen), torch.randn(11, generator=gen)
    seg = torch.tensor([0, 0, 1, 2, 2, 2, 0, 4, 4, 1, 2])
    ok = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)  # clip 4: nothing valid
    eager = [segment_pool(x, ok, s, seg, 5) for s in (None, score)]
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.equal(order_by_key(key), stable)
    for s, (out, present) in zip((None, score), eager):
        dense, dense_present = segment_pool(x, ok, s, seg, 5)
        torch.testing.assert_close(dense, out)
        assert torch.equal(dense_present, present) and present.tolist() == [True, True, True, False, False]
    assert torch.equal(_segment_pool_dense(x, ok.float(), None, seg, 5)[1], eager[0][1])


def test_formats_torchscript_only_and_refusals(built, tmp_path, monkeypatch):
    """`formats` picks the files; a re-export in one format removes the other's old files; unknown
    names and ONNX without its packages are refused before anything is written."""
    _, av, _, _, result = built
    out = tmp_path / "out"
    shutil.copytree(result.out_dir, out)
    res = export_model(av, out, formats="torchscript")
    assert sorted(p.name for p in out.iterdir()) == sorted(res.files) == \
        ["audio_encoder.ts", "classifier.ts", "export.json", "visual_encoder.ts"]
    with pytest.raises(ExportError, match=r"unknown export format \['tflite'\]"):
        export_model(av, tmp_path / "a", formats="torchscript,tflite")
    from vqmae.stages import export_onnx

    monkeypatch.setattr(export_onnx, "available", lambda: "the onnx package is not installed (x)")
    with pytest.raises(ExportError, match="cannot export ONNX: the onnx package is not installed"):
        export_model(av, tmp_path / "b", formats="onnx")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    res = export_model(av, tmp_path / "c")  # `all` without the packages: TorchScript alone
    assert [n for n in res.files if n.endswith(".onnx")] == []


def test_hub_folder_round_trip(built, tmp_path, monkeypatch):
    """`vqmae export --hub-dir`: safetensors + config + model card; `Predictor.from_pretrained` on the
    folder (or `Predictor.load` / `vqmae predict --model` on it) scores exactly as the checkpoint;
    a changed file and an unreachable repo id are refused with the reason."""
    from vqmae.stages.predict.hub import CONFIG, FORMAT
    from vqmae.stages.predict import PredictError

    _, av, _, _, _ = built
    hub = tmp_path / "hub"
    res = CliRunner().invoke(_app(), ["export", str(av), "--hub-dir", str(hub)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "audio_tokenizer.safetensors", "config.json",
                                                     "model.safetensors", "visual_tokenizer.safetensors"]
    config = json.loads((hub / CONFIG).read_text())
    assert config["format"] == FORMAT and config["classifier"]["checkpoint_sha256"] == checkpoint_sha256(av)
    card = (hub / "README.md").read_text()
    for part in ("library_name: vqmae", "## Intended use", "## Training data and protocol", "fold0",
                 "## Metrics", "## Provenance", config["classifier"]["parents"]["audio_tokenizer"],
                 "Predictor.from_pretrained"):
        assert part in card
    original, shared = Predictor.load(av), Predictor.from_pretrained(hub)
    assert Predictor.load(hub).path == hub
    rng = np.random.default_rng(0)
    arrays = {"audio": rng.integers(0, CB_A, (90, K_A)), "visual": rng.integers(0, 64, (45, *GRID_V))}
    a, b = original.predict(arrays), shared.predict(arrays)
    assert a.names == b.names and np.array_equal(a.scores, b.scores)
    data = (hub / "model.safetensors").read_bytes()  # its last 8 bytes flipped
    (hub / "model.safetensors").write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    with pytest.raises(PredictError, match=r"model\.safetensors: sha256 .* is not the .* config\.json records"):
        Predictor.from_pretrained(hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PredictError, match="someone/not-a-model: not a folder, and the Hub download failed"):
        Predictor.from_pretrained("someone/not-a-model")


def _app():
    from vqmae_cli.main import app

    return app
