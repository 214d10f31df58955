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
