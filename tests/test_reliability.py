"""Faults and interruptions lose nothing; resumption is exact (bit for bit on the CPU)."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyro
import pytest
import torch

from pyro_kpp import svi
from pyro_kpp.inference import bound
from pyro_kpp.inference.bound import image_bounds, make_elbo, training_loss
from pyro_kpp.models import MODELS, build_model
from pyro_kpp.train.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_checkpoint

from helpers import make_mnist, tiny_cli_args, tiny_config

# A synthetic MNIST of 256 training images: 16 steps per epoch of 4 episodes of 4 images, so a
# whole 12-epoch run takes seconds and a signal at a random time lands mid-run.
EPOCHS = ["--epochs", "12", "--kl-warmup", "50"]
TIMING = {"train_seconds", "train_seconds_total", "wall_seconds"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    make_mnist(root, n_train=256, n_test=32)
    return root


def _args(run_dir, data_dir, *extra):
    return ["--data", "mnist", "--data-dir", str(data_dir), "--run-dir", str(run_dir), "--no-progress",
            *tiny_cli_args(batch_size=4), *EPOCHS, *extra]


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _assert_same_run(a, b):
    assert _records(a) == _records(b)
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["step"] == sb["step"]
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, small_data):
    """The uninterrupted reference run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert svi.main(_args(run, small_data)) == 0
    return run


def _start(run_dir, data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pyro_kpp.svi", *_args(run_dir, data_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, run_dir, timeout=240):
    deadline = time.time() + timeout
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "no checkpoint written in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_ends_like_an_uninterrupted_run(straight_run, small_data, tmp_path):
    run = tmp_path / "killed"
    proc = _start(run, small_data)
    _wait_for_checkpoint(proc, run)                       # past epoch 0: a resumable state exists
    time.sleep(random.uniform(0.0, 1.0))                  # a random later point (or checkpoint write)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine too fast for this timing)")
    assert proc.returncode == -signal.SIGKILL
    # A kill between mkstemp and the write may leave an empty temp file of ours; the resume removes it.
    assert svi.main(["--resume", str(run), "--no-progress"]) == 0
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    _assert_same_run(straight_run, run)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(straight_run, small_data, tmp_path):
    run = tmp_path / "terminated"
    proc = _start(run, small_data)
    _wait_for_checkpoint(proc, run)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine too fast for this timing)")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopped at step" in err and "Traceback" not in err
    assert load_checkpoint(run)["step"] > 16
    assert svi.main(["--resume", str(run), "--no-progress"]) == 0
    _assert_same_run(straight_run, run)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    real = bound.training_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(bound, "training_loss", sometimes_nan)
    run = tmp_path / "run"
    assert svi.main(["--data", "omniglot", "--run-dir", str(run), "--no-progress", *tiny_cli_args(),
                     "--max-steps", "6"]) == 0
    (record,) = _records(run)
    assert record["skipped_steps"] == 2 and record["step"] == 6
    state = load_checkpoint(run)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_too_many_nonfinite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert svi.main(["--data", "omniglot", "--run-dir", str(run), "--no-progress", *tiny_cli_args(),
                     "--max-steps", "2"]) == 0
    good = load_checkpoint(run)
    real = bound.training_loss
    monkeypatch.setattr(bound, "training_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(SystemExit) as exit_info:
        svi.main(["--resume", str(run), "--max-steps", "20", "--max-nonfinite", "3", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "3 steps in a row" in err and "last good checkpoint is kept" in err
    after = load_checkpoint(run)
    assert after["step"] == good["step"] == 2
    assert all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])


def test_unwritable_run_directory_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_info:
        svi.main(["--data", "omniglot", "--run-dir", str(blocker / "run"), *tiny_cli_args(), "--max-steps", "1"])
    assert exit_info.value.code == 2
    assert "run directory" in capsys.readouterr().err


def test_full_disk_fails_before_training(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(SystemExit):
        svi.main(["--data", "omniglot", "--run-dir", str(tmp_path / "run"), *tiny_cli_args(), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert "MiB free" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert svi.main(["--data", "omniglot", "--run-dir", str(run), "--no-progress", *tiny_cli_args(),
                     "--max-steps", "2"]) == 0
    good = (run / "checkpoint.pt").read_bytes()

    def no_space(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(SystemExit):
        svi.main(["--resume", str(run), "--max-steps", "4", "--no-progress"])
    assert "No space left on device" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == good
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoint")) == []


def test_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    run = tmp_path / "run"
    assert svi.main(["--data", "omniglot", "--run-dir", str(run), "--no-progress", *tiny_cli_args(),
                     "--max-steps", "1"]) == 0
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(run)
    torch.save({"weights": 1}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a pyro_kpp checkpoint"):
        load_checkpoint(run)


class _Payload:
    """Stands for what a malicious checkpoint would smuggle: unpickling it calls ``os.system``."""

    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.devnull,))


@pytest.mark.parametrize("payload", [os.system, _Payload()])
def test_a_checkpoint_smuggling_code_is_refused_unopened(tmp_path, payload):
    """Checkpoints load with weights_only=True: a pickled callable is an error, never a call."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": {}, "model": {}, "step": 0,
             "hook": payload}
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="objects other than tensors and plain data"):
        load_checkpoint(tmp_path)


def test_resume_targets_must_leave_work_to_do(tmp_path, capsys):
    run = tmp_path / "run"
    assert svi.main(["--data", "omniglot", "--run-dir", str(run), "--no-progress", *tiny_cli_args(),
                     "--max-steps", "3"]) == 0
    with pytest.raises(SystemExit):
        svi.main(["--resume", str(run), "--max-steps", "2"])
    assert "already at step 3" in capsys.readouterr().err


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_bounds_stay_finite_for_extreme_images(model_name):
    """All-zero and all-one episodes (blank and saturated images) give finite bounds and gradients."""
    pyro.set_rng_seed(0)
    model = build_model(tiny_config(model=model_name, slots=8, address_size=8))
    for value in (0.0, 1.0):
        x = torch.full((2, 4, 1, 28, 28), value)
        b = image_bounds(model, x, samples=3)
        assert torch.isfinite(b["elbo"]).all() and torch.isfinite(b["iw"]).all()
        loss = training_loss(model, x, make_elbo("trace"))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
