"""The `vqmae` command line: one typer app, stage commands registered from their own modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vqmae_cli import common
from vqmae_cli import (config, evaluate, export, finetune, ingest, inspect, predict, pretrain, reconstruct, synth,
                 tokenize)

app = typer.Typer(
    help="vqmae: self-supervised audiovisual speech emotion recognition with discrete tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

@app.callback()
def main(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no info messages: warnings, errors and the final tables only.")] = False,
    log_file: Annotated[Optional[Path], typer.Option("--log-file", help="Also append every log message and progress line, timestamped, to this file.")] = None,
) -> None:
    """vqmae: self-supervised audiovisual speech emotion recognition with discrete tokens.
    Global options go before the command: vqmae --quiet --log-file run.log tokenize ..."""
    common.GLOBAL.update(quiet=quiet, log_file=log_file)


app.command("synth")(synth.synth)
app.command("ingest")(ingest.ingest)
app.command("tokenize")(tokenize.tokenize)
app.command("pretrain")(pretrain.pretrain)
app.command("finetune")(finetune.finetune)
app.command("evaluate")(evaluate.evaluate)
app.command("predict")(predict.predict)
app.command("reconstruct")(reconstruct.reconstruct)
app.command("inspect")(inspect.inspect)
app.command("export")(export.export)
app.add_typer(config.app, name="config")


if __name__ == "__main__":
    app()
