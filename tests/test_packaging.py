"""The wheel holds every subpackage (pyproject's explicit package list)."""
from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_in_the_package_list():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    root = REPO / "pyro_kpp"
    found = {".".join(("pyro_kpp", *init.parent.relative_to(root).parts)) for init in root.rglob("__init__.py")}
    found |= {f"pyro_kpp.{top}" for top in ("models", "guides")}          # installed under the package
    assert found <= listed, f"missing from pyproject's packages: {sorted(found - listed)}"



def test_every_console_script_is_a_cli_main():
    """Each [project.scripts] entry names a CLI module's ``main`` (what ``python -m`` runs), and
    every CLI the README names has one."""
    import importlib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    modules = {target.split(":")[0] for target in scripts.values()}
    assert modules == {f"pyro_kpp.{name}" for name in ("svi", "evaluate", "denoise", "generation", "plot")} | {
        "pyro_kpp.bench.__main__"}
    for name, target in scripts.items():
        module, attr = target.split(":")
        assert attr == "main" and callable(getattr(importlib.import_module(module), attr)), name

@pytest.mark.slow
def test_the_built_wheel_holds_every_module(tmp_path):
    """Build the wheel from a copy of the tracked files (symlinks kept) and list it: every module of
    the package, the design card's models/ and guides/ under pyro_kpp, no other top-level name."""
    import shutil
    import subprocess
    import sys
    import zipfile

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in tracked:
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            target.symlink_to(Path((REPO / name).readlink()))
        else:
            shutil.copy2(REPO / name, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("pyro_kpp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"pyro_kpp/{p.relative_to(REPO / 'pyro_kpp')}" for p in (REPO / "pyro_kpp").glob("*.py")}
    for sub in ("bench", "generation"):
        expected |= {f"pyro_kpp/{sub}/{p.name}" for p in (REPO / "pyro_kpp" / sub).glob("*.py")}
    for top in ("models", "guides"):
        expected |= {f"pyro_kpp/{top}/{p.name}" for p in (REPO / top).glob("*.py")}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert {n.split("/")[0] for n in names} <= {"pyro_kpp", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
