"""Stage-2 windows: geometry, split, sampling plan, in-RAM and streaming gathers, DDP, resume."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vqmae.config import StoreConfig, load_config
from vqmae.store import ModalitySpec, StoreWriter, TokenStore, merge
from vqmae.windows import (StreamingWindows, WindowData, WindowPlan, gather, split_rows,
                           tile_windows, unigram_baseline, usable_rows, window_geometry)

N_CLIPS = 48
WIN_S = 0.4  # 10 visual + 20 audio frames: short clips below keep the store tiny
SPECS = {"audio": ModalitySpec("audio", 16, (4,), 50.0, "a" * 64),
         "visual": ModalitySpec("visual", 8, (2, 3), 25.0, "b" * 64)}


def kind(i: int) -> str:
    return {3: "failed", 7: "audio_only"}.get(i % 10, "av")


def make_clip(i: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Visual lengths 1..39 frames (many below a window); audio 2× (one short when i%10==5)."""
    rng = np.random.default_rng(100 + i)
    n_v = int(rng.integers(1, 40)) if i % 6 else int(rng.integers(1, 10))
    n_a = 2 * n_v - (i % 10 == 5)
    codes = {"audio": rng.integers(0, 16, (n_a, 4))}
    if kind(i) == "av":
        # Skewed codes: position-dependent favourites make the unigram baseline non-trivial.
        v = rng.integers(0, 8, (n_v, 6))
        v = np.where(rng.random((n_v, 6)) < 0.5, np.arange(6), v)
        codes["visual"] = v
    return {"clip_id": f"c{i:03d}", "index": i, "speaker": f"s{i % 4}"}, codes


def build(path: Path, n: int = N_CLIPS) -> Path:
    cfg = StoreConfig(segment_clips=8, audio_chunk_rows=32, visual_chunk_rows=8)
    with StoreWriter(path, SPECS, cfg=cfg) as w:
        for i in range(n):
            record, codes = make_clip(i)
            if kind(i) == "failed":
                w.add_failure(record, "decode", "broken")
            else:
                w.add(record, codes)
    merge(path)
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("win") / "tokens.zarr")


def config(**pretrain):
    cfg = load_config("tiny", [f"mae.window_seconds={WIN_S}"])
    pre = dict(batch_size=8, val_fraction=0.2, ram_limit_gb=1.0, workers=0)
    pre.update(pretrain)
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, **pre))


@pytest.fixture(scope="module")
def data(store_path) -> WindowData:
    return WindowData(TokenStore.open(store_path), config())


def naive(store: TokenStore, m: str, row: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    clip = store.clip_codes(m, row)[start:start + n]
    codes = np.zeros((n, store.specs[m].n_tokens), np.int64)
    codes[:len(clip)] = clip
    valid = np.arange(n) < len(clip)
    return codes, valid


def assert_naive(store: TokenStore, batch, ratio=None) -> None:
    """Every window of `batch` equals slicing the clip; in av mode audio starts at 2 × visual."""
    ratio = ratio or {"visual": 1, "audio": 2}
    frames = {"visual": 10, "audio": 20}
    for b, (row, start) in enumerate(zip(batch.rows.tolist(), batch.starts.tolist())):
        for m in ratio:
            codes, valid = naive(store, m, row, start * ratio[m], frames[m])
            got = getattr(batch, m)[b].reshape(frames[m], -1)
            assert torch.equal(got, torch.from_numpy(codes)), (m, row, start)
            assert torch.equal(getattr(batch, f"{m}_valid")[b], torch.from_numpy(valid))


def batch_tuple(batch) -> tuple:
    return tuple(None if v is None else v.clone() for v in vars(batch).values())


def assert_batches_equal(a, b) -> None:
    for x, y in zip(batch_tuple(a), batch_tuple(b)):
        assert (x is None and y is None) or torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# geometry, usable clips, split


def test_geometry_paper_defaults_and_errors():
    specs = {"audio": ModalitySpec("audio", 256, (64,), 50.0, ""),
             "visual": ModalitySpec("visual", 512, (24, 24), 25.0, "")}
    g = window_geometry(specs, "av", 2.0)
    assert g.frames == {"visual": 50, "audio": 100} and g.ratio == {"visual": 1, "audio": 2}
    assert g.window_steps == 50 and g.step_rate == 25.0
    assert window_geometry(specs, "audio", 2.0).window_steps == 100  # own 50 fps grid
    with pytest.raises(ValueError, match=r"visual frames per window \(0.37 s × 25 fps\) = 9.25"):
        window_geometry(specs, "av", 0.37)
    odd = dict(specs, audio=ModalitySpec("audio", 256, (64,), 60.0, ""))
    with pytest.raises(ValueError, match="audio frame rate / 25 fps"):
        window_geometry(odd, "av", 2.0)
    with pytest.raises(ValueError, match=r"mode 'av' needs .* store has only \['audio'\]"):
        window_geometry({"audio": specs["audio"]}, "av", 2.0)


def test_usable_rows_per_mode(data):
    clips = data.store.clips
    ids = lambda rows: {int(str(clips["clip_id"][r])[1:]) for r in rows}  # noqa: E731
    av = usable_rows(clips, window_geometry(SPECS, "av", WIN_S))
    audio = usable_rows(clips, window_geometry(SPECS, "audio", WIN_S))
    assert ids(av) == {i for i in range(N_CLIPS) if kind(i) == "av"}
    assert ids(audio) == {i for i in range(N_CLIPS) if kind(i) != "failed"}


def test_split_disjoint_deterministic_and_stable(data):
    usable = usable_rows(data.store.clips, data.geom)
    train, val = data.train_rows, data.val_rows
    assert not set(train) & set(val) and sorted(set(train) | set(val)) == sorted(usable)
    assert 0 < len(val) < len(usable) // 2
    again = WindowData(TokenStore.open(data.store.path), config())
    assert np.array_equal(again.train_rows, train) and np.array_equal(again.val_rows, val)
    other = split_rows(data.store.clips, usable, 0.2, seed=1)[1]
    assert not np.array_equal(other, val)
    # Per-clip hash: the val clips of a subset of the store are the val clips of the whole.
    sub_val = split_rows(data.store.clips, usable[::2], 0.2, seed=0)[1]
    assert set(sub_val) == set(val) & set(usable[::2])
    with pytest.raises(ValueError, match=r"val_fraction 1.0 must lie in \[0, 1\)"):
        split_rows(data.store.clips, usable, 1.0, seed=0)


# ----------------------------------------------------------------------------------------------
# the plan and in-RAM batches


def test_batch_shapes_dtypes_and_naive_slicing(data):
    batch = next(data.train_batches())
    assert batch.visual.shape == (8, 10, 2, 3) and batch.visual.dtype == torch.int64
    assert batch.audio.shape == (8, 20, 4) and batch.audio.dtype == torch.int64
    assert batch.visual_valid.shape == (8, 10) and batch.visual_valid.dtype == torch.bool
    assert batch.audio_valid.shape == (8, 20) and batch.rows.dtype == torch.int64
    for b in [batch] + [next(data.train_batches(s)) for s in range(1, 12)]:
        assert set(b.rows.tolist()) <= set(data.train_rows.tolist())
        assert_naive(data.store, b)


def test_audio_mode_has_no_visual_and_uses_audio_only_clips(store_path):
    d = WindowData(TokenStore.open(store_path), config(), mode="audio")
    assert d.geom.window_steps == 20
    audio_only = {r for r in d.train_rows.tolist() if d.store.clips["visual_length"][r] == 0}
    assert audio_only
    seen = set()
    for step, b in zip(range(40), d.train_batches()):
        assert b.visual is None and b.visual_valid is None and b.audio.shape == (8, 20, 4)
        seen |= set(b.rows.tolist())
        if step < 5:
            assert_naive(d.store, b, {"audio": 1})
    assert audio_only <= seen


def test_epoch_covers_every_clip_by_tiles_and_short_clips_are_padded(data):
    plan = data.plan
    rows, starts = plan.epoch(0)
    tiles = dict(zip(plan.rows.tolist(), plan.tiles.tolist()))
    assert Counter(rows.tolist()) == tiles
    steps = dict(zip(data.train_rows.tolist(), data.steps[data.train_rows].tolist()))
    assert all(0 <= s <= max(steps[r] - 10, 0) for r, s in zip(rows.tolist(), starts.tolist()))
    short = [r for r, n in steps.items() if n < 10]
    assert short, "the store must hold clips shorter than a window"
    b = data.windows(np.array(short), np.zeros(len(short), np.int64))
    lengths = data.store.clips["visual_length"][short]
    assert np.array_equal(b.visual_valid.sum(1).numpy(), lengths)
    assert np.array_equal(b.audio_valid.sum(1).numpy(), data.store.clips["audio_length"][short])
    assert (b.visual[~b.visual_valid] == 0).all() and (b.audio[~b.audio_valid] == 0).all()
    assert_naive(data.store, b)


def test_one_short_audio_frame_is_masked_not_shifted(data):
    # Clip i % 10 == 5 has 2 n_v - 1 audio frames: its last audio frame is masked, visual whole.
    row = next(r for r in data.train_rows.tolist()
               if data.store.clips["audio_length"][r] % 2 and
               data.store.clips["visual_length"][r] >= 10)
    n_v = int(data.store.clips["visual_length"][row])
    start = n_v - 10  # the window ending at the clip's last visual frame
    b = data.windows(np.array([row]), np.array([start]))
    assert b.visual_valid.all() and b.audio_valid[0, :-1].all() and not b.audio_valid[0, -1]
    assert_naive(data.store, b)


def test_same_seed_same_batches_other_epoch_or_seed_differs(data, store_path):
    again = WindowData(TokenStore.open(store_path), config())
    for a, b in zip([next(data.train_batches(s)) for s in range(5)],
                    [next(again.train_batches(s)) for s in range(5)]):
        assert_batches_equal(a, b)
    e0, e1 = data.plan.epoch(0), data.plan.epoch(1)
    assert not np.array_equal(e0[0], e1[0]) or not np.array_equal(e0[1], e1[1])
    seeded = WindowData(TokenStore.open(store_path), dataclasses.replace(config(), seed=5))
    assert not torch.equal(next(seeded.train_batches()).rows, next(data.train_batches()).rows) \
        or not np.array_equal(seeded.val_rows, data.val_rows)


def test_resume_at_step_k_equals_uninterrupted(data):
    k, n = 7, 12  # crosses the epoch boundary (samples_per_epoch is about 5 batches here)
    assert data.plan.samples_per_epoch < (k + n) * 8
    whole = [b for _, b in zip(range(k + n), data.train_batches(0))]
    resumed = [b for _, b in zip(range(n), data.train_batches(k))]
    for a, b in zip(whole[k:], resumed):
        assert_batches_equal(a, b)


def test_distributed_union_equals_single_process(store_path, data):
    ranks = [WindowData(TokenStore.open(store_path), config(), rank=r, world_size=4)
             for r in range(4)]
    for step in range(9):
        parts = [next(d.train_batches(step)) for d in ranks]
        assert all(len(p) == 2 for p in parts)
        single = next(data.train_batches(step))
        for field in ("rows", "starts", "visual", "visual_valid", "audio", "audio_valid"):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]),
                               getattr(single, field)), (step, field)
    with pytest.raises(ValueError, match="batch_size 8 must be a multiple of world_size 3"):
        WindowData(TokenStore.open(store_path), config(), rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        WindowData(TokenStore.open(store_path), config(), rank=2, world_size=2)


def test_plan_handles_epochs_smaller_than_a_batch():
    plan = WindowPlan(np.array([4, 9]), np.array([3, 25]), window_steps=10, seed=0)
    assert plan.samples_per_epoch == 4  # 1 tile + 3 tiles
    rows, starts = plan.batch(0, 10)
    assert len(rows) == 10 and Counter(rows[:4].tolist()) == {4: 1, 9: 3}
    assert set(starts[rows == 4].tolist()) == {0} and starts.max() <= 15


# ----------------------------------------------------------------------------------------------
# validation


def test_validation_tiles_every_clip_deterministically(data, store_path):
    rows, starts = data.val_windows()
    for r in data.val_rows.tolist():
        n = int(data.steps[r])
        assert starts[rows == r].tolist() == list(range(0, max(n, 1), 10))
    batches = list(data.val_batches())
    assert [len(b) for b in batches[:-1]] == [8] * (len(batches) - 1)
    assert sum(len(b) for b in batches) == len(rows)
    frames = sum(int(b.visual_valid.sum()) for b in batches)
    assert frames == int(data.store.clips["visual_length"][data.val_rows].sum())
    for a, b in zip(batches, data.val_batches()):
        assert_batches_equal(a, b)
        assert_naive(data.store, a)
    two = [WindowData(TokenStore.open(store_path), config(), rank=r, world_size=2).val_windows()
           for r in range(2)]
    union = sorted(zip(np.concatenate([t[0] for t in two]).tolist(),
                       np.concatenate([t[1] for t in two]).tolist()))
    assert union == sorted(zip(rows.tolist(), starts.tolist()))
    streamed = WindowData(TokenStore.open(store_path), config(ram_limit_gb=0.0))
    assert not streamed.in_ram and not streamed.store.is_loaded("visual")
    for a, b in zip(batches, streamed.val_batches()):
        assert_batches_equal(a, b)


def test_tile_windows():
    rows, starts = tile_windows(np.array([5, 6, 7]), np.array([10, 21, 0]), 10)
    assert rows.tolist() == [5, 6, 6, 6, 7] and starts.tolist() == [0, 0, 10, 20, 0]


def test_gather_matches_loops():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 100, (30, 3)).astype(np.uint16)
    first, avail = np.array([2, 10, 29]), np.array([8, 15, 1])  # clips at 0, 10, 25
    codes, valid = gather(src, first, avail, 6)
    assert valid.sum(1).tolist() == [6, 6, 1]
    assert np.array_equal(codes[0], src[2:8]) and np.array_equal(codes[2, 0], src[29])
    assert (codes[2, 1:] == 0).all()


# ----------------------------------------------------------------------------------------------
# streaming


def stream_samples(batches) -> Counter:
    return Counter((r, s) for b in batches for r, s in zip(b.rows.tolist(), b.starts.tolist()))


@pytest.fixture(scope="module")
def streamed(store_path) -> WindowData:
    d = WindowData(TokenStore.open(store_path), config(ram_limit_gb=0.0, stream_buffer_mb=0.002))
    assert not d.in_ram
    return d


def test_streaming_covers_all_clips_and_equals_naive_slicing(streamed, data, monkeypatch):
    ds = streamed.streaming(epochs=1, drop_last=False)
    assert len(ds.blocks) > 4 and ds.blocks_per_group < len(ds.blocks)
    carried, group = [], StreamingWindows._group

    def spy(self, epoch, blocks, carry):
        carried.append(0 if carry is None else len(carry.rows))
        return group(self, epoch, blocks, carry)

    monkeypatch.setattr(StreamingWindows, "_group", spy)
    batches = list(ds)
    assert len(carried) > 2 and max(carried) > 0  # leftovers crossed group boundaries
    assert [len(b) for b in batches[:-1]] == [8] * (len(batches) - 1)
    got = stream_samples(batches)
    assert Counter(r for r, _ in got.elements()) == dict(zip(data.plan.rows.tolist(),
                                                             data.plan.tiles.tolist()))
    for b in batches:
        assert_naive(streamed.store, b)
    assert not streamed.store.is_loaded("audio")
    assert stream_samples(streamed.streaming(epochs=1, drop_last=False)) == got  # deterministic
    other = stream_samples(streamed.streaming(start_epoch=1, epochs=1, drop_last=False))
    assert other != got


def test_streaming_window_set_independent_of_ranks(streamed, store_path):
    one = stream_samples(streamed.streaming(epochs=1, drop_last=False))
    ranks = [WindowData(TokenStore.open(store_path),
                        config(ram_limit_gb=0.0, stream_buffer_mb=0.002), rank=r, world_size=2)
             for r in range(2)]
    parts = [stream_samples(d.streaming(epochs=1, drop_last=False)) for d in ranks]
    assert not set(parts[0]) & set(parts[1])
    assert parts[0] + parts[1] == one
    ds = ranks[0].streaming(epochs=1)
    assert all(len(b) == 4 for b in ds)


def test_streaming_dataloader_two_workers(streamed):
    ds = streamed.streaming(epochs=1, drop_last=False)
    one = stream_samples(ds)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    batches = list(loader)
    assert stream_samples(batches) == one  # each worker a disjoint share of the blocks
    for b in batches[:3]:
        assert_naive(streamed.store, b)
    assert [stream_samples(list(loader))] == [one]  # same again next time


def test_streaming_train_loader_and_too_many_consumers(streamed, store_path):
    it = streamed.train_loader()
    first = [next(it) for _ in range(3)]
    assert all(len(b) == 8 for b in first)
    resumed = next(streamed.train_loader(start_step=10 ** 6))
    assert len(resumed) == 8
    ds = streamed.streaming()
    ds.world_size = len(ds.blocks) + 1
    with pytest.raises(ValueError, match=r"tokens.zarr: \d+ chunk blocks .* cannot feed"):
        next(iter(ds))


# ----------------------------------------------------------------------------------------------
# unigram baseline


def test_unigram_baseline_matches_brute_force(data):
    store = TokenStore.open(data.store.path, load=True)
    val = list(data.val_batches())
    got = unigram_baseline(store, data.train_rows, val)
    for m in ("audio", "visual"):
        frames = np.concatenate([store.clip_codes(m, r) for r in data.train_rows])  # [F, K]
        modes = np.array([np.bincount(col, minlength=store.specs[m].codebook_size).argmax()
                          for col in frames.T])
        assert np.array_equal(got[m].mode, modes)
        assert got[m].train_accuracy == pytest.approx((frames == modes).mean())
        hits = [(getattr(b, m).reshape(len(b), getattr(b, m).shape[1], -1).numpy() == modes)
                [getattr(b, f"{m}_valid").numpy()] for b in val]
        assert got[m].accuracy == pytest.approx(np.concatenate(hits).mean())
        # cross-entropy of the add-one smoothed per-position frequencies on the valid val tokens
        v = store.specs[m].codebook_size
        counts = np.stack([np.bincount(col, minlength=v) for col in frames.T])  # [K, V]
        log_p = np.log((counts + 1) / (counts.sum(1, keepdims=True) + v))
        codes = np.concatenate([getattr(b, m).reshape(len(b), getattr(b, m).shape[1], -1).numpy()
                                [getattr(b, f"{m}_valid").numpy()] for b in val])  # [N, K]
        assert got[m].cross_entropy == pytest.approx(-log_p[np.arange(codes.shape[1]), codes].mean())
        if m == "visual":  # the skew built into its codes: frequencies alone predict them
            assert got[m].cross_entropy < np.log(v)
    assert got["visual"].mode.tolist() == [0, 1, 2, 3, 4, 5]  # the skew built into the codes
    streamed = unigram_baseline(TokenStore.open(data.store.path), data.train_rows, val)
    assert streamed["visual"].to_dict() == got["visual"].to_dict()
