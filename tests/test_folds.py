"""Speaker folds: coverage, no speaker leak, seeding, LOSO, split files and nested label subsets."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vqmae.folds import (ClipSplitFile, Fold, SpeakerFoldFile, folds_from_speaker_map, make_folds,
                         read_split_file, speaker_groups, stratified_subset)

N_TABLE = 60
SPEAKERS = [f"spk{i:02d}" for i in range(11)]


@pytest.fixture
def table() -> tuple[np.ndarray, np.ndarray]:
    """(speaker str [60], usable rows int64): uneven clips per speaker; every 7th row unusable."""
    rng = np.random.default_rng(5)
    speaker = np.array([SPEAKERS[i] for i in rng.integers(0, len(SPEAKERS), N_TABLE)])
    speaker[[1, 12, 23, 24, 30, 40, 44]] = SPEAKERS[:7]  # usable rows for every speaker
    speaker[[45, 46, 47, 50]] = SPEAKERS[7:]
    rows = np.array([r for r in range(N_TABLE) if r % 7], dtype=np.int64)
    return speaker, rows


def check_fold(fold: Fold, speaker: np.ndarray, rows: np.ndarray) -> None:
    parts = (fold.train, fold.val, fold.test)
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), rows)  # disjoint and union == rows
    spk = [set(speaker[p].tolist()) for p in parts]
    assert not (spk[0] & spk[1]) and not (spk[0] & spk[2]) and not (spk[1] & spk[2])
    assert fold.test_speakers == tuple(sorted(spk[2]))
    assert fold.val_speakers == tuple(sorted(spk[1]))
    assert len(fold.train) > 0 and len(fold.val) > 0 and len(fold.test) > 0


def same_folds(a: list[Fold], b: list[Fold]) -> bool:
    return all(x.name == y.name and x.test_speakers == y.test_speakers and
               x.val_speakers == y.val_speakers and np.array_equal(x.train, y.train)
               for x, y in zip(a, b, strict=True))


def usable_speakers(speaker, rows) -> list[str]:
    return sorted(set(speaker[rows].tolist()))


# ------------------------------------------------------------------ speaker groups

def test_speaker_groups_partition_and_seeding():
    spk = ["c", "a", "b", "a", "d", "e", "f", "g", "c"]
    groups = speaker_groups(spk, 3, seed=1)
    flat = [s for g in groups for s in g]
    assert sorted(flat) == ["a", "b", "c", "d", "e", "f", "g"]  # each exactly once
    assert sorted(len(g) for g in groups) == [2, 2, 3]
    assert speaker_groups(list(reversed(spk)), 3, seed=1) == groups  # input order is irrelevant
    assert len({str(speaker_groups(spk, 3, seed=s)) for s in range(6)}) > 1


@pytest.mark.parametrize("k", [1, 8])
def test_speaker_groups_reject_k(k):
    with pytest.raises(ValueError, match=rf"k={k} folds needs 2 <= k <= the number of speakers \(7\)"):
        speaker_groups(list("abcdefg"), k, seed=0)


# ------------------------------------------------------------------ k-fold and LOSO

def test_kfold_covers_every_speaker_once_without_leak(table):
    speaker, rows = table
    folds = make_folds(speaker, rows, protocol="kfold", k=4, seed=3, val_speakers=2)
    assert [f.name for f in folds] == ["fold0", "fold1", "fold2", "fold3"]
    tested = Counter(s for f in folds for s in f.test_speakers)
    assert sorted(tested) == usable_speakers(speaker, rows) and set(tested.values()) == {1}
    assert sorted(len(f.test_speakers) for f in folds) == [2, 3, 3, 3]
    for fold in folds:
        check_fold(fold, speaker, rows)
        assert len(fold.val_speakers) == 2
    assert np.array_equal(np.sort(np.concatenate([f.test for f in folds])), rows)


def test_kfold_is_deterministic_per_seed(table):
    speaker, rows = table
    a = make_folds(speaker, rows, protocol="kfold", k=3, seed=7)
    assert same_folds(a, make_folds(speaker, rows, protocol="kfold", k=3, seed=7))
    assert not same_folds(a, make_folds(speaker, rows, protocol="kfold", k=3, seed=8))


def test_loso_one_fold_per_speaker(table):
    speaker, rows = table
    folds = make_folds(speaker, rows, protocol="loso", seed=0)
    present = usable_speakers(speaker, rows)
    assert len(folds) == len(present) == len(SPEAKERS)
    assert [f.name for f in folds] == [f"loso-{s}" for s in present]
    assert [f.test_speakers for f in folds] == [(s,) for s in present]
    for fold in folds:
        check_fold(fold, speaker, rows)
        assert len(fold.val_speakers) == 1
    assert len({f.val_speakers for f in folds}) > 1  # validation drawn per fold, not fixed
    summary = folds[0].summary()
    assert summary["test_speakers"] == [present[0]] and summary["n_test"] == len(folds[0].test)


def test_store_string_columns_are_accepted(table):
    """The store's table columns are numpy StringDType, possibly with None for a missing value."""
    speaker, rows = table
    string_dtype = np.dtypes.StringDType(na_object=None)
    a = make_folds(np.array(speaker.tolist(), dtype=string_dtype), rows, protocol="kfold", k=3, seed=2)
    assert same_folds(a, make_folds(speaker, rows, protocol="kfold", k=3, seed=2))
    split = np.array(["train", "val", "test", None], dtype=string_dtype)
    with pytest.raises(ValueError, match=r"1 usable clips have no train/val/test split \(rows \[3\]"):
        make_folds(np.array(list("abcd")), np.arange(4), protocol="split", split=split)


def test_folds_need_three_speakers_and_room_for_validation():
    speaker = np.array(["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="needs at least 3 speakers .* the usable clips have 2"):
        make_folds(speaker, np.arange(4), protocol="loso")
    speaker = np.array(list("abcd"))
    with pytest.raises(ValueError, match="fold0: 2 speakers remain .* too few for 2 validation"):
        make_folds(speaker, np.arange(4), protocol="kfold", k=2, val_speakers=2)
    with pytest.raises(ValueError, match="val_speakers must be >= 1"):
        make_folds(speaker, np.arange(4), protocol="kfold", k=2, val_speakers=0)
    with pytest.raises(ValueError, match="unknown protocol 'holdout'"):
        make_folds(speaker, np.arange(4), protocol="holdout")
    with pytest.raises(ValueError, match="rows span \\[0, 9\\] but the table has 4 rows"):
        make_folds(speaker, np.array([0, 9]), protocol="loso")


# ------------------------------------------------------------------ fixed split

def test_split_protocol_and_its_errors(table, caplog):
    speaker, rows = table
    split = np.array(["train"] * N_TABLE, dtype="<U5")
    split[speaker == "spk03"] = "val"
    split[speaker == "spk04"] = "test"
    (fold,) = make_folds(speaker, rows, protocol="split", split=split)
    assert fold.name == "split" and fold.test_speakers == ("spk04",) and fold.val_speakers == ("spk03",)
    check_fold(fold, speaker, rows)
    split[rows[0]] = "test"  # a train speaker's clip in test: allowed, but logged
    with caplog.at_level(logging.WARNING, logger="vqmae.folds"):
        make_folds(speaker, rows, protocol="split", split=split)
    assert "in both train and test" in caplog.text
    no_val = np.where(split == "val", "train", split)
    with pytest.raises(ValueError, match="the split leaves val empty"):
        make_folds(speaker, rows, protocol="split", split=no_val)
    split[rows[2]] = ""
    with pytest.raises(ValueError,
                       match=rf"1 usable clips have no train/val/test split \(rows \[{rows[2]}\]"):
        make_folds(speaker, rows, protocol="split", split=split)


# ------------------------------------------------------------------ split files

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_speaker_fold_file(tmp_path, table):
    speaker, rows = table
    lines = ["Speaker,Fold"] + [f"{s},{i % 3 * 5}" for i, s in enumerate(SPEAKERS)] + ["spk00,0", ""]
    parsed = read_split_file(write(tmp_path / "folds.csv", "\n".join(lines)), np.array([]), np.array([]))
    assert isinstance(parsed, SpeakerFoldFile)
    assert parsed.fold_of["spk04"] == "5" and len(parsed.fold_of) == 11
    folds = parsed.folds(speaker, rows, seed=0, val_speakers=1)
    assert [f.name for f in folds] == ["fold-0", "fold-5", "fold-10"]  # numeric label order
    assert folds[1].test_speakers == ("spk01", "spk04", "spk07", "spk10")
    for fold in folds:
        check_fold(fold, speaker, rows)
    again = folds_from_speaker_map(speaker, rows, parsed.fold_of, seed=0, val_speakers=1)
    assert same_folds(folds, again)


def test_speaker_map_errors(tmp_path, table):
    speaker, rows = table
    partial = {s: "a" if i < 5 else "b" for i, s in enumerate(SPEAKERS[:9])}
    with pytest.raises(ValueError, match=r"2 speaker\(s\) .* no fold .*\['spk09', 'spk10'\]"):
        folds_from_speaker_map(speaker, rows, partial, seed=0, val_speakers=1)
    bad = write(tmp_path / "bad.csv", "speaker,fold\nspk00,1\nspk01,2\nspk00,2\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 4: speaker 'spk00' in fold '2', but line 2 "
                                         r"put it in fold '1'"):
        read_split_file(bad, np.array([]), np.array([]))
    with pytest.raises(ValueError, match=r"hdr.csv: line 1: header has columns \['speaker', 'group'\]"):
        read_split_file(write(tmp_path / "hdr.csv", "speaker,group\nspk00,1\n"), np.array([]), np.array([]))
    with pytest.raises(ValueError, match=r"empty.csv: line 3: empty fold"):
        read_split_file(write(tmp_path / "empty.csv", "speaker,fold\na,1\nb,\n"), np.array([]), np.array([]))


def clip_table(root: Path) -> tuple[np.ndarray, np.ndarray]:
    clip_id = np.array(["Actor_01/a", "Actor_01/b", "Actor_02/a", "Actor_03/c"])
    paths = np.array([str(root / "data" / f"{c}.mp4") for c in clip_id])
    return clip_id, paths


def test_clip_split_file_by_clip_id(tmp_path):
    clip_id, paths = clip_table(tmp_path)
    f = write(tmp_path / "split.csv", "clip_id,split\nActor_01/a,train\nActor_02/a, Validation \n"
                                      "Actor_03/c,TEST\nActor_01/a,train\n")
    parsed = read_split_file(f, clip_id, paths)
    assert isinstance(parsed, ClipSplitFile)
    assert parsed.split.tolist() == ["train", "", "val", "test"]
    (fold,) = parsed.folds(np.array(["s1", "s1", "s2", "s3"]), np.arange(4))  # row 1 not listed
    assert fold.train.tolist() == [0] and fold.val.tolist() == [2] and fold.test.tolist() == [3]


def test_clip_split_file_by_path(tmp_path):
    clip_id, paths = clip_table(tmp_path)
    f = write(tmp_path / "split.csv", f"path,split\ndata/Actor_01/a.mp4,train\nActor_01/b.mp4,train\n"
                                      f"{paths[2]},val\n./data/Actor_03/../Actor_03/c.mp4,test\n")
    assert read_split_file(f, clip_id, paths).split.tolist() == ["train", "train", "val", "test"]
    ambiguous = write(tmp_path / "amb.csv", "path,split\na.mp4,train\n")
    with pytest.raises(ValueError, match=r"amb.csv: line 2: unknown clip path 'a.mp4': matches 2 stored"):
        read_split_file(ambiguous, clip_id, paths)


@pytest.mark.parametrize("text, message", [
    ("clip_id,split\nActor_01/a,train\nActor_01/b,holdout\n",
     r"line 3: unknown split value 'holdout'; expected train, val or test"),
    ("clip_id,split\nActor_09/z,train\n", r"line 2: unknown clip clip_id 'Actor_09/z'"),
    ("clip_id,split\nActor_01/a,train\nActor_01/a,test\n",
     r"line 3: clip_id 'Actor_01/a' is 'test' here but 'train' on an earlier line"),
    ("", r"line 1: empty file"),
])
def test_clip_split_file_errors(tmp_path, text, message):
    clip_id, paths = clip_table(tmp_path)
    f = write(tmp_path / "s.csv", text)
    with pytest.raises(ValueError, match=r"s\.csv: " + message):
        read_split_file(f, clip_id, paths)


def test_missing_split_file_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"nope.csv: cannot read split file"):
        read_split_file(tmp_path / "nope.csv", np.array([]), np.array([]))


# ------------------------------------------------------------------ label-efficiency subsets

def test_stratified_subset_counts_and_nesting():
    labels = np.repeat([0, 1, 2, -1], [40, 10, 3, 7])
    np.random.default_rng(0).shuffle(labels)
    previous = np.zeros(0, np.int64)
    for fraction in (0.05, 0.1, 0.25, 0.5, 1.0):
        sub = stratified_subset(labels, fraction, seed=4)
        assert sub.dtype == np.int64 and np.all(np.diff(sub) > 0)
        counts = Counter(labels[sub].tolist())
        for value, total in ((0, 40), (1, 10), (2, 3), (-1, 7)):
            assert counts[value] == max(1, round(fraction * total))
        assert set(previous.tolist()) <= set(sub.tolist())  # nested across fractions
        previous = sub
    assert np.array_equal(previous, np.arange(len(labels)))


def test_stratified_subset_seeding_and_errors():
    labels = np.repeat([0, 1], 50)
    a = stratified_subset(labels, 0.2, seed=1)
    assert np.array_equal(a, stratified_subset(labels, 0.2, seed=1))
    assert not np.array_equal(a, stratified_subset(labels, 0.2, seed=2))
    unlabeled = stratified_subset(np.full(20, -1), 0.3, seed=0)
    assert len(unlabeled) == 6
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        stratified_subset(labels, 0, seed=0)
    with pytest.raises(ValueError, match="got -2"):
        stratified_subset(np.array([0, -2]), 0.5, seed=0)
