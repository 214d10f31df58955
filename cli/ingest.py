"""`vqmae ingest DATA`: decode and face-crop a corpus, report what works and what fails
(`vqmae.stages.ingest`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from vqmae_cli.common import PresetOpt, RichReporter, SetOpt, console, err_console, make_config, setup_logging

if TYPE_CHECKING:
    from vqmae.stages.ingest import IngestReport


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
    run = run_dir or Path("runs") / f"ingest-{data.stem}"
    from vqmae.datasets import DatasetError
    from vqmae.ingest import parse_modalities
    from vqmae.stages.ingest import ingest_report

    try:
        with RichReporter(console) as reporter:
            report = ingest_report(data, cfg, run, kind=kind, modalities=parse_modalities(modalities),
                                   workers=workers, limit=limit, reporter=reporter)
    except (ValueError, DatasetError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _print_summary(report)


def _print_summary(report: IngestReport) -> None:
    summary, failures, skipped, run = report.summary, report.failures, report.skipped, report.run
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
    if failures:  # the exit-code rule of every command: 1 when some inputs failed
        raise typer.Exit(1)
