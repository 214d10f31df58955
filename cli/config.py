"""`vqmae config show [PREFIX]`: every key `--set` accepts, with its type, its value in a preset (after
any `--set`) and the paper preset's default."""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from vqmae_cli.common import PresetOpt, SetOpt, console, err_console, make_config

app = typer.Typer(help="Configuration keys: what `--set KEY=VALUE` accepts.", no_args_is_help=True,
                  add_completion=False)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"{inner}, …" if len(args) != 2 or args[1] is Ellipsis else f"{inner} × 2"
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def rows(cfg: Any, default: Any, prefix: str = "") -> list[tuple[str, str, Any, Any]]:
    """(key, type, value in `cfg`, value in `default`) for every leaf field, in declaration order."""
    out = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            out += rows(value, base, prefix + f.name + ".")
        else:
            out.append((prefix + f.name, _type_name(hints[f.name]), value, base))
    return out


@app.command("show")
def show(
    prefix: Annotated[Optional[str], typer.Argument(help="Only keys starting with this (e.g. `mae.` or `finetune.head`).")] = None,
    preset: PresetOpt = "paper",
    set_: SetOpt = None,
) -> None:
    """List the configuration keys with their types, their values in PRESET (after --set) and the
    paper preset's defaults; a value that differs from the paper's is shown in bold."""
    cfg = make_config(preset, set_)
    from vqmae.config import load_config

    found = [r for r in rows(cfg, load_config("paper")) if not prefix or r[0].startswith(prefix)]
    if not found:
        from vqmae.config import _unknown

        err_console.print(f"[red]no configuration key starts with {prefix!r}[/red]: {_unknown(prefix)}")
        raise typer.Exit(2)
    table = Table("key", "type", f"{preset}" + (" + --set" if set_ else ""), "paper default")
    for key, tp, value, base in found:
        shown = repr(value) if isinstance(value, str) else str(value)
        table.add_row(key, tp, f"[bold]{shown}[/bold]" if value != base else shown,
                      repr(base) if isinstance(base, str) else str(base))
    console.print(table)
