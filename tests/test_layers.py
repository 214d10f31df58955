"""The package is a stack of floors (docs/architecture.md): a module imports only its own floor or
the ones below, no two modules import each other (directly or round a circle), and a stage never
imports another stage. Every import counts, including those inside functions and under
TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module belongs to the floor of its longest listed prefix
FLOORS = [
    ["vqmae", "vqmae.config", "vqmae.utils", "vqmae.isolate", "vqmae.metrics"],
    ["vqmae.audio", "vqmae.prosody", "vqmae.expression", "vqmae.media", "vqmae.faces", "vqmae.framepool", "vqmae.plots",
     "vqmae.datasets", "vqmae.folds", "vqmae.demo"],
    ["vqmae.store", "vqmae.models"],
    ["vqmae.checkpoint", "vqmae.ingest", "vqmae.windows", "vqmae.training", "vqmae.tasks",
     "vqmae.encoding", "vqmae.noise", "vqmae.recon"],
    ["vqmae.stages"],
    ["vqmae.stages.export"],  # an export is a Predictor written to files: it stands on stages.predict
    ["vqmae_cli"],  # the cli/ folder, installed as vqmae_cli
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "cli":
        parts[0] = "vqmae_cli"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [p for top in ("vqmae", "cli") for p in (ROOT / top).rglob("*.py")]
    return {module_name(p): p for p in files}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import vqmae.models.mae as m` → vqmae.models.mae
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def floor(name: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    if level is None:
        raise AssertionError(f"{name} is on no floor: add it to FLOORS and docs/architecture.md")
    return level


def stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["vqmae", "stages"] else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def test_every_module_has_a_floor(graph):
    for name in graph:
        floor(name)


def test_no_import_from_a_higher_floor(graph):
    upward = [f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
              for a, deps in sorted(graph.items()) for b in sorted(deps) if floor(b) > floor(a)]
    assert not upward, "\n".join(upward)


def test_no_stage_imports_another_stage(graph):
    cross = [f"{a} imports {b}" for a, deps in sorted(graph.items()) for b in sorted(deps)
             if stage_of(a) and stage_of(b) and stage_of(a) != stage_of(b) and floor(a) == floor(b)]
    assert not cross, "\n".join(cross)


def test_no_import_cycle(graph):
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_check_sees_function_level_imports(tmp_path):
    """The parser counts an import inside a function body (how cycles used to be hidden)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from vqmae.stages.pretrain import pretrain\n")
    assert imports_of("vqmae.audio", f, {"vqmae.stages.pretrain", "vqmae.audio"}) == {"vqmae.stages.pretrain"}


def test_no_module_over_500_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in project_modules().items()}
    over = {n: k for n, k in long.items() if k > 500}
    assert not over, f"modules over 500 lines: {over}"
