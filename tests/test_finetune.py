"""Stage 3 on a small labelled synthetic store: folds, selection, scoring, resume, checks, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vqmae_cli.main import app
from vqmae.config import load_config
from vqmae.stages.finetune import FinetuneError, finetune
from vqmae.stages.pretrain import pretrain
from vqmae.store import ModalitySpec, StoreWriter, merge
from vqmae.training import Reporter

CLASSES = ("neutral", "happy", "sad")
OVERRIDES = ["mae.window_seconds=0.4", "mae.width=32", "mae.heads=2", "mae.encoder_depth=1",
             "mae.decoder_depth=1", "mae.head_dim=8", "pretrain.batch_size=8", "pretrain.steps=4",
             "pretrain.warmup_steps=1", "pretrain.val_fraction=0.2", "pretrain.log_every=2",
             "pretrain.val_every=4", "pretrain.ckpt_every=4", "pretrain.recon_every=1000",
             "finetune.folds=4", "finetune.epochs=4", "finetune.batch_size=8", "finetune.lr=0.003",
             "finetune.head_lr=0.01", "finetune.dropout=0.0", "finetune.warmup_epochs=0.5",
             "finetune.inits=pretrained,scratch"]


def make_store(path, sha="a" * 64, n_speakers=4, per_speaker=6, seed=0, flip=0.0):
    """Clips whose audio and visual codes carry the label (learnable across speakers); the last
    clip of every speaker is audio-only. `flip` perturbs a fraction of audio codes (a 'noisy' copy)."""
    rng = np.random.default_rng(seed)
    specs = {"audio": ModalitySpec("audio", 16, (8,), 50.0, sha),
             "visual": ModalitySpec("visual", 32, (8, 8), 25.0, "b" * 64)}
    n = 0
    with StoreWriter(path, specs) as w:
        for s in range(n_speakers):
            for j in range(per_speaker):
                k = j % len(CLASSES)
                tv = int(rng.integers(12, 30))
                audio = (np.full((2 * tv, 8), 4 * k) + rng.integers(0, 3, (2 * tv, 8)) + s) % 16
                if flip:
                    hit = rng.random(audio.shape) < flip
                    audio[hit] = rng.integers(0, 16, hit.sum())
                codes = {"audio": audio}
                if j < per_speaker - 1:
                    codes["visual"] = (np.full((tv, 64), 8 * k) + rng.integers(0, 4, (tv, 64))) % 32
                w.add({"clip_id": f"s{s}c{j}", "index": n, "speaker": f"spk{s}", "label": CLASSES[k],
                       "labels": [CLASSES[k]] + (["angry"] if j % 2 else []),
                       "valence": k - 1.0 + 0.1 * rng.normal(), "arousal": 0.5 * k + 0.1 * rng.normal()},
                      codes)
                n += 1
    merge(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store, a briefly pretrained MAE, and one default fine-tuning run (both inits)."""
    tmp = tmp_path_factory.mktemp("ft")
    store = make_store(tmp / "s.zarr")
    cfg = load_config("tiny", OVERRIDES)
    pretrain(store, cfg, tmp / "pre")
    result = finetune(store, cfg, tmp / "ft", mae=tmp / "pre" / "mae.pt")
    return tmp, store, cfg, result


def test_every_speaker_tested_once_and_model_beats_chance(trained):
    tmp, _, _, result = trained
    folds = json.loads((tmp / "ft" / "folds.json").read_text())
    tested = [s for f in folds for s in f["test_speakers"]]
    assert sorted(tested) == ["spk0", "spk1", "spk2", "spk3"]
    for f in folds:
        assert not set(f["val_speakers"]) & set(f["test_speakers"])
    rows = {(r["variant"], r["eval"]): r for r in result.summary["rows"]}
    assert set(rows) == {(v, e) for v in ("pretrained", "scratch") for e in ("av", "audio", "visual")}
    for v in ("pretrained", "scratch"):
        assert rows[(v, "av")]["uar"]["mean"] > 0.8  # chance is 1/3
        assert rows[(v, "av")]["uar"]["n"] == 4
    # audio-only clips are scored in av and audio mode, never in visual mode
    unit = next(u for u in result.units if u.unit.startswith("pretrained/"))
    assert unit.metrics["av"]["n_clips"] == unit.metrics["audio"]["n_clips"] == 6
    assert unit.metrics["visual"]["n_clips"] == 5
    report = (tmp / "ft" / "report.md").read_text()
    assert "| pretrained | 100% | av | 4 |" in report and "±" in report
    assert (tmp / "ft" / "confusion_pretrained.png").read_bytes()[:4] == b"\x89PNG"
    # every plot embedded, and each test speaker's score per variant
    assert "![Confusion matrix: pretrained, 100% of the labels, every fold's test clips](confusion_pretrained.png)" in report
    assert "## Per test speaker: UAR with 100% of the labels" in report
    # av / audio / visual on the same (talking-face) clips, next to the main table's rows
    paired = {r["variant"]: r for r in result.summary["paired"]}
    assert set(paired) == {"pretrained", "scratch"} and paired["pretrained"]["visual"]["n"] == 4
    assert paired["pretrained"]["visual"]["mean"] == pytest.approx(rows[("pretrained", "visual")]["uar"]["mean"])
    assert "## Audiovisual against each modality alone, on the same clips" in report
    # the paired test: each fold's av minus its visual, on the same clips (4 folds)
    pv = paired["pretrained"]
    assert pv["av-visual"]["n"] == 4 and pv["av-visual"]["mean"] == pytest.approx(pv["av"]["mean"] - pv["visual"]["mean"])
    assert "| av − audio | av − visual |" in report
    table = report[report.index("## Per test speaker"):].splitlines()
    speakers = [line.split(" | ")[0].strip("| ") for line in table if line.startswith("| spk")]
    assert len(speakers) == len(set(speakers)) == 4


def test_epoch_is_selected_on_validation(trained):
    tmp, _, _, result = trained
    for u in result.units:
        rows = [json.loads(x) for x in (tmp / "ft" / "units" / u.unit / "metrics.jsonl").read_text().splitlines()]
        vals = [r["val/uar"] for r in rows]
        assert u.best_epoch == 1 + int(np.argmax(vals))  # first best validation epoch
        assert u.val == pytest.approx(max(vals))


def test_classifier_checkpoint_records_parents_task_and_fold(trained):
    tmp, _, _, result = trained
    unit = next(u for u in result.units if u.unit.startswith("pretrained/"))
    ckpt = torch.load(unit.checkpoint, weights_only=True)
    assert ckpt["kind"] == "classifier"
    assert ckpt["parents"]["audio_tokenizer"] == "a" * 64 and len(ckpt["parents"]["mae"]) == 64
    assert ckpt["extra"]["task"] == {"kind": "classify", "names": list(CLASSES)}
    assert ckpt["extra"]["test_speakers"] and ckpt["extra"]["variant"] == "pretrained"
    preds = (tmp / "ft" / "units" / unit.unit / "predictions.csv").read_text().splitlines()
    assert preds[0].startswith("mode,clip_id,speaker,target,prediction,neutral,happy,sad")
    assert len(preds) == 1 + 6 + 6 + 5  # av, audio, visual rows


def test_rerun_skips_finished_units(trained):
    tmp, store, cfg, result = trained

    class Boom(Reporter):
        def start(self, name, total):
            raise AssertionError(f"retrained {name}")

    again = finetune(store, cfg, tmp / "ft", mae=tmp / "pre" / "mae.pt", reporter=Boom())
    assert [u.to_dict() for u in again.units] == [u.to_dict() for u in result.units]


def test_interrupted_unit_resumes_exactly(trained, tmp_path):
    tmp, store, cfg, _ = trained
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=scratch", "finetune.folds=4"])
    full = finetune(store, cfg, tmp_path / "full")

    class Stop(Reporter):
        def advance(self, name, n=1, **fields):
            if name.endswith("fold1") and fields:
                raise KeyboardInterrupt  # after the first epoch of the second unit

    with pytest.raises(KeyboardInterrupt):
        finetune(store, cfg, tmp_path / "part", reporter=Stop())
    assert (tmp_path / "part" / "units" / "scratch" / "frac1" / "fold1" / "last.pt").exists()
    resumed = finetune(store, cfg, tmp_path / "part")
    assert [u.to_dict()["metrics"] for u in resumed.units] == [u.to_dict()["metrics"] for u in full.units]
    assert not list((tmp_path / "part").rglob("last.pt"))


def test_other_tokenizer_and_other_config_are_refused(trained, tmp_path):
    tmp, _, cfg, _ = trained
    other = make_store(tmp_path / "o.zarr", sha="c" * 64)
    with pytest.raises(FinetuneError, match=r"audio_tokenizer mismatch.*aaaaaaaaaaaa.*cccccccccccc"):
        finetune(other, cfg, tmp_path / "run", mae=tmp / "pre" / "mae.pt")
    with pytest.raises(FinetuneError, match="another config"):
        finetune(tmp / "s.zarr", load_config("tiny", OVERRIDES + ["finetune.epochs=5"]), tmp / "ft",
                 mae=tmp / "pre" / "mae.pt")
    with pytest.raises(FinetuneError, match="--from-scratch"):
        finetune(tmp / "s.zarr", cfg, tmp_path / "nomae")


def test_label_fractions_noise_and_distillation(trained, tmp_path):
    tmp, store, _, _ = trained
    noisy = make_store(tmp_path / "n.zarr", flip=0.6)
    cfg = load_config("tiny", OVERRIDES + ["finetune.label_fractions=0.2,1", "finetune.distill=true",
                                           "finetune.eval_modalities=av,audio", "finetune.epochs=2"])
    r = finetune(store, cfg, tmp_path / "run", mae=tmp / "pre" / "mae.pt", noisy_stores={0.0: noisy})
    got = {(x["variant"], x["fraction"], x["eval"]) for x in r.summary["rows"]}
    assert ("pretrained", 0.2, "av") in got and ("scratch", 0.2, "av") in got
    assert ("pretrained", 1.0, "noise0dB/av") in got and ("scratch", 1.0, "noise0dB/audio") in got
    assert ("student", 1.0, "audio") in got and ("audio_labels", 1.0, "audio") in got
    assert not any(v in ("student", "audio_labels") and f == 0.2 for v, f, _ in got)
    small = [u for u in r.units if "/frac0.2/" in u.unit]
    assert all(u.n_train < 6 for u in small)  # 20% of 12 training clips, at least one per class
    assert (tmp_path / "run" / "label_efficiency.png").exists()
    assert "](label_efficiency.png)" in (tmp_path / "run" / "report.md").read_text()
    bad = make_store(tmp_path / "b.zarr", n_speakers=3)
    with pytest.raises(FinetuneError, match="noisy store"):
        finetune(store, cfg, tmp_path / "run2", mae=tmp / "pre" / "mae.pt", noisy_stores={5.0: bad})


@pytest.mark.parametrize("task,key", [("regress", "ccc"), ("multilabel", "macro_auc")])
def test_regression_and_multilabel(trained, tmp_path, task, key):
    _, store, _, _ = trained
    cfg = load_config("tiny", OVERRIDES + [f"finetune.task={task}", "finetune.inits=scratch",
                                           "finetune.targets=valence,arousal", "finetune.epochs=3"])
    r = finetune(store, cfg, tmp_path / "run")
    av = next(x for x in r.summary["rows"] if x["eval"] == "av")
    assert av[key]["n"] == 4 and np.isfinite(av[key]["mean"])
    if task == "regress":
        assert r.summary["task"]["names"] == ["valence", "arousal"] and av["ccc"]["mean"] > 0.3
    else:
        assert r.summary["task"]["names"] == ["neutral", "happy", "sad", "angry"]


def test_split_file_protocol(trained, tmp_path):
    _, store, _, _ = trained
    split = tmp_path / "split.csv"
    split.write_text("speaker,fold\nspk0,a\nspk1,a\nspk2,b\nspk3,b\n")
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=scratch", "finetune.epochs=1"])
    r = finetune(store, cfg, tmp_path / "run", split_file=split)
    assert [u.unit for u in r.units] == ["scratch/frac1/fold-a", "scratch/frac1/fold-b"]


def test_cli_finetune_from_scratch(trained, tmp_path):
    _, store, _, _ = trained
    out = CliRunner().invoke(app, ["finetune", str(store), "--from-scratch", "--run", str(tmp_path / "run"),
                                   "--preset", "tiny", *sum([["--set", o] for o in OVERRIDES], []),
                                   "--set", "finetune.epochs=1", "--folds", "3"])
    assert out.exit_code == 0, out.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # the baselines run beside it (eGeMAPS has no media to read in this synthetic store: no rows)
    assert summary["folds"] == 3 and {r["variant"] for r in summary["rows"]} == {"scratch", "tokens"}
    assert "UAR" in out.output
    bad = CliRunner().invoke(app, ["finetune", str(store), "--from-scratch", "--label-fraction", "x",
                                   "--run", str(tmp_path / "r2"), "--preset", "tiny"])
    assert bad.exit_code == 2 and "label_fractions" in bad.output


def _ddp_worker(rank, world, store, run, port, overrides):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    finetune(store, load_config("tiny", overrides), run)
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_process_gloo_ddp_equals_one_process(trained, tmp_path):
    """Each rank trains on its half of every global batch: same selection, metrics and weights."""
    import socket

    import torch.multiprocessing as tmp

    _, store, _, _ = trained
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = OVERRIDES + ["finetune.inits=scratch", "finetune.epochs=2", "finetune.folds=2"]
    torch.set_num_threads(1)
    one = finetune(store, load_config("tiny", overrides), tmp_path / "one")
    tmp.spawn(_ddp_worker, args=(2, str(store), str(tmp_path / "ddp"), port, overrides), nprocs=2)
    two = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    for a, b in zip(one.summary["units"], two["units"]):
        assert a["best_epoch"] == b["best_epoch"] and a["unit"] == b["unit"]
        assert b["metrics"]["av"]["uar"] == pytest.approx(a["metrics"]["av"]["uar"])
        sa = torch.load(a["checkpoint"], weights_only=True)["state_dict"]
        sb = torch.load(b["checkpoint"], weights_only=True)["state_dict"]
        for k in sa:
            if k.endswith("attn.kv.bias"):  # see tests/test_pretrain.py: only the value half counts
                sa[k], sb[k] = sa[k][32:], sb[k][32:]
            assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-5), k


def test_audio_only_store_pretrains_and_finetunes_with_defaults(tmp_path):
    """mae.modalities 'auto' takes the store's: no --set needed for an audio-only store, and the
    artifacts record the concrete modality."""
    rng = np.random.default_rng(0)
    specs = {"audio": ModalitySpec("audio", 16, (8,), 50.0, "a" * 64)}
    with StoreWriter(tmp_path / "a.zarr", specs) as w:
        for i in range(24):
            k, n = i % len(CLASSES), int(rng.integers(40, 80))
            w.add({"clip_id": f"c{i}", "index": i, "speaker": f"spk{i % 4}", "label": CLASSES[k]},
                  {"audio": (np.full((n, 8), 4 * k) + rng.integers(0, 3, (n, 8))) % 16})
    merge(tmp_path / "a.zarr")
    cfg = load_config("tiny", OVERRIDES + ["finetune.epochs=2"])
    assert cfg.mae.modalities == "auto"
    pre = pretrain(tmp_path / "a.zarr", cfg, tmp_path / "pre")
    assert pre.model.names == ("audio",) and set(pre.accuracy) == {"audio"}
    ckpt = torch.load(tmp_path / "pre" / "mae.pt", weights_only=True)
    assert ckpt["config"]["mae"]["modalities"] == "audio"
    r = finetune(tmp_path / "a.zarr", cfg, tmp_path / "ft", mae=tmp_path / "pre" / "mae.pt")
    assert {row["eval"] for row in r.summary["rows"]} == {"audio"}
    assert {row["variant"] for row in r.summary["rows"]} == {"pretrained", "scratch"}


def test_evaluate_on_a_noisy_twin_and_on_another_corpus(trained, tmp_path):
    """`vqmae evaluate`: a twin (same clip ids) is scored fold by fold on each fold's own test clips;
    a store lacking those ids is another corpus, scored whole by every fold model; a store made by
    other tokenizers is refused."""
    from vqmae.stages.finetune.evaluate import evaluate

    tmp, store, _, result = trained
    same = evaluate(tmp / "ft", store, tmp_path / "same")
    assert same.protocol == "twin"
    clean = {(r["variant"], r["eval"]): r["uar"]["mean"] for r in result.summary["rows"]}
    for r in same.summary["rows"]:  # the same clips, the same models: the run's own test scores
        assert r["folds"] == 4 and r["uar"]["mean"] == pytest.approx(clean[(r["variant"], r["eval"])], abs=1e-6)
    noisy = make_store(tmp_path / "noisy.zarr", flip=1.0)  # same clip ids, every audio code randomised
    twin = evaluate(tmp / "ft", noisy, tmp_path / "noisy")
    rows = {(r["variant"], r["eval"]): r["uar"]["mean"] for r in twin.summary["rows"]}
    assert twin.protocol == "twin" and rows[("pretrained", "audio")] < clean[("pretrained", "audio")]
    assert rows[("pretrained", "visual")] == pytest.approx(clean[("pretrained", "visual")], abs=1e-6)
    assert (tmp_path / "noisy" / "report.md").read_text().startswith("# Evaluation of")
    other = make_store(tmp_path / "other.zarr", per_speaker=4, seed=5)  # fewer clips: other ids
    cross = evaluate(tmp / "ft", other, tmp_path / "other")
    assert cross.protocol == "cross-corpus"
    assert all(r["folds"] == 4 for r in cross.summary["rows"])
    with pytest.raises(FinetuneError, match="audio_tokenizer mismatch"):
        evaluate(tmp / "ft", make_store(tmp_path / "c.zarr", sha="c" * 64), tmp_path / "c")
    # a run's saved baselines are scored too: the bag of tokens from the evaluated store's codes
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=tokens", "finetune.epochs=1"])
    finetune(store, cfg, tmp_path / "bl")
    base_same = evaluate(tmp_path / "bl", store, tmp_path / "bl_same").summary["rows"]
    garbled = make_store(tmp_path / "garbled.zarr", flip=1.0)  # every audio code random
    base_noisy = {(r["variant"], r["eval"]): r["uar"]["mean"]
                  for r in evaluate(tmp_path / "bl", garbled, tmp_path / "bl_noisy").summary["rows"]}
    run_rows = json.loads((tmp_path / "bl" / "summary.json").read_text())["rows"]
    assert {(r["variant"], r["eval"], round(r["uar"]["mean"], 6)) for r in base_same} == \
        {(r["variant"], r["eval"], round(r["uar"]["mean"], 6)) for r in run_rows}
    clean_tokens = {(r["variant"], r["eval"]): r["uar"]["mean"] for r in run_rows}
    assert base_noisy[("tokens", "audio")] < 0.6 < clean_tokens[("tokens", "audio")]  # chance 1/3
    res = CliRunner().invoke(app, ["evaluate", str(tmp / "ft"), str(noisy), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "twin" in res.output and (tmp_path / "cli" / "summary.json").exists()


def test_training_crops_cover_at_most_clip_windows_and_stop_at_the_clip_end():
    from types import SimpleNamespace
    from vqmae.stages.finetune.data import ClipWindows

    data = object.__new__(ClipWindows)
    data.geom = SimpleNamespace(window_steps=10)
    data.steps = np.array([5, 35, 100, 10])
    rows, starts = np.array([0, 1, 2, 2, 3]), np.array([0, 0, 0, 55, 0])
    win_rows, win_starts, crop = data.crop_windows(rows, starts, 4)
    assert crop.tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert win_rows.tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    assert win_starts.tolist() == [0, 0, 10, 20, 30, 0, 10, 20, 30, 55, 65, 75, 85, 0]
    assert (win_starts < data.steps[win_rows]).all()


def test_linear_probe_and_fitted_head_init(trained, tmp_path):
    """`probe`: the frozen pretrained encoder with a linear head fitted to convergence; saved as an
    ordinary classifier that `vqmae evaluate` rescores to the run's own numbers. head_init=fit
    starts fine-tuning from that fitted head (its validation score is logged before epoch 1)."""
    from vqmae.stages.finetune.evaluate import evaluate

    tmp, store, _, _ = trained
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=probe"])
    r = finetune(store, cfg, tmp_path / "probe", mae=tmp / "pre" / "mae.pt")
    rows = {(row["variant"], row["eval"]): row["uar"]["mean"] for row in r.summary["rows"]}
    assert set(rows) == {("probe", e) for e in ("av", "audio", "visual")}
    assert rows[("probe", "av")] > 0.8  # chance is 1/3
    unit = r.units[0]
    assert unit.epochs == 0 and unit.checkpoint
    ckpt = torch.load(unit.checkpoint, weights_only=True)
    # parameter-free pooling: per position as the configured `position`, else a plain mean
    assert ckpt["config"]["finetune"]["pooling"] == "position" and ckpt["config"]["finetune"]["head_norm"] == "none"
    encoder = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    mae = torch.load(tmp / "pre" / "mae.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, mae[k.removeprefix("backbone.")]) for k, v in encoder.items())  # frozen
    again = evaluate(tmp_path / "probe", store, tmp_path / "again")
    for row in again.summary["rows"]:
        assert row["uar"]["mean"] == pytest.approx(rows[(row["variant"], row["eval"])], abs=1e-6)
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=pretrained", "finetune.head_init=fit",
                                           "finetune.epochs=1", "finetune.label_fractions=1"])
    lpft = finetune(store, cfg, tmp_path / "lpft", mae=tmp / "pre" / "mae.pt")
    assert {row["variant"] for row in lpft.summary["rows"]} == {"pretrained"}
