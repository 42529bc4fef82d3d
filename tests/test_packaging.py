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
