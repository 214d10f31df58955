"""`vqmae ingest`: decode and face-crop a corpus exactly as `tokenize` will, and report what works.

This is the check a user runs before the expensive tokenize stage. The run directory receives
per-clip results (``clips.jsonl``), every failed or skipped input (``failures.csv``), counts and
face-detection rates (``summary.json``) and a preview of face crops (``faces.png``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vqmae.config import Config
from vqmae.datasets import scan
from vqmae.ingest import MODALITIES, Failure, clip_progress, ingest
from vqmae.training import Reporter
from vqmae.utils import atomic_write_bytes, atomic_write_json

PREVIEW_CLIPS = 48  # face crops in faces.png (the middle frame of each of the first clips)


@dataclass
class IngestReport:
    run: Path
    rows: list[dict[str, Any]]  # one per decoded clip, by clip id
    failures: list[Failure]
    skipped: list[tuple[str, str]]  # (path, reason) of files the scan could not use
    summary: dict[str, Any]


def ingest_report(data: str | Path, cfg: Config, run_dir: str | Path, *, kind: str = "auto",
                  modalities: Sequence[str] = MODALITIES, workers: int = 2, limit: int = 0,
                  reporter: Reporter = Reporter()) -> IngestReport:
    """Decode every clip of the corpus at `data` (the first `limit` when > 0) and write the report."""
    scanned = scan(data, kind)  # before the run directory is made: a bad corpus leaves none
    clips = scanned.clips[:limit] if limit else scanned.clips
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", cfg.to_dict())
    rows, failures, previews = [], [], []
    t0 = time.perf_counter()
    reporter.start("ingest", len(clips))
    for clip, got, failure in ingest(clips, cfg, modalities, workers=workers,
                                     on_progress=clip_progress(reporter, "ingest")):
        reporter.advance("ingest")
        if failure is not None:
            failures.append(failure)
            rows.append({"clip_id": clip.clip_id, "path": clip.path, "status": "failed",
                         "error": f"{failure.stage}: {failure.reason}"})
            continue
        rows.append({"clip_id": clip.clip_id, "path": clip.path, "status": "ok",
                     "video_frames": got.n_video_frames, "audio_frames": got.n_audio_frames,
                     "face_rate": None if math.isnan(got.face_rate) else round(got.face_rate, 4),
                     "av_offset": round(got.av_offset, 4)})
        if got.faces is not None and len(previews) < PREVIEW_CLIPS:
            previews.append(got.faces[len(got.faces) // 2])
    reporter.finish("ingest")
    rows.sort(key=lambda r: r["clip_id"])
    failures.sort(key=lambda f: f.path)
    summary = _summarise(rows, failures, scanned.skipped, time.perf_counter() - t0, cfg.video.fps)
    _write_outputs(run, rows, failures, scanned.skipped, summary, previews)
    return IngestReport(run, rows, failures, scanned.skipped, summary)


def _summarise(rows, failures, skipped, elapsed: float, fps: float) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    rates = [r["face_rate"] for r in ok if r.get("face_rate") is not None]
    frames = sum(r.get("video_frames", 0) for r in ok)
    detected = sum(r["face_rate"] * r["video_frames"] for r in ok if r.get("face_rate") is not None)
    return {
        "clips": len(rows), "ok": len(ok), "failed": len(failures), "skipped_at_scan": len(skipped),
        "video_frames": frames,
        "video_hours": round(frames / fps / 3600, 4),
        "audio_frames": sum(r.get("audio_frames", 0) for r in ok),
        "face_rate_frames": round(detected / frames, 4) if frames else None,
        "face_rate_min_clip": round(min(rates), 4) if rates else None,
        "clips_face_rate_below_0.5": sum(r < 0.5 for r in rates),
        "seconds": round(elapsed, 2),
        "video_frames_per_second": round(frames / elapsed, 1) if elapsed > 0 else None,
    }


def _write_outputs(run: Path, rows, failures: list[Failure], skipped, summary, previews) -> None:
    atomic_write_bytes(run / "clips.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    lines = [["path", "stage", "reason"]] + [[f.path, f.stage, f.reason] for f in failures]
    lines += [[p, "scan", reason] for p, reason in skipped]
    buf = io.StringIO()
    csv.writer(buf).writerows(lines)
    atomic_write_bytes(run / "failures.csv", buf.getvalue().encode())
    atomic_write_json(run / "summary.json", summary)
    if previews:
        _write_grid(run / "faces.png", previews)


def _write_grid(path: Path, crops: list[np.ndarray], cols: int = 8) -> None:
    """Tile crops [S, S, 3] into one PNG (the middle frame of each clip)."""
    import cv2

    s = crops[0].shape[0]
    rows = math.ceil(len(crops) / cols)
    grid = np.zeros((rows * s, cols * s, 3), np.uint8)
    for i, c in enumerate(crops):
        r, k = divmod(i, cols)
        grid[r * s:(r + 1) * s, k * s:(k + 1) * s] = c
    ok, png = cv2.imencode(".png", grid[..., ::-1])
    if ok:
        atomic_write_bytes(path, png.tobytes())
