"""Stage-3 metrics against small examples worked out by hand, plus brute-force cross-checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vqmae.metrics import (aggregate, ccc, ccc_loss, classification_metrics, format_mean_std,
                           multilabel_metrics, regression_metrics, roc_auc)


def one_hot_scores(pred: list[int], n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[pred] * 3.0 - 1.0  # logits: argmax = pred


# ------------------------------------------------------------------ single-label classification

def test_three_class_by_hand():
    y = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [0, 0, 1, 2, 1, 1, 0, 2, 2, 2]
    m = classification_metrics(np.array(y), one_hot_scores(pred, 3), 3)
    np.testing.assert_array_equal(m["confusion"], [[2, 1, 1], [1, 2, 0], [0, 0, 3]])
    assert m["confusion"].dtype == np.int64
    assert m["war"] == pytest.approx(0.7)
    np.testing.assert_allclose(m["recall"], [2 / 4, 2 / 3, 1.0])
    assert m["uar"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    # F1 = 2TP / (2TP + FP + FN): class 0 (2, 1, 2), class 1 (2, 1, 1), class 2 (3, 1, 0)
    np.testing.assert_allclose(m["f1"], [4 / 7, 4 / 6, 6 / 7])
    assert m["macro_f1"] == pytest.approx(44 / 63)


def test_probabilities_and_logits_agree():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 40)
    a, b = classification_metrics(y, logits, 4), classification_metrics(y, probs, 4)
    np.testing.assert_array_equal(a["confusion"], b["confusion"])
    assert a["uar"] == b["uar"] and a["macro_f1"] == b["macro_f1"]
    assert a["war"] == pytest.approx(np.trace(a["confusion"]) / 40)
    assert a["confusion"].sum() == 40


def test_absent_classes_excluded_from_uar_and_f1():
    # 5 classes: class 3 never true but predicted once (F1 = 0, counted); class 4 neither (NaN).
    y = [0, 0, 1, 1, 2, 2]
    pred = [0, 3, 1, 1, 2, 0]
    m = classification_metrics(np.array(y), one_hot_scores(pred, 5), 5)
    assert np.isnan(m["recall"][3]) and np.isnan(m["recall"][4])
    assert m["uar"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["f1"][3] == 0.0 and np.isnan(m["f1"][4])
    f1_0, f1_1, f1_2 = 2 / (2 + 1 + 1), 1.0, 2 / (2 + 0 + 1)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1 + f1_2 + 0.0) / 4)


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        classification_metrics(np.array([0, 3]), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="y_true has 3 rows but scores has 2"):
        classification_metrics(np.array([0, 1, 2]), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="scores has 4 columns but n_classes is 3"):
        classification_metrics(np.array([0, 1]), np.zeros((2, 4)), 3)
    with pytest.raises(ValueError, match="non-finite"):
        classification_metrics(np.array([0, 1]), np.array([[0.0, np.nan, 0], [1, 0, 0]]), 3)


# ------------------------------------------------------------------ ROC-AUC

def test_auc_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # one tied positive/negative pair counts ½: (0.5 + 1 + 1 + 1) / 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc(np.array([False, False]), [0.1, 0.2]))


def test_auc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 6, 60).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0
                for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))
    assert roc_auc(y, s) == pytest.approx(brute)


def test_auc_rejects_non_binary_labels():
    with pytest.raises(ValueError, match="only 0 and 1"):
        roc_auc([0, 2, 1], [0.1, 0.2, 0.3])


# ------------------------------------------------------------------ multi-label

def test_multilabel_by_hand():
    y = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]])
    p = np.array([[.9, .2, .6, .1], [.3, .4, .7, .2], [.6, .1, .2, .3], [.2, .7, .4, .0]])
    m = multilabel_metrics(y, p)
    # label 0 perfect; label 1 one miss + one false alarm; label 2 TP 2, FN 1; label 3 never occurs
    np.testing.assert_allclose(m["f1"][:3], [1.0, 0.0, 0.8])
    assert np.isnan(m["f1"][3])
    np.testing.assert_allclose(m["auc"][:3], [1.0, 2 / 3, 1.0])
    assert np.isnan(m["auc"][3])
    assert m["macro_f1"] == pytest.approx(0.6)
    assert m["macro_auc"] == pytest.approx(8 / 9)
    assert m["micro_f1"] == pytest.approx(8 / 11)  # TP 4, FP 1, FN 2
    assert m["subset_accuracy"] == pytest.approx(0.5)


def test_multilabel_threshold_is_inclusive_and_all_nan_auc():
    y = np.array([[1], [1]])
    m = multilabel_metrics(y, np.array([[0.5], [0.7]]), threshold=0.5)
    assert m["f1"][0] == 1.0 and m["subset_accuracy"] == 1.0
    assert math.isnan(m["macro_auc"])  # only positives: AUC undefined everywhere


def test_multilabel_rejects_logits():
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        multilabel_metrics(np.array([[1, 0]]), np.array([[2.0, -1.0]]))


# ------------------------------------------------------------------ CCC

def test_ccc_known_values():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc(x, x + 1) == pytest.approx(5 / 7)  # cov 1.25, var 1.25 each, mean gap 1
    assert ccc(x - 2.5, 2.5 - x) == pytest.approx(-1.0)
    assert ccc(x, 2 * x) < 1.0  # correlation 1 but not concordant
    assert math.isnan(ccc([1.0], [1.0]))
    assert math.isnan(ccc([2.0, 2.0], [2.0, 2.0]))


def test_regression_metrics_skip_missing_targets():
    y = np.array([[1.0, 0.0], [2.0, np.nan], [3.0, 1.0], [4.0, 2.0]])
    p = np.array([[2.0, 0.0], [3.0, 9.0], [4.0, 1.0], [5.0, 2.0]])
    m = regression_metrics(y, p, ["valence", "arousal"])
    assert m["ccc/valence"] == pytest.approx(5 / 7)
    assert m["mse/valence"] == pytest.approx(1.0)
    assert m["ccc/arousal"] == pytest.approx(1.0)  # the NaN row (pred 9) is left out
    assert m["mse/arousal"] == pytest.approx(0.0)
    assert m["ccc"] == pytest.approx((5 / 7 + 1.0) / 2)
    with pytest.raises(ValueError, match="2 target columns but 3 names"):
        regression_metrics(y, p, ["a", "b", "c"])


def test_ccc_loss_matches_numpy_and_has_finite_gradient():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(32, 3, generator=g, dtype=torch.float64)
    pred = (0.6 * target + 0.5 * torch.randn(32, 3, generator=g, dtype=torch.float64) + 0.2)
    pred.requires_grad_(True)
    loss = ccc_loss(pred, target)
    want = np.mean([1 - ccc(pred[:, d].detach().numpy(), target[:, d].numpy()) for d in range(3)])
    assert loss.item() == pytest.approx(want, abs=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_ccc_loss_zero_when_equal_and_ignores_nan_targets():
    target = torch.tensor([[0.1, 1.0], [0.5, float("nan")], [0.9, 2.0], [0.3, 3.0]])
    pred = torch.where(torch.isnan(target), torch.tensor(50.0), target).requires_grad_(True)
    loss = ccc_loss(pred, target)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[1, 1] == 0.0  # the unlabelled entry gets no gradient


def test_ccc_loss_skips_dimensions_without_two_labels():
    target = torch.tensor([[1.0, float("nan")], [2.0, 5.0], [3.0, float("nan")]])
    pred = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]], requires_grad=True)
    assert ccc_loss(pred, target).item() == pytest.approx(2.0, abs=1e-6)  # only dim 0: CCC −1
    empty = ccc_loss(pred, torch.full((3, 2), float("nan")))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="one shape"):
        ccc_loss(pred, target[:, :1])


# ------------------------------------------------------------------ aggregation

def test_aggregate_mean_std_and_nan_handling():
    conf = np.eye(2, dtype=np.int64)
    folds = [{"war": 0.8, "uar": 0.7, "confusion": conf, "x": math.nan, "only_here": 1.0},
             {"war": 0.6, "uar": math.nan, "confusion": conf, "x": math.nan},
             {"war": np.float32(0.7), "uar": 0.5, "confusion": conf, "x": math.nan}]
    agg = aggregate(folds)
    assert set(agg) == {"war", "uar", "x"}
    assert agg["war"]["mean"] == pytest.approx(0.7) and agg["war"]["n"] == 3
    assert agg["war"]["std"] == pytest.approx(0.1)
    assert agg["uar"] == pytest.approx({"mean": 0.6, "std": math.sqrt(0.02), "n": 2})
    assert agg["x"]["n"] == 0 and math.isnan(agg["x"]["mean"])
    one = aggregate([{"war": 0.9}])
    assert one["war"] == {"mean": 0.9, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="at least one fold"):
        aggregate([])


def test_format_mean_std():
    assert format_mean_std({"mean": 0.8123, "std": 0.0411}) == "0.812 ± 0.041"
    assert format_mean_std({"mean": 0.5, "std": 0.0, "n": 1}, digits=1) == "0.5 ± 0.0"


# ------------------------------------------------------------------ plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path, out) -> np.ndarray:
    import matplotlib.image

    assert path == out and out.read_bytes().startswith(PNG_SIGNATURE)
    assert out.stat().st_size > 5_000
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind
    return matplotlib.image.imread(out)  # [H, W, 4]


def test_confusion_png(tmp_path):
    from vqmae.plots import confusion_png

    out = tmp_path / "plots" / "confusion.png"
    conf = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # an empty row must not break the colours
    image = check_png(confusion_png(conf, ["angry", "happy", "sad"], out, "fold0"), out)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # cells and text drawn, not a blank canvas
    with pytest.raises(ValueError, match="confusion matrix of shape \\(3, 3\\) does not match 2 class"):
        confusion_png(conf, ["a", "b"], tmp_path / "x.png", "t")


def test_label_efficiency_png(tmp_path):
    from vqmae.plots import label_efficiency_png

    out = tmp_path / "curves" / "label_efficiency.png"
    curves = {"pretrained": ([0.01, 0.1, 1.0], [0.4, 0.6, 0.75], [0.05, 0.03, 0.02]),
              "scratch": ([0.01, 0.1, 1.0], [0.2, 0.45, 0.7], [0.06, 0.04, 0.02])}
    check_png(label_efficiency_png(curves, out, "uar"), out)
    with pytest.raises(ValueError, match="curve 'scratch' has 3 fractions, 2 means and 3 stds"):
        label_efficiency_png({"scratch": ([0.1, 0.5, 1.0], [0.2, 0.3], [0, 0, 0])},
                             tmp_path / "y.png", "uar")
