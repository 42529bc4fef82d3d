"""A new user's first hour (issue 24): the quick start's two lines, the run's data root, and what
the CLIs say about precision, time, figures and quick benchmarks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

import pyro_kpp
from pyro_kpp import data as D
from pyro_kpp import plot
from pyro_kpp import svi
from pyro_kpp.config import Config
from pyro_kpp.train import epoch, session
from pyro_kpp.train import speed
from pyro_kpp.viz import curves

from helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
#: What a fresh clone needs to run a test of its own: the package and the test set-up.
CLONE_PARTS = ["pyro_kpp", "models", "guides", "tests/conftest.py", "tests/helpers.py", "pyproject.toml", ".gitignore"]
REAL_DATA_TEST = "def test_real_data(omniglot):\n    assert len(omniglot.test) == 8115\n"


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone's files (no runs, no caches) holding one test that needs real data."""
    root = tmp_path_factory.mktemp("fresh") / "clone"
    for part in CLONE_PARTS:
        src, dst = REPO / part, root / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (root / "tests" / "test_real.py").write_text(REAL_DATA_TEST)
    return root


def fresh_shell(clone: Path, home: Path, **env) -> dict:
    """The environment of a new shell: none of our variables, a home of its own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYRO_KPP_", "XDG_"))}
    return {**base, "HOME": str(home), "PYTHONPATH": str(clone), **env}


def run_pytest(clone: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_real.py"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)


def test_pytest_finds_the_data_root_of_the_quick_start_run(clone, tmp_path):
    """``PYRO_KPP_DATA=/path/to/data python -m pyro_kpp.svi ...`` then ``pytest`` in the same
    shell: the variable was set for svi alone; pytest takes the root from the run's config."""
    run = clone / "runs" / "omniglot-kpp"
    run.mkdir(parents=True)
    recorded = Config(data_dir=str(Path(os.environ["PYRO_KPP_DATA"]).resolve()))   # as svi records it
    (run / "config.json").write_text(json.dumps(recorded.to_dict()))
    # The decoded tensors of this root, so the inner session does not decode Omniglot again.
    env = fresh_shell(clone, tmp_path / "home", PYRO_KPP_CACHE=os.environ["PYRO_KPP_CACHE"])
    done = run_pytest(clone, env)
    shutil.rmtree(clone / "runs")
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_without_data_the_real_data_test_skips_in_one_line_and_writes_nothing_outside(clone, tmp_path):
    home = tmp_path / "home"
    done = run_pytest(clone, fresh_shell(clone, home))
    assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    reason = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(reason) == 1 and "set PYRO_KPP_DATA=" in reason[0], done.stdout[-2000:]
    assert not (clone.parent / "shared").exists(), "no data folder created beside the clone"
    assert not home.exists(), "nothing written into the user's home (cache, data)"


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    """torchvision creates its folders before it fetches; a failure must not leave them under the root."""
    class Offline(torchvision.datasets.MNIST):
        def __init__(self, root, *args, **kwargs):
            (Path(root) / type(self).__name__ / "raw").mkdir(parents=True, exist_ok=True)
            (Path(root) / type(self).__name__ / "raw" / "part.gz").write_bytes(b"x")
            raise OSError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", type("FashionMNIST", (Offline,), {}))
    monkeypatch.setattr(torchvision.datasets, "Omniglot", type("omniglot-py", (Offline,), {}))
    missing = tmp_path / "shared" / "data"                      # the root and its parent do not exist
    with pytest.raises(D.DataError, match="downloading it failed"):
        D.load_dataset("fashion-mnist", missing, offline=False)
    assert not (tmp_path / "shared").exists()
    existing = tmp_path / "data"
    (existing / "mine").mkdir(parents=True)
    with pytest.raises(D.DataError, match="downloading it failed"):
        D.load_dataset("omniglot", existing, offline=False)
    assert sorted(p.name for p in existing.iterdir()) == ["mine"]


def test_episodes_of_a_loaded_run_read_its_data_root(tiny_run, monkeypatch):
    monkeypatch.delenv("PYRO_KPP_DATA")                        # as in a fresh shell: only the run knows
    model = pyro_kpp.load(tiny_run)
    x = next(iter(pyro_kpp.episodes(run=model)))
    assert x.shape == (2, 4, 1, 28, 28)                        # the run's B and T (helpers.TINY)
    assert next(iter(pyro_kpp.episodes(run=tiny_run, T=3, B=1))).shape == (1, 3, 1, 28, 28)
    with pytest.raises(TypeError, match="run:"):
        pyro_kpp.episodes(run=42)


def test_precision_auto_says_which_and_why(monkeypatch):
    monkeypatch.setattr(speed, "bf16_native", lambda device: False)
    message = speed.prepare(torch.nn.Linear(2, 2), "auto", False, torch.device("cpu"))[1]
    assert "float32" in message and "no native bf16" in message and "AVX512-BF16" in message
    monkeypatch.setattr(speed, "bf16_native", lambda device: True)
    assert "bf16" in speed.prepare(torch.nn.Linear(2, 2), "auto", False, torch.device("cpu"))[1]


def test_the_run_bar_clock_stops_during_evaluation(tmp_path, monkeypatch):
    """The bar's elapsed time (and so its rate and ETA) counts training steps, not evaluation."""
    pause, bars = 4.0, []
    evaluate_epoch = session.evaluate_epoch

    def slow_evaluation(*args, **kwargs):
        time.sleep(pause)
        return evaluate_epoch(*args, **kwargs)

    def kept_bar(*args, **kwargs):
        bars.append(run_bar(*args, **kwargs))
        return bars[-1]

    run_bar = session.run_bar
    monkeypatch.setattr(session, "evaluate_epoch", slow_evaluation)
    monkeypatch.setattr(session, "run_bar", kept_bar)
    history = svi.train(tiny_config(max_steps=3), tmp_path / "run", progress=True)
    elapsed = bars[0].format_dict["elapsed"]
    assert elapsed < history[-1]["train_seconds"] + pause / 2, (elapsed, history[-1]["train_seconds"])


def test_plot_of_two_runs_writes_beside_them_over_steps(tiny_run, tmp_path, monkeypatch, capsys):
    runs = [tmp_path / "runs" / name for name in ("a", "b")]
    for run in runs:
        shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock"))
    here = tmp_path / "clone"
    here.mkdir()
    monkeypatch.chdir(here)
    assert plot.main([str(r) for r in runs]) == 0
    out = tmp_path / "runs" / "curves-a-vs-b.png"
    assert out.is_file() and not list(here.iterdir())
    assert str(out) in capsys.readouterr().err
    assert curves.progress_axis(runs) == "step"                  # 3 steps: no "epoch 0.5"
    assert curves.draw(runs).axes[0].get_xlabel() == "step"


def test_quick_benchmark_judges_no_target():
    from pyro_kpp.bench.report import QUICK_VERDICT, table_rows

    target = SimpleNamespace(text="K++ step / DKM step <= 0.5", value=0.8, met=False)
    assert table_rows({}, [target], quick=True)[-1][2] == f"0.800 {QUICK_VERDICT}"
    assert table_rows({}, [target])[-1][2] == "0.800 NOT MET"


def test_epoch_line_shows_both_kl_weights():
    record = {"epoch": 0, "step": 2, "train_objective": 470.0, "train_bound": 450.0, "test_bound": 451.0,
              "memory_gain": 0.0, "train_seconds": 3.0, "kl_scale": 0.002, "key_kl_scale": 0.02}
    assert "(KL x 0.00, keys x 0.02)" in epoch.report(record)


def test_a_memory_of_one_episode_says_episode(model, episode):
    assert "1 episode," in repr(pyro_kpp.write(model, episode[:1]))
    assert "2 episodes," in repr(pyro_kpp.write(model, episode))


def test_a_missing_run_names_the_timestamped_runs_like_it(tiny_run, tmp_path):
    """``evaluate runs/omniglot-kpp`` after a run without --run-dir (runs/omniglot-kpp-<time>)."""
    shutil.copytree(tiny_run, tmp_path / "runs" / "omniglot-kpp-20261203-101010", ignore=shutil.ignore_patterns(".lock"))
    with pytest.raises(ValueError, match="the newest .*omniglot-kpp-20261203-101010.*--run-dir"):
        pyro_kpp.load(tmp_path / "runs" / "omniglot-kpp")
