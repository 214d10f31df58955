"""`vqmae export CLASSIFIER.pt --out DIR`: TorchScript files that run with plain PyTorch / libtorch,
and ONNX files for onnxruntime and other ONNX runtimes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from vqmae_cli.common import console, err_console, setup_logging

if TYPE_CHECKING:
    from vqmae.stages.export import ExportResult


def export(
    classifier: Annotated[Path, typer.Argument(help="A classifier checkpoint (runs/.../classifier.pt).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory to write the TorchScript / ONNX files into.")] = None,
    hub_dir: Annotated[Optional[Path], typer.Option("--hub-dir", help="Directory to write a Hugging Face Hub-ready folder into (safetensors weights, config, tokenizers, model card); upload it with huggingface-cli upload.")] = None,
    tokenizers: Annotated[Optional[Path], typer.Option(help="Directory with audio_vqvae.pt / visual_vqvae.pt, when the paths recorded in the classifier moved.")] = None,
    device: Annotated[str, typer.Option(help="Device the exported files will run on (the traced graph keeps it): cpu, cuda, ... or auto.")] = "cpu",
    format: Annotated[str, typer.Option("--format", help="all (TorchScript, plus ONNX when the onnx extra is installed), torchscript, onnx, or torchscript,onnx.")] = "all",
    verbose: bool = False,
) -> None:
    """Export a fine-tuned classifier and its tokenizer encoders to TorchScript and ONNX, each file
    checked against the eager model (--out), and/or as a Hub-ready folder (--hub-dir). Exit code 2 if
    the checkpoint cannot be exported."""
    if out is None and hub_dir is None:
        raise typer.BadParameter("give --out DIR, --hub-dir DIR, or both", param_hint="--out / --hub-dir")
    setup_logging(verbose)
    if hub_dir is not None:
        _hub(classifier, hub_dir, tokenizers)
    if out is None:
        return
    from vqmae.stages.export import ExportError, export_model
    from vqmae.utils import resolve_device

    try:
        result = export_model(classifier, out, tokenizers=tokenizers, device=resolve_device(device),
                              formats=format)
    except ExportError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _print(result)
    from vqmae.stages.export_onnx import available

    if format.strip() == "all" and (why := available()):
        console.print(f"ONNX files skipped: {why}")


def _hub(classifier: Path, hub_dir: Path, tokenizers: Optional[Path]) -> None:
    from vqmae.stages.predict.hub import write_hub_folder
    from vqmae.stages.predict import PredictError

    try:
        files = write_hub_folder(classifier, hub_dir, tokenizers=tokenizers)
    except PredictError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"Hub folder {hub_dir}: {', '.join(files)}; load it with "
                  f"vqmae.Predictor.from_pretrained('{hub_dir}') or vqmae predict --model {hub_dir}; "
                  f"share it with huggingface-cli upload USER/REPO {hub_dir}")


def _print(result: ExportResult) -> None:
    from vqmae.stages.export import MANIFEST

    m = result.manifest
    table = Table(title=f"{m['task']['kind']}: {', '.join(m['task']['names'])} — exported to {result.out_dir}",
                  caption=f"torch {m['torch_version']}, device {m['device']}, "
                          f"{m['window']['seconds']:g} s windows; load .ts with torch.jit.load, "
                          f".onnx with onnxruntime (export.json: run)")
    for col, justify in (("file", "left"), ("takes", "left"), ("returns", "left"),
                         ("bytes", "right"), ("max |Δ| vs eager", "right"), ("sha256", "left")):
        table.add_column(col, justify=justify)
    for name, info in m["files"].items():
        table.add_row(name, _signature(info["inputs"]), _signature(info["outputs"]), f"{info['bytes']:,}",
                      f"{result.max_abs_diff[name]:.2g}", info["sha256"][:12])
    console.print(table)
    console.print(f"wrote {result.out_dir / MANIFEST} (inputs, shapes, feature settings, sha256s)")


def _signature(items: list[dict]) -> str:
    return "\n".join(f"{x['name']} {x['dtype']} [{', '.join(map(str, x['shape']))}]" for x in items)
