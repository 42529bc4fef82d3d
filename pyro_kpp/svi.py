"""Training CLI: ``python -m pyro_kpp.svi --data omniglot [--model kpp] ...`` (``pyro-kpp-train``).

The options are generated from the ``Config`` dataclass (``pyro_kpp.config.opt``,
``pyro_kpp.cliargs``); the loop is ``pyro_kpp.train.loop.train``. This module chooses and locks the
run folder (``pyro_kpp.train.rundir``), reads a resumed run's checkpoint under that lock, and turns
every error a user can fix into one line.

Each epoch: train on every training image once (random episodes, or ``--episode-classes``;
binarized data get a fresh binarization, 8-bit data for ``--likelihood dmol`` are used as they
are), evaluate the negative bound on the fixed validation or test episodes (in nats/image, and in
bits/dim for 8-bit data), write image grids, append a line to ``metrics.jsonl`` and save
``checkpoint.pt`` (atomically). A KL warm-up (``--kl-warmup``) weights the KL terms of the
training loss only. The speed options (``pyro_kpp.train.speed``): bf16 networks where native
(``--precision auto``) and channels-last are the defaults, ``--compile`` is off; every evaluation
runs in float32.

Under ``torchrun --nproc_per_node W -m pyro_kpp.svi ...`` the loop runs data-parallel on W ranks
under ``DistributedDataParallel`` (``--batch-size`` is then the global batch): see
``pyro_kpp.train.distributed``.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

from pyro_kpp.cliargs import add_config_options, flag_message
from pyro_kpp.config import Config
from pyro_kpp.data import DATASETS
from pyro_kpp.models import MODELS
from pyro_kpp.train import distributed, rundir
from pyro_kpp.train.checkpoint import RESUME_KEYS, find_checkpoint, load_checkpoint
from pyro_kpp.train.loop import train
from pyro_kpp.train.resume import CONFIG_FIELDS, check_resume_targets, config_from_args
from pyro_kpp.train.session import Interrupted
from pyro_kpp.train.step import NonFiniteTraining


def build_parser() -> argparse.ArgumentParser:
    """One option per ``Config`` field with help metadata, then the run's own options. Options
    not given are absent from the parsed namespace (``SUPPRESS``), so that the config's default,
    or the resumed run's value, applies; the help shows the defaults."""
    p = argparse.ArgumentParser(prog="python -m pyro_kpp.svi", description=__doc__.split("\n")[0],
                                argument_default=argparse.SUPPRESS)
    add_config_options(p, Config, choices={"model": sorted(MODELS), "data": DATASETS})
    p.add_argument("--run-dir", help="where to write checkpoints, metrics and images "
                                     "(default: runs/<data>-<model>-<time>, or the resumed run)")
    p.add_argument("--resume", help="run directory or checkpoint file to resume from")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --run-dir that holds a run, deleting that run (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-steps", action="store_true", help="append each step's loss (the global mean over "
                                                           "ranks) and gradient norm to steps.jsonl")
    return p



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resume = getattr(args, "resume", None)
        source = find_checkpoint(resume) if resume else None      # a wrong path claims no folder
        named = None if source else config_from_args(args, None)  # a fresh run's config names its folder
        is_main = distributed.is_main_rank()
        run_dir, fresh = rundir.choose(getattr(args, "run_dir", None), source, named and named.data,
                                       named and named.model, is_main)
        if is_main:
            print(f"run directory: {run_dir}", file=sys.stderr)
        with rundir.claim(run_dir, fresh, getattr(args, "overwrite", False)) if is_main else nullcontext():
            # Read under the lock: a resume that waited for another writer continues from what it
            # left, rather than rolling the run back to the checkpoint read before.
            resume_state = load_checkpoint(source, require=RESUME_KEYS) if source else None
            cfg = config_from_args(args, resume_state)
            world = distributed.init(cfg.device)
            check_resume_targets(cfg, resume_state)
            history = train(cfg, run_dir, resume_state, progress=not getattr(args, "no_progress", False),
                            log_steps=getattr(args, "log_steps", False), world=world)
    except Interrupted as stop:
        return 128 + stop.signum
    except (ValueError, TypeError, OSError, NonFiniteTraining) as exc:
        parser.exit(2, f"error: {flag_message(exc, CONFIG_FIELDS)}\n")
    if history:
        print(json.dumps(history[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
