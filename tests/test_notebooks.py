"""The notebooks are committed with the outputs of a real run and run top to bottom against a tiny trained run."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# notebook -> how many figures it must draw
FIGURES = {"posterior_inspection.ipynb": 6, "generation.ipynb": 12}


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_is_committed_with_outputs(name):
    """Committed after a run top to bottom against a real run (README "Memory use", runs/W-blur2),
    so a code host previews them: every code cell executed, in order, no error, no warning on
    stderr, and the figures drawn."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= FIGURES[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_top_to_bottom(name, tiny_run, monkeypatch):
    monkeypatch.setenv("PYRO_KPP_RUN", str(tiny_run))
    monkeypatch.setenv("PYRO_KPP_SAMPLES", "50")   # guide draws per image (posterior inspection)
    monkeypatch.setenv("PYRO_KPP_STEPS", "2")      # iterative-reading steps (generation)
    # Non-interactive, and unlike Agg it puts each figure in the cell's outputs (counted below).
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # jupyter_client starts the "python3" kernel with this interpreter (sys.executable).
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    outputs = [o for c in _code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= FIGURES[name]
