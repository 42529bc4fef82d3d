"""Data sets (the episodes drawn from them: ``pyro_kpp.episodes``).

``load_dataset(name)`` returns an :class:`ImageData` with uint8 tensors of shape (N, C, H, W)
whose grey level 255 means ink (a pen stroke, a garment, a digit) and 0 means background
(CIFAR-10: the RGB intensities as they are).

* ``omniglot``: the 28x28 Omniglot of Burda et al. (2016) as used by the Kanerva Machine papers,
  under the protocol of ``pyro_kpp.omniglot``.

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

import dataclasses
import logging
import math
import os
import pathlib
import shutil

import numpy as np
import torch

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

_OFFLINE_ENV = "PYRO_KPP_OFFLINE"
_DATA_ENV = "PYRO_KPP_DATA"
_CACHE_ENV = "PYRO_KPP_CACHE"


class DataError(ValueError):
    """A data problem the user can fix: names the argument/folder, what was expected and found."""


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
    """Folder for derived files: ``$PYRO_KPP_CACHE``, else ``$XDG_CACHE_HOME/pyro_kpp``, else
    ``~/.cache/pyro_kpp``. Created on demand."""
    if os.environ.get(_CACHE_ENV):
        path = pathlib.Path(os.environ[_CACHE_ENV]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
        path = pathlib.Path(base).expanduser() / "pyro_kpp"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cache folder {path} (from ${_CACHE_ENV} or the per-user cache) cannot be created: {e}; "
            f"set ${_CACHE_ENV} to a writable folder"
        ) from e
    return path


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    """The data root: explicit ``data_dir`` > ``$PYRO_KPP_DATA`` > ``cache_dir()/"data"``.

    The root is the folder that holds torchvision's per-data-set folders (``omniglot-py/``,
    ``FashionMNIST/``, ``MNIST/``, ``cifar-10-batches-py/``). It is returned absolute but not created.
    """
    if data_dir is not None and str(data_dir) != "":
        path = pathlib.Path(data_dir)
    elif os.environ.get(_DATA_ENV):
        path = pathlib.Path(os.environ[_DATA_ENV])
    else:
        path = cache_dir() / "data"
    path = path.expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise DataError(f"data_dir (--data-dir): expected a folder, but {path} is a file")
    return path


def _offline(offline: bool | None) -> bool:
    """``offline`` if given, else ``$PYRO_KPP_OFFLINE`` (1/true/yes/on), else False."""
    if offline is not None:
        return bool(offline)
    raw = os.environ.get(_OFFLINE_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise DataError(f"${_OFFLINE_ENV}: expected 1/true/yes/on or 0/false/no/off, got {raw!r}")


# --------------------------------------------------------------------------------------------
# The data container
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(repr=False)
class ImageData:
    """Both splits of a data set as uint8 (N, C, H, W) tensors, 255 = ink. Treat as read-only:
    ``load_dataset`` returns the same object to every caller in a process."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None  # int64 (N_train,) class ids, if the set has them
    test_labels: torch.Tensor | None = None  # int64 (N_test,)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, split)
            if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
                raise DataError(
                    f"ImageData.{split}: expected a uint8 tensor (N, C, H, W), got "
                    f"{getattr(images, 'dtype', type(images).__name__)} of shape {tuple(getattr(images, 'shape', ()))}"
                )
            labels = getattr(self, f"{split}_labels")
            if labels is not None and (labels.dtype != torch.int64 or labels.shape != images.shape[:1]):
                raise DataError(
                    f"ImageData.{split}_labels: expected int64 of shape ({len(images)},), "
                    f"got {labels.dtype} of shape {tuple(labels.shape)}"
                )
        if self.train.shape[1:] != self.test.shape[1:]:
            raise DataError(
                f"ImageData: train and test images differ in shape: "
                f"{tuple(self.train.shape[1:])} vs {tuple(self.test.shape[1:])}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train.shape[1:]
        return (int(c), int(h), int(w))

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"image_shape={self.image_shape}, labels={self.train_labels is not None})"
        )


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
        from .omniglot import load_omniglot                 # here: it builds on this module
        loader = {"omniglot": load_omniglot, "cifar10": _load_cifar10}.get(key_name, _load_idx_dataset)
        _MEMO[key] = loader(key_name, root, _offline(offline))
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


def _download(name: str, root: pathlib.Path, missing: str, layout: str, offline: bool, fetch) -> None:
    """Run ``fetch()`` (a torchvision download) unless offline; turn every failure into a
    DataError that says which folder to provide and in which layout."""
    how = f"Provide them yourself, laid out as {layout} (or point --data-dir / ${_DATA_ENV} at a root that has it)"
    if offline:
        raise DataError(f"{name}: missing {missing}, and offline mode is on, so it is not downloaded. {how}.")
    before = _entries(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fetch()
    except Exception as e:  # noqa: BLE001 - URLError, OSError, RuntimeError, BadZipFile, ...
        _remove_new_entries(root, before)
        raise DataError(f"{name}: missing {missing}, and downloading it failed ({type(e).__name__}: {e}). {how}.") from e


def _entries(root: pathlib.Path) -> tuple[pathlib.Path | None, set[str]]:
    """What exists before a download: the highest folder of ``root``'s path that does not exist
    yet (None: ``root`` exists) and the names in ``root``."""
    missing = None
    for path in (root, *root.parents):
        if path.exists():
            break
        missing = path
    return missing, ({p.name for p in root.iterdir()} if missing is None and root.is_dir() else set())


def _remove_new_entries(root: pathlib.Path, before: tuple[pathlib.Path | None, set[str]]) -> None:
    """Undo what a failed download made: torchvision creates its folders (``omniglot-py``,
    ``FashionMNIST/raw``) before it fetches, and a failure would leave them empty or partial
    under a data root that may be shared or read-only, where a later run would take an empty
    folder for the data set. Removes only what did not exist before (``_entries``)."""
    missing, names = before
    if missing is not None:
        shutil.rmtree(missing, ignore_errors=True)
        return
    for path in root.iterdir():
        if path.name not in names:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


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
        _download(
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

        _download(name, root, f"files in folder {folder}", f"{folder}/{{{','.join(required)}}} "
                  f"(torchvision's pickled python batches)", offline, fetch)
    train = [_read_cifar10_batch(folder / f) for f in CIFAR10_TRAIN_BATCHES]
    test_x, test_y = _read_cifar10_batch(folder / CIFAR10_TEST_BATCH)
    return ImageData(name, torch.cat([x for x, _ in train]), test_x, torch.cat([y for _, y in train]), test_y)


def _read_cifar10_batch(path: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch: {"data": uint8 (N, 3072) rows of R, G, B planes, "labels": N ints}
    -> images uint8 (N, 3, 32, 32) and labels int64 (N,)."""
    import pickle

    expected = (f"a pickled dict with 'data' (uint8, N x {math.prod(CIFAR10_SHAPE)}) and 'labels' "
                f"(N ints), as in torchvision's {CIFAR10_FOLDER}")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data, labels = np.asarray(entry["data"]), np.asarray(entry["labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways on damaged files
        raise DataError(f"cifar10: cannot read {path} ({type(e).__name__}: {e}); expected {expected}. "
                        f"Replace the damaged file or delete {path.parent} to download it again.") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != math.prod(CIFAR10_SHAPE) \
            or labels.shape != data.shape[:1]:
        raise DataError(f"cifar10: {path} holds data {data.dtype} {data.shape} and {labels.shape[0]} labels; "
                        f"expected {expected}")
    images = torch.from_numpy(data.reshape(-1, *CIFAR10_SHAPE).copy())
    return images, torch.from_numpy(labels)
