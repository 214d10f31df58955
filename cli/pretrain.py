"""`vqmae pretrain STORE`: stage 2 from the command line (also under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from vqmae_cli.common import PresetOpt, RichReporter, SetOpt, console, err_console, make_config, setup_logging


def pretrain(
    store: Annotated[Path, typer.Argument(help="Token store written by `vqmae tokenize`.")],
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/pretrain-<store name>); rerun to resume.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ... (under torchrun: one GPU per process).")] = "auto",
    max_steps: Annotated[Optional[int], typer.Option(help="Stop at this step (the schedule still spans pretrain.steps).")] = None,
    preset: PresetOpt = "paper",
    set_: SetOpt = None,
    verbose: bool = False,
) -> None:
    """Masked-token pretraining of the audiovisual transformer on a token store."""
    setup_logging(verbose)
    cfg = make_config(preset, set_)
    run = run_dir or Path("runs") / f"pretrain-{store.name.removesuffix('.zarr')}"
    from vqmae.checkpoint import CheckpointError
    from vqmae.stages.pretrain import PretrainError, pretrain as run_pretrain
    from vqmae.store import StoreError
    from vqmae.utils import resolve_device

    try:
        with RichReporter(console) as reporter:
            result = run_pretrain(store, cfg, run, device=resolve_device(device), reporter=reporter,
                                  max_steps=max_steps)
    except (StoreError, PretrainError, CheckpointError, ValueError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _print(result)


def _print(result) -> None:
    table = Table(title=f"pretraining at step {result.step} (validation clips)")
    for col in ("modality", "masked-token accuracy", "unigram baseline", "cross-entropy", "unigram's"):
        table.add_column(col, justify="right")
    for m, (acc, base) in result.accuracy.items():
        ce, ce_base = result.cross_entropy[m]
        table.add_row(m, f"{acc:.3f}", f"{base:.3f}", f"{ce:.3f}", f"{ce_base:.3f}")
    console.print(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(f"validation loss {result.val.get('val/loss_total', float('nan')):.4f}, "
                  f"{result.windows_per_s:.1f} windows/s; checkpoint [bold]{result.checkpoint}[/bold]")
    panels = sorted((result.run / "recon").glob("*.png"))
    if panels:
        console.print(f"reconstructions (original / masked / predicted) in [bold]{result.run / 'recon'}[/bold], "
                      f"latest: {', '.join(p.name for p in panels[-2:])}")
