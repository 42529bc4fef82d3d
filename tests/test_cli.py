"""The training and evaluation CLIs end to end on real Omniglot with a tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pyro_kpp import evaluate as evaluate_cli
from pyro_kpp import svi
from pyro_kpp.train.checkpoint import load_checkpoint

from helpers import tiny_cli_args


def _train(run_dir, *extra):
    assert svi.main(["--data", "omniglot", "--run-dir", str(run_dir), "--no-progress",
                     *tiny_cli_args(), *extra]) == 0


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_everything_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, "--max-steps", "3")
    assert {p.name for p in run.iterdir()} >= {"checkpoint.pt", "metrics.jsonl", "config.json", "images"}
    assert {p.name for p in (run / "images").iterdir()} == {"reconstructions_0000.png", "samples_0000.png"}
    (record,) = _metrics(run)
    assert record["step"] == 3 and record["epoch"] == 0 and not record["epoch_complete"]
    assert record["test_images"] == 2 * 4 and 0 < record["test_bound"] < 28 * 28 * 2
    state = load_checkpoint(run)
    assert state["step"] == 3 and state["epoch_step"] == 3
    assert state["config"]["memory_shape"] == (3, 16, 16)

    assert svi.main(["--resume", str(run), "--max-steps", "5", "--no-progress"]) == 0
    records = _metrics(run)
    assert [r["step"] for r in records] == [3, 5]
    assert load_checkpoint(run)["step"] == 5

    capsys.readouterr()
    assert evaluate_cli.main([str(run), "--samples", "3", "--episodes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 3 and result["test_images"] == 8
    assert result["test_iw_bound"] <= result["test_bound"] + 1e-3


def test_resumed_run_is_identical_to_an_uninterrupted_one(tmp_path):
    _train(tmp_path / "straight", "--max-steps", "4")
    _train(tmp_path / "split", "--max-steps", "2")
    # Checking every step (Pyro's validation) may be switched on when resuming; it changes no number.
    assert svi.main(["--resume", str(tmp_path / "split"), "--max-steps", "4", "--no-progress",
                     "--validate-every-step"]) == 0
    assert load_checkpoint(tmp_path / "split")["config"]["validate_every_step"] is True
    a = load_checkpoint(tmp_path / "straight")["model"]
    b = load_checkpoint(tmp_path / "split")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(tmp_path / "straight")[-1]["test_bound"] == _metrics(tmp_path / "split")[-1]["test_bound"]


def test_resume_refuses_options_that_change_the_model(tmp_path, capsys):
    _train(tmp_path / "run", "--max-steps", "1")
    with pytest.raises(SystemExit) as exit_info:
        svi.main(["--resume", str(tmp_path / "run"), "--code-size", "16"])
    assert exit_info.value.code == 2
    assert "code_size" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "cifar100"], "invalid choice"),
    (["--memory-shape", "3,64"], "C,H,W"),
    (["--window", "6"], "window: expected a multiple of 4"),
    (["--window", "128"], "larger than the memory"),
    (["--episode-length", "0"], "--episode-length: expected a positive integer"),
])
def test_bad_options_are_clear_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        svi.main([*argv, "--run-dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_offline_names_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYRO_KPP_OFFLINE", "1")
    empty = tmp_path / "no-data"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        svi.main(["--data", "omniglot", "--data-dir", str(empty), "--run-dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert str(empty) in capsys.readouterr().err


def test_module_entry_points_run(tmp_path):
    """`python -m pyro_kpp.svi` and `python -m pyro_kpp.evaluate` as a user runs them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pyro_kpp.svi", "--data", "omniglot", "--run-dir", str(run),
           "--max-steps", "2", *tiny_cli_args()]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == 2
    out = subprocess.run([sys.executable, "-m", "pyro_kpp.evaluate", str(run), "-S", "2", "--episodes", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "test conditional bound (-ELBO):" in out.stdout and "nats/image" in out.stdout


def test_options_are_generated_from_the_config():
    """Every option comes from a Config field's metadata: its flags, type and the default in its help;
    an option not given is absent, so the config's default (or a resumed run's value) applies."""
    parser = svi.build_parser()
    text = " ".join(parser.format_help().split())
    assert "-T EPISODE_LENGTH, --episode-length EPISODE_LENGTH images per episode T" in text
    assert "(default: 32)" in text and "(default: 3,64,64)" in text and "(default: by preset: cpu 256, paper 512)" in text
    args = parser.parse_args(["-T", "5", "--memory-shape", "3,32,32", "--validate-every-step", "--lr", "0.01"])
    assert vars(args) == {"episode_length": 5, "memory_shape": (3, 32, 32), "validate_every_step": True, "lr": 0.01}
    cfg = svi.config_from_args(args, None)
    assert (cfg.episode_length, cfg.memory_shape, cfg.batch_size) == (5, (3, 32, 32), 8)
