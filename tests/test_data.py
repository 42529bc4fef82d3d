"""Tests of pyro_kpp.data.sets: data sets (real Omniglot / Fashion-MNIST, synthetic MNIST) and Episodes.

The real data come from $PYRO_KPP_DATA, else ../shared/data next to the project. The Omniglot
cache goes to $PYRO_KPP_CACHE if set (so it persists across sessions), else to one temporary
folder per test session: the 32k PNGs are decoded at most once per session.
"""
from __future__ import annotations

import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

from pyro_kpp import data as D
from pyro_kpp.data import episodes as E
from pyro_kpp.data import omniglot as O

from helpers import make_mnist

# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


def _real_data_root() -> Path:
    env = os.environ.get("PYRO_KPP_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def cache_folder(tmp_path_factory) -> Path:
    """A cache folder that lives for the session (or longer, if $PYRO_KPP_CACHE is set)."""
    env = os.environ.get("PYRO_KPP_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("pyro_kpp_cache")


@pytest.fixture(scope="module", autouse=True)
def data_env(cache_folder):
    """Point $PYRO_KPP_DATA / $PYRO_KPP_CACHE at the real data and the session cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYRO_KPP_DATA", str(_real_data_root()))
        mp.setenv("PYRO_KPP_CACHE", str(cache_folder))
        mp.delenv("PYRO_KPP_OFFLINE", raising=False)
        yield


@pytest.fixture(scope="module")
def real_root() -> Path:
    root = _real_data_root()
    if not (root / "omniglot-py").is_dir():
        pytest.skip(f"real data not found at {root}; set PYRO_KPP_DATA")
    return root


@pytest.fixture(scope="module")
def omniglot(real_root) -> D.ImageData:
    D.clear_memory_cache()      # other modules may have loaded it under another cache folder
    return D.load_dataset("omniglot")


@pytest.fixture(autouse=True)
def _fresh_memo():
    """Tests that use temporary roots must not see each other's memoised results."""
    yield
    for key in [k for k in D.sets._MEMO if not k[1].startswith(str(_real_data_root().resolve()))]:
        del D.sets._MEMO[key]


def _make_omniglot(root: Path, per_split: int = 4) -> list[Path]:
    """A tiny Omniglot tree: per split one alphabet, one character, ``per_split`` drawers; each
    PNG is 105x105 1-bit, white background, with a black bar whose position varies."""
    paths = []
    for s, split in enumerate(O.OMNIGLOT_SPLITS):
        char_id = 7 + 100 * s
        folder = root / "omniglot-py" / split / f"Alphabet_{s}" / "character01"
        folder.mkdir(parents=True)
        for drawer in range(1, per_split + 1):
            im = Image.new("1", (105, 105), 1)
            ImageDraw.Draw(im).rectangle([10 * drawer, 20, 10 * drawer + 30, 40], fill=0)
            path = folder / f"{char_id:04d}_{drawer:02d}.png"
            im.save(path)
            paths.append(path)
    return paths


def _synthetic(n_train: int = 100, n_test: int = 23) -> D.ImageData:
    """ImageData whose image i carries its index i in pixels (0,0,0)/(0,0,1) and grey elsewhere."""

    def images(n):
        x = torch.full((n, 1, 4, 4), 128, dtype=torch.uint8)
        idx = torch.arange(n)
        x[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
        x[:, 0, 0, 1] = (idx // 256).to(torch.uint8)
        return x

    return D.ImageData("mnist", images(n_train), images(n_test), torch.zeros(n_train, dtype=torch.int64),
                       torch.zeros(n_test, dtype=torch.int64))


def _indices(batch: torch.Tensor) -> torch.Tensor:
    """Recover the image indices encoded by _synthetic from a uint8 batch."""
    return batch[..., 0, 0, 0].long() + 256 * batch[..., 0, 0, 1].long()


# ---------------------------------------------------------------------------------------------
# Omniglot
# ---------------------------------------------------------------------------------------------


def test_omniglot_sizes_shape_dtype_labels(omniglot):
    assert omniglot.name == "omniglot"
    assert len(omniglot.train) == 24345 and len(omniglot.test) == 8115
    assert omniglot.image_shape == (1, 28, 28)
    assert omniglot.train.dtype == torch.uint8 and omniglot.test.dtype == torch.uint8
    assert omniglot.train_labels.dtype == torch.int64 and omniglot.train_labels.shape == (24345,)
    assert omniglot.test_labels.shape == (8115,)
    labels = torch.cat([omniglot.train_labels, omniglot.test_labels])
    assert labels.min() == 0 and labels.max() == 1622
    assert torch.bincount(labels).eq(20).all(), "every character has exactly 20 drawings"


def test_omniglot_strokes_bright_on_dark_background(omniglot):
    grey = omniglot.train.float()
    assert grey.mean() < 0.3 * 255
    assert (grey == 0).float().mean() > 0.5, "most pixels are background = 0"
    assert grey.max() == 255 and grey.min() == 0


def test_omniglot_matches_protocol_for_single_files(omniglot, real_root):
    """Re-derive a few images independently: sorted file order, invert, resize, round; split."""
    folder = real_root / "omniglot-py"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("images_*/*/*/*.png"))
    assert len(files) == 32460 and files[0].startswith("images_background/")
    train_idx, test_idx = O.omniglot_split(len(files))
    for split, idx, pos in (("train", train_idx, 0), ("train", train_idx, 12345), ("test", test_idx, 8114)):
        file = files[int(idx[pos])]
        with Image.open(folder / file) as im:
            white = np.asarray(im).astype(np.float32)  # 1-bit: True = white background
        ref = TF.resize(torch.from_numpy(1.0 - white)[None], [28, 28], antialias=True)
        ref = torch.round(ref * 255).to(torch.uint8)
        assert torch.equal(getattr(omniglot, split)[pos], ref), file
        assert getattr(omniglot, f"{split}_labels")[pos] == int(file.rsplit("/", 1)[1][:4]) - 1


def test_omniglot_split_deterministic_and_disjoint():
    train, test = O.omniglot_split(32460)
    train2, test2 = O.omniglot_split(32460)
    assert torch.equal(train, train2) and torch.equal(test, test2)
    assert len(train) == 24345 and len(test) == 8115
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(32460))
    # both splits span all alphabets: background (index < 19280) and evaluation files
    assert (test < 19280).any() and (test >= 19280).any()


def test_omniglot_cache_hit_decodes_nothing_and_is_identical(omniglot, real_root, cache_folder, monkeypatch):
    caches = list(cache_folder.glob("omniglot28-v1-*.pt"))
    assert caches, f"no Omniglot cache written in {cache_folder}"
    assert not list((real_root / "omniglot-py").glob("*.pt")), "cache must not go into the data folder"
    D.clear_memory_cache()

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cache hit must not decode PNGs")

    monkeypatch.setattr(O, "_decode_omniglot", no_decoding)
    again = D.load_dataset("omniglot")
    assert again is not omniglot, "the memo was cleared, so this came from the disk cache"
    for field in ("train", "test", "train_labels", "test_labels"):
        assert torch.equal(getattr(again, field), getattr(omniglot, field))
    assert D.load_dataset("omniglot") is again, "second call in-process is memoised"


def test_synthetic_omniglot_tree_decodes_and_keys_its_own_cache(tmp_path, cache_folder):
    paths = _make_omniglot(tmp_path)
    with pytest.warns(UserWarning, match="not the 32460"):
        data = D.load_dataset("omniglot", tmp_path, offline=True)
    assert len(data.train) + len(data.test) == 8 and len(data.test) == 2
    assert set(torch.cat([data.train_labels, data.test_labels]).tolist()) == {6, 106}
    # strokes (black bars in the files) are bright, the white background is 0
    assert data.train.max() == 255 and (data.train == 0).float().mean() > 0.5
    before = set(cache_folder.glob("omniglot28-*.pt"))
    # one more file -> a different cache key, hence a new cache file
    shutil.copy(paths[0], paths[0].with_name("0008_05.png"))
    D.clear_memory_cache()
    with pytest.warns(UserWarning):
        bigger = D.load_dataset("omniglot", tmp_path, offline=True)
    assert len(bigger.train) + len(bigger.test) == 9
    assert len(set(cache_folder.glob("omniglot28-*.pt")) - before) == 1


def test_omniglot_corrupt_png_is_a_data_error(tmp_path):
    paths = _make_omniglot(tmp_path)
    paths[1].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UserWarning), pytest.raises(D.DataError, match=paths[1].name):
        D.load_dataset("omniglot", tmp_path, offline=True)


def test_omniglot_empty_split_folder_is_a_data_error(tmp_path):
    for split in O.OMNIGLOT_SPLITS:
        (tmp_path / "omniglot-py" / split).mkdir(parents=True)
    with pytest.raises(D.DataError, match="no PNG files") as err:
        D.load_dataset("omniglot", tmp_path)  # present, so no download is attempted
    assert str(tmp_path / "omniglot-py" / "images_background") in str(err.value)


def test_omniglot_badly_named_file_is_a_data_error(tmp_path):
    paths = _make_omniglot(tmp_path)
    paths[0].rename(paths[0].with_name("stroke.png"))
    with pytest.warns(UserWarning), pytest.raises(D.DataError, match="CCCC_DD.png"):
        D.load_dataset("omniglot", tmp_path, offline=True)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST and MNIST
# ---------------------------------------------------------------------------------------------


def test_fashion_mnist(real_root):
    data = D.load_dataset("fashion-mnist")
    assert len(data.train) == 60000 and len(data.test) == 10000
    assert data.image_shape == (1, 28, 28) and data.train.dtype == torch.uint8
    assert data.train_labels.dtype == torch.int64 and set(data.test_labels.unique().tolist()) == set(range(10))
    assert data.train.float().mean() < 0.5 * 255, "background is 0, garments bright"


def test_mnist_reads_synthetic_idx_files(tmp_path):
    arrays = make_mnist(tmp_path)
    data = D.load_dataset("mnist", tmp_path, offline=True)
    assert data.name == "mnist" and data.image_shape == (1, 28, 28)
    assert torch.equal(data.train[:, 0], torch.from_numpy(arrays["train-images"]))
    assert torch.equal(data.test[:, 0], torch.from_numpy(arrays["t10k-images"]))
    assert torch.equal(data.test_labels, torch.from_numpy(arrays["t10k-labels"]).long())
    assert data.train_labels.dtype == torch.int64


def test_truncated_idx_file_is_a_data_error(tmp_path):
    make_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(D.DataError) as err:
        D.load_dataset("mnist", tmp_path, offline=True)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value) and "train" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Names, folders, offline mode and failed downloads
# ---------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(D.DataError) as err:
        D.load_dataset("cifar-10")
    assert isinstance(err.value, ValueError)
    assert all(name in str(err.value) for name in D.DATASETS) and "cifar-10" in str(err.value)


@pytest.mark.parametrize("how", ["argument", "env"])
def test_missing_omniglot_offline_names_the_folder(tmp_path, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("PYRO_KPP_OFFLINE", "1")
        call = lambda: D.load_dataset("omniglot", tmp_path)  # noqa: E731
    else:
        call = lambda: D.load_dataset("omniglot", tmp_path, offline=True)  # noqa: E731
    with pytest.raises(D.DataError) as err:
        call()
    message = str(err.value)
    assert str(tmp_path / "omniglot-py" / "images_background") in message
    assert str(tmp_path / "omniglot-py" / "images_evaluation") in message
    assert "characterNN/CCCC_DD.png" in message and "offline" in message
    assert list(tmp_path.iterdir()) == [], "offline: nothing downloaded or created"


def test_missing_fashion_mnist_offline_names_the_folder(tmp_path):
    with pytest.raises(D.DataError) as err:
        D.load_dataset("fashion-mnist", tmp_path, offline=True)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(err.value)
    assert "train-images-idx3-ubyte" in str(err.value)


def test_failed_download_is_a_data_error(tmp_path, monkeypatch):
    """No network: torchvision's download raises; load_dataset turns it into a DataError."""
    calls = []

    class NoNetwork(torchvision.datasets.MNIST):
        def __init__(self, root, train=True, download=False, **kw):
            calls.append(download)
            raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "MNIST", NoNetwork)
    monkeypatch.setattr(torchvision.datasets, "Omniglot", NoNetwork)
    for name, folder in (("mnist", tmp_path / "MNIST" / "raw"), ("omniglot", tmp_path / "omniglot-py")):
        with pytest.raises(D.DataError, match="downloading it failed") as err:
            D.load_dataset(name, tmp_path, offline=False)
        assert str(folder) in str(err.value) and "no route to host" in str(err.value)
    assert calls == [True, True], "a download was attempted once per data set"


def test_bad_offline_env_value(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_KPP_OFFLINE", "maybe")
    with pytest.raises(D.DataError, match="PYRO_KPP_OFFLINE"):
        D.load_dataset("mnist", tmp_path)


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_KPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PYRO_KPP_DATA")
    assert D.resolve_data_dir(None) == (tmp_path / "cache" / "data").resolve()
    monkeypatch.setenv("PYRO_KPP_DATA", str(tmp_path / "env"))
    assert D.resolve_data_dir(None) == (tmp_path / "env").resolve()
    assert D.resolve_data_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(D.DataError, match="data_dir"):
        D.resolve_data_dir(tmp_path / "file")


def test_cache_dir_env_and_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_KPP_CACHE", str(tmp_path / "a" / "b"))
    assert D.cache_dir() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    monkeypatch.delenv("PYRO_KPP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.cache_dir() == tmp_path / "xdg" / "pyro_kpp" and D.cache_dir().is_dir()


# ---------------------------------------------------------------------------------------------
# Episodes
# ---------------------------------------------------------------------------------------------


def test_episodes_shapes_and_binary_values(omniglot):
    ep = E.Episodes(omniglot, episode_length=32, batch_size=16, seed=3)
    assert ep.steps_per_epoch() == 48  # ceil(24345 / 512)
    batch = next(iter(ep.train_epoch(0)))
    assert batch.shape == (16, 32, 1, 28, 28) and batch.dtype == torch.float32
    assert set(batch.unique().tolist()) == {0.0, 1.0}
    # dynamic binarization keeps the ink fraction of the grey levels
    grey = omniglot.train.float().mean() / 255
    assert abs(batch.mean() - grey) < 0.02


def test_episodes_grey_and_uint8_views():
    data = _synthetic()
    grey = next(iter(E.Episodes(data, 5, 2, seed=0, binarize=False).train_epoch(0)))
    assert grey.dtype == torch.float32 and torch.allclose(grey[..., 1:, :], torch.full_like(grey[..., 1:, :], 128 / 255))
    raw = next(iter(E.Episodes(data, 5, 2, seed=0, binarize=False, as_uint8=True).train_epoch(0)))
    assert raw.dtype == torch.uint8 and torch.equal(raw.float() / 255, grey)
    with pytest.raises(ValueError, match="as_uint8"):
        E.Episodes(data, 5, 2, seed=0, binarize=True, as_uint8=True)


def test_test_episodes_fixed_across_calls_objects_and_seeds(omniglot):
    a = E.Episodes(omniglot, 32, 16, seed=1)
    b = E.Episodes(omniglot, 32, 16, seed=99)
    assert a.num_test_episodes() == 253  # 8115 = 253 * 32 + 19
    first = list(a.test_episodes())
    assert [len(x) for x in first] == [16] * 15 + [13]
    assert all(set(x.unique().tolist()) == {0.0, 1.0} for x in first)
    for other in (list(a.test_episodes()), list(b.test_episodes())):
        assert all(torch.equal(x, y) for x, y in zip(first, other, strict=True))
    rebatched = torch.cat(list(a.test_episodes(batch_size=100)))
    assert rebatched.shape == (253, 32, 1, 28, 28) and torch.equal(rebatched, torch.cat(first))


def test_test_episodes_drop_the_remainder_and_cover_distinct_images():
    data = _synthetic(n_test=23)
    ep = E.Episodes(data, 5, 3, seed=0, binarize=False, as_uint8=True)
    episodes = torch.cat(list(ep.test_episodes()))
    assert ep.num_test_episodes() == 4 and episodes.shape[:2] == (4, 5)
    ids = _indices(episodes).flatten()
    assert len(ids.unique()) == 20 and ids.max() < 23


def test_train_epochs_differ_and_seeds_reproduce(omniglot):
    ep = E.Episodes(omniglot, 32, 4, seed=5)
    first0 = next(iter(ep.train_epoch(0)))
    first1 = next(iter(ep.train_epoch(1)))
    assert not torch.equal(first0, first1)
    assert torch.equal(first0, next(iter(E.Episodes(omniglot, 32, 4, seed=5).train_epoch(0))))
    assert not torch.equal(first0, next(iter(E.Episodes(omniglot, 32, 4, seed=6).train_epoch(0))))
    assert not torch.equal(ep.train_order(0), ep.train_order(1))


def test_resume_at_start_step_reproduces_the_tail(omniglot):
    ep = E.Episodes(omniglot, 32, 16, seed=11)
    full = list(ep.train_epoch(2))
    tail = list(E.Episodes(omniglot, 32, 16, seed=11).train_epoch(2, start_step=45))
    assert len(full) == 48 and len(tail) == 3
    assert all(torch.equal(x, y) for x, y in zip(full[45:], tail, strict=True))
    assert list(ep.train_epoch(2, start_step=48)) == []
    with pytest.raises(ValueError, match="start_step"):
        ep.train_epoch(2, start_step=49)


def test_every_train_image_seen_each_epoch(omniglot):
    ep = E.Episodes(omniglot, 32, 16, seed=0)
    for epoch in (0, 1):
        order = ep.train_order(epoch)
        assert order.shape == (48, 16, 32)
        assert torch.equal(order.flatten().unique(), torch.arange(24345))
    # and the yielded images are those of the order, including the wrap-around at the end
    data = _synthetic(n_train=100)
    ep = E.Episodes(data, 7, 3, seed=2, binarize=False, as_uint8=True)
    batches = list(ep.train_epoch(4))
    assert len(batches) == ep.steps_per_epoch() == 5  # 105 slots for 100 images
    seen = torch.cat([_indices(b).flatten() for b in batches])
    assert torch.equal(seen, ep.train_order(4).flatten())
    assert torch.equal(seen.unique(), torch.arange(100)) and len(seen) == 105


def test_episode_argument_validation():
    data = _synthetic(n_train=100, n_test=23)
    with pytest.raises(D.DataError, match="episode_length.*longer than the train split"):
        E.Episodes(data, 101, 2, seed=0)
    with pytest.raises(D.DataError, match="episode_length.*longer than the test split"):
        E.Episodes(data, 24, 2, seed=0)
    for kwargs, arg in (({"episode_length": 0}, "episode_length"), ({"batch_size": 0}, "batch_size")):
        args = {"episode_length": 5, "batch_size": 2} | kwargs
        with pytest.raises(ValueError, match=arg):
            E.Episodes(data, **args, seed=0)
    ep = E.Episodes(data, 5, 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        ep.test_episodes(batch_size=0)


def test_validation_episodes_are_held_out_of_training(omniglot):
    """valid_images carves the same images out of the train split for every run seed; training
    never sees them; test episodes are unchanged."""
    plain = E.Episodes(omniglot, 32, 8, seed=0)
    held = E.Episodes(omniglot, 32, 8, seed=0, valid_images=1024)
    other_seed = E.Episodes(omniglot, 32, 8, seed=3, valid_images=1024)
    valid = torch.cat(list(held.valid_episodes()))                         # (32, 32, 1, 28, 28)
    assert valid.shape == (32, 32, 1, 28, 28)
    torch.testing.assert_close(valid, torch.cat(list(other_seed.valid_episodes())))
    assert len(held._train) == len(omniglot.train) - 1024
    train_rows = {bytes(img.numpy()) for img in held._train}
    assert not any(bytes(img.numpy()) in train_rows for img in held._valid_images[:50])
    torch.testing.assert_close(next(held.test_episodes()), next(plain.test_episodes()))
    with pytest.raises(ValueError, match="no validation images"):
        next(plain.valid_episodes())
    with pytest.raises(D.DataError, match="valid_images"):
        E.Episodes(omniglot, 32, 8, seed=0, valid_images=len(omniglot.train))
