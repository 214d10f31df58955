"""Shared CLI pieces: the rich console, preset/--set options, config loading, logging."""

from __future__ import annotations

import datetime
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from vqmae.config import Config, ConfigError, load_config

console = Console(stderr=False)
err_console = Console(stderr=True)

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="Config preset: paper or tiny.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config value, e.g. --set face.mode=haar (repeatable)."),
]


def make_config(preset: str, overrides: Optional[list[str]]) -> Config:
    """Resolve preset + overrides, turning a config mistake into a clean CLI error."""
    try:
        return load_config(preset, overrides or [])
    except ConfigError as e:
        err_console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None


# The global options (`vqmae --quiet --log-file F COMMAND ...`), set by the app's callback.
GLOBAL: dict = {"quiet": False, "log_file": None}


def setup_logging(verbose: bool = False) -> None:
    """Log records to stderr (warnings and errors only with --quiet) and, with --log-file, every
    record with its time and logger to that file as well."""
    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    handler.setLevel(logging.WARNING if GLOBAL["quiet"] else logging.DEBUG)
    handlers: list[logging.Handler] = [handler]
    if GLOBAL["log_file"] is not None:
        to_file = logging.FileHandler(GLOBAL["log_file"], encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=handlers, force=True)


def RichReporter(console: Console, every: float = 30.0) -> "BarReporter | LineReporter | TeeReporter":
    """A `vqmae.training.Reporter` for `console`: rich progress bars on a terminal; elsewhere (a log
    file, `nohup`, CI), where bars would draw nothing until the end, plain lines; nothing with
    --quiet. With --log-file the plain lines, timestamped, also go to that file."""
    shown = [] if GLOBAL["quiet"] else [BarReporter(console) if console.is_terminal
                                        else LineReporter(console, every)]
    if GLOBAL["log_file"] is not None:
        shown.append(LineReporter(_LogFileConsole(GLOBAL["log_file"]), every))
    return TeeReporter(shown)


class TeeReporter:
    """The same progress to several reporters (none: silent)."""

    def __init__(self, reporters: list):
        self.reporters = reporters

    def __enter__(self) -> "TeeReporter":
        for r in self.reporters:
            r.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for r in self.reporters:
            r.__exit__(*exc)

    def start(self, name: str, total: int | None) -> None:
        for r in self.reporters:
            r.start(name, total)

    def advance(self, name: str, n: int = 1, **fields) -> None:
        for r in self.reporters:
            r.advance(name, n, **fields)

    def finish(self, name: str) -> None:
        for r in self.reporters:
            r.finish(name)


class _LogFileConsole:
    """Appends `print`ed progress lines to a file with a timestamp, as the log records are."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def print(self, text: str, **_) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} PROGRESS {text}\n")


def _info(fields: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


class BarReporter:
    """One rich progress bar per named phase."""

    def __init__(self, console: Console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "BarReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, name: str, total: int | None) -> None:
        self.tasks[name] = self.progress.add_task(name, total=total, info="")

    def advance(self, name: str, n: int = 1, **fields) -> None:
        info = _info(fields)
        self.progress.update(self.tasks[name], advance=n, **({"info": info} if info else {}))

    def finish(self, name: str) -> None:
        task = self.tasks[name]
        total = next(t.total for t in self.progress.tasks if t.id == task)
        self.progress.update(task, completed=total)


class LineReporter:
    """Each phase prints a plain line when it starts, at most every `every` seconds while it runs
    (done / total, the latest fields, elapsed and remaining time) and when it finishes."""

    def __init__(self, console: Console, every: float = 30.0):
        self.console, self.every = console, every
        self.state: dict[str, dict] = {}  # per phase: done, total, t0, last line, info, running
        self.lock = threading.Lock()
        self.ticker: threading.Thread | None = None
        self.closed = False

    def _tick(self) -> None:
        """A line for every running phase that has printed none for `every` seconds, even when
        one step of it takes longer than that (a slow step, a loaded machine)."""
        tick = max(0.05, min(1.0, self.every / 4))
        while not self.closed:
            time.sleep(tick)
            for name, st in list(self.state.items()):  # a tick early rather than late
                if st["running"] and time.monotonic() - st["last"] >= self.every - tick:
                    with self.lock:  # finished or closed meanwhile: no line after "done"
                        if st["running"] and not self.closed:
                            self._print_line(name, "")

    def __enter__(self) -> "LineReporter":
        return self

    def __exit__(self, *exc) -> None:
        with self.lock:  # a phase an error left unfinished prints no more lines
            for st in self.state.values():
                st["running"] = False
            self.closed = True

    def start(self, name: str, total: int | None) -> None:
        now = time.monotonic()
        self.state[name] = {"done": 0, "total": total, "t0": now, "last": now, "info": "",
                            "running": True}
        self._line(name, "started")
        if self.every > 0 and (self.ticker is None or not self.ticker.is_alive()):
            self.closed = False
            self.ticker = threading.Thread(target=self._tick, name="progress-lines", daemon=True)
            self.ticker.start()

    def advance(self, name: str, n: int = 1, **fields) -> None:
        st = self.state[name]
        st["done"] += n
        st["info"] = _info(fields) or st["info"]
        if time.monotonic() - st["last"] >= self.every:
            self._line(name)

    def finish(self, name: str) -> None:
        st = self.state[name]
        with self.lock:
            st["done"] = st["total"] if st["total"] is not None else st["done"]
            st["running"] = False
            self._print_line(name, "done")

    def _line(self, name: str, what: str = "") -> None:
        with self.lock:
            self._print_line(name, what)

    def _print_line(self, name: str, what: str) -> None:
        st = self.state[name]
        now = time.monotonic()
        st["last"] = now
        elapsed = now - st["t0"]
        done, total = st["done"], st["total"]
        parts = [f"{name}:", what] if what else [f"{name}:"]
        if total:
            parts.append(f"{done}/{total} ({done / total:.0%})")
            if 0 < done < total:
                parts.append(f"~{_clock(elapsed * (total - done) / done)} left")
        elif done:
            parts.append(str(done))
        parts += [st["info"], f"{_clock(elapsed)} elapsed"]
        self.console.print(" ".join(p for p in parts if p), highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def results_table(title: str, rows: list[dict], keys: list[str]):
    """A fine-tuning or evaluation summary's rows (mean ± std over folds) as a rich table."""
    from rich.table import Table

    from vqmae.metrics import format_mean_std

    table = Table(title=title)
    for col in ["variant", "labels", "eval", *[k.upper() for k in keys]]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["variant"], f"{r['fraction']:.0%}", r["eval"],
                      *[format_mean_std(r[k]) if r.get(k) else "n/a" for k in keys])
    return table
