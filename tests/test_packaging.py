"""What `pip install .` puts into site-packages: the library `vqmae` and the command line as
`vqmae_cli` (from the repository's `cli/` folder), never a top-level `cli` package; the wheel's
command runs from the wheel alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vqmae").rglob("__init__.py"))
    assert sorted(cfg["packages"]) == sorted(found + ["vqmae_cli"])
    assert cfg["package-dir"] == {"vqmae_cli": "cli"}


def test_wheel_installs_vqmae_cli_not_cli_and_its_command_runs(tmp_path):
    # from a copy without build outputs: a stale build/ of an older layout would be packed too
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", "runs", ".git", "*.egg-info",
                                                              "__pycache__", "*.zarr", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("vqmae-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "vqmae = vqmae_cli.main:app" in z.read(entry).decode()
        z.extractall(tmp_path / "site")
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"vqmae", "vqmae_cli"}
    assert "vqmae_cli/main.py" in names and "LICENSE" in " ".join(names)
    # The unpacked wheel first on the path, this environment's dependencies after it, no site
    # processing (so no editable install of this checkout), run from elsewhere: what a clean
    # `pip install .` gives.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), sysconfig.get_paths()["purelib"],
                                                        sysconfig.get_paths()["platlib"]])}
    code = ("import importlib.util, vqmae, vqmae_cli\n"
            "assert importlib.util.find_spec('cli') is None, 'a top-level cli package is importable'\n"
            "assert vqmae.__file__.startswith(%r) and vqmae_cli.__file__.startswith(%r)\n"
            "from vqmae_cli.main import app\n"
            "app(['--help'])\n") % (str(tmp_path / "site"), str(tmp_path / "site"))
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tokenize" in run.stdout and "finetune" in run.stdout
