"""Downstream tasks: what a fine-tuned model's outputs mean, its targets, loss, metrics and report.

    task = build_task(cfg.finetune, store.clips, rows)   → Classify / Multilabel / Regress
    y = task.targets(clips, rows); loss = task.loss(out, y_batch, weight); task.metrics(y, outputs)

Everything that depends on the kind of task lives here, so fine-tuning, prediction, export and the
CLI never switch on a task name: they ask the task. A new task is a new `Task` subclass in this file
plus its line in `TASKS` (docs/architecture.md shows one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from vqmae import metrics as M
from vqmae.config import FinetuneConfig
from vqmae.datasets import EMOTIONS


class TaskError(ValueError):
    """A task the store's clips cannot support (too few classes, a missing target column)."""


class Task(ABC):
    """One kind of output. ``names`` are the classes, labels or target columns, in output order."""

    kind: ClassVar[str]
    select_key: ClassVar[str]  # the validation metric that selects the epoch (higher is better)
    activation: ClassVar[str]  # what turns outputs into scores: softmax, sigmoid or identity
    single_label: ClassVar[bool] = False  # one class per clip (what class weights, the token
    # baseline, distillation and stratified label subsets need)
    values: ClassVar[bool] = False  # outputs are predicted values of `names`, not per-name scores

    def __init__(self, names: tuple[str, ...] | list[str]):
        self.names = tuple(names)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.names == self.names

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.names})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names)}

    @classmethod
    @abstractmethod
    def from_store(cls, fcfg: FinetuneConfig, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> "Task":
        """The task with its names taken from the store's clips ``rows`` (and the settings)."""

    # -- targets ---------------------------------------------------------------------------

    @abstractmethod
    def targets(self, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """The clips' targets, in `empty(n)`'s dtype and shape."""

    def empty(self, n: int) -> np.ndarray:
        """n rows of "no target": float32 [n, C] of NaN (Classify: int64 [n] of -1)."""
        return np.full((n, len(self.names)), np.nan, np.float32)

    def has_target(self, y: np.ndarray) -> np.ndarray:
        """bool [n]: the clip can be trained and scored on."""
        return ~np.isnan(y).all(1)

    def batch_targets(self, y: np.ndarray, device: str | torch.device) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.float32)).to(device)

    def strata(self, y: np.ndarray) -> np.ndarray:
        """int64 [n] labels that label subsets are stratified by (-1: none)."""
        return np.full(len(y), -1, np.int64)

    def class_weight(self, y: np.ndarray) -> np.ndarray | None:
        """Inverse-frequency class weights from training targets, for tasks that have classes."""
        return None

    # -- outputs ---------------------------------------------------------------------------

    @abstractmethod
    def loss(self, out: torch.Tensor, y: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
        """Per-sample loss [B] from outputs [B, C] and batch targets."""

    @abstractmethod
    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
        """Metrics of clip outputs [n, C] against targets (the report's keys among them)."""

    def activate(self, outputs: np.ndarray) -> np.ndarray:
        """Model outputs [..., C] → scores."""
        return np.asarray(outputs, np.float32)

    def top(self, scores: np.ndarray) -> str | None:
        """The name a clip is labelled with (None for tasks without one)."""
        return None

    def format_target(self, y: np.ndarray) -> str:
        return ";".join(f"{v:.4f}" for v in y)

    def format_output(self, out: np.ndarray) -> str:
        return ";".join(f"{v:.4f}" for v in out)

    # -- the report ------------------------------------------------------------------------

    @property
    @abstractmethod
    def key_metrics(self) -> list[str]:
        """The metrics a report shows, in column order."""

    @property
    def curve_key(self) -> str:
        """The metric of the label-efficiency plot."""
        return self.key_metrics[0]

    @property
    @abstractmethod
    def chance(self) -> dict[str, float]:
        """What a model that learned nothing scores, per metric."""


class Classify(Task):
    """One class per clip: a softmax over ``names``; UAR selects the epoch."""

    kind, select_key, activation, single_label = "classify", "uar", "softmax", True

    @classmethod
    def from_store(cls, fcfg: FinetuneConfig, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> Task:
        return cls(_label_names(cls.kind, {str(x) for x in clips["label"][rows].tolist() if str(x)}))

    def targets(self, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """int64 [n], -1 = no usable label."""
        index = {c: i for i, c in enumerate(self.names)}
        return np.array([index.get(str(x), -1) for x in clips["label"][rows]], np.int64)

    def empty(self, n: int) -> np.ndarray:
        return np.full(n, -1, np.int64)

    def has_target(self, y: np.ndarray) -> np.ndarray:
        return y >= 0

    def batch_targets(self, y: np.ndarray, device: str | torch.device) -> torch.Tensor:
        return torch.from_numpy(y).to(device)

    def strata(self, y: np.ndarray) -> np.ndarray:
        return y

    def class_weight(self, y: np.ndarray) -> np.ndarray:
        counts = np.bincount(y, minlength=len(self.names)).astype(np.float64)
        return np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)

    def loss(self, out: torch.Tensor, y: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(out.float(), y, weight=class_weight, reduction="none")

    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
        return M.classification_metrics(y, outputs, len(self.names))

    def activate(self, outputs: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.from_numpy(np.asarray(outputs, np.float32)), -1).numpy()

    def top(self, scores: np.ndarray) -> str | None:
        return self.names[int(np.argmax(scores))]

    def format_target(self, y: np.ndarray) -> str:
        return self.names[y] if y >= 0 else ""

    def format_output(self, out: np.ndarray) -> str:
        return self.names[int(np.argmax(out))]

    @property
    def key_metrics(self) -> list[str]:
        return ["war", "uar", "macro_f1"]

    @property
    def curve_key(self) -> str:
        return "uar"

    @property
    def chance(self) -> dict[str, float]:
        return {"uar": 1.0 / len(self.names)}


class Multilabel(Task):
    """Any number of labels per clip (``labels`` column, ";"-separated): a sigmoid per name."""

    kind, select_key, activation = "multilabel", "macro_f1", "sigmoid"

    @classmethod
    def from_store(cls, fcfg: FinetuneConfig, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> Task:
        cells = clips["labels"][rows].tolist()
        return cls(_label_names(cls.kind, {x for cell in cells for x in str(cell).split(";") if x}))

    def targets(self, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """float32 [n, C]; a NaN row = no labels."""
        out = np.zeros((len(rows), len(self.names)), np.float32)
        index = {c: i for i, c in enumerate(self.names)}
        for j, cell in enumerate(clips["labels"][rows].tolist()):
            hits = [index[x] for x in str(cell).split(";") if x in index]
            out[j] = np.nan if not hits else 0.0
            out[j, hits] = 1.0
        return out

    def has_target(self, y: np.ndarray) -> np.ndarray:
        return ~np.isnan(y).any(1)

    def loss(self, out: torch.Tensor, y: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out.float(), y, reduction="none").mean(1)

    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
        return M.multilabel_metrics(y, 1.0 / (1.0 + np.exp(-outputs)))

    def activate(self, outputs: np.ndarray) -> np.ndarray:
        return torch.sigmoid(torch.from_numpy(np.asarray(outputs, np.float32))).numpy()

    def top(self, scores: np.ndarray) -> str | None:
        return self.names[int(np.argmax(scores))]

    def format_target(self, y: np.ndarray) -> str:
        return ";".join(n for n, v in zip(self.names, y) if v > 0.5)

    def format_output(self, out: np.ndarray) -> str:
        return ";".join(n for n, v in zip(self.names, out) if v > 0)

    @property
    def key_metrics(self) -> list[str]:
        return ["macro_f1", "macro_auc", "micro_f1"]

    @property
    def chance(self) -> dict[str, float]:
        return {"macro_auc": 0.5}


class Regress(Task):
    """Continuous targets (``names`` are table columns such as valence, arousal); CCC is both the
    loss (1 − CCC) and the selection metric."""

    kind, select_key, activation, values = "regress", "ccc", "identity", True

    @classmethod
    def from_store(cls, fcfg: FinetuneConfig, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> Task:
        missing = [t for t in fcfg.targets if t not in clips]
        if missing or not fcfg.targets:
            raise TaskError(f"finetune.targets {list(fcfg.targets)}: the store has no column "
                            f"{missing}; choose from valence, arousal, dominance")
        return cls(tuple(fcfg.targets))

    def targets(self, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """float32 [n, D]; NaN = missing value."""
        return np.stack([np.asarray(clips[t][rows], np.float32) for t in self.names], 1)

    def loss(self, out: torch.Tensor, y: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
        """The batch's 1 − CCC, repeated per sample: CCC is a batch statistic."""
        return M.ccc_loss(out.float(), y).expand(out.shape[0])

    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
        return M.regression_metrics(y, outputs, self.names)

    @property
    def key_metrics(self) -> list[str]:
        return ["ccc"] + [f"ccc/{n}" for n in self.names]

    @property
    def chance(self) -> dict[str, float]:
        return {"ccc": 0.0}


TASKS: dict[str, type[Task]] = {t.kind: t for t in (Classify, Multilabel, Regress)}


def task_from_dict(d: Mapping[str, Any]) -> Task:
    """Inverse of `Task.to_dict` (as stored in classifier checkpoints and summaries)."""
    kind = str(d["kind"])
    if kind not in TASKS or not d.get("names"):
        raise TaskError(f"task {dict(d)}: expected a kind in {sorted(TASKS)} and at least one name")
    return TASKS[kind](tuple(d["names"]))


def build_task(fcfg: FinetuneConfig, clips: Mapping[str, np.ndarray], rows: np.ndarray) -> Task:
    """`fcfg.task` with its names found in the store's labelled clips ``rows``."""
    if fcfg.task not in TASKS:
        raise TaskError(f"finetune.task {fcfg.task!r}: expected one of {sorted(TASKS)}")
    return TASKS[fcfg.task].from_store(fcfg, clips, rows)


def _label_names(task: str, found: set[str]) -> tuple[str, ...]:
    """Labels in `EMOTIONS` order, then any others alphabetically; at least two."""
    order = [e for e in EMOTIONS if e in found] + sorted(found - set(EMOTIONS))
    if len(order) < 2:
        raise TaskError(f"task {task!r} needs at least 2 classes among the store's clips, found {order}")
    return tuple(order)
