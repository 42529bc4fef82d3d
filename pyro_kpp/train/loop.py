"""The training loop (nanoGPT style), read top to bottom: batch, loss and step; once per epoch,
evaluate, log and checkpoint. Its plumbing is in ``pyro_kpp.train.session`` (building and
restoring the run, files, budget, progress bars), the step in ``pyro_kpp.train.step`` and the
epoch's measurements in ``pyro_kpp.train.epoch``.

The loss is Pyro's ``Trace_ELBO`` (or ``TraceMeanField_ELBO``) used as a differentiable loss with
a plain torch optimizer over the model's parameters (``pyro_kpp.train.optim.build_optimizer``: a
foreach Adam, or LARS(Adam) with a one-cycle schedule for ``--preset paper``): one optimizer for
the whole model and global gradient-norm clipping, which Pyro's per-tensor
``PyroOptim``/``ClippedAdam`` do not give. The same models also train with Pyro's own ``SVI``
(docs/training.md).
"""
from __future__ import annotations

import time
from pathlib import Path

from pyro_kpp.config import Config
from pyro_kpp.train import distributed
from pyro_kpp.train.interrupts import StopRequests
from pyro_kpp.train.session import Bars, Run
from pyro_kpp.train.step import train_step


def train(cfg: Config, run_dir: str | Path, resume_state: dict | None = None,
          progress: bool = True, log_steps: bool = False, world: distributed.World | None = None) -> list[dict]:
    """Train ``cfg`` in ``run_dir``; returns the metrics of every epoch run here.

    Under torchrun (``world``, see ``pyro_kpp.train.distributed``) every rank trains on its slice
    of each global batch of ``cfg.batch_size`` episodes with averaged gradients; only rank 0
    evaluates and writes files, and only rank 0 returns metrics. The caller holds ``run_dir``
    (the CLI does, with ``rundir.claim``: a lock against other writers, no overwriting of
    another run). SIGINT/SIGTERM finish the step, save a checkpoint and raise ``Interrupted``.
    """
    run = Run.start(cfg, Path(run_dir), resume_state, world or distributed.init(cfg.device))
    state, history = run.state, []
    show = progress and run.world.is_main
    with StopRequests() as stop, Bars(cfg, state, run.episodes.steps_per_epoch(), show) as bars:
        while state.epoch < cfg.epochs and run.budget_left():
            epoch_start, interrupted = time.time(), False
            for x in bars.epoch(run.episodes.train_epoch(state.epoch, start_step=state.epoch_step)):
                line = train_step(run.loss_fn, state, run.my_slice(x), cfg, run.world, run.validate_step())
                run.check_nonfinite_streak()
                if log_steps:
                    run.log_step(line)
                bars.step(line)
                interrupted = run.world.any(stop.requested)       # all ranks stop at the same step
                if interrupted or not run.budget_left(time.time() - epoch_start):
                    break
            train_seconds = run.end_training(epoch_start)
            if interrupted:
                run.save()
                raise run.interrupted(stop)
            if run.world.is_main:
                history.append(run.log_epoch(train_seconds, progress))
            if state.epoch_step >= run.episodes.steps_per_epoch():
                state.next_epoch()
            run.save()
            bars.resume_clock()                                   # evaluation and saving: not training time
        if stop.requested:                                        # after the last step, e.g. in the final evaluation
            raise run.interrupted(stop, after_last_step=True)
    return history
