"""Pyro effect handlers for measuring a model, so that the model objects carry no instrumentation.

Every model routes two things through effectful functions of ``pyro_kpp.models.base``:
the memory it reads (``episode_memory``) and its per-episode results (``episode_cached``: the
embedding E and the written memory). Outside these handlers both are plain calls.

* ``reuse_embedding()``: one encoder pass (and, for KM, one stochastic write) per episode tensor,
  shared by the guide, the model and every importance particle run inside it.
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

from pyro.poutine.messenger import Messenger

from pyro_kpp.models.base import roll_episodes


class ReuseEmbedding(Messenger):
    """Keeps each ``episode_cached`` result per (model, what) for the latest episode tensor."""

    def __init__(self):
        super().__init__()
        self._x = None
        self._values: dict[tuple[int, str], object] = {}

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


def foreign_memory(fn=None, shift: int = 1):
    """``ForeignMemory(shift)`` as a context manager, or ``fn`` run under it."""
    messenger = ForeignMemory(shift)
    return messenger(fn) if fn is not None else messenger
