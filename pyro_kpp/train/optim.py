"""Optimisers of the two presets; the paper's is K++ Appendix E "Optimizer & LR schedule".

"We use LARS (You et al., 2017) coupled with ADAM (Kingma & Ba, 2014) and a one-cycle
(Smith & Topin, 2017) cosine learning rate schedule (Loshchilov & Hutter, 2017). A linear
warm-up of 10 epochs (Goyal et al., 2017c) is also used for the schedule. A weight decay of
1e-3 is used on every parameter barring biases and the affine terms of batchnorm."

Choices where the paper is silent:

* LARS around Adam: the inner optimizer (Adam) takes its step; LARS rescales each adapted
  parameter's step to ``lr * eta * ||w||`` keeping its direction, i.e. the trust ratio
  ``eta * ||w|| / ||d||`` multiplies the inner update per unit learning rate ``d`` (so the
  learning-rate schedule still sets the step size, as in LARS and LAMB). ``eta = 1``
  (LAMB's value: with Adam's lr of 1e-3 a layer moves by 0.1% of its norm per step).
  A parameter of zero norm, or with a zero update, keeps the inner update.
* Weight decay is Adam's own (L2 added to the gradient, as LARS adds it), 1e-3 on every
  parameter except biases and normalisation parameters (any 1-D parameter, or one of a norm
  layer, EvoNormS0's included); those are also excluded from the LARS adaptation.
* Schedule: per step; warm-up factor (s + 1) / W for steps s < W (so the first step
  already learns), then 0.5 (1 + cos(pi (s - W) / (S - W))) down to 0 at S = epochs x
  steps per epoch. The warm-up is 10 epochs, at most half the run (shorter runs still
  get a cosine phase). Only applied updates advance it (skipped non-finite steps do not).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pyro_kpp.config import Config
from pyro_kpp.nets.paper import EvoNormS0

PAPER_WEIGHT_DECAY = 1e-3
PAPER_WARMUP_EPOCHS = 10
#: layers whose parameters are normalisation affine terms (no weight decay, no LARS adaptation)
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, EvoNormS0)


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decay ``weight_decay`` (weights) and none (biases, norm terms).

    The no-decay group also carries ``"lars": False`` so ``LARS`` leaves it unadapted.
    Shared parameters are listed once; frozen ones (requires_grad False) are left out.
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay: expected a non-negative number, got {weight_decay!r}")
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (no_decay if p.dim() <= 1 or isinstance(module, NORM_LAYERS) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0, "lars": False}]
    return [g for g in groups if g["params"]]


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling (You et al., 2017) around any torch optimizer.

    After the inner step, each parameter of a group without ``"lars": False`` is moved from
    its old value w along the inner update u = -lr * d by ``trust * u`` instead of u, with
    trust = eta ||w|| / ||d||, so its step has norm lr * eta * ||w||. The wrapper has no state
    of its own: ``param_groups``, ``state`` and the state dict are the inner optimizer's (so
    an LR scheduler built on the wrapper drives the inner optimizer's learning rates).
    """

    def __init__(self, optimizer: Optimizer, eta: float = 1.0):
        # Optimizer.__init__ is not called: the groups and state belong to the inner optimizer.
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not eta > 0:
            raise ValueError(f"eta: expected a positive trust coefficient, got {eta!r}")
        self.optimizer = optimizer
        self.eta = eta
        self.defaults = optimizer.defaults

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"LARS(eta={self.eta}, {self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure=None):
        adapted = [(group["lr"], p, p.detach().clone()) for group in self.param_groups
                   if group.get("lars", True) for p in group["params"] if p.grad is not None]
        loss = self.optimizer.step(closure)
        for lr, p, w in adapted:
            update = p - w                                   # the inner step, -lr * d
            w_norm, u_norm = w.norm(), update.norm()
            if w_norm > 0 and u_norm > 0:
                # trust * update with trust = eta ||w|| / ||d|| = eta * lr * ||w|| / ||update||
                p.copy_(w + update * (self.eta * lr * w_norm / u_norm))
        return loss


def one_cycle_cosine(optimizer: Optimizer, steps_per_epoch: int, warmup_epochs: float,
                     total_epochs: float) -> LambdaLR:
    """Linear warm-up over ``warmup_epochs`` then one cosine decay to 0 at ``total_epochs``."""
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected a positive integer, got {steps_per_epoch!r}")
    if not 0 <= warmup_epochs < total_epochs:
        raise ValueError(f"warmup_epochs: expected 0 <= warmup_epochs < total_epochs = {total_epochs}, "
                         f"got {warmup_epochs!r}")
    warmup = round(warmup_epochs * steps_per_epoch)
    total = max(round(total_epochs * steps_per_epoch), warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def build_optimizer(cfg: Config, model: nn.Module, steps_per_epoch: int) -> tuple[Optimizer, LambdaLR | None]:
    """The optimizer and (paper preset only) the per-step LR scheduler of ``cfg.preset``.

    "cpu": plain Adam over all parameters, constant learning rate. "paper": LARS(Adam) with
    weight decay groups and the one-cycle cosine schedule (K++ App. E).
    """
    if cfg.preset == "paper":
        inner = torch.optim.Adam(param_groups_for_weight_decay(model, PAPER_WEIGHT_DECAY), lr=cfg.lr, foreach=True)
        optimizer = LARS(inner)
        warmup = min(PAPER_WARMUP_EPOCHS, cfg.epochs / 2)
        return optimizer, one_cycle_cosine(optimizer, steps_per_epoch, warmup, cfg.epochs)
    # foreach: one multi-tensor update for all parameters (torch picks it only for CUDA by default)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True), None
