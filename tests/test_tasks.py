"""Downstream tasks: targets, losses, scores and report keys per kind, and the extension point: a new
task is one `Task` subclass plus its `TASKS` entry, and fine-tuning runs it end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqmae.config import load_config
from vqmae.stages.finetune import FinetuneError, finetune
from vqmae.tasks import TASKS, Classify, Multilabel, Regress, TaskError, build_task, task_from_dict

from tests.test_finetune import OVERRIDES, make_store

CLIPS = {"label": np.array(["sad", "happy", "", "zzz", "happy"], dtype=object),
         "labels": np.array(["sad;happy", "happy", "", "sad", "happy"], dtype=object),
         "valence": np.array([0.5, -0.5, np.nan, 0.1, 0.0]),
         "arousal": np.array([0.2, np.nan, np.nan, 0.3, 0.0])}
ROWS = np.arange(5)


def test_build_task_names_and_targets():
    fcfg = load_config("tiny").finetune
    task = build_task(fcfg, CLIPS, ROWS)
    assert isinstance(task, Classify) and task.names == ("happy", "sad", "zzz")  # EMOTIONS order first
    y = task.targets(CLIPS, ROWS)
    assert y.tolist() == [1, 0, -1, 2, 0] and task.has_target(y).tolist() == [True, True, False, True, True]
    assert task.format_target(y[0]) == "sad" and task.format_target(y[2]) == ""
    ml = build_task(load_config("tiny", ["finetune.task=multilabel"]).finetune, CLIPS, ROWS)
    ym = ml.targets(CLIPS, ROWS)
    assert ml.names == ("happy", "sad") and ym[0].tolist() == [1.0, 1.0] and np.isnan(ym[2]).all()
    assert ml.has_target(ym).tolist() == [True, True, False, True, True]
    rg = build_task(load_config("tiny", ["finetune.task=regress", "finetune.targets=valence,arousal"]).finetune,
                    CLIPS, ROWS)
    yr = rg.targets(CLIPS, ROWS)
    assert rg.names == ("valence", "arousal") and rg.has_target(yr).tolist() == [True, True, False, True, True]


def test_build_task_refusals():
    with pytest.raises(TaskError, match="at least 2 classes"):
        build_task(load_config("tiny").finetune, {"label": np.array(["sad", "sad"], dtype=object)}, np.arange(2))
    with pytest.raises(TaskError, match="no column"):
        build_task(load_config("tiny", ["finetune.task=regress", "finetune.targets=joy"]).finetune, CLIPS, ROWS)
    with pytest.raises(TaskError, match="expected one of"):
        build_task(load_config("tiny", ["finetune.task=ordinal"]).finetune, CLIPS, ROWS)


@pytest.mark.parametrize("task", [Classify(("a", "b", "c")), Multilabel(("a", "b", "c")), Regress(("a", "b", "c"))])
def test_round_trip_scores_and_losses(task):
    assert task_from_dict(task.to_dict()) == task
    out = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]], np.float32)
    scores = task.activate(out)
    if task.activation == "softmax":
        np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-6)
        assert task.top(scores[0]) == "a" and task.top(scores[1]) == "b"
    elif task.activation == "sigmoid":
        assert ((scores > 0) & (scores < 1)).all() and task.format_output(out[1]) == "b"
    else:
        np.testing.assert_array_equal(scores, out)
        assert task.top(scores[0]) is None
    y = task.empty(2)
    y[:] = task.targets({"label": np.array(["a", "b"], dtype=object), "labels": np.array(["a", "b;c"], dtype=object),
                         "a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([0.5, 0.5])},
                        np.arange(2))
    loss = task.loss(torch.from_numpy(out), task.batch_targets(y, "cpu"), None)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert set(task.key_metrics) <= set(task.metrics(y, out)) | {f"ccc/{n}" for n in task.names}
    assert task.curve_key in task.key_metrics and set(task.chance) <= set(task.key_metrics) | {"macro_auc"}


def test_class_weights_are_inverse_frequency():
    w = Classify(("a", "b", "c")).class_weight(np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(w, [4 / 9, 4 / 3, 0.0])
    assert Regress(("v",)).class_weight(np.zeros((3, 1))) is None


class HighArousal(Classify):
    """The docs/architecture.md example: is the clip's arousal above 0.5?"""

    kind = "arousal2"

    @classmethod
    def from_store(cls, fcfg, clips, rows):
        return cls(("low", "high"))

    def targets(self, clips, rows):
        a = np.asarray(clips["arousal"][rows], np.float64)
        return np.where(np.isnan(a), -1, (a > 0.5).astype(np.int64))


def test_a_new_task_is_one_class_plus_its_registry_entry(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s.zarr")  # arousal = 0.5 × class index + noise
    cfg = load_config("tiny", OVERRIDES + ["finetune.task=arousal2", "finetune.inits=scratch", "finetune.epochs=2",
                                           "finetune.folds=2"])
    with pytest.raises(FinetuneError, match="arousal2"):
        finetune(store, cfg, tmp_path / "refused")
    monkeypatch.setitem(TASKS, "arousal2", HighArousal)
    result = finetune(store, cfg, tmp_path / "run")
    assert result.summary["task"] == {"kind": "arousal2", "names": ["low", "high"]}
    av = next(r for r in result.summary["rows"] if r["eval"] == "av")
    assert av["uar"]["n"] == 2 and np.isfinite(av["uar"]["mean"])
    assert "| scratch | 100% | av |" in result.report
    lines = (tmp_path / "run" / "units" / "scratch" / "frac1" / "fold0" / "predictions.csv").read_text().splitlines()
    assert lines[0].endswith("low,high") and {ln.split(",")[4] for ln in lines[1:]} <= {"low", "high"}
