"""`vqmae tokenize DATA --out STORE`: stage 1 from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from vqmae_cli.common import PresetOpt, RichReporter, SetOpt, console, err_console, make_config, setup_logging

if TYPE_CHECKING:
    from vqmae.ingest import Failure
    from vqmae.stages.tokenize import TokenizeResult


def tokenize(
    data: Annotated[Path, typer.Argument(help="Corpus root, or a CSV manifest.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Token store to write (a .zarr directory).")],
    tokenizers: Annotated[Optional[Path], typer.Option(help="Encode with these trained tokenizers (a directory with audio_vqvae.pt / visual_vqvae.pt) instead of training new ones.")] = None,
    kind: Annotated[str, typer.Option(help="Dataset layout: auto, ravdess, cremad, enterface, voxceleb2, csv, folder.")] = "auto",
    modalities: Annotated[str, typer.Option(help="auto (av when any clip has video, else audio), av, audio or visual.")] = "auto",
    shard: Annotated[str, typer.Option(help="i/N: encode every N-th clip starting at i; run 0/1 (the default) afterwards to merge.")] = "0/1",
    face: Annotated[Optional[str], typer.Option(help="Face mode: auto, fan, haar, none (sets face.mode).")] = None,
    workers: Annotated[int, typer.Option(help="Decoding processes.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/tokenize-<store name>).")] = None,
    train_only: Annotated[bool, typer.Option(help="Train the tokenizers and stop before encoding.")] = False,
    heldout: Annotated[float, typer.Option(help="Fraction of clips held out to evaluate the tokenizers.")] = 0.1,
    preset: PresetOpt = "paper",
    set_: SetOpt = None,
    verbose: bool = False,
) -> None:
    """Train audio + visual VQ-VAE tokenizers on a corpus (or load given ones) and encode every clip."""
    setup_logging(verbose)
    cfg = make_config(preset, list(set_ or []) + ([f"face.mode={face}"] if face else []))
    from vqmae.checkpoint import CheckpointError
    from vqmae.datasets import DatasetError
    from vqmae.encoding import TokenizeError
    from vqmae.ingest import parse_modalities
    from vqmae.stages.tokenize import tokenize as run_tokenize
    from vqmae.store import StoreError, parse_shard
    from vqmae.utils import resolve_device

    try:
        shard_ = parse_shard(shard)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--shard") from None
    run = run_dir or Path("runs") / f"tokenize-{out.name.removesuffix('.zarr')}"
    try:
        with RichReporter(console) as reporter:
            result = run_tokenize(data, out, cfg, run, tokenizers=tokenizers, kind=kind,
                                  modalities=None if modalities == "auto" else parse_modalities(modalities), shard=shard_, workers=workers,
                                  device=resolve_device(device if device != "auto" else cfg.device),
                                  train_only=train_only, heldout_fraction=heldout, reporter=reporter)
    except (DatasetError, TokenizeError, StoreError, CheckpointError, ValueError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if result.evaluation is not None:
        _print_eval(result.evaluation, result.tokenizers)
    if train_only:
        _print_failures(result.failures, result.failures_csv, result.skipped)
    else:
        _print_summary(result)
    if result.failures:  # the exit-code rule of every command: 1 when some inputs failed
        raise typer.Exit(1)


def _print_eval(evaluation: dict, directory: Path) -> None:
    """Held-out evaluation: codebook use and error (ratio: the tokenizer's error over predicting the
    mean frame); for audio how much pitch and energy the decoded frames keep, for video how much of
    the mouth's and eyes' expression detail and of the face colour."""
    table = Table(title=f"tokenizers in {directory} (held-out clips)")
    keys = ("f0_corr", "f0_within_5pct", "energy_corr", "mouth_kept", "eyes_kept", "colour_corr")
    for col in ("", "frames", "usage", "perplexity", "error ratio", "F0 corr", "F0 ±5%", "energy corr",
                "mouth kept", "eyes kept", "colour corr"):
        table.add_column(col, justify="right")
    for m, e in evaluation.items():
        kept = [f"{e[k]:.3f}" if e.get(k) is not None else "-" for k in keys]
        table.add_row(m, str(e["frames"]), f"{e['usage']:.1%}", f"{e['perplexity']:.1f}", f"{e['ratio']:.3f}",
                      *kept)
    console.print(table)
    for m, e in evaluation.items():
        if e.get("ids_f0_corr") is not None:
            console.print(f"{m} prosody ids, the pitch and energy of their bins: F0 corr {e['ids_f0_corr']:.3f}, "
                          f"F0 ±5% {e['ids_f0_within_5pct']:.3f}, energy corr {e['ids_energy_corr']:.3f}")


def _print_summary(result: TokenizeResult) -> None:
    out, failed, run = result.store, result.failures, result.run
    table = Table(title="tokenize summary", show_header=False)
    table.add_row("store", str(out) + ("" if result.merged else " (parts, not merged yet)"))
    table.add_row("clips encoded now", str(result.encoded))
    table.add_row("clips already done (resumed)", str(result.skipped_done))
    table.add_row("failed clips", str(len(failed)))
    table.add_row("inputs skipped at scan", str(len(result.skipped)))
    if result.merged:
        from vqmae.store import TokenStore

        store = TokenStore.open(out)
        for m, spec in store.specs.items():
            table.add_row(f"{m} frames", f"{int(store.clips[f'{m}_length'].sum())} "
                                          f"(codebook {spec.codebook_size}, grid {list(spec.grid)})")
    table.add_row("time", f"{result.seconds:.1f} s")
    console.print(table)
    _print_failures(failed, result.failures_csv, result.skipped)
    console.print(f"run directory: [bold]{run}[/bold]")


def _print_failures(failed: list[Failure], csv_path: Path, skipped: list[tuple[str, str]] = ()) -> None:
    if not failed and not skipped:
        return
    ft = Table(title=f"failed files ({len(failed)}) and inputs skipped at scan ({len(skipped)}), "
                     f"also in {csv_path}")
    for col in ("file", "stage", "reason"):
        ft.add_column(col, overflow="fold")
    for f in failed[:50]:
        ft.add_row(f.path, f.stage, f.reason)
    for p, reason in list(skipped)[: max(0, 50 - len(failed))]:
        ft.add_row(p, "scan", reason)
    console.print(ft)
