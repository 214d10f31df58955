"""`vqmae evaluate RUN STORE`: a finished fine-tuning run's fold models scored on another store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from vqmae_cli.common import RichReporter, console, err_console, results_table, setup_logging

if TYPE_CHECKING:
    from vqmae.stages.finetune.evaluate import EvaluateResult


def evaluate(
    run: Annotated[Path, typer.Argument(help="A finished `vqmae finetune` run directory.")],
    store: Annotated[Path, typer.Argument(help="A token store made with the run's tokenizers: a twin of the training store (same clip ids, e.g. a noisy copy) or another corpus.")],
    out: Annotated[Optional[Path], typer.Option(help="Where summary.json and report.md go (default RUN/evaluate/<store name>).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    verbose: bool = False,
) -> None:
    """Score the run's saved fold models on STORE, as fine-tuning scored its test clips."""
    setup_logging(verbose)
    from vqmae.checkpoint import CheckpointError
    from vqmae.stages.finetune import FinetuneError
    from vqmae.stages.finetune.evaluate import evaluate as run_evaluate
    from vqmae.store import StoreError
    from vqmae.utils import resolve_device

    try:
        with RichReporter(console) as reporter:
            result = run_evaluate(run, store, out, device=resolve_device(device), reporter=reporter)
    except (StoreError, FinetuneError, CheckpointError, ValueError, FileNotFoundError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _print(result)


def _print(result: EvaluateResult) -> None:
    s = result.summary
    console.print(results_table(f"{s['task']['kind']} on {s['store']} ({result.protocol}), mean ± std over folds",
                                s["rows"], s["metrics"]))
    console.print(f"chance: {s['chance']}; report [bold]{result.out / 'report.md'}[/bold]")
