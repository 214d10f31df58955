"""The bag-of-tokens baseline: histogram features, the logistic fit, and its rows in a finetune run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_finetune import CLASSES, OVERRIDES, make_store
from vqmae.stages.finetune import baseline
from vqmae.config import load_config
from vqmae.stages.finetune import FinetuneError, finetune
from vqmae.store import TokenStore


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return TokenStore.open(make_store(tmp_path_factory.mktemp("bl") / "s.zarr"))


def test_histograms_are_per_position_frequencies(store):
    rows = np.arange(store.n_clips)
    v = baseline.histogram_features(store, rows, "visual", pool=4)  # 8 × 8 grid → 2 × 2 blocks
    assert v.shape == (store.n_clips, 4 * 32) and v.dtype == np.float32
    has = np.asarray(store.clips["visual_length"]) > 0
    sums = v.reshape(len(rows), 4, 32).sum(-1)
    np.testing.assert_allclose(sums[has], 1.0, rtol=1e-5)  # each block: a distribution over codes
    assert not v[~has].any()  # audio-only clips: a zero row
    r = int(np.flatnonzero(has)[0])
    codes = np.asarray(store.clip_codes("visual", r)).reshape(-1, 8, 8)
    top_left = np.bincount(codes[:, :4, :4].ravel(), minlength=32) / codes[:, :4, :4].size
    np.testing.assert_allclose(v[r, :32], top_left, rtol=1e-6)
    a = baseline.histogram_features(store, rows, "audio", pool=3)  # 8 tokens → blocks of 3, 3, 2
    assert a.shape == (store.n_clips, 3 * 16)
    np.testing.assert_allclose(a.reshape(len(rows), 3, 16).sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="pool=0"):
        baseline.histogram_features(store, rows, "audio", pool=0)


def test_logistic_fit_separates_and_penalty_shrinks():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    x[:, 0] += 3 * y  # one informative feature
    loose = baseline.fit_logistic(x, y, 3, penalty=1e-3)
    assert (loose(x).argmax(1) == y).mean() > 0.9
    tight = baseline.fit_logistic(x, y, 3, penalty=100.0)
    assert np.ptp(tight(x), axis=1).mean() < 0.2 * np.ptp(loose(x), axis=1).mean()


def test_token_rows_in_a_finetune_run(store, tmp_path):
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=scratch,tokens", "finetune.token_pool=2",
                                           "finetune.label_fractions=0.5,1"])
    result = finetune(store.path, cfg, tmp_path / "ft")
    rows = {(r["variant"], r["fraction"], r["eval"]): r for r in result.summary["rows"]}
    for ev in ("av", "audio", "visual"):
        assert rows[("tokens", 1.0, ev)]["uar"]["n"] == 4
    assert rows[("tokens", 1.0, "av")]["uar"]["mean"] > 0.8  # the codes carry the label (chance 1/3)
    unit = next(u for u in result.units if u.unit == "tokens/frac1/fold0")
    assert unit.metrics["av"]["penalty"] in baseline.PENALTIES and unit.epochs == 0
    assert unit.metrics["visual"]["n_clips"] == 5 and unit.metrics["av"]["n_clips"] == 6
    saved = json.loads((tmp_path / "ft" / "units" / "tokens" / "frac1" / "fold0" / "result.json").read_text())
    assert saved["unit"] == "tokens/frac1/fold0"
    preds = (tmp_path / "ft" / "units" / "tokens" / "frac1" / "fold0" / "predictions.csv").read_text()
    assert preds.splitlines()[0] == "mode,clip_id,speaker,target,prediction," + ",".join(CLASSES)
    assert "| tokens | 100% | av | 4 |" in result.report
    assert (tmp_path / "ft" / "confusion_tokens.png").exists()


def test_token_baseline_is_classification_only(store, tmp_path):
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=tokens", "finetune.task=regress"])
    with pytest.raises(FinetuneError, match="needs task 'classify'"):
        finetune(store.path, cfg, tmp_path / "ft")
