"""Training CLI: ``python -m pyro_kpp.svi --data omniglot [--model kpp] ...``.

One explicit loop (nanoGPT style): ``train`` builds the run, then alternates ``train_step`` and,
once per epoch, ``evaluate_epoch``; a ``TrainState`` holds the optimizer, scheduler and counters
and saves and restores them symmetrically (``state_dict``/``load_state_dict``). The CLI options
are generated from the ``Config`` dataclass (``pyro_kpp.config.opt``, ``pyro_kpp.cliargs``).
The loss is Pyro's ``Trace_ELBO`` (or ``TraceMeanField_ELBO``) used as a differentiable loss
with a plain torch optimizer over the model's parameters (``pyro_kpp.optim.build_optimizer``: a foreach Adam, or LARS(Adam) with a
one-cycle schedule for ``--preset paper``): one optimizer for the whole model and global
gradient-norm clipping, which Pyro's per-tensor ``PyroOptim``/``ClippedAdam`` do not give.
A KL warm-up (``--kl-warmup``) weights the KL terms of the training loss only. The speed options
(``pyro_kpp.speed``): bf16 networks where native (``--precision auto``) and channels-last are the
defaults, ``--compile`` is off; every evaluation runs in float32.

Each epoch: train on every training image once (random episodes; binarized data get a fresh
binarization, 8-bit data for ``--likelihood dmol`` are used as they are), evaluate the negative
conditional bound on the fixed test episodes (in nats/image, and in bits/dim for 8-bit data),
write image grids, append a line to ``metrics.jsonl`` and save ``checkpoint.pt`` (atomically).

Under ``torchrun --nproc_per_node W -m pyro_kpp.svi ...`` the loop runs data-parallel on W
ranks under ``DistributedDataParallel`` (``--batch-size`` is then the global batch): see
pyro_kpp.distributed. The same models also train with Pyro's own ``SVI`` (README, "Pyro programs").
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from . import distributed, rundir, speed
from .api import model_from_state
from .bound import TrainingLoss, evaluate, make_elbo
from .checkpoint import (CHECKPOINT_NAME, RESUME_KEYS, ensure_writable, load_checkpoint, nonfinite_entries,
                         save_checkpoint)
from .cliargs import add_config_options, flag_message
from .config import Config
from .data import DATASETS, load_dataset
from .episodes import Episodes, make_episodes, test_batches
from .footprint import check_training_fits
from .interrupts import StopRequests
from .likelihoods import LIKELIHOODS, bits_per_dim
from .memory_use import diagnose
from .optim import build_optimizer
from .plot import save_curves
from .plots import write_images
from .registry import MODELS, build_model
from .resume import CONFIG_FIELDS, check_resume_targets, config_from_args, resolve_run_data_dir
from .schedules import key_free_nats, key_kl_weight, kl_weight

#: Training episodes on which the true train bound is measured at the end of a warm-up epoch.
TRAIN_BOUND_EPISODES = 64


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


class NonFiniteTraining(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def nonfinite_stop(what: str, run_dir: Path) -> NonFiniteTraining:
    """The error that stops training on non-finite values, saying truthfully what is left."""
    path = run_dir / CHECKPOINT_NAME
    kept = f"The last good checkpoint is kept at {path}" if path.exists() else "No checkpoint was written"
    return NonFiniteTraining(f"training: {what}; stopped. {kept} (try a lower --lr or --clip-norm)")


def check_finite_weights(model, step: int, run_dir: Path) -> None:
    """Weights turned non-finite (an overflowing update) are never evaluated or saved; checked
    once per epoch or stop, not per step (it waits for the device)."""
    bad = nonfinite_entries(model.state_dict())
    if bad:
        raise nonfinite_stop(f"the weights became non-finite by step {step} (e.g. {bad[0]})", run_dir)


def run_bar(cfg: Config, state: "TrainState", steps_per_epoch: int, enabled: bool) -> tqdm:
    """The whole run's bar, over every step to ``--epochs`` (or ``--max-steps``), so that its ETA
    says when training will end (evaluation time excluded); the epoch's bar sits below it."""
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.epochs * steps_per_epoch, cfg.max_steps)
    return tqdm(total=total, initial=state.step, desc="run", unit="step", disable=not enabled, dynamic_ncols=True,
                position=0)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the config, the weights and the RNG states:
    saved in the checkpoint by ``state_dict`` and restored from it by ``load_state_dict``."""

    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR | None
    epoch: int = 0                # epochs completed
    epoch_step: int = 0           # steps done in the current epoch
    step: int = 0                 # steps in total, skipped ones included
    loss_sum: float = 0.0         # sum and count of the current epoch's finite step losses
    loss_count: int = 0
    skipped: int = 0              # steps whose update was skipped (non-finite), whole run
    nonfinite_in_row: int = 0
    train_seconds: float = 0.0    # training time of the whole run, evaluation excluded

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step,
                "epoch_loss": (self.loss_sum, self.loss_count), "train_seconds": self.train_seconds,
                "skipped": (self.skipped, self.nonfinite_in_row)}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.epoch_step, self.step = state["epoch"], state["epoch_step"], state["step"]
        self.loss_sum, self.loss_count = state["epoch_loss"]
        self.train_seconds = state["train_seconds"]
        self.skipped, self.nonfinite_in_row = state["skipped"]

    def next_epoch(self) -> None:
        self.epoch, self.epoch_step, self.loss_sum, self.loss_count = self.epoch + 1, 0, 0.0, 0


def train_step(loss_fn: torch.nn.Module, state: TrainState, x: torch.Tensor, cfg: Config,
               world: distributed.World, validate: bool) -> dict:
    """One step on x, this rank's slice of the global batch: the (global mean) loss, the gradient
    clipped to ``cfg.clip_norm`` and, when both are finite, an optimizer step; otherwise the
    update is skipped. Returns the step's log line (the loss and the gradient norm before clipping)."""
    beta, key_beta = kl_weight(cfg, state.step), key_kl_weight(cfg, state.step)
    with pyro.validation_enabled(validate), speed.autocast(cfg.precision, x.device):
        loss = loss_fn(x, beta, key_beta, key_free_nats(cfg, state.step))
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()                                              # under DDP: averaged over the ranks
    loss = world.mean(loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(loss_fn.parameters(), cfg.clip_norm if cfg.clip_norm > 0 else math.inf)
    value, norm = torch.stack([loss, grad_norm]).tolist()       # the step's one host sync
    if math.isfinite(value) and math.isfinite(norm):
        state.optimizer.step()
        if state.scheduler is not None:
            state.scheduler.step()
        state.nonfinite_in_row = 0
        state.loss_sum, state.loss_count = state.loss_sum + value, state.loss_count + 1
    else:                                                        # skip the update, keep the parameters
        state.skipped += 1
        state.nonfinite_in_row += 1
    state.epoch_step += 1
    state.step += 1
    return {"step": state.step, "loss": value, "grad_norm": norm, "kl_scale": beta, "key_kl_scale": key_beta}


@torch.no_grad()
def evaluate_epoch(model, episodes: Episodes, cfg: Config, state: TrainState, run_dir: Path,
                   first_test: torch.Tensor) -> dict:
    """The epoch's metrics line: the test bound and its terms, the memory's use, and the training
    figures of ``state``; writes the epoch's images. With ``cfg.valid_images`` the figures are
    the validation episodes' (keys ``valid_*``, for choosing designs), else the test episodes'
    (``test_*``). Evaluation and images draw from their own seeded RNG stream, so they neither
    perturb training (an interrupted-and-resumed run stays identical) nor differ between epochs
    except through the parameters."""
    split = eval_split(cfg)
    with torch.random.fork_rng(devices=[first_test.device] if first_test.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 1)
        test = evaluate(model, test_batches(episodes, cfg.eval_episodes, split))
        memory_use = diagnose(model, test_batches(episodes, cfg.eval_episodes, split))
        write_images(model, first_test, run_dir, state.epoch, cfg.seed)
        objective = state.loss_sum / max(state.loss_count, 1)
        train_bound = (evaluate(model, train_sample(episodes, cfg, state.epoch))["elbo"]
                       if objective_is_weighted(cfg, state.step - state.epoch_step) else objective)
    record = {
        "epoch": state.epoch, "step": state.step, "epoch_complete": state.epoch_step >= episodes.steps_per_epoch(),
        "train_objective": objective, "train_bound": train_bound, f"{split}_bound": test["elbo"],
        f"{split}_images": test["images"], f"{split}_terms": test["terms"],
        "memory_gain": test["memory_gain"], f"{split}_terms_other_memory": test["foreign_terms"], **memory_use,
        "train_seconds_total": round(state.train_seconds, 2),
        # < 1: train_objective is the warm-up objective, and train_bound the bound at the epoch's end
        "kl_scale": kl_weight(cfg, state.step - 1), "key_kl_scale": key_kl_weight(cfg, state.step - 1),
        "skipped_steps": state.skipped,          # non-finite loss or gradient, update skipped (whole run)
    }
    if not LIKELIHOODS[cfg.likelihood].binarized:
        record["train_bits_per_dim"] = bits_per_dim(record["train_bound"], cfg.image_shape)
        record[f"{split}_bits_per_dim"] = bits_per_dim(record[f"{split}_bound"], cfg.image_shape)
    return record


def objective_is_weighted(cfg: Config, step: int) -> bool:
    """Whether the training objective from ``step`` on differs from the bound (a KL weight below 1,
    or free nats); the weights only rise, so the epoch's first step decides for the epoch."""
    return kl_weight(cfg, step) != 1.0 or key_kl_weight(cfg, step) != 1.0 or key_free_nats(cfg, step) > 0


def train_sample(episodes: Episodes, cfg: Config, epoch: int, most: int = TRAIN_BOUND_EPISODES):
    """The epoch's first training batches, up to ``most`` episodes (or ``--eval-episodes``): where the
    true train bound is measured while the objective is weighted (a fixed, cheap sample)."""
    wanted = min(most, cfg.eval_episodes or most)
    return itertools.islice(episodes.train_epoch(epoch), max(1, math.ceil(wanted / cfg.batch_size)))


def eval_split(cfg: Config) -> str:
    """Where the per-epoch figures come from: "valid" episodes held out of the train split, or "test"."""
    return "valid" if cfg.valid_images else "test"


def report(record: dict) -> str:
    """The epoch's one line on stderr."""
    split = "valid" if "valid_bound" in record else "test"
    objective = ("" if record["train_objective"] == record["train_bound"] else
                 f"warm-up objective {record['train_objective']:.2f} (KL x {record['kl_scale']:.2f}), ")
    return (f"epoch {record['epoch']} step {record['step']}: {objective}train bound {record['train_bound']:.2f}, "
            f"{split} bound {record[f'{split}_bound']:.2f} nats/image"
            + (f" = {record[f'{split}_bits_per_dim']:.3f} bits/dim" if f"{split}_bits_per_dim" in record else "")
            + (f", memory gain {record['memory_gain']:.2f}" if record["memory_gain"] is not None else "")
            + f" ({record['train_seconds']:.0f} s)")


def save(run_dir: Path, cfg: Config, model, state: TrainState, world: distributed.World, fingerprint: dict) -> None:
    """Save everything needed to resume exactly (rank 0; every rank joins the RNG gather); a failed
    write leaves the old checkpoint intact."""
    rng = world.checkpoint_rng(model)                       # every rank's; checks they agree
    if not world.is_main:
        return
    try:
        save_checkpoint(run_dir / CHECKPOINT_NAME, {
            "config": cfg.to_dict(), "model": model.state_dict(), **state.state_dict(), "rng": rng,
            "pyro_kpp_version": __import__("pyro_kpp").__version__, "data": fingerprint})
    except OSError as exc:
        raise OSError(f"checkpoint: could not write {run_dir / CHECKPOINT_NAME} ({exc.strerror or exc}); "
                      f"the previous checkpoint is intact") from None


def train(cfg: Config, run_dir: str | Path, resume_state: dict | None = None,
          progress: bool = True, log_steps: bool = False, world: distributed.World | None = None) -> list[dict]:
    """Train ``cfg`` in ``run_dir``; returns the metrics of every epoch run here.

    Under torchrun (``world``, see pyro_kpp.distributed) every rank trains on its slice of each
    global batch of ``cfg.batch_size`` episodes with averaged gradients; only rank 0 evaluates
    and writes files, and only rank 0 returns metrics. The caller holds ``run_dir`` (the CLI
    does, with ``rundir.claim``: a lock against other writers, no overwriting of another run).
    """
    run_dir = Path(run_dir)
    world = world or distributed.init(cfg.device)
    mine = world.episodes(cfg.batch_size)                   # this rank's slice of every global batch
    resolve_run_data_dir(cfg)                               # the run's config says where its data are
    data = load_dataset(cfg.data, cfg.data_dir)
    fingerprint = rundir.data_fingerprint(data)
    if resume_state is not None:
        rundir.check_same_data(resume_state.get("data"), fingerprint, cfg.data_dir)
    cfg.image_shape = tuple(data.image_shape)
    check_training_fits(cfg, world.device, world.size)      # sizes that cannot fit: refused before allocating
    episodes = make_episodes(cfg, data, world.device)

    pyro.set_rng_seed(cfg.seed)
    model = build_model(cfg).to(world.device) if resume_state is None else model_from_state(resume_state, world.device)
    message = speed.prepare(model, cfg.precision, cfg.compile, world.device, cfg.channels_last)[1]   # bf16: training loss only
    if message and world.is_main:
        print(message, file=sys.stderr)
    loss_fn = world.data_parallel(TrainingLoss(model, make_elbo(cfg.elbo)))   # DDP: rank 0's weights everywhere
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
            rundir.repair_metrics(run_dir / "metrics.jsonl", state.step)
            rundir.repair_metrics(run_dir / "steps.jsonl", state.step)
    history = []
    first_test = next(iter(test_batches(episodes, None, eval_split(cfg))))
    start_time = time.time()

    def budget_left(seconds_this_epoch: float = 0.0) -> bool:
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            return False
        spent = state.train_seconds + seconds_this_epoch
        return cfg.max_minutes is None or not world.any(spent >= 60 * cfg.max_minutes)

    first_step = state.step                                  # validated (see Config.validate_every_step)
    model.train()
    show = progress and world.is_main
    with StopRequests() as stop, run_bar(cfg, state, episodes.steps_per_epoch(), show) as whole_run:
        while state.epoch < cfg.epochs and budget_left():
            epoch_start = time.time()
            batches = episodes.train_epoch(state.epoch, start_step=state.epoch_step)
            bar = tqdm(batches, total=episodes.steps_per_epoch(), initial=state.epoch_step, desc=f"epoch {state.epoch}",
                       unit="step", disable=not show, dynamic_ncols=True, position=1, leave=False)
            running, interrupted = None, False
            for x in bar:
                line = train_step(loss_fn, state, x[mine], cfg, world,
                                  validate=cfg.validate_every_step or state.step == first_step)
                whole_run.update()
                if state.nonfinite_in_row >= cfg.max_nonfinite:
                    raise nonfinite_stop(f"{state.nonfinite_in_row} steps in a row (up to step {state.step - 1}) "
                                         f"gave a non-finite loss or gradient", run_dir)
                if log_steps and world.is_main:
                    with (run_dir / "steps.jsonl").open("a") as f:
                        f.write(json.dumps(line) + "\n")
                if state.nonfinite_in_row == 0:
                    running = line["loss"] if running is None else 0.95 * running + 0.05 * line["loss"]
                if running is not None:
                    beta, key_beta = line["kl_scale"], line["key_kl_scale"]
                    bar.set_postfix_str(f"bound {running:.2f} nats/image" if beta * key_beta == 1.0 else
                                        f"warm-up objective {running:.2f} (KL x {beta:.2f}, keys x {key_beta:.2f})")
                interrupted = world.any(stop.requested)       # all ranks stop at the same step
                if interrupted or not budget_left(time.time() - epoch_start):
                    break
            bar.close()
            check_finite_weights(model, state.step, run_dir)
            train_seconds = time.time() - epoch_start
            state.train_seconds += train_seconds
            if interrupted:
                save(run_dir, cfg, model, state, world, fingerprint)
                if world.is_main:
                    print(f"{stop.name or 'another rank'}: stopped at step {state.step}; checkpoint saved to "
                          f"{run_dir / CHECKPOINT_NAME}. Resume with: python -m pyro_kpp.svi --resume {run_dir.resolve()}",
                          file=sys.stderr, flush=True)
                raise Interrupted(stop.signum or signal.SIGTERM)
            if world.is_main:                       # the others wait in save()'s gather
                record = {**evaluate_epoch(model, episodes, cfg, state, run_dir, first_test),
                          "train_seconds": round(train_seconds, 2), "wall_seconds": round(time.time() - start_time, 2)}
                history.append(record)
                with (run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                save_curves([run_dir], run_dir / "curves.png")
                if progress or not sys.stderr.isatty():
                    print(report(record), file=sys.stderr, flush=True)
            if state.epoch_step >= episodes.steps_per_epoch():
                state.next_epoch()
            save(run_dir, cfg, model, state, world, fingerprint)
    return history


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resume = getattr(args, "resume", None)
        resume_state = load_checkpoint(resume, require=RESUME_KEYS) if resume else None
        cfg = config_from_args(args, resume_state)
        world = distributed.init(cfg.device)
        check_resume_targets(cfg, resume_state)
        run_dir, fresh = rundir.choose(getattr(args, "run_dir", None), resume, cfg.data, cfg.model, world.is_main)
        if world.is_main:
            print(f"run directory: {run_dir}", file=sys.stderr)
        with rundir.claim(run_dir, fresh, getattr(args, "overwrite", False)) if world.is_main else nullcontext():
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
