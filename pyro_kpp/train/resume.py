"""What a resumed run keeps, what it may change, and whether it has anything left to do.

A run is self-contained: its config holds the resolved data root (``resolve_run_data_dir``), so
the resume command printed on Ctrl-C works in a fresh shell without ``$PYRO_KPP_DATA``. A resume
whose targets are already reached (``--epochs``, ``--max-steps``, or the cumulative
``--max-minutes`` budget) is an error naming the target and how to extend it, never a silent
exit 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

from pyro_kpp.config import Config
from pyro_kpp.data import resolve_data_dir

# Options that may change when resuming a run (they do not change the model or data order).
RESUMABLE = {"epochs", "max_steps", "max_minutes", "max_nonfinite", "validate_every_step", "device",
             "eval_episodes", "data_dir", "compile", "precision", "channels_last"}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}


def config_from_args(args: argparse.Namespace, resume_state: dict | None) -> Config:
    """The run's config: defaults <- checkpoint (when resuming) <- explicit CLI options."""
    given = {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS}
    if resume_state is None:
        return Config(**given)
    base = Config.from_dict(resume_state["config"])
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE and getattr(base, k) != v)
    if changed:
        raise ValueError(f"--resume: options {changed} differ from the checkpoint's config; a resumed run "
                         f"keeps its model and data (only {sorted(RESUMABLE)} may change)")
    return Config(**{**base.to_dict(), **given})


def resolve_run_data_dir(cfg: Config) -> None:
    """Store the absolute data root in ``cfg`` (``--data-dir`` > ``$PYRO_KPP_DATA`` > the cache
    folder), so that the run's config says where its data are and a resume needs no environment."""
    cfg.data_dir = str(resolve_data_dir(cfg.data_dir))


def check_resume_targets(cfg: Config, resume_state: dict | None) -> None:
    """A resumed run must have something left to do: a target it has already reached is an
    error saying which one and how to extend it (exit 0 after doing nothing would look like success)."""
    if resume_state is None:
        return
    done = resume_state["step"]
    if cfg.max_steps is not None and cfg.max_steps <= done:
        raise ValueError(f"--max-steps: the checkpoint is already at step {done}; "
                         f"ask for more than {done} steps to continue")
    if cfg.epochs <= resume_state["epoch"]:
        raise ValueError(f"--epochs: the checkpoint has finished {resume_state['epoch']} epochs; "
                         f"ask for more than {resume_state['epoch']} to continue")
    spent = resume_state["train_seconds"] / 60
    if cfg.max_minutes is not None and spent >= cfg.max_minutes:
        raise ValueError(f"--max-minutes: the run has trained {spent:.1f} minutes, which reaches its budget of "
                         f"{cfg.max_minutes:g} minutes (the budget counts all training of the run, resumes "
                         f"included); ask for more than {spent:.1f} minutes to continue")


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``, quoted for a POSIX shell (a folder
    name with spaces or ``$`` must not break it)."""
    return f"python -m pyro_kpp.svi --resume {shlex.quote(str(run_dir.resolve()))}"
