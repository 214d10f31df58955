"""Token store: write/merge/open, windowed reads, concurrent and killed writers, bad stores, CLI."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import zarr

import vqmae.store.merging as merging_mod
import vqmae.store.reader as reader_mod
import vqmae.store.segments as segments_mod
from vqmae import __version__
from vqmae.config import StoreConfig
from vqmae.store import (FORMAT, ModalitySpec, StoreError, StoreMismatchError, StoreWriter,
                         TokenStore, committed_ids, list_segments, list_tmp_segments, merge,
                         parse_shard, parts_dir, pending, table_columns)

SHA_A = "a" * 64
SHA_B = "b" * 64
CFG = StoreConfig(segment_clips=3, audio_chunk_rows=16, visual_chunk_rows=8)
N_CLIPS = 14


def make_specs(audio_sha: str = SHA_A) -> dict[str, ModalitySpec]:
    return {"audio": ModalitySpec("audio", 16, (4,), 50.0, audio_sha),
            "visual": ModalitySpec("visual", 8, (2, 3), 25.0, "c" * 64)}


def make_clip(i: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Deterministic clip i: every 5th is audio-only, lengths vary, codes depend on i."""
    rng = np.random.default_rng(i)
    n_video = int(rng.integers(1, 9))
    record = {"clip_id": f"c{i:03d}", "index": i, "path": f"/data/s{i % 3}/{i}.mp4",
              "dataset": "ravdess" if i % 2 else "voxceleb2", "speaker": f"s{i % 3}",
              "label": ["neutral", "happy", ""][i % 3], "labels": ["a", "b"] if i % 4 == 0 else None,
              "split": "train", "valence": 0.5 if i % 2 else None, "arousal": float(i),
              "dominance": None, "face_rate": None if i % 5 == 0 else 0.9}
    codes = {"audio": rng.integers(0, 16, (2 * n_video, 4)).astype(np.uint16)}
    if i % 5:
        codes["visual"] = rng.integers(0, 8, (n_video, 6)).astype(np.uint16)
    return record, codes


def is_failure(i: int) -> bool:
    return i % 7 == 3


def write_clips(path: Path, ids, shard=(0, 1), cfg: StoreConfig = CFG, specs=None) -> set[str]:
    """Write clips `ids` (skipping done ones); returns the done set seen at start."""
    with StoreWriter(path, specs or make_specs(), shard=shard, cfg=cfg,
                     config={"preset": "tiny"}) as w:
        done = set(w.done)
        for i in ids:
            record, codes = make_clip(i)
            if record["clip_id"] in w.done:
                continue
            if is_failure(i):
                w.add_failure(record, "decode", f"corrupt stream in {record['path']}")
            else:
                w.add(record, codes)
    return done


def _worker(path: str, ids: list[int], shard: tuple[int, int], die_on_save: int = 0) -> None:
    """Subprocess body; with die_on_save=k it SIGKILLs itself inside its k-th segment file write."""
    if die_on_save:
        real_save, calls = np.save, [0]

        def dying_save(f, arr, *a, **kw):
            calls[0] += 1
            if calls[0] == die_on_save:
                f.write(b"\x93NUMPY partial")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(f, arr, *a, **kw)

        segments_mod.np.save = dying_save
    write_clips(Path(path), ids, shard=shard)


def run_workers(jobs: list[tuple]) -> list[int]:
    ctx = mp.get_context("spawn")  # no fork of a process that already runs zarr's threads
    procs = [ctx.Process(target=_worker, args=job) for job in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [p.exitcode for p in procs]


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = TokenStore.open(a), TokenStore.open(b)
    assert sa.specs == sb.specs
    assert sorted(sa.clips) == sorted(sb.clips)
    for col in sa.clips:
        x, y = sa.clips[col], sb.clips[col]
        assert x.dtype == y.dtype, col
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), col
        else:
            assert np.array_equal(x, y), col
    for name in sa.specs:
        assert sa.codes(name).tobytes() == sb.codes(name).tobytes()
        assert sa.codes(name).shape == sb.codes(name).shape


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """All clips written by one writer in index order, merged."""
    path = tmp_path_factory.mktemp("ref") / "tokens.zarr"
    write_clips(path, range(N_CLIPS))
    merge(path)
    return path


# ----------------------------------------------------------------------------------------------
# roundtrip


def test_roundtrip_codes_table_attrs(tmp_path):
    path = tmp_path / "t.zarr"
    order = [5, 0, 9, 3, 2, 7, 1]  # out of index order on purpose
    write_clips(path, order)
    summary = merge(path)
    assert (summary.n_segments, summary.n_new_clips, summary.n_clips) == (3, 7, 7)
    assert not parts_dir(path).exists()
    s = TokenStore.open(path)
    assert s.attrs["format"] == FORMAT == "vqmae-tokens/1"
    assert s.attrs["vqmae_version"] == __version__
    assert s.attrs["config"] == {"preset": "tiny"}
    assert s.attrs["modalities"]["visual"] == {"codebook_size": 8, "grid": [2, 3],
                                               "frame_rate": 25.0, "tokenizer_sha256": "c" * 64}
    assert s.specs == make_specs()
    assert set(s.clips) == set(table_columns(["audio", "visual"]))
    assert s.clips["index"].tolist() == sorted(order)
    assert s.clips["clip_id"].tolist() == [f"c{i:03d}" for i in sorted(order)]
    for row, i in enumerate(sorted(order)):
        record, codes = make_clip(i)
        assert s.clips["path"][row] == record["path"]
        assert s.clips["speaker"][row] == record["speaker"]
        assert s.clips["labels"][row] == ("a;b" if i % 4 == 0 else "")
        assert s.clips["arousal"][row] == np.float32(i)
        assert np.isnan(s.clips["dominance"][row])
        assert np.isnan(s.clips["face_rate"][row]) == (i % 5 == 0)
        if is_failure(i):
            assert s.clips["status"][row] == "failed"
            assert s.clips["error"][row] == f"decode: corrupt stream in {record['path']}"
            assert s.clips["audio_length"][row] == s.clips["visual_length"][row] == 0
            continue
        assert s.clips["status"][row] == "ok" and s.clips["error"][row] == ""
        for name in s.specs:
            want = codes.get(name, np.zeros((0, s.specs[name].n_tokens), np.uint16))
            assert np.array_equal(s.clip_codes(name, row), want)
    # clips are concatenated without gaps, in table order
    for name in s.specs:
        ends = s.clips[f"{name}_start"] + s.clips[f"{name}_length"]
        assert np.array_equal(s.clips[f"{name}_start"][1:], ends[:-1])
        assert ends[-1] == s.n_frames(name)
    assert s.codes("audio").dtype == np.uint16
    assert TokenStore.open(path)._arrays["audio"].chunks == (16, 4)


def test_merge_is_idempotent_and_extends(tmp_path, reference):
    path = tmp_path / "t.zarr"
    write_clips(path, [i for i in range(N_CLIPS) if i % 3 == 0])
    merge(path)
    assert merge(path).n_segments == 0  # nothing new: no-op
    write_clips(path, range(N_CLIPS))  # extension run skips what the store has
    assert merge(path).n_new_clips == N_CLIPS - len(range(0, N_CLIPS, 3))
    assert_same_store(path, reference)
    assert TokenStore.open(path).chunk_rows("visual") == CFG.visual_chunk_rows


def test_merge_keeps_store_chunks_without_writer_meta(tmp_path, reference):
    path = tmp_path / "t.zarr"
    write_clips(path, range(4))
    merge(path)
    write_clips(path, range(N_CLIPS))
    (parts_dir(path) / "meta.json").unlink()  # e.g. a merge removed it while this writer ran
    merge(path)
    s = TokenStore.open(path)
    assert (s.chunk_rows("audio"), s.chunk_rows("visual")) == (16, 8)
    assert_same_store(path, reference)


def test_merge_streams_in_small_blocks(tmp_path, reference, monkeypatch):
    # Force the bounded-memory path: runs split into blocks smaller than a clip, many flushes.
    monkeypatch.setattr(merging_mod, "MERGE_BLOCK_BYTES", 16)
    path = tmp_path / "t.zarr"
    write_clips(path, [i for i in range(N_CLIPS) if i % 2])
    merge(path)
    write_clips(path, range(N_CLIPS))
    merge(path)
    assert_same_store(path, reference)


def test_store_without_frames(tmp_path):
    @dataclasses.dataclass
    class Clip:  # records may be dataclasses; fields outside the table are ignored
        clip_id: str
        index: int
        duration: float = 1.0

    path = tmp_path / "t.zarr"
    with StoreWriter(path, make_specs(), cfg=CFG) as w:
        w.add_failure(Clip("x", 0), "decode", "no streams")
        w.add(Clip("y", 1), {})
    merge(path)
    for load in (True, False):
        s = TokenStore.open(path, load=load)
        assert s.n_frames("audio") == s.n_frames("visual") == 0
        assert s.clips["clip_id"].tolist() == ["x", "y"]
        codes, valid = s.read_windows("audio", np.array([0, 1]), np.array([0, 3]), 4)
        assert codes.shape == (2, 4, 4) and not valid.any() and not codes.any()
        assert s.code_counts("visual").sum() == 0


def test_merge_of_nothing_is_an_error(tmp_path):
    with pytest.raises(StoreError, match="nothing to merge") as e:
        merge(tmp_path / "none.zarr")
    assert "none.zarr" in str(e.value)


# ----------------------------------------------------------------------------------------------
# read_windows


def naive_windows(s: TokenStore, name: str, rows, starts, length):
    tokens = s.specs[name].n_tokens
    codes = np.zeros((len(rows), length, tokens), np.uint16)
    valid = np.zeros((len(rows), length), bool)
    for b, (r, st) in enumerate(zip(rows, starts)):
        clip = s.clip_codes(name, r)[st:st + length]
        codes[b, :len(clip)] = clip
        valid[b, :len(clip)] = True
    return codes, valid


@pytest.mark.parametrize("load", [True, False])
def test_read_windows_matches_naive_slicing(reference, load):
    s = TokenStore.open(reference, load=load)
    assert s.is_loaded("audio") == load
    rng = np.random.default_rng(0)
    for name, length in (("audio", 6), ("visual", 3)):
        rows = rng.integers(0, s.n_clips, 64)
        starts = rng.integers(0, 12, 64)  # many run past the end (padding), some clips empty
        codes, valid = s.read_windows(name, rows, starts, length)
        want_codes, want_valid = naive_windows(s, name, rows, starts, length)
        assert codes.shape == (64, length, s.specs[name].n_tokens) and codes.dtype == np.uint16
        assert np.array_equal(valid, want_valid)
        assert np.array_equal(codes, want_codes)
        assert valid.any() and not valid.all()
        assert (codes[~valid] == 0).all()


def test_read_windows_bad_rows(reference):
    s = TokenStore.open(reference)
    with pytest.raises(IndexError, match="rows"):
        s.read_windows("audio", np.array([s.n_clips]), np.array([0]), 4)
    with pytest.raises(ValueError, match=r"\[B\]"):
        s.read_windows("audio", np.array([0, 1]), np.array([0]), 4)


def test_code_counts_streamed_equals_loaded(reference, monkeypatch):
    s = TokenStore.open(reference)
    want = np.bincount(TokenStore.open(reference, load=True).codes("visual").ravel(), minlength=8)
    monkeypatch.setattr(reader_mod, "MERGE_BLOCK_BYTES", 64)
    assert np.array_equal(s.code_counts("visual"), want)


# ----------------------------------------------------------------------------------------------
# concurrency and crashes


def test_two_writer_processes_equal_one(tmp_path, reference):
    path = tmp_path / "t.zarr"
    ids = list(range(N_CLIPS))
    codes = run_workers([(str(path), [i for i in ids if i % 2 == k], (k, 2)) for k in range(2)])
    assert codes == [0, 0]
    names = [p.name for p in list_segments(path)]
    assert any(n.startswith("seg-0of2-") for n in names)
    assert any(n.startswith("seg-1of2-") for n in names)
    merge(path)
    assert_same_store(path, reference)


def test_sigkill_mid_segment_then_resume(tmp_path, reference):
    path = tmp_path / "t.zarr"
    # 3 clips per segment, 2 modality files each: the 5th save is inside the third segment.
    assert run_workers([(str(path), list(range(N_CLIPS)), (0, 1), 5)]) == [-signal.SIGKILL]
    assert len(list_segments(path)) == 2
    assert [p.name for p in list_tmp_segments(path)][0].startswith("seg-0of1-000002-")
    assert committed_ids(path) == {f"c{i:03d}" for i in range(6)}
    assert pending(path).n_tmp == 1
    done = write_clips(path, range(N_CLIPS))  # the rerun: skips done ids, drops the tmp segment
    assert done == {f"c{i:03d}" for i in range(6)}
    assert not list_tmp_segments(path)
    merge(path)
    s = TokenStore.open(path)
    assert s.clips["clip_id"].tolist() == [f"c{i:03d}" for i in range(N_CLIPS)]
    assert_same_store(path, reference)


def test_other_shards_tmp_survives_writer_start(tmp_path):
    path = tmp_path / "t.zarr"
    write_clips(path, [0], shard=(0, 2))
    tmp = parts_dir(path) / "seg-1of2-000000-deadbeef.tmp"
    tmp.mkdir()
    write_clips(path, [2], shard=(0, 2))
    assert tmp.exists()  # shard 1 may be mid-write: not ours to discard
    write_clips(path, [1], shard=(1, 2))
    assert not tmp.exists()


def test_duplicate_clip_across_shards_is_an_error(tmp_path):
    path = tmp_path / "t.zarr"
    write_clips(path, [0, 1, 2], shard=(0, 2))
    # A second shard given overlapping work, started before the first committed anything.
    with StoreWriter(path, make_specs(), shard=(1, 2), cfg=CFG) as w:
        w.done.clear()
        record, codes = make_clip(1)
        w.add(record, codes)
    before = sorted(p.name for p in list_segments(path))
    with pytest.raises(StoreError, match=r"clip 'c001' committed twice \(segment seg-") as e:
        merge(path)
    assert str(path) in str(e.value)
    assert sorted(p.name for p in list_segments(path)) == before  # nothing consumed
    assert not path.exists()


def test_writer_refuses_committed_id(tmp_path):
    path = tmp_path / "t.zarr"
    write_clips(path, [0, 1])
    with StoreWriter(path, make_specs(), cfg=CFG) as w:
        record, codes = make_clip(1)
        with pytest.raises(StoreError, match="c001.*already committed"):
            w.add(record, codes)


def test_merge_interrupted_mid_swap_recovers(tmp_path, reference, monkeypatch):
    path = tmp_path / "t.zarr"
    write_clips(path, range(5))
    merge(path)
    write_clips(path, range(N_CLIPS))
    real_rename, calls = os.rename, []

    def crashing_rename(a, b):
        calls.append((a, b))
        if str(b) == str(path):  # the second step of the swap: new store into place
            raise OSError("simulated crash")
        return real_rename(a, b)

    monkeypatch.setattr(merging_mod.os, "rename", crashing_rename)
    with pytest.raises(OSError, match="simulated"):
        merge(path)
    monkeypatch.setattr(merging_mod.os, "rename", real_rename)
    assert not path.exists() and Path(f"{path}.replaced").exists()
    with pytest.raises(StoreError, match="interrupted"):
        TokenStore.open(path)
    assert committed_ids(path) == {f"c{i:03d}" for i in range(N_CLIPS)}
    merge(path)
    assert not Path(f"{path}.replaced").exists() and not Path(f"{path}.merged").exists()
    assert not parts_dir(path).exists()
    assert_same_store(path, reference)


def test_leftover_merged_segment_not_duplicated(tmp_path, reference):
    path = tmp_path / "t.zarr"
    write_clips(path, range(N_CLIPS))
    keep = tmp_path / "keep"
    shutil.copytree(list_segments(path)[0], keep)
    merge(path)
    # A crash after the swap but before deleting the consumed segments leaves this behind.
    parts_dir(path).mkdir()
    shutil.copytree(keep, parts_dir(path) / list(TokenStore.open(path).attrs["merged_segments"])[0])
    assert pending(path).segments == []
    assert merge(path).n_new_clips == 0
    assert not parts_dir(path).exists()
    assert_same_store(path, reference)


def test_stale_merge_lock_of_dead_process_is_removed(tmp_path, reference):
    path = tmp_path / "t.zarr"
    write_clips(path, range(N_CLIPS))
    lock = Path(f"{path}.merging")
    lock.mkdir()
    import socket
    (lock / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 7}))
    merge(path)
    assert_same_store(path, reference)
    lock.mkdir()
    (lock / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(StoreError, match="another merge is running"):
        merge(path)


# ----------------------------------------------------------------------------------------------
# failures and resume


def test_failed_clips_recorded_and_skipped_on_resume(tmp_path):
    path = tmp_path / "t.zarr"
    write_clips(path, range(5))  # clip 3 fails
    done = write_clips(path, range(5))
    assert "c003" in done
    assert pending(path).n_failed == 1
    merge(path)
    s = TokenStore.open(path)
    assert s.failures() == [("c003", "/data/s0/3.mp4", "decode: corrupt stream in /data/s0/3.mp4")]
    with StoreWriter(path, make_specs(), cfg=CFG) as w:
        assert "c003" in w.done
        assert w.done == set(s.clips["clip_id"].tolist())


# ----------------------------------------------------------------------------------------------
# mismatches and bad input


def test_spec_mismatch_names_both_values(tmp_path):
    path = tmp_path / "t.zarr"
    write_clips(path, range(3))
    # against the parts' meta.json before any merge
    with pytest.raises(StoreMismatchError,
                       match=f"audio tokenizer_sha256: parts has {SHA_A}, writer has {SHA_B}"):
        StoreWriter(path, make_specs(SHA_B), cfg=CFG)
    merge(path)
    with pytest.raises(StoreMismatchError) as e:
        StoreWriter(path, make_specs(SHA_B), cfg=CFG)
    assert str(e.value) == f"{path}: audio tokenizer_sha256: store has {SHA_A}, writer has {SHA_B}"
    other = make_specs()
    other["visual"] = ModalitySpec("visual", 8, (4, 4), 25.0, "c" * 64)
    with pytest.raises(StoreMismatchError,
                       match=r"visual grid: store has \[2, 3\], writer has \[4, 4\]"):
        StoreWriter(path, other, cfg=CFG)
    with pytest.raises(StoreMismatchError, match=r"modalities: store has \['audio', 'visual'\], "
                                                 r"writer has \['audio'\]"):
        StoreWriter(path, {"audio": make_specs()["audio"]}, cfg=CFG)


@pytest.mark.parametrize("codes, match", [
    ({"audio": np.zeros((3, 5), np.uint16)}, r"audio codes have shape \(3, 5\), expected \[T, 4\]"),
    ({"audio": np.full((3, 4), 16)}, r"outside codebook \[0, 16\)"),
    ({"audio": np.zeros((3, 4), np.float32)}, "expected integers"),
    ({"depth": np.zeros((3, 4), np.uint16)}, r"unknown modalities \['depth'\]"),
])
def test_writer_rejects_bad_codes(tmp_path, codes, match):
    path = tmp_path / "t.zarr"
    with StoreWriter(path, make_specs(), cfg=CFG) as w:
        with pytest.raises(ValueError, match=match) as e:
            w.add({"clip_id": "x", "index": 0}, codes)
        assert str(path) in str(e.value) and "'x'" in str(e.value)
        with pytest.raises(ValueError, match="no clip_id"):
            w.add({"index": 0}, {})
        with pytest.raises(ValueError, match="index must be a non-negative int"):
            w.add({"clip_id": "y", "index": -1}, {})


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match=f"shard '{bad}': expected i/N"):
            parse_shard(bad)


def _copy(reference: Path, tmp_path: Path) -> Path:
    path = tmp_path / "bad.zarr"
    shutil.copytree(reference, path)
    return path


def test_unknown_format_version(tmp_path, reference):
    path = _copy(reference, tmp_path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format"] = "vqmae-tokens/9"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError) as e:
        TokenStore.open(path)
    assert str(e.value) == (f"{path}: unknown store format 'vqmae-tokens/9'; "
                            f"this vqmae reads 'vqmae-tokens/1'")
    with pytest.raises(StoreError, match="unknown store format"):
        StoreWriter(path, make_specs(), cfg=CFG)


def test_missing_array(tmp_path, reference):
    path = _copy(reference, tmp_path)
    shutil.rmtree(path / "clips" / "speaker")
    with pytest.raises(StoreError, match=f"^{path}: missing array clips/speaker$"):
        TokenStore.open(path)
    shutil.rmtree(path / "audio")
    with pytest.raises(StoreError, match=f"^{path}: missing array audio/codes$"):
        TokenStore.open(path)


def test_inconsistent_lengths(tmp_path, reference):
    path = _copy(reference, tmp_path)
    g = zarr.open_group(str(path), mode="r+")
    del g["clips/label"]
    g.create_array("clips/label", shape=(3,), dtype=str, chunks=(3,))
    with pytest.raises(StoreError, match=f"^{path}: clips/label has 3 rows, clips/clip_id has "
                                         f"{N_CLIPS}$"):
        TokenStore.open(path)


def test_offsets_outside_codes(tmp_path, reference):
    path = _copy(reference, tmp_path)
    g = zarr.open_group(str(path), mode="r+")
    g["clips/visual_length"][-1] = 10_000
    with pytest.raises(StoreError, match="visual_start/_length point outside visual/codes"):
        TokenStore.open(path)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match=f"^{tmp_path}: not a token store \\(no zarr.json\\)$"):
        TokenStore.open(tmp_path)
    with pytest.raises(StoreError, match="no such token store"):
        TokenStore.open(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# CLI


# The CLI is imported lazily: spawned writer processes import this module and should stay light.


def invoke(*args: str):
    from typer.testing import CliRunner

    from vqmae_cli.main import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture()
def wide_console(monkeypatch):
    from vqmae_cli.common import console

    monkeypatch.setattr(console, "width", 160)


def test_inspect_store(reference, wide_console):
    result = invoke("inspect", str(reference), "--failures", "1")
    assert result.exit_code == 0, result.output
    out = result.output
    s = TokenStore.open(reference)
    assert "vqmae-tokens/1" in out and __version__ in out
    assert SHA_A[:12] in out and SHA_A[:13] not in out
    assert str(s.n_frames("audio")) in out and str(s.n_frames("visual")) in out
    assert "50/s" in out and "2×3" in out
    usage = (s.code_counts("audio") > 0).mean() * 100
    assert f"{usage:.1f}%" in out
    assert "ravdess" in out and "voxceleb2" in out and "happy" in out
    n_failed = sum(is_failure(i) for i in range(N_CLIPS))
    assert f"{n_failed} failed clips" in out
    assert "decode: corrupt stream in /data/s0/3.mp4" in out
    assert "/data/s1/10.mp4" not in out  # only the first failure with --failures 1
    assert "pending" not in out


def test_inspect_shows_pending_segments(tmp_path, reference, wide_console):
    path = tmp_path / "t.zarr"
    shutil.copytree(reference, path)
    write_clips(path, range(N_CLIPS + 4))
    result = invoke("inspect", str(path), "--no-usage")
    assert result.exit_code == 0, result.output
    assert "2 unmerged segments, 4 clips (1 failed)" in result.output
    only_parts = tmp_path / "p.zarr"
    write_clips(only_parts, range(2))
    result = invoke("inspect", str(only_parts))
    assert result.exit_code == 0, result.output
    assert "1 unmerged segments, 2 clips" in result.output


@pytest.mark.parametrize("kind", ["empty_dir", "file", "missing"])
def test_inspect_not_a_store_exits_2(tmp_path, kind):
    target = tmp_path / "thing"
    if kind == "empty_dir":
        target.mkdir()
    elif kind == "file":
        target.write_text("hello")
    result = invoke("inspect", str(target))
    assert result.exit_code == 2
    assert "not a vqmae token store" in " ".join(result.output.split())  # rich wraps lines
    assert "thing" in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------
# damage


def _damaged(tmp_path, reference, name="store.zarr"):
    path = tmp_path / name
    shutil.copytree(reference, path)
    return path


def test_missing_truncated_or_altered_chunks_are_found_not_read_as_codes(tmp_path, reference):
    """A deleted chunk file reads as the fill value, not code 0; loading, window reads and
    `verify_store` name the array, the chunk and its clips; a truncated file is an error naming
    its path; rewritten rows fail the checksum; the intact store verifies clean."""
    from vqmae.store.integrity import FILL, chunk_file, verify_store

    damage, notes = verify_store(TokenStore.open(reference))
    assert damage == [] and notes == []
    # a missing chunk
    path = _damaged(tmp_path, reference, "missing.zarr")
    (path / chunk_file("audio", 1)).unlink()
    s = TokenStore.open(path)
    assert s._array("audio")[16:32].max() == FILL  # what zarr hands back for it
    with pytest.raises(StoreError, match=r"audio/codes chunk 1 \(rows 16-31.*missing.*clips c0"):
        s.codes("audio")
    row = int(np.flatnonzero(s.clips["audio_start"] >= 16)[0])
    with pytest.raises(StoreError, match="outside the codebook"):
        s.read_windows("audio", np.array([row]), np.array([0]), 4)
    damage, _ = verify_store(s)
    assert [(d.modality, d.chunk, d.rows) for d in damage] == [("audio", 1, (16, 32))]
    want = {str(c) for c, a, n in zip(s.clips["clip_id"], s.clips["audio_start"], s.clips["audio_length"])
            if n and a < 32 and a + n > 16}
    assert set(damage[0].clips) == want
    # a truncated chunk file
    path = _damaged(tmp_path, reference, "truncated.zarr")
    f = path / chunk_file("visual", 0)
    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(StoreError, match=r"visual/codes/c/0/0"):
        TokenStore.open(path).codes("visual")
    damage, _ = verify_store(TokenStore.open(path))
    assert [(d.modality, d.chunk) for d in damage] == [("visual", 0)] and "unreadable" in damage[0].reason
    # rows rewritten with other valid codes
    path = _damaged(tmp_path, reference, "altered.zarr")
    arr = zarr.open_array(str(path / "audio" / "codes"), mode="r+")
    arr[3] = (arr[3] + 1) % 16
    with pytest.raises(StoreError, match="chunk 0.*checksum mismatch"):
        TokenStore.open(path).codes("audio")


def test_inspect_verify_exit_codes(tmp_path, reference):
    from typer.testing import CliRunner

    from vqmae_cli.main import app
    from vqmae.store.integrity import chunk_file

    ok = CliRunner().invoke(app, ["inspect", str(reference), "--verify"])
    assert ok.exit_code == 0 and "no damage" in ok.output
    path = _damaged(tmp_path, reference)
    (path / chunk_file("audio", 0)).unlink()
    bad = CliRunner().invoke(app, ["inspect", str(path), "--verify"])
    assert bad.exit_code == 1 and "damaged chunks: 1" in bad.output
    plain = CliRunner().invoke(app, ["inspect", str(path)])  # counting code usage meets the damage
    assert plain.exit_code == 1
