"""Self-describing checkpoints, written atomically (temporary file, fsync, rename).

A checkpoint is one dict (nanoGPT style)::

    {"format": "pyro_kpp.checkpoint", "format_version": 1, "pyro_kpp_version": ...,
     "config": Config.to_dict(), "model": state_dict, "optimizer": state_dict,
     "epoch": e, "epoch_step": s, "step": n, "rng": {...}, "metrics": [...]}

``epoch``/``epoch_step`` say where training resumes: step ``epoch_step`` of epoch ``epoch``
(the data order is a function of the seed and the epoch, so that is the whole data state).

A checkpoint holds tensors and plain data only (dicts, lists, tuples, strings, numbers, None)
and numpy's RNG state (a uint32 array), and is read with ``torch.load(weights_only=True)`` with
exactly the numpy array types allow-listed (``SAFE_GLOBALS``): opening a checkpoint someone sent
you never runs code from it. One that holds anything else (a pickled callable, a class
instance) is refused with a ``CheckpointError``.

Loading also verifies the zip archive's CRC-32s first (bit rot or a damaged copy is an error,
never a silently wrong weight or Adam moment), and checks the training counters and the
config's field types (``counter_problem``, ``config_problem``): every such error names the file
and the entry.
"""
from __future__ import annotations

import glob
import math
import os
import random
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from pyro_kpp.config import Config
from pyro_kpp.models import build_model
from pyro_kpp.models.base import EpisodicModel

FORMAT = "pyro_kpp.checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
#: Entries every checkpoint has (enough to rebuild the model), and those resuming training needs.
MODEL_KEYS = ("config", "model", "step")
RESUME_KEYS = (*MODEL_KEYS, "optimizer", "scheduler", "epoch", "epoch_step", "epoch_loss", "train_seconds",
               "skipped", "rng")


#: What a checkpoint may hold besides tensors and plain data: numpy arrays (the numpy RNG state).
SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one of ours."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _torch_save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _torch_save(obj, f) -> None:
    """``torch.save``, with a failed write of the file reported as the OSError it is.

    torch's zip writer turns an error of the file's ``write`` (ENOSPC, EFBIG, EIO) into a
    ``RuntimeError`` ("unexpected pos ...") whose context is that OSError; callers handle disk
    errors as OSError, with a one-line message.
    """
    try:
        torch.save(obj, f)
    except RuntimeError as exc:
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise


def nonfinite_entries(tensors: dict) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` (a state dict) holding NaN or Inf.

    No such weights are ever saved or loaded: they decode NaN images and train no further.
    """
    names = [k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).tolist()   # one host sync
    return [k for k, ok in zip(names, finite) if not ok]


def ensure_writable(run_dir: str | os.PathLike, needed_bytes: int) -> Path:
    """Fail before training, with a clear message, if ``run_dir`` cannot hold our checkpoints."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-") as probe:
            probe.write(b"pyro_kpp")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise OSError(f"run directory: cannot write to {run_dir} ({exc.strerror or exc})") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise OSError(f"run directory: {run_dir} has {free / 2**20:.1f} MiB free, checkpoints need about "
                      f"{needed_bytes / 2**20:.1f} MiB (a new one is written beside the old one)")
    return run_dir


def find_checkpoint(location: str | os.PathLike) -> Path:
    """A checkpoint file from a run directory or a file path."""
    p = Path(location)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"checkpoint: no checkpoint at {p} (expected a run directory holding "
                              f"{CHECKPOINT_NAME}, or a checkpoint file){_named_like(Path(location))}")
    return p


def _named_like(missing: Path) -> str:
    """A hint when ``missing`` is the stem of timestamped runs (``runs/omniglot-kpp`` for the
    default ``runs/omniglot-kpp-<time>``): names the newest, not silently opening a run the user
    did not name."""
    found = sorted(missing.parent.glob(f"{glob.escape(missing.name)}-*/{CHECKPOINT_NAME}"),
                   key=lambda c: c.stat().st_mtime) if missing.name and missing.parent.is_dir() else []
    if not found:
        return ""
    return (f"; {len(found)} run(s) named like it, the newest {found[-1].parent} (name a run with "
            f"svi's --run-dir to have a fixed folder)")


def load_checkpoint(location: str | os.PathLike, map_location="cpu", require: tuple[str, ...] = MODEL_KEYS) -> dict:
    """Read and check a checkpoint; errors name the file and what is wrong with it.

    ``require``: the entries the caller needs (``RESUME_KEYS`` to resume training). Before
    anything is unpickled the archive's CRC-32s are verified (bit rot in a weight or an Adam
    moment would otherwise load silently); after, the counters and the config are checked.
    The file is opened once, so the bytes checked are the bytes loaded even if a writer
    replaces the path meanwhile.
    """
    path = find_checkpoint(location)
    try:
        with open(path, "rb") as f:
            _verify_archive(f, path)
            f.seek(0)
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                state = torch.load(f, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or corrupt files fail in many ways inside torch/pickle
        blocked = [line.strip() for line in str(exc).splitlines() if "global" in line.lower()]
        if blocked:             # weights_only refused a class or function the pickle would import
            raise CheckpointError(f"checkpoint: {path} holds objects other than tensors and plain data; refusing "
                                  f"to load it, since unpickling them could run code ({blocked[0]})") from None
        raise CheckpointError(f"checkpoint: {path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {path} is not a pyro_kpp checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {path} has format version {state.get('format_version')!r}, "
                              f"this pyro_kpp reads version {FORMAT_VERSION}")
    missing = [key for key in require if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint: {path} lacks {missing} (damaged, or not written by pyro_kpp.svi)")
    problem = counter_problem(state) or (config_problem(state["config"]) if "config" in state else None)
    if problem:
        raise CheckpointError(f"checkpoint: {path}: {problem} (damaged, or edited by hand)")
    return state


def _verify_archive(f, path: Path) -> None:
    """Check every member of the checkpoint's zip archive against its CRC-32 (torch writes them
    but does not check them when loading)."""
    try:
        with zipfile.ZipFile(f) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as exc:
        raise CheckpointError(f"checkpoint: {path} is truncated or corrupt (not a readable zip archive: "
                              f"{exc})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint: {path} is corrupt: its member {bad} fails its CRC-32 check (bit rot "
                              f"or a damaged copy); restore the file from a backup")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2


def counter_problem(state: dict) -> str | None:
    """What is wrong with a checkpoint's training counters (those it has), or None.

    Steps and epochs are non-negative integers; the current epoch's steps are part of all
    steps, its finite-loss count part of its steps; skipped steps are part of all steps and a
    streak of skips part of them; the training time is a finite number of seconds >= 0.
    """
    for key in ("step", "epoch", "epoch_step"):
        if key in state and not _is_count(state[key]):
            return f"\"{key}\" is {state[key]!r}, expected a non-negative integer"
    if "epoch_step" in state and "step" in state and state["epoch_step"] > state["step"]:
        return f"\"epoch_step\" {state['epoch_step']} exceeds \"step\" {state['step']}"
    if "epoch_loss" in state:
        value = state["epoch_loss"]
        if not (_is_pair(value) and isinstance(value[0], (int, float)) and math.isfinite(value[0])
                and _is_count(value[1]) and value[1] <= state.get("epoch_step", value[1])):
            return (f"\"epoch_loss\" is {value!r}, expected (finite sum, count) with the count at most "
                    f"\"epoch_step\"")
    if "skipped" in state:
        value = state["skipped"]
        if not (_is_pair(value) and all(map(_is_count, value)) and value[1] <= value[0] <= state.get("step", value[0])):
            return (f"\"skipped\" is {value!r}, expected (skipped steps, of them in a row) with "
                    f"in a row <= skipped <= \"step\"")
    if "train_seconds" in state:
        value = state["train_seconds"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            return f"\"train_seconds\" is {value!r}, expected a finite number of seconds >= 0"
    return None


def config_problem(config) -> str | None:
    """What is wrong with a checkpoint's config (its type, a field's type or value), or None."""
    if not isinstance(config, dict):
        return f"\"config\" is a {type(config).__name__}, expected a dict of Config fields"
    try:
        Config.from_dict(config)
    except (ValueError, TypeError) as exc:
        return f"\"config\": {exc}"
    return None


def rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and, when present, CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_from_state(state: dict, device: torch.device | str = "cpu") -> EpisodicModel:
    """Rebuild a model from a checkpoint dict (config + weights)."""
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint: its weights do not fit a {cfg.model!r} model with this config: {exc}") from None
    bad = nonfinite_entries(state["model"])
    if bad:
        raise ValueError(f"checkpoint: {len(bad)} weight tensors hold NaN or Inf values (e.g. {bad[0]}); "
                         f"the run diverged before this checkpoint was saved")
    return model.to(device)
