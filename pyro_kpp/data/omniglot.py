"""Omniglot, 28x28, as the Kanerva Machine papers use it (Burda et al., 2016): ``load_dataset("omniglot")``.

Protocol (fixed, the cache and every experiment depend on it):

1. all 32,460 PNGs of BOTH torchvision folders, ``omniglot-py/images_background`` (19,280) and
   ``omniglot-py/images_evaluation`` (13,180), in sorted relative-path order;
2. each 105x105 1-bit PNG -> float grey in [0, 1] inverted so that strokes are 1 (the files
   have a white background), resized to 28x28 with bilinear interpolation and antialiasing
   (``torchvision.transforms.functional.resize(t, [28, 28], antialias=True)``), stored as
   ``uint8 = round(255 * v)``;
3. a random split, drawn once with ``SPLIT_SEED`` (independent of any training seed), into
   24,345 train / 8,115 test images over all alphabets (each split kept in path order);
4. labels = the global character id parsed from the file name ``CCCC_DD.png``, minus 1
   (0..1622).

The PNGs are decoded once and the tensors cached in ``cache_dir()`` (never in the data
folder, which may be read-only); the file name of the cache carries a hash of the data root
and of the file list, so a different folder gets a different cache, and the cache records a
hash of every file's size and modification time (``_omniglot_stamp``), so a PNG replaced under
the same name makes it stale and it is decoded again.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import re
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from pyro_kpp.data.base import DataError, ImageData, cache_dir, download

log = logging.getLogger(__name__)

#: Seed of the fixed Omniglot train/test split. Never tie it to a training seed.
SPLIT_SEED = 0
OMNIGLOT_FOLDER = "omniglot-py"
OMNIGLOT_SPLITS = ("images_background", "images_evaluation")
OMNIGLOT_N_FILES = 32_460
OMNIGLOT_N_TRAIN = 24_345
OMNIGLOT_N_TEST = 8_115
OMNIGLOT_SIZE = 28
#: Characters of ``images_background`` (30 alphabets): their global ids are 1..964 in the file
#: names, labels 0..963; ``images_evaluation``'s 20 alphabets hold ids 965..1623.
OMNIGLOT_BACKGROUND_CHARACTERS = 964
# Bump when the decoding protocol changes so that old caches are ignored.
OMNIGLOT_CACHE_VERSION = 1
_OMNIGLOT_NAME = re.compile(r"(\d{4})_(\d{2})\.png")


def load_omniglot(name: str, root: pathlib.Path, offline: bool) -> ImageData:
    """Omniglot 28x28 under the protocol of the module docstring."""
    folder = root / OMNIGLOT_FOLDER
    missing = [folder / s for s in OMNIGLOT_SPLITS if not (folder / s).is_dir()]
    if missing:
        download(
            name, root, " and ".join(f"folder {m}" for m in missing),
            f"{folder}/{{{','.join(OMNIGLOT_SPLITS)}}}/<Alphabet>/characterNN/CCCC_DD.png", offline,
            _omniglot_fetch(root),
        )
    files = _list_omniglot_files(folder)
    images, labels = _omniglot_tensors(folder, files)
    train_idx, test_idx = omniglot_split(len(files))
    return ImageData(name, images[train_idx], images[test_idx], labels[train_idx], labels[test_idx])


def omniglot_by_alphabet(data: ImageData) -> ImageData:
    """The same images re-split by alphabet (Lake et al., 2015): train = the 964 characters of
    ``images_background``, test = the 659 new characters of ``images_evaluation``, every drawing
    of each (20 per character). Class-structured episodes use it (``pyro_kpp.data.classes``):
    a test character was never seen in training, so what a memory tells about a test image can
    only come from the other drawings its episode holds. Labels stay the global character ids."""
    if data.train_labels is None or data.test_labels is None:
        raise DataError(f"data: {data.name} has no character labels to split by alphabet")
    images = torch.cat([data.train, data.test])                       # (N, 1, 28, 28)
    labels = torch.cat([data.train_labels, data.test_labels])        # (N,)
    order = torch.argsort(labels, stable=True)                        # a fixed order: by character
    images, labels = images[order], labels[order]
    background = labels < OMNIGLOT_BACKGROUND_CHARACTERS
    if bool(background.all()) or not bool(background.any()):
        raise DataError(f"data: {data.name} has no characters on one side of the background/evaluation "
                        f"boundary (label {OMNIGLOT_BACKGROUND_CHARACTERS}); is it the full Omniglot?")
    return ImageData(data.name, images[background], images[~background], labels[background], labels[~background])


def _omniglot_fetch(root: pathlib.Path):
    def fetch() -> None:
        import torchvision.datasets as tvd

        for background in (True, False):
            tvd.Omniglot(str(root), background=background, download=True)

    return fetch


def omniglot_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into the sorted file list) of the train and test images, each sorted.

    A permutation drawn from ``torch.Generator().manual_seed(SPLIT_SEED)``: the first 24,345
    indices are train, the other 8,115 test. A folder with a number of files other than 32,460
    keeps the same 3:1 proportion (and ``_list_omniglot_files`` warns).
    """
    n_test = OMNIGLOT_N_TEST if n == OMNIGLOT_N_FILES else round(n * OMNIGLOT_N_TEST / OMNIGLOT_N_FILES)
    n_test = min(max(n_test, 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[: n - n_test].sort().values, perm[n - n_test :].sort().values


def _list_omniglot_files(folder: pathlib.Path) -> list[str]:
    """Relative posix paths ``<split>/<Alphabet>/<character>/<file>.png`` in sorted order."""
    files = []
    for split in OMNIGLOT_SPLITS:
        found = [p.relative_to(folder).as_posix() for p in (folder / split).glob("*/*/*.png")]
        if not found:
            raise DataError(
                f"omniglot: folder {folder / split} has no PNG files; expected "
                f"{folder / split}/<Alphabet>/characterNN/CCCC_DD.png. Delete {folder} to download it "
                f"again or copy the extracted images_background/images_evaluation trees there."
            )
        files += found
    files.sort()
    if len(files) != OMNIGLOT_N_FILES:
        warnings.warn(
            f"omniglot: {folder} holds {len(files)} PNGs, not the {OMNIGLOT_N_FILES} of the full data set; "
            f"the train/test sizes will not match Burda et al.'s {OMNIGLOT_N_TRAIN}/{OMNIGLOT_N_TEST}",
            stacklevel=3,
        )
    return files


def _omniglot_cache_path(folder: pathlib.Path, files: list[str]) -> pathlib.Path:
    """Cache file named by protocol version and a hash of the data folder and its file list."""
    digest = hashlib.sha256(f"{folder.resolve()}\n{len(files)}\n".encode())
    digest.update("\n".join(files).encode())
    return cache_dir() / f"omniglot{OMNIGLOT_SIZE}-v{OMNIGLOT_CACHE_VERSION}-{digest.hexdigest()[:16]}.pt"


def _omniglot_stamp(folder: pathlib.Path, files: list[str]) -> str:
    """A hash of every file's size and modification time (ns): what changes when a PNG is
    replaced or rewritten, at the cost of one ``stat`` per file rather than reading them all."""
    digest = hashlib.sha256()
    for file in files:
        st = (folder / file).stat()
        digest.update(f"{file}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _omniglot_tensors(folder: pathlib.Path, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 1, 28, 28) uint8 and labels (N,) int64 in file order, from the cache if
    it is there and its files unchanged, else decoded and then cached."""
    path = _omniglot_cache_path(folder, files)
    stamp = _omniglot_stamp(folder, files)
    cached = _read_cache(path, len(files), stamp)
    if cached is not None:
        return cached
    labels = torch.tensor([_omniglot_label(folder, f) for f in files], dtype=torch.int64)
    start = time.perf_counter()
    images = _decode_omniglot(folder, files)
    log.info("decoded %d Omniglot PNGs in %.1f s", len(files), time.perf_counter() - start)
    try:
        _atomic_save({"version": OMNIGLOT_CACHE_VERSION, "stamp": stamp, "images": images, "labels": labels}, path)
    except OSError as e:  # a cache we cannot write only costs time
        warnings.warn(f"omniglot: could not write the cache {path}: {e}", stacklevel=3)
    return images, labels


def _omniglot_label(folder: pathlib.Path, file: str) -> int:
    match = _OMNIGLOT_NAME.fullmatch(file.rsplit("/", 1)[-1])
    if match is None:
        raise DataError(f"omniglot: file {folder / file} is not named CCCC_DD.png (character id, drawer)")
    return int(match.group(1)) - 1


def _decode_omniglot(folder: pathlib.Path, files: list[str]) -> torch.Tensor:
    """Decode and resize every PNG (a plain loop: ~15 s for 32k files on one core)."""
    from tqdm import tqdm

    out = torch.empty(len(files), 1, OMNIGLOT_SIZE, OMNIGLOT_SIZE, dtype=torch.uint8)
    bar = tqdm(files, desc="omniglot: decoding PNGs once", unit="img", file=sys.stderr, mininterval=1.0)
    for i, file in enumerate(bar):
        out[i] = _decode_omniglot_png(folder / file)
    return out


def _decode_omniglot_png(path: pathlib.Path) -> torch.Tensor:
    """One PNG -> (1, 28, 28) uint8, strokes bright (see the protocol in the module docstring)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    try:
        with Image.open(path) as im:
            # convert("L") maps the 1-bit pixels to 0/255 and accepts any other mode too.
            grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"omniglot: cannot decode {path} as an image ({type(e).__name__}: {e})") from e
    ink = torch.from_numpy(1.0 - grey).unsqueeze(0)  # invert: white background -> 0, strokes -> 1
    small = F.resize(ink, [OMNIGLOT_SIZE, OMNIGLOT_SIZE], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return torch.round(small.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _read_cache(path: pathlib.Path, n: int, stamp: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (images, labels), or None if absent, unusable or stale (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        images, labels = blob["images"], blob["labels"]
        ok = (
            blob.get("version") == OMNIGLOT_CACHE_VERSION
            and images.dtype == torch.uint8
            and tuple(images.shape) == (n, 1, OMNIGLOT_SIZE, OMNIGLOT_SIZE)
            and labels.dtype == torch.int64
            and tuple(labels.shape) == (n,)
        )
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: decode again
        warnings.warn(f"omniglot: ignoring unreadable cache {path} ({type(e).__name__}: {e})", stacklevel=4)
        return None
    if not ok:
        warnings.warn(f"omniglot: ignoring cache {path} with unexpected contents", stacklevel=4)
        return None
    if blob.get("stamp") != stamp:
        log.info("omniglot: the PNGs' sizes or times differ from those %s records (or it records none); "
                 "decoding them again", path)
        return None
    return images, labels


def _atomic_save(obj, path: pathlib.Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: readers never see a
    half-written cache, and concurrent writers each replace it with a complete file."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
