"""`vqmae ingest DATA`: decode and face-crop a corpus, report what works and what fails.

This is the check a user runs before the expensive tokenize stage: every clip is decoded and cropped
exactly as tokenize will do it, and the run directory receives per-clip results, the failure list and
a preview of face crops.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.common import PresetOpt, SetOpt, console, err_console, make_config, setup_logging
from vqmae.datasets import DatasetError, scan
from vqmae.ingest import Failure, ingest as ingest_clips, parse_modalities
from vqmae.utils import atomic_write_bytes, atomic_write_json


def ingest(
    data: Annotated[Path, typer.Argument(help="Corpus root, or a CSV manifest.")],
    kind: Annotated[str, typer.Option(help="Dataset layout: auto, ravdess, cremad, enterface, voxceleb2, csv, folder.")] = "auto",
    face: Annotated[Optional[str], typer.Option(help="Face mode: auto, fan, haar, none (sets face.mode).")] = None,
    modalities: Annotated[str, typer.Option(help="av, audio or visual.")] = "av",
    workers: Annotated[int, typer.Option(help="Decoding processes (0 = in-process, no crash isolation).")] = 2,
    limit: Annotated[int, typer.Option(help="Only the first N clips (0 = all).")] = 0,
    run_dir: Annotated[Optional[Path], typer.Option(help="Where results go (default runs/ingest-<data name>).")] = None,
    preset: PresetOpt = "paper",
    set_: SetOpt = None,
    verbose: bool = False,
) -> None:
    """Decode every clip, crop faces, and list per-clip face-detection rates and failures."""
    setup_logging(verbose)
    overrides = list(set_ or []) + ([f"face.mode={face}"] if face else [])
    cfg = make_config(preset, overrides)
    try:
        mods = parse_modalities(modalities)
        result = scan(data, kind)
    except (ValueError, DatasetError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    clips = result.clips[:limit] if limit else result.clips
    run = run_dir or Path("runs") / f"ingest-{data.stem}"
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", cfg.to_dict())

    rows, failures, previews = [], [], []
    t0 = time.perf_counter()
    with _progress() as progress:
        bar = progress.add_task("ingest", total=len(clips))
        for clip, got, failure in ingest_clips(clips, cfg, mods, workers=workers):
            progress.advance(bar)
            if failure is not None:
                failures.append(failure)
                rows.append({"clip_id": clip.clip_id, "path": clip.path, "status": "failed",
                             "error": f"{failure.stage}: {failure.reason}"})
                continue
            rows.append({"clip_id": clip.clip_id, "path": clip.path, "status": "ok",
                         "video_frames": got.n_video_frames, "audio_frames": got.n_audio_frames,
                         "face_rate": None if math.isnan(got.face_rate) else round(got.face_rate, 4),
                         "av_offset": round(got.av_offset, 4)})
            if got.faces is not None and len(previews) < 48:
                previews.append(got.faces[len(got.faces) // 2])
    elapsed = time.perf_counter() - t0
    rows.sort(key=lambda r: r["clip_id"])
    failures.sort(key=lambda f: f.path)
    summary = _summarise(rows, failures, result.skipped, elapsed, cfg.video.fps)
    _write_outputs(run, rows, failures, result.skipped, summary, previews)
    _print_summary(summary, failures, result.skipped, run)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def _summarise(rows, failures, skipped, elapsed, fps) -> dict:
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
    _write_csv(run / "failures.csv", lines)
    atomic_write_json(run / "summary.json", summary)
    if previews:
        _write_grid(run / "faces.png", previews)


def _write_csv(path: Path, lines: list[list[str]]) -> None:
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(lines)
    atomic_write_bytes(path, buf.getvalue().encode())


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


def _print_summary(summary: dict, failures: list[Failure], skipped, run: Path) -> None:
    table = Table(title="ingest summary", show_header=False)
    for k, v in summary.items():
        table.add_row(k, str(v))
    console.print(table)
    if failures or skipped:
        ft = Table(title=f"failures ({len(failures)}) and files skipped at scan ({len(skipped)})")
        for col in ("file", "stage", "reason"):
            ft.add_column(col, overflow="fold")
        for f in failures[:50]:
            ft.add_row(f.path, f.stage, f.reason)
        for p, reason in skipped[: max(0, 50 - len(failures))]:
            ft.add_row(p, "scan", reason)
        console.print(ft)
    console.print(f"results in [bold]{run}[/bold] (clips.jsonl, failures.csv, summary.json, faces.png)")
