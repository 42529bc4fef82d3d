"""docs/api.md agrees with the docstrings and signatures; LICENSE and CITATION.cff are present."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pyro_kpp

REPO = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"^## `([\w.]+)(\(.*\).*)`$", re.M)


def _resolve(dotted: str):
    """The function documented as ``dotted``; ``pyro_kpp.data.episodes`` is the callable module's function."""
    module, _, name = dotted.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    return obj.load_episodes if inspect.ismodule(obj) else obj


def test_api_page_matches_signatures_and_docstrings():
    text = (REPO / "docs" / "api.md").read_text()
    entries = ENTRY.findall(text)
    assert len(entries) >= 8
    for dotted, signature in entries:
        func = _resolve(dotted)
        assert signature == str(inspect.signature(func)), f"docs/api.md: {dotted} has a stale signature"
        assert inspect.getdoc(func).split("\n\n")[0] in text, f"docs/api.md: {dotted} has a stale description"


def test_every_public_function_is_documented():
    documented = {dotted for dotted, _ in ENTRY.findall((REPO / "docs" / "api.md").read_text())}
    public = {f"pyro_kpp.{name}" for name in pyro_kpp.__all__
              if callable(getattr(pyro_kpp, name)) and not inspect.isclass(getattr(pyro_kpp, name))}
    assert public <= documented, f"undocumented: {sorted(public - documented)}"


def test_license_and_citation_name_the_project_and_both_papers():
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    citation = (REPO / "CITATION.cff").read_text()
    assert "Kanerva++" in citation and "The Kanerva Machine" in citation and "Ramapuram" in citation
