"""Pyro effect handlers for measuring a model, so that the model objects carry no instrumentation.

Every model routes two things through effectful functions of ``pyro_kpp.models.base``:
the memory it reads (``episode_memory``) and its per-episode results (``episode_cached``: the
embedding E and the written memory). Outside these handlers both are plain calls.

* ``reuse_embedding()``: one encoder pass (and, for KM, one stochastic write) per episode tensor,
  shared by the guide, the model and every importance particle run inside it.
* ``held_out(model, x, folds)``: each episode cut into ``folds`` interleaved folds, each fold
  reading the memory written from the other folds (the held-out objective); with one image per
  fold, ``leave_one_out(model, x)``: each image reads the memory of the other T - 1 (the
  leave-one-out bound).
* ``foreign_memory(shift=1)``: every episode b of a batch reads the memory written from episode
  b + shift. The bound computed inside, minus the bound outside, is the *memory gain*
  (``pyro_kpp.inference.bound.evaluate``). Only the memory is swapped: the encoder, keys and
  codes of each image stay its own, and a guide that reads the memory (KM, DKM) reads the
  swapped one, so the bound is the best this guide gives with that memory.

Both are ordinary Pyro messengers: use them as context managers or wrap a callable, and nest them
with ``poutine.trace`` and the rest::

    with reuse_embedding(), foreign_memory():
        loss = Trace_ELBO().loss(model.model, model.guide, x)

K++'s memory is also the deterministic site ``"memory"`` of its model, so
``poutine.condition(data={"memory": M})`` replaces it there; these handlers work for every model.
"""
from __future__ import annotations

import contextlib

import torch
from pyro.poutine.messenger import Messenger

from pyro_kpp.config import check_folds
from pyro_kpp.models.base import roll_episodes


class ReuseEmbedding(Messenger):
    """Keeps each ``episode_cached`` result per (model, what) for the latest episode tensor,
    starting from ``values`` for the episode tensor ``x`` if given (``leave_one_out``)."""

    def __init__(self, x: torch.Tensor | None = None, values: dict | None = None):
        super().__init__()
        self._x = x
        self._values: dict[tuple[int, str], object] = dict(values or {})

    def _pyro_episode_cache(self, msg) -> None:
        model, x, what, _ = msg["args"]
        if self._x is not x:                # a new batch of episodes: forget the last one's
            self._values.clear()
            self._x = x
        key = (id(model), what)
        if key in self._values:
            msg["value"] = self._values[key]
            msg["done"] = True

    def _pyro_post_episode_cache(self, msg) -> None:
        model, _, what, _ = msg["args"]
        self._values[(id(model), what)] = msg["value"]


class ForeignMemory(Messenger):
    """Gives episode b of every ``episode_memory`` the memory of episode b + ``shift``."""

    def __init__(self, shift: int = 1):
        super().__init__()
        if not isinstance(shift, int) or isinstance(shift, bool):
            raise TypeError(f"shift: expected an int, got {type(shift).__name__}")
        self.shift = shift

    def _pyro_post_episode_memory(self, msg) -> None:
        msg["value"] = roll_episodes(msg["value"], self.shift)


def reuse_embedding(fn=None):
    """``ReuseEmbedding`` as a context manager, or ``fn`` run under it."""
    messenger = ReuseEmbedding()
    return messenger(fn) if fn is not None else messenger


def held_out_indices(T: int, folds: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold f of an episode of T images holds the images t with t % folds == f: returns their
    indices (folds, T / folds) and those of the other folds' images (folds, T - T / folds), each in
    episode order. Episodes are drawn shuffled (``pyro_kpp.data``), so interleaved folds are random
    subsets, and with folds = T fold t is image t alone."""
    check_folds(T, folds)
    index = torch.arange(T, device=device)
    in_fold = (index % folds).unsqueeze(0) == torch.arange(folds, device=device).unsqueeze(1)   # (F, T)
    return index.expand(folds, T)[in_fold].view(folds, -1), index.expand(folds, T)[~in_fold].view(folds, -1)


@contextlib.contextmanager
def held_out(model, x: torch.Tensor, folds: int):
    """Yields the images of x (B, T, C, H, W) as B*F episodes of T/F images, F = ``folds``: row
    b*F + f holds fold f of episode b (``held_out_indices``). Inside, the model and guide run on
    them read the memory written from the *other* folds of episode b, all B*F memories written at
    once as a batch of episodes of T - T/F images (``model.held_out_cache``).

    The bound of the programs on these episodes is ln p(fold f | M written from X without fold f),
    a proper density over the held-out images: no image can store itself in the memory it is read
    from. ``folds = T`` is the leave-one-out bound (``leave_one_out``); a training run with
    ``--objective held-out`` optimises it with few folds (``pyro_kpp.inference.bound.training_loss``).
    Everything but the memory is as in the full episode: each image's embedding is the one it has in
    its episode (the same for encoders that do not mix the episode), so the guide's q(keys, z) is
    unchanged. Gradients flow through both the held-out images and the memory's writers.
    """
    B, T = model.check_episode(x)
    fold_of, others_of = held_out_indices(T, folds, x.device)
    held = x[:, fold_of].flatten(0, 1)                                    # (B*F, T/F, C, H, W)
    others = x[:, others_of].flatten(0, 1)                                # (B*F, T - T/F, C, H, W)
    with reuse_embedding():
        E_held = model.embed(x)[:, fold_of].flatten(0, 1)                 # (B*F, T/F, D)
        preset = {"E": E_held, **model.held_out_cache(others, E_held)}
    with ReuseEmbedding(held, {(id(model), what): value for what, value in preset.items()}):
        yield held


def leave_one_out(model, x: torch.Tensor):
    """``held_out`` with one image per fold: yields the images of x (B, T, C, H, W) as B*T
    single-image episodes (B*T, 1, C, H, W), row b*T + t holding x_bt, each reading the memory
    written from the other T - 1 images of episode b.

    The bound of the programs on these episodes is ln p(x_t | M written from X without x_t), a
    proper density over x_t (``pyro_kpp.inference.bound.leave_one_out_particles``).
    """
    B, T = model.check_episode(x)
    if T < 2:
        raise ValueError(f"episode: a leave-one-out memory needs episodes of at least 2 images, got T = {T}")
    return held_out(model, x, T)


def foreign_memory(fn=None, shift: int = 1):
    """``ForeignMemory(shift)`` as a context manager, or ``fn`` run under it."""
    messenger = ForeignMemory(shift)
    return messenger(fn) if fn is not None else messenger
