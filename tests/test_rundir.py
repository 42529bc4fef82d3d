"""Run directories: no run overwrites another, one writer at a time, no debris, no silent mismatch."""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyro_kpp import svi
from pyro_kpp.config import Config
from pyro_kpp.inference import bound
from pyro_kpp.train import checkpoint as checkpoint_module
from pyro_kpp.train import rundir
from pyro_kpp.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

from helpers import make_mnist, tiny_cli_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _svi(run, *extra) -> int:
    return svi.main(["--data", "omniglot", "--run-dir", str(run), "--no-progress", *tiny_cli_args(), *extra])


def _resume(run, *extra) -> int:
    return svi.main(["--resume", str(run), "--no-progress", *extra])


def _exit_line(capsys, call) -> str:
    """Run ``call``, expect exit status 2 and one error line, no traceback; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def _temp_files(run):
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


def test_a_fresh_run_refuses_a_folder_holding_a_run_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert _svi(run, "--model", "km", "--slots", "8", "--address-size", "8", "--max-steps", "1") == 0
    km = (run / CHECKPOINT_NAME).read_bytes()
    line = _exit_line(capsys, lambda: _svi(run, "--model", "kpp", "--max-steps", "1"))
    assert "already holds a run" in line and f"--resume {run}" in line and "--overwrite" in line
    assert (run / CHECKPOINT_NAME).read_bytes() == km
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert _svi(run, "--model", "kpp", "--max-steps", "1", "--overwrite") == 0
    assert load_checkpoint(run)["config"]["model"] == "kpp"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "--overwrite" in _exit_line(capsys, lambda: _resume(run, "--max-steps", "2", "--overwrite"))
    assert not (run / rundir.LOCK_NAME).exists()                     # released on every exit


def test_a_second_process_is_locked_out_while_a_run_holds_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert _svi(run, "--max-steps", "1") == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, pathlib; from pyro_kpp.train.rundir import RunLock; "
         "RunLock(pathlib.Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)", str(run)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _exit_line(capsys, lambda: _resume(run, "--max-steps", "2"))
        assert "in use by another training process" in line and f"pid {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)                           # the kernel drops its lock
        holder.wait()
    assert _resume(run, "--max-steps", "2") == 0
    assert load_checkpoint(run)["step"] == 2


def test_default_run_folders_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20240101-000000")
    first = rundir.default_run_dir("omniglot", "kpp", tmp_path)
    second = rundir.default_run_dir("omniglot", "kpp", tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == first.name + "-2"


def test_a_fresh_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(bound, "training_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    line = _exit_line(capsys, lambda: _svi(run, "--max-steps", "5", "--max-nonfinite", "2"))
    assert "2 steps in a row" in line and "No checkpoint was written" in line and "kept" not in line
    assert not run.exists()


def test_stale_checkpoint_temp_file_after_sigkill_mid_write_is_removed_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert _svi(run, "--max-steps", "1") == 0
    stalled_writer = ("import sys, time, torch\nfrom pyro_kpp import svi\n"
                      "def stalled(obj, f, *a, **k):\n"
                      "    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(120)\n"
                      "torch.save = stalled\nsvi.main(sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", stalled_writer, "--resume", str(run), "--max-steps", "2",
                             "--no-progress"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"         # killed inside the checkpoint write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(_temp_files(run)) == 1 and _temp_files(run)[0].startswith(f".{CHECKPOINT_NAME}.")
    capsys.readouterr()
    assert _resume(run, "--max-steps", "2") == 0
    assert "removed 1 temporary file" in capsys.readouterr().err
    assert _temp_files(run) == [] and load_checkpoint(run)["step"] == 2


class FullDisk(io.RawIOBase):
    """A file on a disk that fills up after ``room`` bytes: writes then fail with ENOSPC."""

    def __init__(self, f, room: int):
        super().__init__()
        self.f, self.room, self.written = f, room, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.written + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(b)
        return self.f.write(b)

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


def _fill_disk_after(monkeypatch, room: int) -> None:
    real = os.fdopen
    monkeypatch.setattr(checkpoint_module.os, "fdopen", lambda fd, mode: FullDisk(real(fd, mode), room))


def test_enospc_inside_torchs_writer_is_an_oserror(tmp_path, monkeypatch):
    _fill_disk_after(monkeypatch, 1000)
    with pytest.raises(OSError) as info:                     # torch itself raises RuntimeError("unexpected pos")
        save_checkpoint(tmp_path / CHECKPOINT_NAME, {"model": {"w": torch.zeros(10_000)}})
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_torchs_writer_exits_2_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert _svi(run, "--max-steps", "1") == 0
    good = (run / CHECKPOINT_NAME).read_bytes()
    _fill_disk_after(monkeypatch, 4096)
    line = _exit_line(capsys, lambda: _resume(run, "--max-steps", "2"))
    assert "No space left on device" in line and "previous checkpoint is intact" in line
    assert (run / CHECKPOINT_NAME).read_bytes() == good and _temp_files(run) == []


def test_free_space_check_needs_room_for_one_new_checkpoint_only(tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    assert _svi(run, "--max-steps", "1") == 0
    size = (run / CHECKPOINT_NAME).stat().st_size
    free = size + 2**20 + 2**18              # less than two checkpoints, more than one and the margin
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    assert _resume(run, "--max-steps", "2") == 0


def test_torn_last_metrics_line_is_repaired_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert _svi(run, "--max-steps", "1") == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 0, "step": 2, "train_bo')                  # a crash mid-line
    assert _resume(run, "--max-steps", "2") == 0
    assert "torn last line" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("damage, message", [
    ("not json\n", 'line 1 is not a JSON record'),
    ('{"epoch": 0}\n', 'line 1 has no integer "step"'),
])
def test_damaged_metrics_name_the_file_and_line(tmp_path, capsys, damage, message):
    run = tmp_path / "run"
    assert _svi(run, "--max-steps", "1") == 0
    metrics = run / "metrics.jsonl"
    metrics.write_text(damage + metrics.read_text())
    line = _exit_line(capsys, lambda: _resume(run, "--max-steps", "2"))
    assert str(metrics) in line and message in line


def test_resume_refuses_different_data(tmp_path, capsys):
    make_mnist(tmp_path / "a", n_train=16, n_test=8, seed=0)
    make_mnist(tmp_path / "b", n_train=16, n_test=8, seed=1)
    run = tmp_path / "run"
    assert svi.main(["--data", "mnist", "--data-dir", str(tmp_path / "a"), "--run-dir", str(run), "--no-progress",
                     *tiny_cli_args(), "--max-steps", "1"]) == 0
    assert load_checkpoint(run)["data"]["train"] == 16
    line = _exit_line(capsys, lambda: _resume(run, "--max-steps", "2", "--data-dir", str(tmp_path / "b")))
    assert line.startswith("error: --data-dir:") and "differ from those the checkpoint was trained on" in line
    assert _resume(run, "--max-steps", "2", "--data-dir", str(tmp_path / "a")) == 0


def test_a_config_missing_a_field_is_an_error_not_todays_default():
    saved = Config(model="km", km_read_write="distribution").to_dict()
    del saved["km_read_write"]
    with pytest.raises(ValueError, match=r"config: missing fields \['km_read_write'\]"):
        Config.from_dict(saved)


def test_a_migration_fills_a_field_explicitly(monkeypatch):
    from pyro_kpp import config as config_module

    old = Config(model="km", km_read_write="distribution").to_dict()
    del old["km_read_write"]
    old["version"] = 0
    monkeypatch.setitem(config_module.MIGRATIONS, 0, lambda d: {**d, "km_read_write": "distribution", "version": 1})
    assert Config.from_dict(old).km_read_write == "distribution"
