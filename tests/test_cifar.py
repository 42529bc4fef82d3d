"""The CIFAR-10 path: loading torchvision's on-disk layout, and svi + evaluate end to end.

CIFAR-10 is not on this machine, so the tests write a small synthetic stand-in in torchvision's
layout: ``cifar-10-batches-py/`` with pickled ``data_batch_1..5``, ``test_batch`` and
``batches.meta``. torchvision's ``CIFAR10(download=False)`` checks every batch's MD5 against the
official files, so it refuses the stand-in; pyro_kpp reads the batches itself, and one test
checks that it reads them exactly as torchvision does (with torchvision's MD5 check bypassed).
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from helpers import tiny_cli_args

import pyro_kpp
from pyro_kpp import data as D
from pyro_kpp import evaluate as evaluate_cli
from pyro_kpp import svi
from pyro_kpp.data.episodes import make_episodes


def make_cifar10(root: Path, per_batch: int = 8, n_test: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """A CIFAR-10 stand-in in torchvision's layout; returns the images (N, 3, 32, 32) per split."""
    rng = np.random.default_rng(seed)
    folder = root / D.sets.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    train = []
    for i, name in enumerate([*D.sets.CIFAR10_TRAIN_BATCHES, D.sets.CIFAR10_TEST_BATCH]):
        n = n_test if name == D.sets.CIFAR10_TEST_BATCH else per_batch
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        entry = {"batch_label": f"batch {i}", "labels": rng.integers(0, 10, size=n).tolist(),
                 "data": images.reshape(n, 3 * 32 * 32), "filenames": [f"img_{i}_{j}.png" for j in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
        if name != D.sets.CIFAR10_TEST_BATCH:
            train.append(images)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {"train": np.concatenate(train), "test": images}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never download in these tests; forget memoised stand-ins afterwards."""
    monkeypatch.setenv("PYRO_KPP_OFFLINE", "1")
    yield
    D.clear_memory_cache()


def test_loader_reads_torchvision_layout(tmp_path, monkeypatch):
    arrays = make_cifar10(tmp_path)
    data = D.load_dataset("cifar10", tmp_path)
    assert data.image_shape == (3, 32, 32) and len(data.train) == 40 and len(data.test) == 16
    assert torch.equal(data.train, torch.from_numpy(arrays["train"]))
    assert torch.equal(data.test, torch.from_numpy(arrays["test"]))
    assert data.train_labels.dtype == torch.int64 and data.train_labels.shape == (40,)
    # torchvision refuses the stand-in (MD5s) ...
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        tvd.CIFAR10(str(tmp_path), train=True, download=False)
    # ... and, with its integrity checks bypassed, reads the same images and labels.
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    for split, train in (("train", True), ("test", False)):
        ds = tvd.CIFAR10(str(tmp_path), train=train, download=False)
        assert torch.equal(getattr(data, split), torch.from_numpy(ds.data).permute(0, 3, 1, 2))
        assert getattr(data, f"{split}_labels").tolist() == ds.targets


def test_missing_cifar10_offline_names_the_folder(tmp_path):
    with pytest.raises(D.DataError, match="cifar-10-batches-py") as err:
        D.load_dataset("cifar10", tmp_path)
    assert "offline" in str(err.value) and "data_batch_1" in str(err.value)


def test_damaged_batch_is_a_data_error(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / D.sets.CIFAR10_FOLDER / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(D.DataError, match="data_batch_3"):
        D.load_dataset("cifar10", tmp_path)
    D.clear_memory_cache()
    bad = {"data": np.zeros((4, 100), dtype=np.uint8), "labels": [0] * 4}
    (tmp_path / D.sets.CIFAR10_FOLDER / "data_batch_3").write_bytes(pickle.dumps(bad))
    with pytest.raises(D.DataError, match="expected a pickled dict"):
        D.load_dataset("cifar10", tmp_path)


def test_svi_then_evaluate_end_to_end(tmp_path, capsys):
    make_cifar10(tmp_path / "data")
    run = tmp_path / "run"
    argv = ["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--max-steps", "2", "--no-progress",
            "--run-dir", str(run), *tiny_cli_args()]
    assert svi.main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["likelihood"] == "dmol" and tuple(config["image_shape"]) == (3, 32, 32)   # default by data set
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and math.isfinite(record["test_bound"])
    dims = 3 * 32 * 32                                               # sub-pixels per image
    assert record["test_bits_per_dim"] == pytest.approx(record["test_bound"] / (dims * math.log(2)))
    assert record["train_bits_per_dim"] == pytest.approx(record["train_bound"] / (dims * math.log(2)))
    assert (run / "images" / "samples_0000.png").is_file()
    capsys.readouterr()

    assert evaluate_cli.main([str(run), "--samples", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["likelihood"] == "dmol" and result["test_images"] == 16
    assert result["test_bits_per_dim"] == pytest.approx(result["test_bound"] / (dims * math.log(2)))
    assert result["test_iw_bits_per_dim"] == pytest.approx(result["test_iw_bound"] / (dims * math.log(2)))
    assert result["test_iw_bound"] <= result["test_bound"] + 1e-3 * abs(result["test_bound"])
    assert evaluate_cli.main([str(run), "--samples", "2"]) == 0
    assert "bits/dim" in capsys.readouterr().out

    model = pyro_kpp.load(run)
    data = D.load_dataset("cifar10", tmp_path / "data")
    episode = next(iter(make_episodes(model.cfg, data, torch.device("cpu")).test_episodes()))
    pixels = pyro_kpp.sample(pyro_kpp.write(model, episode), n=2, binary=True, as_uint8=True)
    assert pixels.dtype == torch.uint8 and pixels.shape == (episode.shape[0], 2, 3, 32, 32)

