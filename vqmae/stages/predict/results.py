"""What `vqmae predict` returns and writes: one `Prediction` per scored clip, a `Failure` per input
that could not be scored, and the JSON and CSV forms of a `PredictResult`."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vqmae.datasets import MEDIA_EXTS, VIDEO_EXTS, ClipInfo, iter_media
from vqmae.datasets.base import entry_error
from vqmae.ingest import Failure

ARRAYS = "<arrays>"  # the `path` of a prediction made from arrays rather than a file


class PredictError(RuntimeError):
    """A classifier (or its tokenizers) that cannot be used; the message names the file and why."""


class InputError(ValueError):
    """One input that cannot be scored: '<path>: <reason>'."""

    def __init__(self, path: str, reason: str, stage: str = "input"):
        self.path, self.reason, self.stage = path, reason, stage
        super().__init__(f"{path}: {reason}")


@dataclass
class Prediction:
    """Scores of one input.

    scores float32 [C] (classify: probabilities summing to 1; multilabel: one probability per
    label; regress: the predicted values), in ``names`` order; ``top`` the highest-scoring name
    (None for regress); timeline: ``starts`` float64 [W] window starts in seconds and
    ``window_scores`` float32 [W, C] each window's own scores; ``modality`` what was scored
    (av, audio or visual); ``warnings`` anything the user should know about this result.
    """

    path: str
    task: str
    names: tuple[str, ...]
    scores: np.ndarray
    top: str | None
    modality: str
    duration: float  # seconds covered by the windows' valid frames (rounded up to a grid step)
    starts: np.ndarray
    window_scores: np.ndarray
    warnings: list[str] = field(default_factory=list)

    @property
    def top_score(self) -> float | None:
        return None if self.top is None else float(self.scores[self.names.index(self.top)])

    def to_dict(self, timeline: bool = True) -> dict[str, Any]:
        out = {"path": self.path, "status": "ok", "task": self.task, "modality": self.modality,
               "top": self.top, "top_score": self.top_score, "duration": round(self.duration, 4),
               "scores": _named(self.names, self.scores), "warnings": list(self.warnings)}
        if timeline:
            out["timeline"] = [{"start": round(float(s), 4), "scores": _named(self.names, w)}
                               for s, w in zip(self.starts, self.window_scores)]
        return out


def _named(names: Sequence[str], values: np.ndarray) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, values)}


@dataclass
class PredictResult:
    """`predict_many`'s answer: predictions and failures, each in input order."""

    predictions: list[Prediction]
    failures: list[Failure]


def expand_paths(paths: Iterable[str | os.PathLike]) -> tuple[list[str], list[Failure]]:
    """Files to score, in the given order (a folder → its media files, recursively, sorted), and a
    Failure (stage "scan": skipped) for every input that is not scored: a path that does not exist,
    a symlink loop or dangling link, a file that is not media, and whatever a folder scan skips
    (links, loops and directories named like media, each with its reason)."""
    files, failures = [], []
    for p in map(Path, paths):
        if p.is_dir():
            skipped: list[tuple[str, str]] = []
            found = sorted(m.path for m in iter_media(p, skipped))
            failures += [Failure(path, "scan", reason) for path, reason in skipped]
            if not found and not skipped:
                failures.append(Failure(str(p), "scan", f"no media files ({' '.join(MEDIA_EXTS)}) in this folder"))
            files += found
            continue
        try:
            os.stat(p)  # follows links: a loop or a dangling link fails here
        except OSError as err:
            link = p.is_symlink()
            failures.append(Failure(str(p), "scan", entry_error(err, link) if link else "no such file"))
            continue
        if p.suffix.lower() not in MEDIA_EXTS:
            failures.append(Failure(str(p), "scan", f"not a media file (expected one of {' '.join(MEDIA_EXTS)})"))
        elif not p.is_file():
            failures.append(Failure(str(p), "scan", "not a regular file (a device, socket or pipe)"))
        else:
            files.append(str(p))
    return files, failures


def _clip_info(path: Path | str, index: int) -> ClipInfo:
    path = str(path)
    return ClipInfo(clip_id=str(index), path=path, dataset="predict", speaker="",
                    has_video=Path(path).suffix.lower() in VIDEO_EXTS)


def _failure(path: str, e: Exception) -> Failure:
    if isinstance(e, InputError):
        return Failure(e.path, e.stage, e.reason)
    return Failure(path, "encode", str(e) or type(e).__name__)



def failure_status(f: Failure) -> str:
    """"skipped" for an input the scan passed over (not media, missing, a link loop), else "failed"."""
    return "skipped" if f.stage == "scan" else "failed"


def to_json(result: PredictResult, *, model: str, task: str, names: Sequence[str], modality: str,
            timeline: bool, speaker_norm: str | None) -> dict[str, Any]:
    """The whole result as one JSON object. ``speaker_norm``: whose mean features a
    speaker-normalised model subtracted ("these files", "training speakers"; None: not normalised)."""
    return {"model": model, "task": task, "names": list(names), "modality": modality,
            "speaker_norm": speaker_norm,
            "predictions": [p.to_dict(timeline=timeline) for p in result.predictions],
            "failures": [{"path": f.path, "status": failure_status(f), "stage": f.stage, "reason": f.reason}
                         for f in result.failures]}


def to_csv(result: PredictResult, names: tuple[str, ...], timeline: bool) -> str:
    """path,status,start,modality,top,<one column per name>,message: a row per clip (start empty),
    per window with `timeline` (start in seconds), per failure (message = stage: reason)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "status", "start", "modality", "top", *names, "message"])
    for p in result.predictions:
        w.writerow([p.path, "ok", "", p.modality, p.top or "", *[f"{v:.6g}" for v in p.scores],
                    "; ".join(p.warnings)])
        if timeline:
            for start, scores in zip(p.starts, p.window_scores):
                top = "" if p.top is None else names[int(scores.argmax())]
                w.writerow([p.path, "ok", f"{start:.4f}", p.modality, top, *[f"{v:.6g}" for v in scores], ""])
    for f in result.failures:
        w.writerow([f.path, failure_status(f), "", "", "", *[""] * len(names), f"{f.stage}: {f.reason}"])
    return buf.getvalue()
