"""Shared CLI pieces: the rich console, preset/--set options, config loading, logging."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from vqmae.config import Config, ConfigError, load_config

console = Console(stderr=False)
err_console = Console(stderr=True)

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="Config preset: paper or tiny.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config value, e.g. --set face.mode=haar (repeatable)."),
]


def make_config(preset: str, overrides: Optional[list[str]]) -> Config:
    """Resolve preset + overrides, turning a config mistake into a clean CLI error."""
    try:
        return load_config(preset, overrides or [])
    except ConfigError as e:
        err_console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )


class RichReporter:
    """`vqmae.training.Reporter` drawn as rich progress bars (one per named phase)."""

    def __init__(self, console: Console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, name: str, total: int | None) -> None:
        self.tasks[name] = self.progress.add_task(name, total=total, info="")

    def advance(self, name: str, n: int = 1, **fields) -> None:
        info = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self.progress.update(self.tasks[name], advance=n, **({"info": info} if info else {}))

    def finish(self, name: str) -> None:
        task = self.tasks[name]
        total = next(t.total for t in self.progress.tasks if t.id == task)
        self.progress.update(task, completed=total)


def results_table(title: str, rows: list[dict], keys: list[str]):
    """A fine-tuning or evaluation summary's rows (mean ± std over folds) as a rich table."""
    from rich.table import Table

    from vqmae.metrics import format_mean_std

    table = Table(title=title)
    for col in ["variant", "labels", "eval", *[k.upper() for k in keys]]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["variant"], f"{r['fraction']:.0%}", r["eval"],
                      *[format_mean_std(r[k]) if r.get(k) else "n/a" for k in keys])
    return table
