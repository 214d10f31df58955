"""The CLI starts fast: help, usage errors and config errors import no torch / zarr / media libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "zarr", "cv2", "decord", "opensmile")
COMMANDS = ("synth", "ingest", "tokenize", "pretrain", "finetune", "evaluate", "predict", "reconstruct",
            "inspect", "export")

# (argv, expected exit code)
CASES = [
    (["--help"], 0),
    *[([cmd, "--help"], 0) for cmd in COMMANDS],
    (["pretrain"], 2),  # missing argument
    (["pretrain", "x.zarr", "--nosuch-option"], 2),  # unknown option
    (["pretrain", "x.zarr", "--preset", "tiny", "--set", "nosuch.key=1"], 2),  # config error
    (["finetune", "x.zarr", "--preset", "tiny", "--set", "nosuch.key=1"], 2),
    (["tokenize", "data", "--out", "x.zarr", "--set", "nosuch.key=1"], 2),
    (["ingest", "data", "--set", "nosuch.key=1"], 2),
    (["synth", "out", "--set", "nosuch.key=1"], 2),
    (["synth", "out", "--kind", "nope"], 2),
    (["predict", "clip.mp4", "--model", "m.pt", "--modality", "nope"], 2),
    (["config", "--help"], 0),
    (["config", "show", "mae.", "--preset", "tiny"], 0),
    (["config", "show", "nosuch."], 2),
]

SCRIPT = """
import json, sys
HEAVY = {heavy!r}

def heavy_loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)

from typer.testing import CliRunner
from vqmae_cli.main import app

out = [{{"argv": [], "exit_code": 0, "heavy": heavy_loaded(), "output": ""}}]
runner = CliRunner()
for argv in json.loads(sys.argv[1]):
    r = runner.invoke(app, argv)
    out.append({{"argv": argv, "exit_code": r.exit_code, "heavy": heavy_loaded(), "output": r.output[:3000],
                 "exception": None if r.exception is None or isinstance(r.exception, SystemExit)
                 else repr(r.exception)}})
print(json.dumps(out))
"""


def test_cli_help_and_errors_import_no_heavy_modules():
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(heavy=HEAVY), json.dumps([a for a, _ in CASES])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not results[0]["heavy"], f"`from vqmae_cli.main import app` imported {results[0]['heavy']}"
    for (argv, code), r in zip(CASES, results[1:]):
        assert r["argv"] == argv
        assert r["exit_code"] == code, (f"vqmae {' '.join(argv)}: exit {r['exit_code']}, expected {code}; "
                                        f"{r.get('exception')}\n{r['output']}")
        assert not r["heavy"], f"vqmae {' '.join(argv)} imported heavy modules: {r['heavy']}"
        if "nosuch.key=1" in argv:
            assert "unknown config key 'nosuch.key'" in r["output"], r["output"]


def test_predict_modes_match_stage():
    from vqmae_cli.predict import MODES as CLI_MODES
    from vqmae.stages.predict import MODES

    assert CLI_MODES == MODES


def test_refused_commands_leave_no_run_directory(tmp_path, monkeypatch):
    """A command that fails on its arguments (here: no such store) exits 2 and writes nothing."""
    from typer.testing import CliRunner

    from vqmae_cli.main import app

    monkeypatch.chdir(tmp_path)
    for args in (["pretrain", "nosuch.zarr"], ["finetune", "nosuch.zarr", "--from-scratch"],
                 ["tokenize", "nosuch", "--out", "x.zarr"], ["ingest", "nosuch"],
                 ["evaluate", "nosuchrun", "nosuch.zarr"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert not list(tmp_path.iterdir()), (args, list(tmp_path.rglob("*")))


def test_progress_is_printed_as_lines_when_not_on_a_terminal():
    """Under nohup, CI or a log file each phase prints plain lines: start, periodic, done."""
    import io

    from rich.console import Console

    from vqmae_cli.common import RichReporter

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with RichReporter(console, every=0.0) as rep:
        rep.start("pretrain", 4)
        rep.advance("pretrain", 1, loss=5.25)
        rep.advance("pretrain", 1, loss=4.5)
        rep.finish("pretrain")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("pretrain: started 0/4 (0%)")
    assert lines[1].startswith("pretrain: 1/4 (25%) ~") and "loss 5.25" in lines[1]
    assert "2/4 (50%)" in lines[2] and "loss 4.5" in lines[2]
    assert lines[-1].startswith("pretrain: done 4/4 (100%) loss 4.5") and lines[-1].endswith("elapsed")


def test_progress_lines_keep_coming_while_one_step_runs_long():
    """A step longer than the interval still gets a line per interval (a slow step, a loaded
    machine), and none after the phase is done or the reporter closed."""
    import io
    import time

    from rich.console import Console

    from vqmae_cli.common import RichReporter

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with RichReporter(console, every=0.3) as rep:
        rep.start("pretrain", 4)
        rep.advance("pretrain", 1, loss=5.25)
        time.sleep(1.2)  # one long step
        beats = [x for x in out.getvalue().splitlines() if x.startswith("pretrain: 1/4 (25%)")]
        assert len(beats) >= 2 and all("loss 5.25" in x for x in beats)
        rep.finish("pretrain")
    n = len(out.getvalue().splitlines())
    time.sleep(0.5)
    assert len(out.getvalue().splitlines()) == n
