"""One training step and the state it advances (nanoGPT style): ``TrainState`` holds the
optimizer, the scheduler and the counters, and saves and restores them symmetrically
(``state_dict``/``load_state_dict``); ``train_step`` is Pyro's ELBO as a differentiable loss, one
global gradient-norm clip and one optimizer step, skipped when the loss or the gradient is not finite."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from torch.optim.lr_scheduler import LambdaLR

from pyro_kpp.config import Config
from pyro_kpp.inference.schedules import key_free_nats, key_kl_weight, kl_weight
from pyro_kpp.train import distributed, speed
from pyro_kpp.train.checkpoint import CHECKPOINT_NAME, nonfinite_entries


class NonFiniteTraining(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


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
