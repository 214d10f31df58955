"""`vqmae predict MEDIA... --model classifier.pt`: emotion scores for new clips, as a table, JSON, CSV."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from vqmae_cli.common import RichReporter, console, err_console, setup_logging

if TYPE_CHECKING:
    from vqmae.stages.predict import Prediction, Predictor, PredictResult

# must match vqmae.stages.predict.MODES (a literal here so that checking --modality needs no torch;
# tests/test_cli_startup.py asserts they are equal)
MODES = ("auto", "av", "audio", "visual")


def predict(
    media: Annotated[list[Path], typer.Argument(help="Media files (video or audio) or folders of them.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="A classifier checkpoint (runs/.../classifier.pt).")],
    tokenizers: Annotated[Optional[Path], typer.Option(help="Directory with audio_vqvae.pt / visual_vqvae.pt, when the paths recorded in the classifier moved.")] = None,
    modality: Annotated[str, typer.Option(help="auto (what the file has; no face → audio), av, audio or visual.")] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write one row per clip (and window, with --timeline) here.")] = None,
    timeline: Annotated[bool, typer.Option("--timeline", help="Also show and write each window's scores.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    workers: Annotated[int, typer.Option(help="Decoding processes (0: in this process, no crash isolation).")] = 1,
    face: Annotated[Optional[str], typer.Option(help="Face detector override: auto, fan, haar or none.")] = None,
    batch: Annotated[int, typer.Option(help="Windows per model batch (shared across files).")] = 64,
    same_speaker: Annotated[bool, typer.Option("--same-speaker", help="The files are one speaker's clips: a speaker-normalised classifier subtracts their mean features (as fine-tuning did for each test speaker). Without it each clip uses the training speakers' mean.")] = False,
    verbose: bool = False,
) -> None:
    """Score new media with one fine-tuned emotion classifier. Exit code 1 if any file failed,
    2 if the model (or an option) cannot be used."""
    setup_logging(verbose)
    if modality not in MODES:
        err_console.print(f"[red]error:[/red] --modality {modality!r}: expected one of {', '.join(MODES)}")
        raise typer.Exit(2)
    from vqmae.stages.predict import PredictError, Predictor, to_csv, to_json
    from vqmae.utils import atomic_write_bytes, resolve_device

    try:
        predictor = Predictor.load(model, device=resolve_device(device), tokenizers=tokenizers,
                                   face_mode=face, batch_windows=max(1, batch))
        with RichReporter(err_console) as reporter:
            result = predictor.predict_many(media, modality=modality, workers=workers,
                                            same_speaker=same_speaker, reporter=reporter)
    except (PredictError, ValueError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _print(result, predictor, timeline)
    if predictor.speaker_norm and not same_speaker and len(result.predictions) > 1:
        console.print("note: this classifier is speaker-normalised; if these files are one speaker's "
                      "clips, --same-speaker scores them as fine-tuning scored its test speakers")
    if json_out is not None:
        norm = None if not predictor.speaker_norm else "these files" if same_speaker else "training speakers"
        doc = to_json(result, model=str(predictor.path), task=predictor.task.kind, names=predictor.names,
                      modality=modality, timeline=timeline, speaker_norm=norm)
        atomic_write_bytes(json_out, (json.dumps(doc, indent=2) + "\n").encode())
        console.print(f"wrote {json_out}")
    if csv_out is not None:
        atomic_write_bytes(csv_out, to_csv(result, predictor.names, timeline).encode())
        console.print(f"wrote {csv_out}")
    if result.failures:
        raise typer.Exit(1)


def _print(result: PredictResult, predictor: Predictor, timeline: bool) -> None:
    kind, values = predictor.task.kind, predictor.task.values
    base = _common_folder([p.path for p in result.predictions])
    table = Table(title=f"{kind}: {', '.join(predictor.names)} — {predictor.path}",
                  caption=f"files in {base}" if base else None)
    table.add_column("file", overflow="fold")
    table.add_column("modality")
    if values:
        for name in predictor.names:
            table.add_column(name, justify="right")
    else:
        table.add_column("top")
        table.add_column("probability", justify="right")
        table.add_column("others")
    for p in result.predictions:
        if values:
            table.add_row(_short(p.path, base), p.modality, *[f"{v:+.3f}" for v in p.scores])
        else:
            others = sorted(((float(s), n) for n, s in zip(p.names, p.scores) if n != p.top), reverse=True)
            table.add_row(_short(p.path, base), p.modality, p.top, f"{p.top_score:.3f}",
                          "  ".join(f"{n} {s:.3f}" for s, n in others))
    console.print(table)
    for p in result.predictions:
        for w in p.warnings:
            console.print(f"[yellow]warning:[/yellow] {p.path}: {w}")
        if timeline:
            _print_timeline(p)
    from vqmae.stages.predict import failure_status

    failed = [f for f in result.failures if failure_status(f) == "failed"]
    skipped = [f for f in result.failures if failure_status(f) == "skipped"]
    if failed:
        console.print(f"[red]{len(failed)} failed:[/red]")
        for f in failed:
            console.print(f"  [red]✗[/red] {f.path}: {f.stage}: {f.reason}")
    if skipped:
        console.print(f"[yellow]{len(skipped)} skipped:[/yellow]")
        for f in skipped:
            console.print(f"  [yellow]-[/yellow] {f.path}: {f.reason}")
    console.print(f"{len(result.predictions)} scored, {len(failed)} failed, {len(skipped)} skipped")


def _common_folder(paths: list[str]) -> str:
    """The folder all `paths` share (shown once, so the table's file column stays readable)."""
    try:
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    except ValueError:  # different drives
        return ""


def _short(path: str, base: str) -> str:
    return os.path.relpath(os.path.abspath(path), base) if base else path


def _print_timeline(p: Prediction) -> None:
    table = Table(title=f"{p.path} — per window")
    table.add_column("start (s)", justify="right")
    for name in p.names:
        table.add_column(name, justify="right")
    for start, scores in zip(p.starts, p.window_scores):
        table.add_row(f"{start:.2f}", *[f"{v:.3f}" for v in scores])
    console.print(table)
