"""Pyro effect handlers for measuring a model, so that the model objects carry no instrumentation.

Every model routes two things through effectful functions of ``pyro_kpp.models.base``:
the memory it reads (``episode_memory``) and its per-episode results (``episode_cached``: the
embedding E and the written memory). Outside these handlers both are plain calls.

* ``reuse_embedding()``: one encoder pass (and, for KM, one stochastic write) per episode tensor,
  shared by the guide, the model and every importance particle run inside it.
* ``leave_one_out(model, x)``: the T images of each episode as T single-image episodes, each
  reading the memory written from the other T - 1 images (the leave-one-out bound).
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


@contextlib.contextmanager
def leave_one_out(model, x: torch.Tensor):
    """Yields the images of x (B, T, C, H, W) as B*T single-image episodes (B*T, 1, C, H, W), row
    b*T + t holding x_bt; inside, the model and guide run on them read, for x_bt, the memory
    written from the other T - 1 images of episode b: the T memories of each episode are written
    at once, as a batch of B*T episodes of T - 1 images (``model.leave_one_out_cache``).

    The bound of the programs on these episodes is ln p(x_t | M written from X without x_t), a
    proper density over x_t (``pyro_kpp.inference.bound.leave_one_out_particles``). Everything but
    the memory is as in the full episode: each image's embedding is the one it has in its episode
    (the same for encoders that do not mix the episode), so the guide's q(keys, z) is unchanged.
    """
    B, T = model.check_episode(x)
    if T < 2:
        raise ValueError(f"episode: a leave-one-out memory needs episodes of at least 2 images, got T = {T}")
    others_of = torch.arange(T, device=x.device).expand(T, T)[~torch.eye(T, dtype=torch.bool, device=x.device)]
    others = x[:, others_of.view(T, T - 1)].flatten(0, 1)                # (B*T, T-1, C, H, W)
    single = x.flatten(0, 1).unsqueeze(1)                                 # (B*T, 1, C, H, W)
    with reuse_embedding():
        E_single = model.embed(x).flatten(0, 1).unsqueeze(1)              # (B*T, 1, D)
        preset = {"E": E_single, **model.leave_one_out_cache(others, E_single)}
    with ReuseEmbedding(single, {(id(model), what): value for what, value in preset.items()}):
        yield single


def foreign_memory(fn=None, shift: int = 1):
    """``ForeignMemory(shift)`` as a context manager, or ``fn`` run under it."""
    messenger = ForeignMemory(shift)
    return messenger(fn) if fn is not None else messenger
