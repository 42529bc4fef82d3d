"""What every model in this package shares: episodes in, a Pyro model and guide, a memory out.

An episode batch ``x`` has shape (B, T, C, H, W): B episodes of T images. Each model is a
single named ``PyroModule`` root (so its parameters never collide with another model's in
Pyro's global parameter store) exposing

* ``model(x)`` and ``guide(x)``: the generative program and its guide, with the plates
  ``episodes`` (dim -2, size B) and ``images`` (dim -1, size T). Both are decorated with
  :func:`pyro_program`, which registers every parameter of the model with Pyro's param store
  (as ``pyro.module`` does), so that ``pyro.infer.SVI`` with any ``pyro.optim`` optimizer trains all of them;
* ``write(x) -> Memory``: the memory written from episodes (written once here, with the input
  checks; each model supplies ``memory_from(x)``, the memory's value);
* ``infer_keys(x, memory=None)``: the guide's posterior-mean keys (addresses) for each image,
  solved against ``memory`` where the model's addressing reads it (DKM);
* ``generate(memory, keys)``: likelihood parameters of images read with given keys;
* ``prior_keys(memory, n)``: keys drawn from the model's key prior.

Each model supplies its prior over keys (``key_shape``, ``key_scale``; ``key_prior`` is the
distribution its program samples) and ``code_prior(memory, keys)``, the read p(z | M, keys);
``generate`` and ``prior_keys`` are written once, here.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule
from pyro.poutine.runtime import effectful

from pyro_kpp.config import Config
from pyro_kpp.maths.likelihoods import make_likelihood
from pyro_kpp.nets.build import build_decoder, build_encoder
from pyro_kpp.nets.conv import over_leading


@dataclass
class Memory:
    """A written memory and the model that wrote it (needed to read and decode from it).

    ``value`` is the model's memory state for B episodes: a (B, C, H, W) tensor for K++,
    the matrix-normal parameters for KM and DKM.
    """

    model: "EpisodicModel"
    value: Any

    @property
    def episodes(self) -> int:
        v = self.value
        return (v[0] if isinstance(v, tuple) else v).shape[0]

    def __repr__(self) -> str:
        """One line (the default dataclass repr prints the whole model and tensor)."""
        parts = self.value if isinstance(self.value, tuple) else (self.value,)
        shapes = ", ".join(f"{tuple(v.shape)}" for v in parts)
        first = parts[0]
        episodes = f"{self.episodes} episode{'' if self.episodes == 1 else 's'}"
        return (f"Memory({type(self.model).__name__}, {episodes}, value {shapes} "
                f"{str(first.dtype).removeprefix('torch.')} on {first.device})")


def require_memory(memory, argname: str = "memory") -> Memory:
    """``memory`` itself, if it is a ``Memory``; else a TypeError naming ``argname``."""
    if not isinstance(memory, Memory):
        raise TypeError(f"{argname}: expected a Memory (from model.write), got {type(memory).__name__}")
    return memory


def count(argname: str, value, minimum: int = 1, noun: str = "integer") -> int:
    """``value`` as an int >= ``minimum``: any integral number (a Python or numpy integer, an integer
    0-dim tensor: ``operator.index``); a bool or a float (even 4.0) is refused, naming ``argname``
    (and ``noun``, what is counted)."""
    wanted = f"a positive {noun}" if minimum == 1 else f"an {noun} >= {minimum}"
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{argname}: expected {wanted}, got {type(value).__name__} {value!r}") from None
    if n < minimum:
        raise ValueError(f"{argname}: expected {wanted}, got {n}")
    return n


def check_generator(generator, argname: str = "generator") -> torch.Generator | None:
    """``generator`` itself if it is a ``torch.Generator`` or None (the global one); a seed such as
    5 is refused with the way to make one, instead of torch's list of overloads."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{argname}: expected a torch.Generator or None, got {type(generator).__name__} "
                        f"{generator!r}; e.g. torch.Generator().manual_seed(5)")
    return generator


def _fits(value, shapes: tuple[tuple[int, ...], ...]) -> bool:
    """``value`` is a tuple of tensors (B, *shape), one per shape, with one B >= 1."""
    return (isinstance(value, tuple) and len(value) == len(shapes)
            and all(isinstance(v, torch.Tensor) and tuple(v.shape[1:]) == s for v, s in zip(value, shapes))
            and len({v.shape[0] for v in value}) == 1 and value[0].shape[0] >= 1)


# -- effects: what instrumentation may change, as Pyro messages ---------------------------------
# Handlers in ``pyro_kpp.inference.handlers`` act on these; the model object holds no such state.

@effectful(type="episode_memory")
def episode_memory(value):
    """The memory that a program reads for its B episodes (a tensor or a tuple of tensors,
    episodes first), as written. Without a handler it is the identity; the memory gain's
    ``foreign_memory`` handler gives episode b the memory of episode b + 1 instead."""
    return value


@effectful(type="episode_cache")
def episode_cached(model, x: torch.Tensor, what: str, compute):
    """``compute()``: a per-episode result of ``model`` (its embedding E, a written memory).
    Inside ``reuse_embedding`` it is computed once per episode tensor ``x`` and shared by guide,
    model and every importance particle of one evaluation, so that they also read the same
    stochastic write (KM)."""
    return compute()


def pyro_program(method):
    """Decorator for a model's ``model`` and ``guide``: every parameter of the model is registered
    with Pyro's param store first (see ``EpisodicModel.register_parameters``), so
    that Pyro's own ``SVI`` sees and trains the encoder, decoder and memory nets too, not only
    the parameters a ``PyroModule`` context happens to touch."""
    @functools.wraps(method)
    def program(self, *args, **kwargs):
        self.register_parameters()
        return method(self, *args, **kwargs)
    return program


def roll_episodes(memory, shift: int = 1):
    """Episode b of ``memory`` (a tensor or a tuple of tensors, episodes first) becomes episode b + shift's."""
    if isinstance(memory, tuple):
        return tuple(m.roll(-shift, 0) for m in memory)
    return memory.roll(-shift, 0)


class EpisodicModel(PyroModule):
    """Base class: shared encoder, decoder, likelihood, input checks and embedding reuse."""

    #: True when the memory is an episode-level latent variable with a prior and a posterior
    #: (DKM): the images of an episode then share a random memory, so importance weighting
    #: must weight whole episodes (``pyro_kpp.inference.bound.image_bounds``), not images one by one.
    memory_is_latent: bool = False
    #: True when the model's bound is conditional, ln p(X | M) with M written from X itself (K++
    #: eq. 4, KM eq. 12); False for a marginal bound (DKM's ln p(X), the VAE's ln p(x)). Only then
    #: is the leave-one-out minus the full bound what an image gains by storing itself.
    conditional_bound: bool = True
    #: The latent site of each image's key / address (K++ keys y, KM y, DKM w; None for the VAE):
    #: its KL is reported on its own and may get a training-only weight (pyro_kpp.inference.schedules).
    address_site: str | None = None
    #: The keys' prior is N(0, key_scale^2 I) over ``key_shape()``; ``key_name`` names the keys in errors.
    key_scale: float = 1.0
    key_name: str = ""

    def __init__(self, cfg: Config, name: str):
        super().__init__(name)
        self.cfg = cfg
        self.likelihood = make_likelihood(cfg.likelihood)
        c = cfg.image_shape[0]
        self.encoder = build_encoder(cfg)                    # by cfg.preset (pyro_kpp.nets.conv)
        self.decoder = build_decoder(cfg, self.likelihood.out_channels(c))

    def register_parameters(self) -> None:
        """Every parameter into Pyro's param store, named as ``PyroModule`` names its own:
        ``<root>.<state-dict key>``, e.g. ``kpp.encoder.convs.0.weight`` (what ``pyro.module``
        does, under the root's name, for the plain ``nn.Module`` nets too).

        A parameter of the same name left in the store by another model instance (one built
        earlier under the same root name) is replaced by this model's own first: the store then
        always holds the tensors this model computes with, so ``SVI`` never trains stale copies.
        """
        store = pyro.get_param_store()
        for name, value in self.named_parameters():
            full = f"{self._pyro_name}.{name}"
            if full in store and store[full].unconstrained() is not value:
                del store[full]
            pyro.param(full, value)

    # -- inputs ---------------------------------------------------------------------------
    def check_episode(self, x: torch.Tensor, argname: str = "episode", values: bool | None = None) -> tuple[int, int]:
        """Validate an episode batch (B, T, C, H, W); returns (B, T).

        Type, shape, dtype and device are always checked. The values (finite; binary or 8-bit for
        the likelihood) are checked when ``values`` is True, and while Pyro's validation is
        enabled (its default) when it is None: reading them waits for the device, so the training
        loop checks them on its first step only (``Config.validate_every_step``), as it does
        Pyro's own checks.
        """
        shape = tuple(self.cfg.image_shape)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{argname}: expected a torch.Tensor of shape (B, T, {', '.join(map(str, shape))}), "
                            f"got {type(x).__name__}")
        if x.dim() != 5 or tuple(x.shape[2:]) != shape:
            raise ValueError(f"{argname}: expected shape (B, T, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{argname}: expected a floating-point tensor, got dtype {x.dtype}")
        if x.dtype != self.dtype:
            raise TypeError(f"{argname}: expected dtype {self.dtype} (the model's), got {x.dtype}; "
                            f"pyro_kpp.write converts floating-point episodes")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{argname}: expected at least one episode of at least one image, got shape "
                             f"{tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{argname}: expected a tensor on the model's device {self.device}, got {x.device}")
        if values or (values is None and is_validation_enabled()):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{argname}: contains NaN or Inf values")
            self.likelihood.check(x, argname)
        return x.shape[0], x.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype: episodes, keys and memories must have it (torch does not mix dtypes)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device: episodes, keys and memories must be on it."""
        return next(self.parameters()).device

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-episode shapes of the tensors of the memory value (one shape: a tensor, else a tuple)."""
        raise NotImplementedError

    def check_memory(self, memory: Memory, argname: str = "memory") -> None:
        """A memory this model reads must be one it could have written: a ``Memory`` of this
        model whose value has B >= 1 episodes of ``memory_shapes()``, the model's dtype and,
        while Pyro's validation is enabled, finite values (a NaN memory decodes NaN images)."""
        if require_memory(memory, argname).model is not self:
            raise ValueError(f"{argname}: it was written by another model (a {type(memory.model).__name__}); read it "
                             f"with the model that wrote it")
        shapes = self.memory_shapes()
        value = memory.value if len(shapes) > 1 else (memory.value,)
        if not _fits(value, shapes):
            expected = " and ".join(f"(B, {', '.join(map(str, s))})" for s in shapes)
            got = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                   for v in (value if isinstance(value, tuple) else (value,))]
            raise ValueError(f"{argname}: expected a {self.cfg.model} memory of shape {expected}, B >= 1, got {got}")
        if any(v.dtype != self.dtype for v in value):
            raise TypeError(f"{argname}: expected dtype {self.dtype} (the model's), got {[v.dtype for v in value]}")
        if any(v.device != self.device for v in value):
            raise ValueError(f"{argname}: expected tensors on the model's device {self.device}, "
                             f"got {[str(v.device) for v in value]}")
        if is_validation_enabled() and not all(bool(torch.isfinite(v).all()) for v in value):
            raise ValueError(f"{argname}: contains NaN or Inf values")

    def check_keys(self, memory: Memory, keys: torch.Tensor) -> None:
        """Keys for reading ``memory`` must be (B, N, *key_shape), N >= 1, finite, with the memory's
        B and the model's dtype; the memory itself must be one this model wrote (``check_memory``).
        Every method that reads a memory with keys (``generate``, ``read``) checks here."""
        self.check_memory(memory)
        B, key_shape = memory.episodes, self.key_shape()
        expected = ", ".join(map(str, (B, "N", *key_shape)))
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 + len(key_shape) or keys.shape[0] != B \
                or tuple(keys.shape[2:]) != tuple(key_shape) or keys.shape[1] == 0:
            got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            named = f"{self.key_name} of " if self.key_name else ""
            raise ValueError(f"keys: expected {named}shape ({expected}), N >= 1, for this memory of {B} episodes, "
                             f"got {got}")
        if keys.dtype != self.dtype:
            raise TypeError(f"keys: expected dtype {self.dtype} (the model's), got {keys.dtype}; "
                            f"pyro_kpp.sample converts")
        if keys.device != self.device:
            raise ValueError(f"keys: expected a tensor on the model's device {self.device}, got {keys.device}")
        if not bool(torch.isfinite(keys).all()):
            raise ValueError("keys: contains NaN or Inf values")

    # -- shared embedding -----------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """E = f_enc(X): (B, T, C, H, W) -> (B, T, D).

        Computed through ``episode_cached``: inside ``pyro_kpp.inference.handlers.reuse_embedding``
        the encoder runs once per episode tensor (Pyro runs the guide and then the model on the
        same episodes, and both need E), outside it at every call.
        """
        def encode():
            self.check_episode(x)
            if self.encoder.mixes_episode:                       # TSM: needs the (B, T) structure
                return self.encoder(x)                           # (B, T, D)
            return over_leading(self.encoder, x, 3)             # (B, T, D)
        return episode_cached(self, x, "E", encode)

    # -- held-out memories: what the rest of an episode tells about an image -------------------
    def held_out_cache(self, others: torch.Tensor, E_held: torch.Tensor) -> dict:
        """``episode_cached`` values that make the programs, run on episodes of held-out images whose
        embeddings are E_held (B', n, D), read the memory written from ``others``
        (B', T - n, C, H, W) instead of one written from the held-out images themselves
        (``pyro_kpp.inference.handlers.held_out``). By default the memory written from
        ``others`` (K++, KM); a model whose memory is a latent variable also sets its prior (DKM)."""
        return {"memory": self.memory_from(others)}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters (..., C', H, W) from codes z (..., L)."""
        return over_leading(self.decoder, z, 1)

    # -- the key prior and the read, shared by the program and generation ---------------------
    def key_prior(self, like: torch.Tensor) -> dist.Distribution:
        """p(keys) of one image: N(0, key_scale^2 I) with event shape ``key_shape()``, on ``like``'s device and dtype."""
        shape = self.key_shape()
        return dist.Normal(like.new_zeros(()), like.new_tensor(self.key_scale)).expand(shape).to_event(len(shape))

    def prior_keys(self, memory: Memory, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Keys from the key prior: (B, n, *key_shape), for a memory this model wrote."""
        self.check_memory(memory)
        n = count("n", n)
        value = memory.value[0] if isinstance(memory.value, tuple) else memory.value
        return self.key_scale * torch.randn(memory.episodes, n, *self.key_shape(), generator=check_generator(generator),
                                            device=value.device, dtype=value.dtype)

    def generate(self, memory: Memory, keys: torch.Tensor, sample_z: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Likelihood parameters (B, N, C', H, W) of images read from ``memory`` with keys
        (B, N, *key_shape): z ~ p(z | M, keys) (its mean when ``sample_z`` is False), decoded."""
        self.check_keys(memory, keys)
        return self.decode_code(*self.code_prior(memory.value, keys), sample_z, generator)   # (B, N, L) codes

    def read(self, memory: Memory, x: torch.Tensor, keys: torch.Tensor, sample_z: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Likelihood parameters (B, T, C', H, W) of the queries x (B, T, C, H, W) read back from
        ``memory`` at their keys (B, T, *key_shape), as iterative reading does: through the code
        prior p(z | M, keys) (``generate``) unless a model's reading also sees the query (KM)."""
        return self.generate(memory, keys, sample_z, generator)

    def decode_code(self, z_loc: torch.Tensor, z_scale: torch.Tensor | None, sample_z: bool,
                    generator: torch.Generator | None) -> torch.Tensor:
        """Decode z ~ N(z_loc, z_scale^2) (..., L), or z_loc itself when ``sample_z`` is False or
        there is no scale."""
        if sample_z and z_scale is not None:
            z_loc = z_loc + z_scale * torch.randn(z_loc.shape, generator=check_generator(generator), device=z_loc.device,
                                                  dtype=z_loc.dtype)
        return self.decode(z_loc)

    # -- the interface each model implements ----------------------------------------------
    def key_shape(self) -> tuple[int, ...]:
        """The shape of one image's keys (addresses)."""
        raise NotImplementedError

    def code_prior(self, memory, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """loc and scale of p(z | M, keys): (..., B, N, L) for a memory value (B, ...) and keys
        (..., B, N, *key_shape); a scale of None means z is the loc itself."""
        raise NotImplementedError

    def model(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def guide(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def write(self, x: torch.Tensor) -> Memory:
        """The memory written from episodes x (B, T, C, H, W) (each model's ``memory_from``).

        x is checked in full here, its values included (finite; binary or 8-bit) even when Pyro's
        validation is off: a write is not in the training loop, so the check's host sync costs
        nothing there, and a NaN pixel would otherwise surface as an index error deep in the read."""
        self.check_episode(x, values=True)
        return Memory(self, self.memory_from(x))

    def memory_from(self, x: torch.Tensor):
        """The memory value written from the checked episodes x (see ``Memory.value``)."""
        raise NotImplementedError

    def infer_keys(self, x: torch.Tensor, memory: Memory | None = None) -> torch.Tensor:
        """The guide's posterior-mean keys of x (B, T, C, H, W): (B, T, *key_shape). A given
        ``memory`` must be one this model wrote, whether or not its addressing reads it."""
        if memory is not None:
            self.check_memory(memory)
        return self.posterior_keys(x, memory)

    def posterior_keys(self, x: torch.Tensor, memory: Memory | None) -> torch.Tensor:
        """``infer_keys`` for a checked memory (or None): each model's key posterior."""
        raise NotImplementedError
