"""Issue 23, part A: no code from data files, no rollback by a racing resume, bit rot and bad
counters refused by name, ``--overwrite`` deleting only a run's own files, a stale Omniglot
cache rebuilt, and every message about an interrupted run true."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import pyro_kpp
import pyro_kpp.viz.curves
from pyro_kpp import data as D
from pyro_kpp import evaluate as evaluate_cli
from pyro_kpp import svi
from pyro_kpp.train import interrupts
from pyro_kpp.train import loop, session
from pyro_kpp.train import rundir
from pyro_kpp.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from helpers import exit_line, tiny_cli_args



@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the session's tiny run (3 steps, one metrics line), free to damage."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def _rewrite(run, **changes):
    """Save the run's checkpoint again with some entries changed (a checkpoint edited or damaged)."""
    state = load_checkpoint(run)
    state = {k: v for k, v in state.items() if k not in ("format", "format_version")}
    save_checkpoint(run / "checkpoint.pt", {**state, **changes})


# -- 1. CIFAR-10 batches never run code ---------------------------------------------------------

class _Payload:
    """What a crafted data batch smuggles: unpickling it with pickle.load would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _cifar_folder(root, protocol=pickle.DEFAULT_PROTOCOL):
    folder = root / D.sets.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in (*D.sets.CIFAR10_TRAIN_BATCHES, D.sets.CIFAR10_TEST_BATCH):
        entry = {"batch_label": name, "labels": [1, 2], "filenames": ["a.png", "b.png"],
                 "data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batches_load_under_the_restricted_unpickler(tmp_path, protocol):
    _cifar_folder(tmp_path, protocol)
    data = D.load_dataset("cifar10", tmp_path, offline=True)
    assert data.train.shape == (10, 3, 32, 32) and data.test.shape == (2, 3, 32, 32)
    D.clear_memory_cache()


def test_a_cifar_batch_that_would_run_code_is_refused_unrun(tmp_path):
    folder = _cifar_folder(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": _Payload(marker), "labels": []}))
    with pytest.raises(D.DataError, match="data_batch_1.*posix.system.*could run code"):
        D.load_dataset("cifar10", tmp_path, offline=True)
    assert not marker.exists()
    D.clear_memory_cache()


# -- 2. a resume reads the checkpoint under the run's lock --------------------------------------

def test_resume_reads_the_checkpoint_only_while_holding_the_lock(run, monkeypatch, capsys):
    seen = {}

    def probe(location, **kwargs):
        fd = os.open(run / rundir.LOCK_NAME, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen["locked"] = False
        except BlockingIOError:
            seen["locked"] = True
        finally:
            os.close(fd)
        raise ValueError("probe: stop here")

    monkeypatch.setattr(svi, "load_checkpoint", probe)
    assert "probe: stop here" in exit_line(capsys, svi.main, "--resume", str(run), "--max-steps", "9")
    assert seen == {"locked": True}


# -- 3. bit rot is detected at load -------------------------------------------------------------

def _flip_bytes_in_a_tensor(path, n=64):
    """Overwrite ``n`` bytes in the middle of the largest tensor of a checkpoint (as bit rot would)."""
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # a zip local header: 30 fixed bytes ending in the lengths of the name and the extra field
    name_len, extra_len = struct.unpack_from("<HH", raw, member.header_offset + 26)
    start = member.header_offset + 30 + name_len + extra_len + member.file_size // 2 - n // 2
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    path.write_bytes(bytes(raw))


def test_a_checkpoint_with_flipped_bytes_is_refused_everywhere(run, capsys):
    _flip_bytes_in_a_tensor(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=f"{run / 'checkpoint.pt'} is corrupt.*CRC"):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match="CRC"):
        pyro_kpp.load(run)
    assert "CRC" in exit_line(capsys, evaluate_cli.main, str(run), "-S", "2")
    line = exit_line(capsys, svi.main, "--resume", str(run), "--max-steps", "9", "--no-progress")
    assert "CRC" in line and str(run / "checkpoint.pt") in line


# -- 4. counters and config types ---------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"step": -5}, '"step" is -5'),
    ({"epoch": 1.5}, '"epoch" is 1.5'),
    ({"step": 1, "epoch_step": 3}, '"epoch_step" 3 exceeds "step" 1'),
    ({"skipped": (9, 0)}, '"skipped" is'),
    ({"train_seconds": float("nan")}, '"train_seconds" is nan'),
    ({"config": [1, 2]}, '"config" is a list'),
    ({"config": None}, '"config" is a NoneType'),
])
def test_bad_counters_and_config_name_the_file_and_field(run, capsys, changes, message):
    _rewrite(run, **changes)
    with pytest.raises(CheckpointError, match=f"{run / 'checkpoint.pt'}: .*{message}"):
        load_checkpoint(run)
    assert message in exit_line(capsys, svi.main, "--resume", str(run), "--max-steps", "9", "--no-progress")


def test_a_config_field_of_the_wrong_type_is_named(run, capsys):
    _rewrite(run, config={**load_checkpoint(run)["config"], "lr": "0.001"})
    with pytest.raises(CheckpointError, match="\"config\": lr: expected a number, got '0.001'"):
        load_checkpoint(run)
    assert "lr: expected a number" in exit_line(capsys, evaluate_cli.main, str(run), "-S", "2")


# -- 5. --overwrite deletes only a run's own files ------------------------------------------------

def test_overwrite_refuses_a_folder_holding_the_users_files(tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    (folder / "metrics.jsonl").write_text("")
    line = exit_line(capsys, svi.main, "--run-dir", str(folder), "--overwrite", "--max-steps", "1")
    assert "images/holiday.jpg" in line and "nothing was deleted" in line
    assert (folder / "images" / "holiday.jpg").exists() and (folder / "metrics.jsonl").exists()


def test_a_failed_fresh_run_removes_only_its_own_files(tmp_path):
    folder = tmp_path / "run"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "holiday.jpg").write_bytes(b"a photo")
    with pytest.raises(RuntimeError), rundir.claim(folder, fresh=True):
        (folder / "config.json").write_text("{}")
        (folder / "images" / "samples_0000.png").write_bytes(b"png")
        raise RuntimeError("failed before the first checkpoint")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == ["images", "images/holiday.jpg"]


def test_overwrite_replaces_a_folder_of_run_files_by_name(tmp_path):
    folder = tmp_path / "run"
    (folder / "images").mkdir(parents=True)
    for name in ("checkpoint.pt", "metrics.jsonl", "config.json", "images/samples_0003.png",
                 "images/.reconstructions_0001.png.ab12.tmp"):
        (folder / name).write_bytes(b"old")
    rundir.refuse_or_replace(folder, overwrite=True)
    assert list(folder.iterdir()) == []


# -- 6. a replaced Omniglot PNG invalidates the cache -------------------------------------------

def test_a_replaced_omniglot_png_is_decoded_again(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("PYRO_KPP_CACHE", str(tmp_path / "cache"))
    pngs = []
    for s, split in enumerate(("images_background", "images_evaluation")):
        for i in range(3):
            path = tmp_path / "omniglot-py" / split / "Alpha" / "character01" / f"{3 * s + i + 1:04d}_01.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("1", (105, 105), 1).save(path)           # blank white: no ink
            pngs.append(path)
    with pytest.warns(UserWarning, match="holds 6 PNGs"):
        before = D.load_dataset("omniglot", tmp_path, offline=True)
    D.clear_memory_cache()
    Image.new("1", (105, 105), 0).save(pngs[0])                # the same name, now all ink
    os.utime(pngs[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.warns(UserWarning, match="holds 6 PNGs"):
        after = D.load_dataset("omniglot", tmp_path, offline=True)
    D.clear_memory_cache()
    both = lambda d: torch.cat([d.train, d.test])
    assert int(both(before).sum()) == 0 and int(both(after).max()) == 255


# -- metrics records and the curves --------------------------------------------------------------

def test_a_metrics_record_lacking_fields_is_named_on_resume(run, capsys):
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2}) + "\n")
    line = exit_line(capsys, svi.main, "--resume", str(run), "--max-steps", "9", "--no-progress")
    assert 'metrics.jsonl: line 2 has no integer "epoch"' in line


def test_a_failing_plot_never_stops_training(run, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise KeyError("epoch")

    monkeypatch.setattr(pyro_kpp.viz.curves, "save_curves", broken)
    assert svi.main(["--resume", str(run), "--max-steps", "4", "--no-progress"]) == 0
    assert "could not draw" in capsys.readouterr().err
    assert load_checkpoint(run)["step"] == 4


# -- messages about interrupted runs -------------------------------------------------------------

def test_the_resume_command_printed_on_ctrl_c_survives_a_shell(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "my run $HOME"
    real = loop.train_step

    def step_then_ctrl_c(*args, **kwargs):
        line = real(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return line

    monkeypatch.setattr(loop, "train_step", step_then_ctrl_c)
    argv = ["--data", "omniglot", "--run-dir", str(folder), "--no-progress", *tiny_cli_args(), "--max-steps", "5"]
    assert svi.main(argv) == 128 + signal.SIGINT
    command = capsys.readouterr().err.split("Resume with: ")[1].strip()
    assert shlex.split(command)[-2:] == ["--resume", str(folder.resolve())]


def test_a_folder_killed_before_its_first_checkpoint_is_not_offered_for_resume(tmp_path, capsys):
    folder = tmp_path / "run"
    (folder / "images").mkdir(parents=True)
    (folder / "config.json").write_text("{}")                     # what a kill -9 in epoch 0 leaves
    (folder / "images" / "samples_0000.png").write_bytes(b"png")
    line = exit_line(capsys, svi.main, "--run-dir", str(folder), "--max-steps", "1")
    assert "--resume" not in line and "never saved a checkpoint" in line and "--overwrite" in line


def test_a_failed_first_save_does_not_claim_a_previous_checkpoint(tmp_path, monkeypatch, capsys):
    def no_space(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    line = exit_line(capsys, svi.main, "--data", "omniglot", "--run-dir", str(tmp_path / "run"), "--no-progress",
                      *tiny_cli_args(), "--max-steps", "1")
    assert "No space left" in line and "intact" not in line and "no checkpoint of this run" in line


def test_sigterm_during_the_final_evaluation_exits_nonzero_with_a_message(run, monkeypatch, capsys):
    real = session.evaluate_epoch

    def terminated_meanwhile(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "evaluate_epoch", terminated_meanwhile)
    assert svi.main(["--resume", str(run), "--max-steps", "4", "--no-progress"]) == 128 + signal.SIGTERM
    assert "SIGTERM: arrived after the last step" in capsys.readouterr().err
    assert load_checkpoint(run)["step"] == 4


def test_an_unhandled_ctrl_c_in_a_cli_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-X", "utf8", "-m", "pyro_kpp.svi", "--resume", "r"])
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    interrupts.quiet_cli_interrupts()
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err == "pyro_kpp.svi: interrupted (Ctrl-C)\n"
    assert interrupts._cli_module([sys.executable, "script.py", "-m", "pyro_kpp.svi"]) is None


def test_ctrl_c_during_the_imports_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "pyro_kpp.svi", "--help"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)                              # the hook is installed by then; importing torch takes longer
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:
        pytest.skip("the imports finished before the signal arrived (machine too fast for this timing)")
    assert proc.returncode in (128 + signal.SIGINT, -signal.SIGINT)
    assert err == "pyro_kpp.svi: interrupted (Ctrl-C)\n"
