"""Data sets (the episodes drawn from them: ``pyro_kpp.data.episodes``).

``load_dataset(name)`` returns an :class:`ImageData` with uint8 tensors of shape (N, C, H, W)
whose grey level 255 means ink (a pen stroke, a garment, a digit) and 0 means background
(CIFAR-10: the RGB intensities as they are).

* ``omniglot``: the 28x28 Omniglot of Burda et al. (2016) as used by the Kanerva Machine papers,
  under the protocol of ``pyro_kpp.data.omniglot``.

* ``fashion-mnist`` / ``mnist``: torchvision's files under ``<root>/FashionMNIST/raw`` and
  ``<root>/MNIST/raw``, with their native 60,000 / 10,000 split and class labels.

* ``cifar10``: 32x32 RGB, (N, 3, 32, 32), native 50,000 / 10,000 split and class labels, from
  torchvision's folder ``<root>/cifar-10-batches-py`` (pickled batches ``data_batch_1..5`` and
  ``test_batch``). The batches are read directly rather than through
  ``torchvision.datasets.CIFAR10(download=False)``, which refuses any folder whose files do not
  have the official MD5s; torchvision is used to download (it checks the archive's MD5 then).

Where the data live: ``resolve_data_dir`` (explicit argument > ``$PYRO_KPP_DATA`` >
``cache_dir()/"data"``). A data set missing there is downloaded with torchvision unless
offline (argument ``offline=True`` or ``$PYRO_KPP_OFFLINE=1``); every problem a user can fix
raises :class:`DataError` naming the folder, what was expected and what was found.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import pathlib
import pickle

import numpy as np
import torch

from pyro_kpp.data.base import DataError, ImageData, download, offline_mode, resolve_data_dir
from pyro_kpp.data.omniglot import load_omniglot

log = logging.getLogger(__name__)

DATASETS = ("omniglot", "fashion-mnist", "mnist", "cifar10")

#: Seed of the fixed test episodes (their order and their binarization).
TEST_SEED = 0

# torchvision class name and folder for the idx-format data sets.
_IDX_DATASETS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_SHAPE = (3, 32, 32)

# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

# In-process memo: (name, resolved root) -> ImageData.
_MEMO: dict[tuple[str, str], ImageData] = {}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, offline: bool | None = None) -> ImageData:
    """Load data set ``name`` (one of ``DATASETS``) from ``resolve_data_dir(data_dir)``.

    Reads it if present in torchvision's layout, else downloads it with torchvision unless
    ``offline`` (``None`` = ``$PYRO_KPP_OFFLINE``). The result is memoised per (name, root) in
    this process; Omniglot is also cached on disk in ``cache_dir()``.
    """
    key_name = _check_name(name)
    root = resolve_data_dir(data_dir)
    key = (key_name, str(root))
    if key not in _MEMO:
        loader = {"omniglot": load_omniglot, "cifar10": _load_cifar10}.get(key_name, _load_idx_dataset)
        _MEMO[key] = loader(key_name, root, offline_mode(offline))
    return _MEMO[key]


def clear_memory_cache() -> None:
    """Forget the in-process memo of ``load_dataset`` (the on-disk cache is kept)."""
    _MEMO.clear()


def _check_name(name: str) -> str:
    normal = name.strip().lower().replace("_", "-") if isinstance(name, str) else None
    if normal in ("fashionmnist", "fmnist"):
        normal = "fashion-mnist"
    if normal not in DATASETS:
        raise DataError(f"name: expected one of {', '.join(DATASETS)}, got {name!r}")
    return normal


# ---- Fashion-MNIST / MNIST -----------------------------------------------------------------


def _load_idx_dataset(name: str, root: pathlib.Path, offline: bool) -> ImageData:
    """Fashion-MNIST / MNIST through torchvision (download=False), native train/test split."""
    import torchvision.datasets as tvd

    folder = _IDX_DATASETS[name]  # torchvision's class name is also its folder name
    cls = getattr(tvd, folder)  # looked up at call time (tests substitute it)
    raw = root / folder / "raw"
    # The uncompressed idx files torchvision checks for, e.g. train-images-idx3-ubyte.
    required = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    if not all((raw / f).is_file() for f in required):
        download(
            name, root, f"files in folder {raw}", f"{raw}/{{{','.join(required)}}} (uncompressed idx files)", offline,
            lambda: [cls(str(root), train=t, download=True) for t in (True, False)],
        )
    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(root), train=train, download=False)
            images, labels = ds.data, ds.targets
        except Exception as e:  # noqa: BLE001 - torchvision asserts/raises on corrupt idx files
            raise DataError(
                f"{name}: folder {raw} holds files torchvision cannot read as the {split} split "
                f"({type(e).__name__}: {e}); expected uncompressed idx files {required}. "
                f"Replace the damaged files or delete the folder to download it again."
            ) from e
        if images.dtype != torch.uint8 or images.dim() != 3 or len(labels) != len(images):
            raise DataError(
                f"{name}: the {split} files in {raw} give images {images.dtype} {tuple(images.shape)} and "
                f"{len(labels)} labels; expected uint8 (N, H, W) images with N labels"
            )
        splits[split] = (images.unsqueeze(1).contiguous(), labels.to(torch.int64))
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    return ImageData(name, train_x, test_x, train_y, test_y)


# ---- CIFAR-10 ------------------------------------------------------------------------------


def _load_cifar10(name: str, root: pathlib.Path, offline: bool) -> ImageData:
    """CIFAR-10 from torchvision's pickled batches, read directly (see the module docstring)."""
    folder = root / CIFAR10_FOLDER
    required = [*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH]
    if not all((folder / f).is_file() for f in required):
        def fetch() -> None:
            import torchvision.datasets as tvd

            tvd.CIFAR10(str(root), train=True, download=True)

        download(name, root, f"files in folder {folder}", f"{folder}/{{{','.join(required)}}} "
                  f"(torchvision's pickled python batches)", offline, fetch)
    train = [_read_cifar10_batch(folder / f) for f in CIFAR10_TRAIN_BATCHES]
    test_x, test_y = _read_cifar10_batch(folder / CIFAR10_TEST_BATCH)
    return ImageData(name, torch.cat([x for x, _ in train]), test_x, torch.cat([y for _, y in train]), test_y)


#: The only globals a CIFAR-10 batch may name: how numpy pickles a uint8 array (under numpy 1's
#: and 2's module names, pickle protocols 2-5) and the codec protocol 2 uses for bytes.
_NUMPY_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"
CIFAR10_PICKLE_GLOBALS = {
    **{(f"{core}.multiarray", "_reconstruct"): f"{_NUMPY_CORE}.multiarray._reconstruct"
       for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): f"{_NUMPY_CORE}.numeric._frombuffer" for core in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): "numpy.ndarray", ("numpy", "dtype"): "numpy.dtype", ("_codecs", "encode"): "_codecs.encode",
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle naming a global outside ``CIFAR10_PICKLE_GLOBALS``."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``CIFAR10_PICKLE_GLOBALS``: a data file can build dicts,
    lists, strings, numbers and numpy arrays, and never import or call anything else (a plain
    ``pickle.load`` would run whatever callable a crafted file names)."""

    def find_class(self, module: str, name: str):
        target = CIFAR10_PICKLE_GLOBALS.get((module, name))
        if target is None:
            raise _ForbiddenGlobal(f"it names {module}.{name}, which a CIFAR-10 batch never holds; "
                                         f"refusing to load it, since unpickling it could run code")
        owner, attr = target.rsplit(".", 1)
        return getattr(importlib.import_module(owner), attr)


def _read_cifar10_batch(path: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch: {"data": uint8 (N, 3072) rows of R, G, B planes, "labels": N ints}
    -> images uint8 (N, 3, 32, 32) and labels int64 (N,). Read with ``_CifarUnpickler``."""
    expected = (f"a pickled dict with 'data' (uint8, N x {math.prod(CIFAR10_SHAPE)}) and 'labels' "
                f"(N ints), as in torchvision's {CIFAR10_FOLDER}")
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
        if not isinstance(entry, dict):
            raise TypeError(f"it holds a {type(entry).__name__}, not a dict")
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data, labels = np.asarray(entry["data"]), np.asarray(entry["labels"], dtype=np.int64)
    except _ForbiddenGlobal as e:
        raise DataError(f"cifar10: {path}: {e}. Replace the file or delete {path.parent} to download it "
                        f"again.") from None
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways on damaged files
        raise DataError(f"cifar10: cannot read {path} ({type(e).__name__}: {e}); expected {expected}. "
                        f"Replace the damaged file or delete {path.parent} to download it again.") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != math.prod(CIFAR10_SHAPE) \
            or labels.shape != data.shape[:1]:
        raise DataError(f"cifar10: {path} holds data {data.dtype} {data.shape} and {labels.shape[0]} labels; "
                        f"expected {expected}")
    images = torch.from_numpy(data.reshape(-1, *CIFAR10_SHAPE).copy())
    return images, torch.from_numpy(labels)
