"""`vqmae reconstruct MAE.pt STORE`: what the pretrained model fills in, as PNG panels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vqmae_cli.common import console, err_console, setup_logging


def reconstruct(
    checkpoint: Annotated[Path, typer.Argument(help="A pretraining checkpoint (mae.pt).")],
    store: Annotated[Path, typer.Argument(help="A token store made with the same tokenizers.")],
    out: Annotated[Path, typer.Option(help="Folder for the PNG panels and WAV files.")] = Path("reconstructions"),
    tokenizers: Annotated[Optional[Path], typer.Option(help="Tokenizer directory, if the store's recorded paths moved.")] = None,
    windows: Annotated[int, typer.Option(help="Validation windows to draw.")] = 2,
    masking: Annotated[Optional[str], typer.Option(help="Override the masking: coupled, fixed, time, audio2visual, visual2audio.")] = None,
    seed: int = 0,
    device: str = "auto",
    verbose: bool = False,
) -> None:
    """Decode original / masked / predicted codes through the stage-1 decoders into PNG panels, and
    the audio's original / predicted spectrograms into WAV files (Griffin-Lim)."""
    setup_logging(verbose)
    from vqmae.checkpoint import CheckpointError
    from vqmae.stages.reconstruct import reconstruct as run_reconstruct
    from vqmae.store import StoreError
    from vqmae.utils import resolve_device

    try:
        paths = run_reconstruct(checkpoint, store, out, tokenizers_dir=tokenizers, n_windows=windows,
                                seed=seed, masking=masking, device=resolve_device(device))
    except (StoreError, CheckpointError, ValueError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if not paths:
        err_console.print("[red]error:[/red] no tokenizer matching the store was found; pass --tokenizers DIR")
        raise typer.Exit(2)
    for p in paths:
        console.print(f"wrote [bold]{p}[/bold]")
