"""The notebooks in notebooks/: stored without outputs as valid nbformat 4, and the walkthrough run
headlessly (its code cells in order, in one namespace, matplotlib on Agg) so it cannot rot.

Jupyter is not a dependency, so the nbformat 4 structure is checked here by hand and the cells are
run with `exec`: the walkthrough's code must be plain Python (no `%magics`, no `!shell` lines).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
WALKTHROUGH = ROOT / "notebooks" / "walkthrough.ipynb"
CELL_ID = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")
CELL_TYPES = {"code", "markdown", "raw"}
# cell metadata that records an execution (JupyterLab's "record timing", the ExecuteTime extension)
RUN_METADATA = {"execution", "ExecuteTime"}
STRIP = "strip it with `jupyter nbconvert --clear-output --inplace <notebook>`"
STRIP_METADATA = ("strip it with `jupyter nbconvert --clear-output --ClearMetadataPreprocessor.enabled=True "
                  "--inplace <notebook>`")


def notebook_problems(nb) -> list[str]:
    """What keeps `nb` (parsed JSON) from being a valid, output-free nbformat 4 notebook."""
    if not isinstance(nb, dict):
        return [f"top level is {type(nb).__name__}, not an object"]
    problems = []
    if nb.get("nbformat") != 4:
        problems.append(f"nbformat is {nb.get('nbformat')!r}, expected 4")
    minor = nb.get("nbformat_minor")
    if not isinstance(minor, int) or minor < 0:
        problems.append(f"nbformat_minor is {minor!r}, expected a non-negative int")
    if not isinstance(nb.get("metadata"), dict):
        problems.append("metadata is missing or not an object")
    cells = nb.get("cells")
    if not isinstance(cells, list):
        return problems + ["cells is missing or not a list"]
    ids = set()
    for i, cell in enumerate(cells):
        problems += [f"cell {i}: {p}" for p in _cell_problems(cell, minor, ids)]
    return problems


def _cell_problems(cell, minor, ids: set) -> list[str]:
    if not isinstance(cell, dict):
        return [f"is {type(cell).__name__}, not an object"]
    kind = cell.get("cell_type")
    if kind not in CELL_TYPES:
        return [f"cell_type {kind!r}, expected one of {sorted(CELL_TYPES)}"]
    problems = []
    source = cell.get("source")
    if not (isinstance(source, str) or isinstance(source, list) and all(isinstance(s, str) for s in source)):
        problems.append("source is not a string or a list of strings")
    if not isinstance(cell.get("metadata"), dict):
        problems.append("metadata is missing or not an object")
    elif RUN_METADATA & set(cell["metadata"]):
        problems.append(f"execution metadata {sorted(RUN_METADATA & set(cell['metadata']))} left in; "
                        f"{STRIP_METADATA}")
    if isinstance(minor, int) and minor >= 5:
        cid = cell.get("id")
        if not isinstance(cid, str) or not CELL_ID.match(cid):
            problems.append(f"id {cid!r} is not 1-64 letters, digits, '-' or '_' (nbformat 4.5)")
        elif cid in ids:
            problems.append(f"id {cid!r} is used twice")
        ids.add(cid)
    if kind == "code":
        if cell.get("outputs") != []:
            problems.append(f"has outputs; {STRIP}")
        if cell.get("execution_count", "missing") is not None:
            problems.append(f"execution_count is {cell.get('execution_count', 'missing')!r}, expected null; {STRIP}")
    elif "outputs" in cell or "execution_count" in cell:
        problems.append(f"a {kind} cell has outputs or an execution_count")
    return problems


def check_notebook(path: Path) -> dict:
    """The parsed notebook; AssertionError naming the file and every problem otherwise."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AssertionError(f"{path}: not JSON ({e})") from None
    problems = notebook_problems(nb)
    assert not problems, f"{path}: " + "; ".join(problems)
    return nb


def cell_source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def code_cells(nb: dict) -> list[tuple[int, str]]:
    return [(i, cell_source(c)) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


# ----------------------------------------------------------------------------------------------
# structure


def test_walkthrough_is_in_the_checked_set():
    assert WALKTHROUGH in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_valid_nbformat4_without_outputs(path):
    nb = check_notebook(path)
    assert code_cells(nb), f"{path}: no code cell"
    for i, src in code_cells(nb):
        try:
            compile(src, f"{path.name}:cell{i}", "exec")
        except SyntaxError as e:  # also catches %magics and !shell lines, which exec cannot run
            raise AssertionError(f"{path}: cell {i} is not plain Python: {e}") from None


def _write(tmp_path, nb) -> Path:
    path = tmp_path / "bad.ipynb"
    path.write_text(json.dumps(nb))
    return path


def _good() -> dict:
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "markdown", "id": "a", "metadata": {}, "source": "# t"},
        {"cell_type": "code", "id": "b", "metadata": {}, "source": ["x = 1\n", "y = 2"],
         "execution_count": None, "outputs": []}]}


@pytest.mark.parametrize("damage, reason", [
    (lambda nb: nb["cells"][1].update(outputs=[{"output_type": "stream", "name": "stdout", "text": "1"}]),
     r"cell 1: has outputs; strip it with `jupyter nbconvert --clear-output"),
    (lambda nb: nb["cells"][1].update(execution_count=3), r"cell 1: execution_count is 3, expected null"),
    (lambda nb: nb["cells"][1].pop("execution_count"), r"cell 1: execution_count is 'missing'"),
    (lambda nb: nb["cells"][1]["metadata"].update(execution={"iopub.execute_input": "t"}),
     r"cell 1: execution metadata \['execution'\] left in; strip it with .*ClearMetadataPreprocessor"),
    (lambda nb: nb["cells"][1].update(id="a"), r"cell 1: id 'a' is used twice"),
    (lambda nb: nb["cells"][0].pop("id"), r"cell 0: id None is not 1-64 letters"),
    (lambda nb: nb["cells"][0].update(cell_type="heading"), r"cell 0: cell_type 'heading'"),
    (lambda nb: nb["cells"][0].update(source=[1]), r"cell 0: source is not a string or a list"),
    (lambda nb: nb["cells"][0].update(outputs=[]), r"cell 0: a markdown cell has outputs"),
    (lambda nb: nb.update(nbformat=3), r"nbformat is 3, expected 4"),
    (lambda nb: nb.pop("cells"), r"cells is missing or not a list"),
])
def test_checker_names_the_file_and_the_reason(tmp_path, damage, reason):
    nb = _good()
    check_notebook(_write(tmp_path, nb))
    damage(nb)
    path = _write(tmp_path, nb)
    with pytest.raises(AssertionError, match=re.escape(str(path)) + ": .*" + reason):
        check_notebook(path)


def test_checker_refuses_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "half.ipynb"
    path.write_text('{"cells": [')
    with pytest.raises(AssertionError, match=re.escape(str(path)) + r": not JSON"):
        check_notebook(path)


# ----------------------------------------------------------------------------------------------
# execution


class Shown:
    """Stands in for `plt.show`: renders every open figure (as the inline backend would) and keeps
    a description of each, so the test sees what the notebook displayed."""

    def __init__(self, plt):
        self.plt = plt
        self.figures: list[dict] = []

    def __call__(self, *args, **kwargs):
        for num in self.plt.get_fignums():
            fig = self.plt.figure(num)
            fig.canvas.draw()
            self.figures.append({
                "titles": [ax.get_title() for ax in fig.axes],
                "drawn": [bool(ax.images or ax.lines or ax.patches or ax.collections) for ax in fig.axes]})
            self.plt.close(fig)  # as the inline backend does: a shown figure is not shown again


def run_notebook(path: Path, env: dict[str, str], monkeypatch) -> tuple[dict, Shown]:
    """Exec the code cells of `path` in order in one namespace; a failure names the cell."""
    import matplotlib.pyplot as plt

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plt.close("all")  # figures other tests left open are not the notebook's
    shown = Shown(plt)
    monkeypatch.setattr(plt, "show", shown)
    ns: dict = {"__name__": "__main__"}
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the CLI's setup_logging replaces them
    try:
        for i, src in code_cells(check_notebook(path)):
            try:
                exec(compile(src, f"{path.name}:cell{i}", "exec"), ns)
            except Exception as e:
                raise AssertionError(f"{path}: cell {i} ({src.splitlines()[0]!r}) failed: "
                                     f"{type(e).__name__}: {e}") from e
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        plt.close("all")
    return ns, shown


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_walkthrough_builds_a_miniature_pipeline_then_reads_it_without_retraining(tmp_path, monkeypatch):
    """First run: no demo artifacts, so the notebook builds the miniature pipeline and walks through
    it. Second run: pointed at those artifacts, it only reads them (no file changes)."""
    matplotlib.use("Agg")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the notebook's scratch dirs land here
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    ns, shown = run_notebook(WALKTHROUGH, {"VQMAE_DEMO": str(tmp_path / "no-demo"),
                                           "VQMAE_RUN": str(tmp_path / "no-run"),
                                           "MPLBACKEND": "Agg"}, monkeypatch)
    assert ns["BUILT"] is True and ns["DEMO"].is_relative_to(tmp_path)
    assert not list(work.iterdir())  # nothing written into the working directory
    # sections 1-6: clip, usage, codes, 2 stage-1 + 2 stage-2 + 2 reconstruct panels, curves,
    # 5 confusion matrices (pretrained, probe, scratch, tokens, egemaps), label efficiency, timeline
    assert len(shown.figures) == 17, [f["titles"] for f in shown.figures]
    assert all(f["drawn"] and all(f["drawn"]) for f in shown.figures), shown.figures
    pred, truth = ns["pred"], ns["truth"]
    assert pred.top in pred.names and truth in pred.names
    assert str(ns["store"].clips["speaker"][ns["row"]]) in ns["fold"]["test_speakers"]

    demo, run = ns["DEMO"], ns["RUN"]
    before = _snapshot(demo)
    again, shown_again = run_notebook(WALKTHROUGH, {"VQMAE_DEMO": str(demo), "VQMAE_RUN": str(run)},
                                      monkeypatch)
    assert again["BUILT"] is False and again["RUN"] == run
    assert _snapshot(demo) == before  # read, not retrained or rewritten
    assert len(shown_again.figures) == len(shown.figures)
    assert again["pred"].top == pred.top
    assert list(again["pred"].scores) == pytest.approx(list(pred.scores), abs=1e-6)
