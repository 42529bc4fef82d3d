"""Training curves and the comparison table on two tiny real runs."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from pyro_kpp import plot
from pyro_kpp import svi

from helpers import tiny_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A run evaluated on the test split with per-step losses, and one on validation episodes."""
    root = tmp_path_factory.mktemp("plot")
    svi.train(tiny_config(max_steps=4, eval_episodes=1), root / "a", progress=False, log_steps=True)
    svi.train(tiny_config(max_steps=2, eval_episodes=1, valid_images=8, seed=1), root / "b", progress=False)
    return [root / "a", root / "b"]


def test_training_writes_curves_and_labelled_grids(two_runs):
    for run in two_runs:
        assert Image.open(run / "curves.png").size[0] > 500
        assert Image.open(run / "images" / "reconstructions_0000.png").size[0] > 100


def test_plot_command_draws_and_compares_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "both.png"
    assert plot.main([str(r) for r in two_runs] + ["--out", str(out)]) == 0
    assert Image.open(out).size[0] > 500
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:3] == ["run", "model", "data"] and len(rows) == 4
    a, b = (row.split() for row in rows[2:])
    last_a = json.loads((two_runs[0] / "metrics.jsonl").read_text().splitlines()[-1])
    assert a[0] == "a" and a[4] == "4" and a[7] == "test" and float(a[9]) == pytest.approx(last_a["test_bound"], abs=0.01)
    assert b[0] == "b" and b[7] == "valid"


def test_plot_refuses_a_folder_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        plot.main([str(tmp_path)])
    assert stop.value.code == 2 and "RUN:" in capsys.readouterr().err


def test_ymax_caps_the_bound_axes_to_the_curves_below_it(two_runs, tmp_path, capsys):
    from pyro_kpp.viz.curves import draw

    fig = draw(two_runs, ymax=1e4)
    low, high = fig.axes[0].get_ylim()
    first = [json.loads(line) for line in (two_runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert high == 1e4 and low <= min(r["test_bound"] for r in first)
    assert fig.axes[2].get_ylim()[1] != 1e4                 # the per-step losses keep their own scale
    assert plot.main([str(two_runs[0]), "--ymax", "1e4", "--out", str(tmp_path / "c.png")]) == 0
    with pytest.raises(SystemExit) as stop:
        plot.main([str(two_runs[0]), "--ymax", "nan"])
    assert stop.value.code == 2 and "--ymax: expected a finite number" in capsys.readouterr().err
