"""`vqmae finetune STORE --mae mae.pt`: stage 3 from the command line (also under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vqmae_cli.common import (PresetOpt, RichReporter, SetOpt, console, err_console, make_config, results_table,
                        setup_logging)


def finetune(
    store: Annotated[Path, typer.Argument(help="Labelled token store (encoded with the MAE's tokenizers).")],
    mae: Annotated[Optional[Path], typer.Option(help="Pretrained MAE checkpoint (runs/.../mae.pt).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run", help="Run directory (default runs/finetune-<store name>); rerun to resume.")] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Only the randomly initialised backbone (no MAE needed).")] = False,
    baseline: Annotated[bool, typer.Option(help="Also train the identical backbone from scratch, side by side.")] = True,
    baselines: Annotated[bool, typer.Option(help="Also fit the bag-of-tokens and eGeMAPS baselines on the same folds.")] = True,
    task: Annotated[Optional[str], typer.Option(help="classify, multilabel or regress (valence/arousal/dominance, CCC).")] = None,
    protocol: Annotated[Optional[str], typer.Option(help="kfold, loso, or split (the store's split column).")] = None,
    folds: Annotated[Optional[int], typer.Option(help="Number of speaker folds for kfold.")] = None,
    split_file: Annotated[Optional[Path], typer.Option(help="CSV: speaker,fold  or  clip_id|path,split (train/val/test).")] = None,
    label_fraction: Annotated[Optional[str], typer.Option(help="Fractions of each fold's training clips, e.g. 0.05,0.1,0.25,1.")] = None,
    freeze: Annotated[Optional[bool], typer.Option("--freeze/--full", help="Linear probe on a frozen encoder, or full fine-tuning.")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="attention, mean or cls.")] = None,
    noise_snr: Annotated[Optional[str], typer.Option(help="Also test with noise added to the audio at these SNRs (dB), e.g. 10,0.")] = None,
    distill: Annotated[bool, typer.Option("--distill", help="Distil each fold's AV model into an audio-only student.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    workers: Annotated[int, typer.Option(help="Decoding processes when re-tokenizing noisy audio.")] = 2,
    preset: PresetOpt = "paper",
    set_: SetOpt = None,
    verbose: bool = False,
) -> None:
    """Fine-tune emotion models from a pretrained MAE and evaluate them speaker-independently."""
    setup_logging(verbose)
    # the flags are shorthands for --set finetune.<key>=...: one path checks their types
    flags = dict(task=task, protocol="split" if split_file else protocol, folds=folds, freeze=freeze,
                 pooling=pooling, label_fractions=label_fraction, noise_snrs=noise_snr,
                 distill=True if distill else None,
                 inits=_inits(from_scratch, baseline, baselines))
    cfg = make_config(preset, [*(set_ or []), *(f"finetune.{k}={str(v).lower() if isinstance(v, bool) else v}"
                                                for k, v in flags.items() if v is not None)])
    run = run_dir or Path("runs") / f"finetune-{store.name.removesuffix('.zarr')}"
    from vqmae.checkpoint import CheckpointError
    from vqmae.encoding import TokenizeError
    from vqmae.stages.finetune import FinetuneError, finetune as run_finetune
    from vqmae.store import StoreError
    from vqmae.utils import resolve_device

    dev = resolve_device(device)
    try:
        with RichReporter(console) as reporter:
            result = run_finetune(store, cfg, run, mae=None if from_scratch else mae, device=dev,
                                  reporter=reporter, split_file=split_file, workers=workers)
    except (StoreError, FinetuneError, TokenizeError, CheckpointError, ValueError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _print_summary(result.summary)
    console.print(f"report [bold]{run / 'report.md'}[/bold], summary {run / 'summary.json'}, "
                  f"plots {', '.join(p.name for p in sorted(run.glob('*.png')))}; models in {run / 'units'}")


def _inits(from_scratch: bool, scratch: bool, baselines: bool) -> str | None:
    """finetune.inits from the flags (None: the config's, which has all four)."""
    if not from_scratch and scratch and baselines:
        return None
    models = ["scratch"] if from_scratch else ["pretrained", "scratch"] if scratch else ["pretrained"]
    return ",".join(models + (["tokens", "egemaps"] if baselines else []))


def _print_summary(summary: dict) -> None:
    console.print(results_table(f"{summary['task']['kind']} — {summary['folds']} speaker-independent folds "
                                f"({summary['protocol']}), mean ± std over folds", summary["rows"],
                                summary["metrics"]))
    console.print(f"chance: {summary['chance']}")
