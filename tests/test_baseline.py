"""The linear baselines: bag-of-tokens histograms, the logistic and ridge fits, eGeMAPS features, and
their rows in a finetune run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_finetune import CLASSES, OVERRIDES, make_store
from vqmae.config import load_config
from vqmae.stages.finetune import baseline, egemaps, finetune
from vqmae.store import ModalitySpec, StoreWriter, TokenStore, merge


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


def test_speaker_centering_removes_each_speakers_mean_and_keeps_missing_rows_empty():
    x = np.array([[1, 3], [3, 5], [0, 0], [10, 10], [10, 10]], np.float32)  # row 2: no modality
    spk = np.array([0, 0, 0, 1, 1])
    c = baseline.speaker_centered(x, spk)
    np.testing.assert_allclose(c[:2], [[-1, -1], [1, 1]])  # speaker 0's mean over rows with features
    assert not c[2].any()  # still "no features"
    assert c[3].any() and c[4].any() and np.abs(c[3:]).max() < 1e-9  # a real clip never reads as empty


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
    # the histograms are centred per speaker, as the transformer's features (speaker_norm), and the
    # saved model says so, so that `vqmae evaluate` centres another store's histograms the same way
    meta, _ = baseline.load_models(tmp_path / "ft" / "units" / "tokens" / "frac1" / "fold0" / baseline.BASELINE_FILE)
    assert meta["speaker_norm"] is True


def test_token_baseline_regresses_and_skips_multilabel(store, tmp_path):
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=tokens", "finetune.task=regress",
                                           "finetune.targets=valence,arousal"])
    r = finetune(store.path, cfg, tmp_path / "ft")
    av = next(x for x in r.summary["rows"] if x["variant"] == "tokens" and x["eval"] == "av")
    assert av["ccc"]["n"] == 4 and av["ccc"]["mean"] > 0.5  # the codes carry valence and arousal
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=scratch,tokens", "finetune.task=multilabel",
                                           "finetune.epochs=1"])
    r = finetune(store.path, cfg, tmp_path / "ml")
    assert {x["variant"] for x in r.summary["rows"]} == {"scratch"}


def test_ridge_fit_recovers_a_linear_target_with_missing_values():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = np.stack([2 * x[:, 0] - x[:, 2] + 0.5, x[:, 1]], 1).astype(np.float32)
    y[::7, 1] = np.nan
    f = baseline.fit_ridge(x, y, penalty=1e-4)
    np.testing.assert_allclose(f(x)[:, 0], y[:, 0], atol=0.05)
    ok = ~np.isnan(y[:, 1])
    np.testing.assert_allclose(f(x)[ok, 1], y[ok, 1], atol=0.05)
    assert np.abs(baseline.fit_ridge(x, y, penalty=100.0)(x)).max() < 1.0  # shrunk toward the mean


def _voice(f0: float, seconds: float, loud: float, seed: int) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    f = f0 * (1 + 0.08 * np.sin(2 * np.pi * 2 * t))
    x = sum(np.sin(h * 2 * np.pi * np.cumsum(f) / 16000) / h for h in range(1, 10))
    x = x * (0.5 + 0.5 * np.sin(np.pi * t / seconds))  # a syllable-like envelope
    return (loud * x / np.abs(x).max() + 0.003 * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def voiced_store(tmp_path_factory):
    """Real wav files whose class is in pitch and loudness (relative to each speaker's own voice),
    behind a store whose codes carry nothing: only a model of the audio itself can succeed."""
    from tests.conftest import write_wav

    tmp = tmp_path_factory.mktemp("egemaps")
    rng = np.random.default_rng(0)
    specs = {"audio": ModalitySpec("audio", 16, (8,), 50.0, "a" * 64)}
    n = 0
    with StoreWriter(tmp / "s.zarr", specs) as w:
        for s in range(6):
            base = 100.0 + 25 * s  # each speaker's own pitch
            for j in range(9):
                k = j % len(CLASSES)
                wav = write_wav(tmp / f"s{s}c{j}.wav", _voice(base * (1 + 0.25 * k), 1.0 + 0.1 * j,
                                                               0.2 + 0.3 * k, n))
                w.add({"clip_id": f"s{s}c{j}", "index": n, "path": str(wav), "speaker": f"spk{s}",
                       "label": CLASSES[k]}, {"audio": rng.integers(0, 16, (100, 8))})
                n += 1
    merge(tmp / "s.zarr")
    return TokenStore.open(tmp / "s.zarr")


def test_egemaps_features_are_cached_and_speaker_normalised(voiced_store, tmp_path):
    raw = egemaps.store_features(voiced_store, tmp_path)
    assert raw.shape == (voiced_store.n_clips, egemaps.N_FEATURES) and np.isfinite(raw).all() and raw.any(1).all()
    assert (tmp_path / egemaps.CACHE).exists()
    np.testing.assert_array_equal(egemaps.store_features(voiced_store, tmp_path), raw)  # from the cache
    speakers = np.asarray(voiced_store.clips["speaker"])
    z = egemaps.speaker_normalized(raw, speakers)
    for s in np.unique(speakers):
        np.testing.assert_allclose(z[speakers == s].mean(0), 0.0, atol=1e-4)
    assert not egemaps.speaker_normalized(np.zeros((2, 3), np.float32), np.array(["a", "a"])).any()


def test_egemaps_rows_in_a_finetune_report(voiced_store, tmp_path):
    cfg = load_config("tiny", OVERRIDES + ["finetune.inits=egemaps,tokens"])
    r = finetune(voiced_store.path, cfg, tmp_path / "ft", workers=0)
    rows = {(x["variant"], x["eval"]): x for x in r.summary["rows"]}
    assert set(rows) == {("egemaps", "audio"), ("tokens", "audio")}
    eg, tok = rows[("egemaps", "audio")]["uar"]["mean"], rows[("tokens", "audio")]["uar"]["mean"]
    assert eg > 0.7 and eg > tok + 0.2, (eg, tok)  # pitch and loudness carry the class; codes are noise
    assert "| egemaps | 100% | audio | 4 |" in r.report
