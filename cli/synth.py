"""`vqmae synth OUT`: write the built-in demo corpus (talking-face mp4 + audio-only wav + manifest)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from vqmae_cli.common import PresetOpt, RichReporter, SetOpt, console, err_console, make_config, setup_logging


def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write the corpus into.")],
    preset: PresetOpt = "paper",
    set_: SetOpt = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (default: CPU count; 1 = in-process).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty OUT, replacing an earlier corpus there.")] = False,
    kind: Annotated[str, typer.Option(help="demo: talking faces (synth.* settings); speech: festival voices acting emotion through prosody, with noisy twins OUT_snr10 / OUT_snr0 (needs `make speech-corpus`'s packages).")] = "demo",
    speakers: Annotated[int, typer.Option(help="--kind speech: speakers (voice conversions of 3 festival voices).")] = 10,
    clips: Annotated[int, typer.Option(help="--kind speech: clips per speaker.")] = 24,
    seed: Annotated[int, typer.Option(help="--kind speech: seed.")] = 0,
    verbose: bool = False,
) -> None:
    """Generate a seeded corpus: the demo (emotion in the voice and in the face) or the speech corpus."""
    setup_logging(verbose)
    if kind == "speech":
        _speech(out, speakers, clips, seed, workers, force)
        return
    if kind != "demo":
        raise typer.BadParameter(f"{kind!r}: expected demo or speech", param_hint="--kind")
    cfg = make_config(preset, set_)
    from vqmae.demo import SynthError, read_summary, synthesize

    t0 = time.perf_counter()
    try:
        with RichReporter(console) as reporter:
            progress = _Progress(reporter)
            manifest = synthesize(out, cfg.synth, workers=workers, overwrite=force, progress=progress)
            progress.finish()
    except SynthError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _print_summary(read_summary(out), manifest, time.perf_counter() - t0)


def _speech(out: Path, speakers: int, clips: int, seed: int, workers: Optional[int], force: bool) -> None:
    from vqmae.demo.speech import SpeechCorpusError, read_speech_summary, synthesize_speech

    t0 = time.perf_counter()
    try:
        with RichReporter(console) as reporter:
            progress = _Progress(reporter)
            manifest = synthesize_speech(out, n_speakers=speakers, clips_per_speaker=clips, seed=seed,
                                         workers=workers or 1, overwrite=force, progress=progress)
            progress.finish()
    except SpeechCorpusError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    summary = read_speech_summary(out)
    console.print(f"{summary['clips']} clips of {len(summary['speakers'])} speakers "
                  f"({', '.join(e['name'] for e in summary['emotions'])}), seed {seed}, written in "
                  f"{time.perf_counter() - t0:.1f} s")
    console.print(f"manifest: {manifest}; noisy twins: "
                  + ", ".join(f"{out}_snr{s:g}" for s in summary["noisy_snrs"]))


class _Progress:
    """`synthesize`'s progress(done, total) callback → a reporter's "synth" phase."""

    def __init__(self, reporter):
        self.reporter, self.done = reporter, None

    def __call__(self, done: int, total: int) -> None:
        if self.done is None:
            self.reporter.start("synth", total)
            self.done = 0
        self.reporter.advance("synth", done - self.done)
        self.done = done

    def finish(self) -> None:
        if self.done is not None:
            self.reporter.finish("synth")


def _print_summary(summary: dict, manifest: Path, elapsed: float) -> None:
    from vqmae.demo import manifest_counts

    labels = list(summary["config"]["emotions"])
    table = Table(title=f"{summary['n_clips']} clips ({summary['n_video']} video, {summary['n_audio']} audio-only)")
    table.add_column("speaker")
    for label in labels:
        table.add_column(label, justify="right")
    counts = manifest_counts(manifest)
    for speaker in sorted(summary["per_speaker"]):
        table.add_row(speaker, *(str(counts.get((speaker, lab), 0)) for lab in labels))
    table.add_row("[bold]total", *(f"[bold]{summary['per_label'].get(lab, 0)}" for lab in labels))
    console.print(table)
    console.print(f"{summary['total_seconds'] / 60:.1f} min of media, seed {summary['seed']}, "
                  f"written in {elapsed:.1f} s")
    console.print(f"manifest: {manifest}")
