"""Runs are self-contained and a resume with nothing left to do is an error naming the target."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyro_kpp import svi
from pyro_kpp.train.checkpoint import load_checkpoint
from pyro_kpp.train.resume import check_resume_targets

from helpers import tiny_cli_args, tiny_config


def _train(run_dir, *extra):
    return svi.main(["--data", "omniglot", "--run-dir", str(run_dir), "--no-progress", *tiny_cli_args(), *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run whose data root came from $PYRO_KPP_DATA only."""
    path = tmp_path_factory.mktemp("resume") / "run"
    assert _train(path, "--max-steps", "2") == 0
    return path


def test_config_stores_the_resolved_data_root(run):
    expected = os.path.realpath(os.environ["PYRO_KPP_DATA"])
    assert os.path.realpath(json.loads((run / "config.json").read_text())["data_dir"]) == expected
    assert os.path.realpath(load_checkpoint(run)["config"]["data_dir"]) == expected


def test_resume_works_in_a_shell_without_the_data_variable(run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYRO_KPP_DATA"}
    env["PYRO_KPP_CACHE"] = str(tmp_path / "empty-cache")          # the default root holds no data
    env["PYRO_KPP_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-m", "pyro_kpp.svi", "--resume", str(run), "--max-steps", "3",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(run)["step"] == 3


@pytest.mark.parametrize("changes, state, flag", [
    ({"max_steps": 5}, {"step": 5, "epoch": 0, "train_seconds": 1.0}, "--max-steps"),
    ({"epochs": 2}, {"step": 9, "epoch": 2, "train_seconds": 1.0}, "--epochs"),
    ({"max_minutes": 0.5}, {"step": 9, "epoch": 0, "train_seconds": 31.0}, "--max-minutes"),
])
def test_a_reached_target_is_an_error_naming_it(changes, state, flag):
    with pytest.raises(ValueError, match=f"^{flag}:.*(ask for more|to continue)"):
        check_resume_targets(tiny_config(**changes), state)


def test_a_target_not_yet_reached_lets_the_run_continue():
    check_resume_targets(tiny_config(max_minutes=1.0, max_steps=10), {"step": 5, "epoch": 0, "train_seconds": 59.0})


def test_resume_after_the_minutes_budget_exits_with_the_reason(run, capsys):
    state = load_checkpoint(run)
    minutes = state["train_seconds"] / 60 / 2                        # a budget the run has already used
    with pytest.raises(SystemExit) as stop:
        svi.main(["--resume", str(run), "--max-minutes", f"{minutes:.8f}", "--max-steps", "100", "--no-progress"])
    assert stop.value.code == 2
    assert "--max-minutes: the run has trained" in capsys.readouterr().err


def test_config_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(tmp_path / "bad", "--window", "6")
    assert "error: --window: expected a multiple of 4" in capsys.readouterr().err


def test_newest_run_is_the_last_saved_and_its_absence_is_explained(tmp_path):
    from pyro_kpp.train.rundir import RunDirError, newest_run

    with pytest.raises(RunDirError, match="PYRO_KPP_RUN: no run under"):
        newest_run(tmp_path)
    for i, name in enumerate(("omniglot-kpp-1", "omniglot-kpp-2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(b"x")
        os.utime(tmp_path / name / "checkpoint.pt", (1000 + i, 1000 + i))
    assert newest_run(tmp_path) == tmp_path / "omniglot-kpp-2"
