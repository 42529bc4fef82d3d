"""What every data set shares: the error users can fix (``DataError``), where data and caches
live (``resolve_data_dir``, ``cache_dir``), the loaded set (``ImageData``) and the download step.
The loaders themselves are in ``sets.py`` (Fashion-MNIST, MNIST, CIFAR-10) and ``omniglot.py``."""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil

import torch

log = logging.getLogger(__name__)

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


def offline_mode(offline: bool | None) -> bool:
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


def download(name: str, root: pathlib.Path, missing: str, layout: str, offline: bool, fetch) -> None:
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
