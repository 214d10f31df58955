"""Stage 2 loop on a small synthetic store: resume == uninterrupted, tokenizer checks, CLI, DDP."""

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vqmae_cli.main import app
from vqmae.config import load_config
from vqmae.stages.pretrain import PretrainError, pretrain
from vqmae.store import ModalitySpec, StoreWriter, TokenStore, merge

# 0.4 s windows: 10 video frames (2 tube steps of 5) and 20 audio frames (2 patch steps of 10)
OVERRIDES = ["mae.window_seconds=0.4", "mae.width=32", "mae.heads=2", "mae.encoder_depth=1",
             "mae.decoder_depth=1", "mae.head_dim=8", "pretrain.batch_size=4",
             "pretrain.base_lr=0.256", "pretrain.warmup_steps=2", "pretrain.steps=6",
             "pretrain.log_every=1", "pretrain.val_every=3", "pretrain.ckpt_every=3",
             "pretrain.val_fraction=0.25"]


def make_store(path, sha="a" * 64, n_clips=8, seed=0, shared=False):
    """`shared`: every clip has the same codes per position (the unigram baseline is near 1)."""
    rng = np.random.default_rng(seed)
    specs = {"audio": ModalitySpec("audio", 16, (8,), 50.0, sha),
             "visual": ModalitySpec("visual", 32, (8, 8), 25.0, "b" * 64)}
    with StoreWriter(path, specs) as w:
        for i in range(n_clips):
            tv = int(rng.integers(6, 30))  # some clips shorter than a window
            src = np.random.default_rng(seed + 1) if shared else rng
            base = src.integers(0, 16, 8)  # a per-clip spectrum-like pattern, learnable
            audio = (base + rng.integers(0, 2, (2 * tv, 8))) % 16
            visual = np.tile(src.integers(0, 32, 64), (tv, 1))
            w.add({"clip_id": f"c{i}", "index": i, "speaker": f"s{i % 3}"},
                  {"audio": audio, "visual": visual})
    merge(path)
    return path


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_equals_uninterrupted(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    cfg = load_config("tiny", OVERRIDES)
    full = pretrain(store, cfg, tmp_path / "full")
    pretrain(store, cfg, tmp_path / "part", max_steps=3)
    resumed = pretrain(store, cfg, tmp_path / "part")
    assert full.step == resumed.step == 6
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    train = lambda rows: [(r["step"], r["loss/total"]) for r in rows if "loss/total" in r]  # noqa: E731
    assert train(a) == train(b)  # the same trajectory, bit for bit
    sa = torch.load(tmp_path / "full" / "mae.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "part" / "mae.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full.unigram["unigram/audio"] > 0 and "val/acc_audio" in full.val


def test_loss_goes_down_and_checkpoint_records_parents(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    cfg = load_config("tiny", OVERRIDES + ["pretrain.steps=60", "pretrain.val_every=60", "pretrain.base_lr=1.0"])
    pretrain(store, cfg, tmp_path / "run")
    rows = [r for r in metrics(tmp_path / "run") if "loss/total" in r]
    assert np.mean([r["loss/total"] for r in rows[-5:]]) < 0.8 * np.mean([r["loss/total"] for r in rows[:5]])
    ckpt = torch.load(tmp_path / "run" / "mae.pt", weights_only=True)
    assert ckpt["kind"] == "mae" and ckpt["parents"]["audio_tokenizer"] == "a" * 64
    assert ckpt["extra"]["dims"]["audio"]["codebook_size"] == 16
    # the same rows as TensorBoard scalars beside metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    board.Reload()
    logged = board.Scalars("loss/total")
    assert [e.step for e in logged] == [r["step"] for r in rows]
    assert [e.value for e in logged] == pytest.approx([r["loss/total"] for r in rows], rel=1e-6)


def test_unigram_prior_is_set_from_the_training_clips(tmp_path):
    from vqmae.windows import WindowData, position_counts

    store = make_store(tmp_path / "s.zarr")
    cfg = load_config("tiny", OVERRIDES + ["pretrain.steps=2", "mae.unigram_prior=true"])
    pretrain(store, cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "mae.pt", weights_only=True)["state_dict"]
    train_rows = WindowData(TokenStore.open(store), cfg).train_rows
    for m in ("audio", "visual"):
        counts = torch.as_tensor(position_counts(TokenStore.open(store), m, train_rows), dtype=torch.float64)
        want = torch.log((counts + 1) / (counts + 1).sum(1, keepdim=True)).float()
        torch.testing.assert_close(state[f"prior.{m}"], want)
    pretrain(store, load_config("tiny", OVERRIDES + ["pretrain.steps=2"]), tmp_path / "off")  # the default
    state = torch.load(tmp_path / "off" / "mae.pt", weights_only=True)["state_dict"]
    assert (state["prior.audio"] == 0).all() and (state["prior.visual"] == 0).all()


def test_resume_refuses_store_with_other_tokenizer(tmp_path):
    cfg = load_config("tiny", OVERRIDES + ["pretrain.steps=3"])
    pretrain(make_store(tmp_path / "a.zarr"), cfg, tmp_path / "run")
    other = make_store(tmp_path / "b.zarr", sha="c" * 64)
    with pytest.raises(PretrainError, match=r"audio_tokenizer mismatch: checkpoint was trained on aaaaaaaaaaaa…, store .*b\.zarr has cccccccccccc…"):
        pretrain(other, load_config("tiny", OVERRIDES + ["pretrain.steps=6"]), tmp_path / "run")


def test_cli_pretrain(tmp_path):
    store = make_store(tmp_path / "s.zarr", shared=True)
    args = ["pretrain", str(store), "--run-dir", str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu"]
    for o in OVERRIDES:
        args += ["--set", o]
    res = CliRunner().invoke(app, args + ["--max-steps", "1"])
    assert res.exit_code == 0, res.output
    assert "masked-token accuracy" in res.output and (tmp_path / "run" / "summary.json").exists()
    # one step in, the model is near chance, far below a unigram baseline near 1: said so
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["modalities"]
    out = " ".join(res.output.split())
    assert "warning: masked-token accuracy not above the unigram baseline" in out
    for m, s in summary.items():
        assert s["masked_token_accuracy"] <= s["unigram_accuracy"]
        assert f"{m} {s['masked_token_accuracy']:.3f} ≤ {s['unigram_accuracy']:.3f}" in out
        # and its cross-entropy beside the unigram's, both printed
        assert s["cross_entropy"] > s["unigram_cross_entropy"] > 0
        (row,) = [r for r in res.output.splitlines() if r.startswith(f"│ {m:>8} │")]
        assert row.split("│")[4:6] == [f" {s['cross_entropy']:>13.3f} ", f" {s['unigram_cross_entropy']:>9.3f} "]


def _ddp_worker(rank, world, store, run, port, overrides):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides)
    pretrain(store, cfg, run, max_steps=3)  # then resume: rank 0 decides and broadcasts
    result = pretrain(store, cfg, run)
    import torch.distributed as dist

    params = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    dist.destroy_process_group()
    assert torch.equal(gathered[0], gathered[1])


def test_two_process_gloo_ddp_equals_one_process(tmp_path):
    """Same global batch → same loss trajectory, metrics and final weights as one process, with
    the 2-process run stopped at step 3 and resumed (rank 0 decides the resume)."""
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = make_store(tmp_path / "s.zarr")
    overrides = OVERRIDES + ["mae.contrastive_weight=0.5", "mae.unigram_prior=true"]
    torch.set_num_threads(1)
    one = pretrain(store, load_config("tiny", overrides), tmp_path / "one")
    tmp.spawn(_ddp_worker, args=(2, str(store), str(tmp_path / "ddp"), port, overrides), nprocs=2)
    a = [r for r in metrics(tmp_path / "one") if "loss/total" in r]
    b = [r for r in metrics(tmp_path / "ddp") if "loss/total" in r]
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss/total", "loss/audio_ce", "loss/visual_ce", "acc/audio", "acc/visual",
                    "mask/audio", "mask/visual", "loss/contrastive", "grad_norm"):
            # the contrastive logits sum gathered features in another order: 1.0e-5 seen at step 2
            rel = 3e-5 if key == "loss/contrastive" else 1e-5
            assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-7), (ra["step"], key)
    assert any(r["loss/contrastive"] > 0 for r in a)
    va = [r for r in metrics(tmp_path / "one") if "val/loss_total" in r]
    vb = [r for r in metrics(tmp_path / "ddp") if "val/loss_total" in r]
    for key in ("val/loss_audio_ce", "val/loss_visual_ce", "val/acc_audio", "val/mask_visual"):
        assert [r[key] for r in vb] == pytest.approx([r[key] for r in va], rel=1e-5)
    sa = torch.load(tmp_path / "one" / "mae.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "ddp" / "mae.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys() and one.step == 6
    for k in sa:
        if k.endswith("attn.kv.bias"):
            # The key bias shifts every score of a query equally: softmax ignores it, its true
            # gradient is 0 and AdamW turns float noise there into ±lr steps. Only values count.
            sa[k], sb[k] = sa[k][32:], sb[k][32:]  # [2 × width] → the value half (width 32)
        # 6 AdamW steps at lr 4e-3 amplify reduction-order noise: up to 5e-5 seen (weights ~0.1)
        assert torch.allclose(sb[k], sa[k], rtol=1e-5, atol=1e-4), (k, (sb[k] - sa[k]).abs().max().item())


def test_rerunning_a_finished_run_keeps_its_results(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    cfg = load_config("tiny", OVERRIDES + ["pretrain.steps=3"])
    first = pretrain(store, cfg, tmp_path / "run")
    again = pretrain(store, cfg, tmp_path / "run")
    assert again.step == 3 and again.val == first.val
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val"]["val/loss_total"] == first.val["val/loss_total"]


def test_global_masking_matches_the_model_and_ignores_world_size(tmp_path):
    from vqmae.models.layout import MAEDims
    from vqmae.models.mae import MAEModel
    from vqmae.stages.pretrain import GlobalMasking, mask_generator
    from vqmae.windows import batch_dict
    from vqmae.windows import WindowData

    store = make_store(tmp_path / "s.zarr")
    cfg = load_config("tiny", OVERRIDES)

    ts = TokenStore.open(store)
    data = WindowData(ts, cfg)
    model = MAEModel(cfg.mae, MAEDims.from_specs(ts.specs, cfg.mae))
    masker = GlobalMasking(model, data, "cpu")
    rows, starts = data.plan.samples(0, 16)  # a global batch of 16 (clips shorter than a window)
    inp = model.prepare(batch_dict(data.windows(rows, starts), "cpu"))
    padding, ids = masker.geometry(torch.from_numpy(rows), torch.from_numpy(starts))
    for m in model.names:  # the padding and valid ids of each patch, without reading codes
        assert torch.equal(padding[m], inp.padding[m])
        assert torch.equal(ids[m], inp.token_valid[m].sum(-1))
        assert (ids[m] < ids[m].max()).any()  # partly padded patches (clips shorter than 0.4 s)

    def draw(lo, hi):
        return masker.draw(torch.from_numpy(rows), torch.from_numpy(starts),
                           mask_generator(0, 5, "cpu"), lo, hi)

    whole, halves = draw(0, 16), [draw(0, 8), draw(8, 16)]
    for m in model.names:
        assert torch.equal(torch.cat([h.mask[m] for h in halves]), whole.mask[m])
        assert whole.count[m] == inp.token_valid[m][whole.mask[m]].sum() == halves[1].count[m]


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_damaged_store_is_refused_and_leaves_no_run_directory(tmp_path, command):
    """A deleted codes chunk: `pretrain` and `finetune` refuse the store with the chunk and its clips
    named (exit code 2) before any training, and leave no run directory behind."""
    from vqmae.store.integrity import chunk_file

    store = make_store(tmp_path / "s.zarr", n_clips=12)
    (store / chunk_file("audio", 0)).unlink()
    run = tmp_path / "run"
    args = [command, str(store), "--preset", "tiny", "--device", "cpu"]
    args += ["--run-dir", str(run)] if command == "pretrain" else ["--run", str(run), "--set", "finetune.inits=scratch"]
    for o in OVERRIDES:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "audio/codes chunk 0" in out and "c0" in out, out
    assert not run.exists()


def test_context_warning_needs_both_accuracy_and_cross_entropy_at_the_unigram():
    """Audio codes can keep the top-1 accuracy at the unigram's while the cross-entropy shows the
    context used: no warning then; a model behind on both is warned about."""
    from types import SimpleNamespace

    from vqmae.stages.pretrain import context_warnings
    used = SimpleNamespace(accuracy={"audio": (0.248, 0.249)}, cross_entropy={"audio": (3.86, 4.35)})
    assert context_warnings(used) == []
    ignored = SimpleNamespace(accuracy={"audio": (0.248, 0.249)}, cross_entropy={"audio": (4.40, 4.35)})
    (w,) = context_warnings(ignored)
    assert "audio 0.248 ≤ 0.249" in w
    ahead = SimpleNamespace(accuracy={"visual": (0.29, 0.15)}, cross_entropy={"visual": (3.0, 2.9)})
    assert context_warnings(ahead) == []
