"""Run directories: one run per folder, one writer at a time, nothing half-written left behind.

A run directory holds one training run: the files ``RUN_FILES`` and the image grids
``images/<kind>_<epoch>.png`` (``RUN_IMAGE``), known by name; anything else in the folder is
the user's and is never deleted. The training CLI holds the folder through :func:`claim` for
the run's whole life:

* a lock file (``flock``) keeps a second process out: two writers would interleave their
  metrics and overwrite each other's checkpoints. The kernel drops the lock when the process
  ends in any way, SIGKILL included, so a stale lock can never block a resume;
* a fresh run refuses a folder that already holds a run, unless told ``overwrite``, which
  deletes the run's files by name and is refused outright in a folder holding anything else;
* temporary files of our own naming left by a write that was killed are removed (they would
  otherwise stay forever and count against the free-space check);
* a fresh run that fails before its first checkpoint removes what it wrote: nothing in the
  folder could be resumed, and its leftovers would make the next attempt refuse the folder.

It also repairs the metrics files on resume (:func:`repair_metrics`) and fingerprints the
data (:func:`data_fingerprint`) so that a resumed run trains on the data it started with.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from pyro_kpp.train.checkpoint import CHECKPOINT_NAME

#: The files a run writes at its folder's top level; any of them present means the folder holds a run.
RUN_FILES = (CHECKPOINT_NAME, "metrics.jsonl", "steps.jsonl", "config.json", "curves.png")
#: The run's image grids (pyro_kpp.viz.grids.write_images) in ``images/``, and their temporary files.
IMAGES_DIR = "images"
RUN_IMAGE = re.compile(r"\.?(reconstructions|samples)_\d{4,}\.png(\.\w+\.tmp)?")
LOCK_NAME = ".lock"
#: Temporary files of our own naming: checkpoint.save_checkpoint's, ensure_writable's probe and
#: repair_metrics's rewrite. Only ever removed while holding the lock, so never another writer's.
STALE_PATTERNS = (f".{CHECKPOINT_NAME}.*.tmp", ".write-test-*", "*.jsonl.tmp", ".curves.png.*.tmp")
#: Fields of every record of ``metrics.jsonl`` (``pyro_kpp.train.epoch.evaluate_epoch``) that resuming and
#: the curves read (a tuple: one of them), and of ``steps.jsonl``; all numbers, step and epoch counts.
METRICS_FIELDS = ("epoch", "step", "train_objective", "train_bound", "train_seconds_total", ("test_bound", "valid_bound"))
STEPS_FIELDS = ("step", "loss", "grad_norm")


class RunDirError(ValueError):
    """A run directory that is busy, already holds a run, or has damaged metrics."""


def default_run_dir(data: str, model: str, root: Path = Path("runs")) -> Path:
    """A new folder ``runs/<data>-<model>-<time>``, created here so that it is unique.

    ``mkdir`` without ``exist_ok`` is atomic: of two runs started in the same second, one gets
    the plain name and the other a ``-2`` suffix, never the same folder.
    """
    base = f"{data}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"run directory: no free name {root / base}-N; pass --run-dir")


def choose(run_dir: str | None, resume: str | os.PathLike | None, data: str | None = None, model: str | None = None,
           is_main: bool = True) -> tuple[Path, bool]:
    """The run's folder (``--run-dir``, ``--resume``) and whether the run starts there afresh
    rather than continuing the checkpoint there.

    Without ``run_dir``: the resumed run's folder, else a new, unique one named by ``data`` and
    ``model``, made only by the process that writes (``is_main``; the other ranks of a torchrun
    write nothing).
    """
    resumed_dir = None if resume is None else Path(resume) if Path(resume).is_dir() else Path(resume).parent
    if run_dir:
        chosen = Path(run_dir)
    elif resumed_dir is not None:
        chosen = resumed_dir
    else:
        chosen = default_run_dir(data, model) if is_main else Path("runs")
    return chosen, resumed_dir is None or chosen.resolve() != resumed_dir.resolve()


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock``, holding the owner's pid for the message.

    The file is removed on release; a process that opened it just before then would lock an
    unlinked file, so :meth:`acquire` retries until the file it locked is the one at the path.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirError(f"run directory: {self.path.parent} is in use by another training process "
                                  f"(pid {owner}); wait for it to end, or pass another --run-dir") from None
            if self._is_current(fd):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def _is_current(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)                       # closing the last descriptor drops the flock
        self.fd = None


def _is_ours(path: Path) -> bool:
    """Whether a top-level entry of a run folder has a name the run gives its files."""
    if path.name in RUN_FILES:
        return path.is_file()
    return path.name == LOCK_NAME or any(path.match(pattern) for pattern in STALE_PATTERNS)


def sort_entries(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """The run's files in ``run_dir`` (by name, lock and temporary files included) and everything
    else there (the user's: never deleted)."""
    ours, foreign = [], []
    for path in sorted(run_dir.iterdir()):
        if path.name == IMAGES_DIR and path.is_dir() and not path.is_symlink():
            for image in sorted(path.iterdir()):
                (ours if image.is_file() and RUN_IMAGE.fullmatch(image.name) else foreign).append(image)
        else:
            (ours if _is_ours(path) else foreign).append(path)
    return ours, foreign


def existing_run_files(run_dir: Path) -> list[str]:
    """The run's files in ``run_dir`` (relative names), not counting its lock and temporary files."""
    ours, _ = sort_entries(run_dir)
    return [p.relative_to(run_dir).as_posix() for p in ours
            if (p.name in RUN_FILES if p.parent == run_dir else not p.name.endswith(".tmp"))]


def _listed(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def refuse_or_replace(run_dir: Path, overwrite: bool) -> None:
    """A fresh run never silently replaces another: refuse, or remove the old run when asked,
    and only when the folder holds nothing but the run's own files."""
    found = existing_run_files(run_dir)
    if overwrite:
        foreign = [p.relative_to(run_dir).as_posix() + ("/" if p.is_dir() else "") for p in sort_entries(run_dir)[1]]
        if foreign:
            raise RunDirError(f"--overwrite: {run_dir} holds files no run wrote ({_listed(foreign)}); "
                              f"--overwrite deletes only a run's own files, so nothing was deleted. Move those "
                              f"away, or pass another --run-dir")
        remove_run_files(run_dir)
    elif found and not (run_dir / CHECKPOINT_NAME).is_file():
        raise RunDirError(f"run directory: {run_dir} holds files of a run that never saved a checkpoint "
                          f"({_listed(found)}; it was stopped before its first checkpoint), so there is nothing to "
                          f"resume; pass --overwrite to delete them and start over, or pass another --run-dir")
    elif found:
        raise RunDirError(f"run directory: {run_dir} already holds a run ({_listed(found)}); continue it with "
                          f"--resume {shlex.quote(str(run_dir))}, or pass --overwrite to replace it")


def remove_run_files(run_dir: Path) -> None:
    """Delete the run's own files by name (never its lock, never anything else); ``images/``
    goes too if that leaves it empty."""
    for path in sort_entries(run_dir)[0]:
        if path.name != LOCK_NAME:
            path.unlink()
    with contextlib.suppress(OSError):
        (run_dir / IMAGES_DIR).rmdir()


def remove_stale_temp_files(run_dir: Path) -> None:
    stale = [p for pattern in STALE_PATTERNS for p in run_dir.glob(pattern) if p.is_file()]
    for p in stale:
        p.unlink()
    if stale:
        print(f"run directory: removed {len(stale)} temporary file(s) left by an interrupted write "
              f"({', '.join(sorted(p.name for p in stale))})", file=sys.stderr)


@contextlib.contextmanager
def claim(run_dir: Path, fresh: bool, overwrite: bool = False):
    """Hold ``run_dir`` for one run (see the module docstring).

    ``fresh``: the run starts here rather than continuing the checkpoint in this folder.
    """
    if overwrite and not fresh:
        raise RunDirError("--overwrite: a resumed run continues its own folder; drop --overwrite or --resume")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
    except OSError as exc:
        raise OSError(f"run directory: cannot use {run_dir} ({exc.strerror or exc})") from None
    started, finished = False, False
    try:
        if fresh:
            refuse_or_replace(run_dir, overwrite)
        remove_stale_temp_files(run_dir)
        started = True
        yield run_dir
        finished = True
    finally:
        if started and not finished and fresh and not (run_dir / CHECKPOINT_NAME).exists():
            remove_run_files(run_dir)           # under the lock: only this run's files
        lock.release()
        if started and not finished and fresh:
            with contextlib.suppress(OSError):
                run_dir.rmdir()                 # only if empty: never anything of the user's


def repair_metrics(path: Path, step: int, fields: tuple = ("step",)) -> None:
    """Make a metrics file (one JSON record with a ``step`` per line) agree with a checkpoint at ``step``.

    Records past ``step`` are dropped: a run killed after writing them but before its
    checkpoint redoes that work on resume, and must not count it twice. A torn last line,
    the only damage a crash can cause, is dropped too; damage anywhere else, including a
    record that lacks one of ``fields`` (``METRICS_FIELDS``, ``STEPS_FIELDS``) or holds a
    non-number there, is an error naming the file and line, since guessing could lose or
    duplicate records (and the curves drawn from the file would fail at every epoch).
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                torn = True
                continue
            raise RunDirError(f"{path}: line {number} is not a JSON record ({exc.msg}); repair or delete "
                              f"that line to resume") from None
        problem = record_problem(record, fields)
        if problem:
            raise RunDirError(f"{path}: line {number} {problem}; repair or delete that line to resume")
        if record["step"] <= step:
            kept.append(line)
    if torn:
        print(f"{path}: dropped a torn last line (an interrupted write)", file=sys.stderr)
    if torn or len(kept) != sum(1 for line in lines if line.strip()):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def record_problem(record, fields: tuple) -> str | None:
    """What is wrong with one metrics record (see ``repair_metrics``), or None. ``fields``: names,
    or tuples of names of which the record has one; ``step`` and ``epoch`` are counts."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not a record"
    for field in fields:
        names = field if isinstance(field, tuple) else (field,)
        name = next((n for n in names if n in record), names[0])
        value, count = record.get(name), name in ("step", "epoch")
        if isinstance(value, bool) or not isinstance(value, int if count else (int, float)):
            return f"has no {'integer' if count else 'number'} {' or '.join(map(json.dumps, names))}"
        if count and value < 0:
            return f"has {json.dumps(name)} = {value}, expected a non-negative integer"
    return None


def data_fingerprint(data) -> dict:
    """Split sizes and a hash of every image of a ``pyro_kpp.data.ImageData``.

    Saved in each checkpoint: a resumed run must see the data it started with, and a folder
    swapped for another (or a data set re-split) changes the hash. Hashing the pixels rather
    than file names also covers data sets read from a few archive files (MNIST, CIFAR-10).
    """
    digest = hashlib.blake2b(digest_size=16)
    for images in (data.train, data.test):
        digest.update(images.contiguous().numpy().tobytes())
    return {"name": data.name, "train": len(data.train), "test": len(data.test), "hash": digest.hexdigest()}


def check_same_data(recorded: dict | None, current: dict, data_dir) -> None:
    """Refuse to resume on data other than the checkpoint's (``recorded``: its fingerprint)."""
    if recorded is None:
        print("--resume: this checkpoint records no data fingerprint (written by an older pyro_kpp); "
              "the data cannot be checked", file=sys.stderr)
        return
    if recorded != current:
        raise RunDirError(f"--data-dir: the data in {data_dir or 'the default data folder'} differ from those the "
                          f"checkpoint was trained on (checkpoint: {recorded}, now: {current}); resume with the "
                          f"original data")



def newest_run(root: str | os.PathLike = "runs") -> Path:
    """The most recently saved run under ``root`` (by its checkpoint's time): what the notebooks
    open when ``$PYRO_KPP_RUN`` does not name one, so they follow the training default's
    timestamped folders ``runs/<data>-<model>-<time>``."""
    found = sorted(Path(root).glob(f"*/{CHECKPOINT_NAME}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RunDirError(f"PYRO_KPP_RUN: no run under {Path(root).resolve()} holds a {CHECKPOINT_NAME}; train one "
                          f"(python -m pyro_kpp.svi --data omniglot) or set PYRO_KPP_RUN to a run directory")
    return found[-1].parent
