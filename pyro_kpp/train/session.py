"""A training run's plumbing, so that ``pyro_kpp.train.loop.train`` shows only the loop.

* ``Run.start`` builds what a run needs: the data and its fingerprint, the episodes, the model
  (fresh, or restored from a checkpoint with its optimizer state and RNG streams), the loss
  (data-parallel under torchrun) and the ``TrainState``; it writes the run's ``config.json``.
* A ``Run`` owns the run's files (``steps.jsonl``, ``metrics.jsonl``, ``curves.png``,
  ``checkpoint.pt``), its budget (``--max-steps``, ``--max-minutes``) and its messages.
* ``Bars`` draws the whole run's progress bar, whose ETA counts training steps only, and the
  epoch's bar with the running bound below it.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from pyro_kpp.config import Config
from pyro_kpp.data import load_dataset
from pyro_kpp.data.episodes import Episodes, make_episodes, test_batches
from pyro_kpp.inference.bound import TrainingLoss, make_elbo
from pyro_kpp.models import build_model
from pyro_kpp.train import distributed, rundir, speed
from pyro_kpp.train.checkpoint import CHECKPOINT_NAME, ensure_writable, model_from_state, save_checkpoint
from pyro_kpp.train.epoch import eval_split, evaluate_epoch, report, weights
from pyro_kpp.train.footprint import check_training_fits
from pyro_kpp.train.interrupts import StopRequests
from pyro_kpp.train.optim import build_optimizer
from pyro_kpp.train.resume import resolve_run_data_dir, resume_command
from pyro_kpp.train.step import TrainState, check_finite_weights, nonfinite_stop
from pyro_kpp.viz.curves import save_curves_or_warn


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class Run:
    """One training run in ``run_dir``: what ``start`` built, and the run's files and budget."""

    cfg: Config
    run_dir: Path
    world: distributed.World
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    state: TrainState
    episodes: Episodes
    fingerprint: dict
    first_test: torch.Tensor                       # the episodes of the image grids
    first_step: int                                # validated (see Config.validate_every_step)
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, cfg: Config, run_dir: Path, resume_state: dict | None, world: distributed.World) -> "Run":
        """Build the run (fresh, or from ``resume_state``, a loaded checkpoint) and write its config."""
        resolve_run_data_dir(cfg)                               # the run's config says where its data are
        data = load_dataset(cfg.data, cfg.data_dir)
        fingerprint = rundir.data_fingerprint(data)
        if resume_state is not None:
            rundir.check_same_data(resume_state.get("data"), fingerprint, cfg.data_dir)
        cfg.image_shape = tuple(data.image_shape)
        check_training_fits(cfg, world.device, world.size)      # sizes that cannot fit: refused before allocating
        episodes = make_episodes(cfg, data, world.device)

        pyro.set_rng_seed(cfg.seed)
        model = (build_model(cfg).to(world.device) if resume_state is None
                 else model_from_state(resume_state, world.device))
        message = speed.prepare(model, cfg.precision, cfg.compile, world.device, cfg.channels_last)[1]  # bf16: loss only
        if message and world.is_main:
            print(message, file=sys.stderr)
        loss = TrainingLoss(model, make_elbo(cfg.elbo), cfg.training_folds)
        loss_fn = world.data_parallel(loss)                     # DDP: rank 0's weights everywhere
        world.seed_sampling(cfg.seed)                           # per-rank noise (a no-op in one process)
        state = TrainState(*build_optimizer(cfg, model, episodes.steps_per_epoch()))   # by cfg.preset
        if resume_state is not None:
            state.load_state_dict(resume_state)
            world.restore_rng(resume_state["rng"], cfg.seed, state.step)
        if world.is_main:
            state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            ensure_writable(run_dir, needed_bytes=3 * state_bytes + 2**20)   # a new one: weights + Adam moments
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            if resume_state is not None:
                rundir.repair_metrics(run_dir / "metrics.jsonl", state.step, rundir.METRICS_FIELDS)
                rundir.repair_metrics(run_dir / "steps.jsonl", state.step, rundir.STEPS_FIELDS)
        first_test = next(iter(test_batches(episodes, None, eval_split(cfg))))
        model.train()
        return cls(cfg, run_dir, world, model, loss_fn, state, episodes, fingerprint, first_test, state.step)

    def my_slice(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's episodes of a global batch x (B, T, C, H, W): all of them in one process."""
        return x[self.world.episodes(self.cfg.batch_size)]

    def validate_step(self) -> bool:
        """Pyro's validation on the run's first step (every step with ``--validate-every-step``)."""
        return self.cfg.validate_every_step or self.state.step == self.first_step

    def budget_left(self, seconds_this_epoch: float = 0.0) -> bool:
        """Whether ``--max-steps`` and ``--max-minutes`` (training time, all ranks agreeing) allow another step."""
        if self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps:
            return False
        spent = self.state.train_seconds + seconds_this_epoch
        return self.cfg.max_minutes is None or not self.world.any(spent >= 60 * self.cfg.max_minutes)

    def check_nonfinite_streak(self) -> None:
        """Stop after ``--max-nonfinite`` skipped steps in a row."""
        if self.state.nonfinite_in_row >= self.cfg.max_nonfinite:
            raise nonfinite_stop(f"{self.state.nonfinite_in_row} steps in a row (up to step {self.state.step - 1}) "
                                 f"gave a non-finite loss or gradient", self.run_dir)

    def log_step(self, line: dict) -> None:
        """Append a step's loss and gradient norm to ``steps.jsonl`` (``--log-steps``; rank 0)."""
        if self.world.is_main:
            with (self.run_dir / "steps.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")

    def end_training(self, epoch_start: float) -> float:
        """Close the epoch's training phase: the weights must be finite; returns its seconds."""
        check_finite_weights(self.model, self.state.step, self.run_dir)
        seconds = time.time() - epoch_start
        self.state.train_seconds += seconds
        return seconds

    def log_epoch(self, train_seconds: float, show: bool) -> dict:
        """Evaluate, append the record to ``metrics.jsonl``, redraw ``curves.png`` and print the
        epoch's line (rank 0; the other ranks wait in ``save``'s gather)."""
        record = {**evaluate_epoch(self.model, self.episodes, self.cfg, self.state, self.run_dir, self.first_test),
                  "train_seconds": round(train_seconds, 2), "wall_seconds": round(time.time() - self.started, 2)}
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        save_curves_or_warn(self.run_dir)
        if show or not sys.stderr.isatty():
            print(report(record), file=sys.stderr, flush=True)
        return record

    def save(self) -> None:
        """The checkpoint (``save_checkpoint``, see ``pyro_kpp.train.checkpoint``)."""
        save(self.run_dir, self.cfg, self.model, self.state, self.world, self.fingerprint)

    def interrupted(self, stop: StopRequests, after_last_step: bool = False) -> Interrupted:
        """Say where the run stopped and how to resume it (rank 0); the error that ends the CLI."""
        if self.world.is_main:
            path = self.run_dir / CHECKPOINT_NAME
            print(f"{stop.name or 'another rank'}: " + (
                f"arrived after the last step (step {self.state.step}); the run's checkpoint is saved to {path}"
                if after_last_step else f"stopped at step {self.state.step}; checkpoint saved to {path}. "
                                        f"Resume with: {resume_command(self.run_dir)}"), file=sys.stderr, flush=True)
        return Interrupted(stop.signum or signal.SIGTERM)


def save(run_dir: Path, cfg: Config, model, state: TrainState, world: distributed.World, fingerprint: dict) -> None:
    """Save everything needed to resume exactly (rank 0; every rank joins the RNG gather); a failed
    write leaves the old checkpoint intact."""
    rng = world.checkpoint_rng(model)                       # every rank's; checks they agree
    if not world.is_main:
        return
    kept = ("the previous checkpoint is intact" if (run_dir / CHECKPOINT_NAME).exists() else
            "no checkpoint of this run has been written yet")
    try:
        save_checkpoint(run_dir / CHECKPOINT_NAME, {
            "config": cfg.to_dict(), "model": model.state_dict(), **state.state_dict(), "rng": rng,
            "pyro_kpp_version": __import__("pyro_kpp").__version__, "data": fingerprint})
    except OSError as exc:
        raise OSError(f"checkpoint: could not write {run_dir / CHECKPOINT_NAME} ({exc.strerror or exc}); "
                      f"{kept}") from None


def run_bar(cfg: Config, state: TrainState, steps_per_epoch: int, enabled: bool) -> tqdm:
    """The whole run's bar, over every step to ``--epochs`` (or ``--max-steps``), so that its ETA
    says when training will end, evaluation time excluded: ``Bars.resume_clock`` restarts its clock after
    each epoch's evaluation and checkpoint (``tqdm.unpause``), so neither its elapsed time nor
    its step rate counts them, and the ETA does not jump after each evaluation and take steps
    to settle. The epoch's bar sits below it."""
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.epochs * steps_per_epoch, cfg.max_steps)
    return tqdm(total=total, initial=state.step, desc="run", unit="step", disable=not enabled, dynamic_ncols=True,
                position=0)


class Bars:
    """The whole run's bar (``run_bar``) and, below it, each epoch's with the running bound."""

    def __init__(self, cfg: Config, state: TrainState, steps_per_epoch: int, enabled: bool):
        self.state, self.steps_per_epoch, self.enabled = state, steps_per_epoch, enabled
        self.whole_run = run_bar(cfg, state, steps_per_epoch, enabled)
        self.bar, self.running = None, None

    def __enter__(self) -> "Bars":
        return self

    def __exit__(self, *exc) -> None:
        self.whole_run.close()

    def epoch(self, batches):
        """The epoch's batches, counted by its bar."""
        self.bar = tqdm(batches, total=self.steps_per_epoch, initial=self.state.epoch_step,
                        desc=f"epoch {self.state.epoch}", unit="step", disable=not self.enabled, dynamic_ncols=True,
                        position=1, leave=False)
        self.running = None
        try:
            yield from self.bar
        finally:
            self.bar.close()

    def step(self, line: dict) -> None:
        """Count a step; show the running mean of the finite losses (the warm-up objective's weights)."""
        self.whole_run.update()
        if self.state.nonfinite_in_row == 0:
            self.running = line["loss"] if self.running is None else 0.95 * self.running + 0.05 * line["loss"]
        if self.running is not None:
            weighted = line["kl_scale"] * line["key_kl_scale"] != 1.0
            self.bar.set_postfix_str(f"warm-up objective {self.running:.2f} ({weights(line)})" if weighted
                                     else f"bound {self.running:.2f} nats/image")

    def resume_clock(self) -> None:
        """After an evaluation and a checkpoint: neither counts as training time in the ETA."""
        self.whole_run.unpause()
