"""`vqmae inspect PATH`: what is in a token store (and what writers left unmerged beside it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from vqmae_cli.common import console, err_console

if TYPE_CHECKING:
    import numpy as np

    from vqmae.store import PendingInfo, TokenStore

PathArg = Annotated[Path, typer.Argument(help="A token store directory or a checkpoint (.pt).")]


def inspect(
    path: PathArg,
    failures: Annotated[int, typer.Option("--failures", "-f", help="Failed clips to list.")] = 10,
    top: Annotated[int, typer.Option("--top", help="Rows per speaker/label table.")] = 15,
    usage: Annotated[bool, typer.Option("--usage/--no-usage",
                                        help="Count codebook usage (reads every code).")] = True,
    verify: Annotated[bool, typer.Option("--verify", help="Read every chunk and check it against the "
                                         "checksums recorded at merge time; exit 1 on damage.")] = False,
) -> None:
    """Describe a token store (modalities, tokenizers, hours, clips, failures, pending segments)
    or a checkpoint (kind, step, parents, metrics, config)."""
    if path.is_file():
        _print_checkpoint(path)
        return
    from vqmae.store import StoreError

    store, info = _open(path)
    if store is not None:
        try:
            _print_store(store, failures, top, usage and not verify)
        except StoreError as e:
            err_console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(1) from None
        if verify:
            _verify(store)
    if info.segments or info.n_tmp:
        _print_pending(path, info)


def _verify(store: TokenStore) -> None:
    """Every chunk checked (`vqmae.store.integrity`); the damaged ones listed, then exit 1."""
    from vqmae.store.integrity import verify_store

    damage, notes = verify_store(store)
    for note in notes:
        err_console.print(f"[yellow]note:[/yellow] {note}")
    chunks = sum(-(-store.n_frames(m) // store.chunk_rows(m)) for m in store.specs)
    if not damage:
        console.print(f"[green]verified:[/green] {chunks} chunks of {', '.join(store.specs)} codes, no damage")
        return
    table = Table(title=f"damaged chunks: {len(damage)} of {chunks}")
    for col in ("modality", "chunk", "rows", "file", "reason", "clips"):
        table.add_column(col)
    from vqmae.store.integrity import chunk_file

    for d in damage:
        table.add_row(d.modality, str(d.chunk), f"{d.rows[0]}-{d.rows[1] - 1}", chunk_file(d.modality, d.chunk),
                      d.reason, ", ".join(d.clips))
    console.print(table)
    raise typer.Exit(1)


def _open(path: Path) -> tuple[TokenStore | None, PendingInfo]:
    """The merged store (None if only segments exist); exit 2 when `path` is neither."""
    from vqmae.store import StoreError, TokenStore, pending

    try:
        info = pending(path)
        store = TokenStore.open(path) if (path / "zarr.json").exists() or not info.segments \
            else None
    except StoreError as e:
        err_console.print(f"[red]not a vqmae token store:[/red] {e}")
        raise typer.Exit(2) from None
    return store, info


def _print_store(store: TokenStore, n_failures: int, top: int, usage: bool) -> None:
    a = store.attrs
    console.print(f"[bold]{store.path}[/bold]  format {a['format']}  vqmae {a.get('vqmae_version')}"
                  f"  created {a.get('created', '?')}  updated {a.get('updated', '?')}")
    console.print(_modalities_table(store, usage))
    ok = store.clips["status"] == "ok"
    console.print(f"clips: {store.n_clips} ({int(ok.sum())} ok, {int((~ok).sum())} failed)")
    console.print(_datasets_table(store))
    console.print(_counts_table("speaker", store.clips["speaker"][ok], top))
    labels = store.clips["label"][ok]
    if (labels != "").any():
        console.print(_counts_table("label", labels, top))
    _print_failures(store, n_failures)


def _modalities_table(store: TokenStore, usage: bool) -> Table:
    """One column per modality (stays narrow however many fields there are)."""
    t = Table(title="modalities")
    t.add_column("")
    for name in store.specs:
        t.add_column(name, justify="right")
    rows: dict[str, list[str]] = {k: [] for k in (
        "codebook size", "grid", "frame rate", "tokenizer sha256", "frames", "hours",
        "clips with it", "codebook usage")}
    for name, spec in store.specs.items():
        rows["codebook size"].append(str(spec.codebook_size))
        rows["grid"].append("×".join(map(str, spec.grid)))
        rows["frame rate"].append(f"{spec.frame_rate:g}/s")
        rows["tokenizer sha256"].append(spec.tokenizer_sha256[:12])
        rows["frames"].append(str(store.n_frames(name)))
        rows["hours"].append(f"{store.hours(name):.3f}")
        rows["clips with it"].append(str(int((store.clips[f"{name}_length"] > 0).sum())))
        rows["codebook usage"].append(_usage(store, name) if usage else "(skipped)")
    for key, values in rows.items():
        t.add_row(key, *values)
    return t


def _usage(store: TokenStore, name: str) -> str:
    counts = store.code_counts(name)
    if not counts.sum():
        return "-"
    return f"{100.0 * (counts > 0).mean():.1f}% ({int((counts > 0).sum())}/{counts.size})"


def _datasets_table(store: TokenStore) -> Table:
    import numpy as np

    c = store.clips
    t = Table(title="datasets")
    for col in ("dataset", "clips", "ok", "failed", "speakers", "labelled"):
        t.add_column(col, justify="left" if col == "dataset" else "right")
    for ds in sorted(set(c["dataset"].tolist())):
        sel = c["dataset"] == ds
        ok = sel & (c["status"] == "ok")
        labelled = ok & ((c["label"] != "") | (c["labels"] != "") | ~np.isnan(c["valence"]))
        t.add_row(ds or "(none)", str(int(sel.sum())), str(int(ok.sum())),
                  str(int((sel & ~ok).sum())), str(len(set(c["speaker"][sel].tolist()))),
                  str(int(labelled.sum())))
    return t


def _counts_table(what: str, values: np.ndarray, top: int) -> Table:
    counts = Counter(values.tolist()).most_common()
    t = Table(title=f"ok clips by {what} ({len(counts)} distinct)")
    t.add_column(what)
    t.add_column("clips", justify="right")
    for value, n in counts[:top]:
        t.add_row(value or "(none)", str(n))
    if len(counts) > top:
        t.add_row(f"… {len(counts) - top} more", str(sum(n for _, n in counts[top:])))
    return t


def _print_failures(store: TokenStore, n: int) -> None:
    fails = store.failures()
    if not fails:
        return
    console.print(f"[yellow]{len(fails)} failed clips[/yellow] (first {min(n, len(fails))}):")
    for clip_id, src, reason in fails[:n]:
        console.print(f"  {clip_id}  {src}  [red]{reason}[/red]", highlight=False)


def _print_pending(path: Path, info: PendingInfo) -> None:
    from vqmae.store import parts_dir

    console.print(f"[yellow]pending in {parts_dir(path)}:[/yellow] {len(info.segments)} unmerged "
                  f"segments, {info.n_clips} clips ({info.n_failed} failed), {info.n_tmp} "
                  f"half-written; run merge to fold them in")


def _print_checkpoint(path: Path) -> None:
    from vqmae.checkpoint import CheckpointError, checkpoint_sha256, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        err_console.print(f"[red]error:[/red] {path}: not a vqmae token store (a directory) nor a "
                          f"readable checkpoint: {str(e).removeprefix(str(path) + ': ')}")
        raise typer.Exit(2) from None
    n_params = sum(v.numel() for k, v in ckpt["state_dict"].items() if "quantizer" not in k)
    table = Table(title=str(path), show_header=False)
    table.add_row("format", ckpt["format"])
    table.add_row("kind", ckpt["kind"])
    table.add_row("vqmae version", str(ckpt.get("vqmae_version")))
    table.add_row("sha256", checkpoint_sha256(path))
    table.add_row("step", str(ckpt["step"]))
    table.add_row("parameters", f"{n_params:,}")
    table.add_row("resumable", "yes" if ckpt.get("optimizer") else "no (weights only)")
    for name, sha in sorted(ckpt.get("parents", {}).items()):
        table.add_row(f"parent {name}", sha)
    for key, value in sorted(ckpt.get("metrics", {}).items()):
        table.add_row(key, f"{value:.5g}" if isinstance(value, float) else str(value))
    cfg = ckpt["config"]
    section = {"audio_vqvae": "audio_vq", "visual_vqvae": "visual_vq", "mae": "mae"}.get(ckpt["kind"])
    if section and section in cfg:
        table.add_row(f"config.{section}", ", ".join(f"{k}={v}" for k, v in cfg[section].items()))
    table.add_row("config.preset", str(cfg.get("preset")))
    console.print(table)
