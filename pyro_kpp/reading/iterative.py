"""Reading from a fixed memory: iterative reading, generation, clean-up, interpolation.

Everything here goes through the ``EpisodicModel`` interface only (``write``, ``infer_keys``,
``generate``, ``read``, ``prior_keys`` and the likelihood), so it works for every model of the package.

Iterative reading (K++ §3.5 eq. 7; KM §3.5 and Appendix G, Algorithm 1). The memory is held
fixed; at each step the keys are re-inferred from the current query through the guide's key
posterior, the memory is read at those keys and decoded, and a reconstruction drawn from the
likelihood becomes the next query:

    y* = infer_keys(x_i, M),   params_i = read(M, x_i, y*),   x_{i+1} ~ p(x | params_i).

The keys are inferred *against the fixed memory* M: for DKM, whose addresses are solved against
a memory, this is DKM's attractor dynamics; K++, KM and the VAE infer keys without reading M.

Choices where the papers are silent or where the interface differs (also in the README):

* **What is fed back.** Both papers feed back a *sample* of the reconstruction, x ~ p(x|.)
  (K++ eq. 7: "re-inferring the previous reconstruction X ~ p(X|.)"; KM Algorithm 1: "sample
  the new query x_t ~ p(x_t|z_t)"), which is also the only choice that is a valid input for
  a Bernoulli model (the encoder is trained on binary images, and the likelihood's input
  check rejects probabilities). That is the default, ``feedback="sample"``. The alternative
  ``feedback="threshold"`` feeds back the Bernoulli *mode* (probability > 1/2): deterministic,
  so a sequence of reads can be compared without sampling noise.
* **Keys.** ``infer_keys`` gives the posterior mean of q(y|x); eq. 7 uses one sample
  Y* ~ q(Y|X). We read at the mean (the interface exposes no key sample), which removes one
  source of sampling noise from the iteration; the fed-back image is still a sample.
* **Code.** ``read`` decodes the code read at the keys: K++, DKM and the VAE read it from the
  memory prior p(z|M,y) and, by K++ Fig. 5 (decode mu_z at evaluation), take its mean,
  ``sample_z=False`` by default; KM reads it from the posterior q(z|x, y, M), which also sees
  the query (KM Algorithm 1), its mean by default as well (``sample_z=True`` samples it).
* **Perturbed keys** (K++ §4.1.1): y + eps, eps ~ N(0, 0.1^2 I); the paper writes N(0, 0.1)
  and we read 0.1 as the standard deviation.
* **Interpolation** (KM §4.3 interpolates the addressing weights of two images): we
  interpolate linearly between the two images' inferred keys and decode each point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pyro_kpp.models.base import EpisodicModel, Memory, check_generator, count

FEEDBACKS = ("sample", "threshold")
PERTURBATION_STD = 0.1  # K++ §4.1.1
#: Most iterative-reading steps: every step's reconstruction is kept, (steps, B, T, C', H, W), for
#: the scores and the figures (a row per step), and the papers read 10 (K++ Fig. 6, KM Fig. 4).
MAX_READ_STEPS = 100


@dataclass
class IterativeReading:
    """Every step of an iterative read; index i along the first dim is step i + 1.

    ``queries[i]`` is the image the keys of step i + 1 were inferred from (``queries[0]`` is
    the input), ``keys[i]`` those keys and ``params[i]`` the likelihood parameters of the
    reconstruction read at them.
    """

    queries: torch.Tensor  # (n, B, T, C, H, W)
    keys: torch.Tensor     # (n, B, T, *key_shape)
    params: torch.Tensor   # (n, B, T, C', H, W)
    model: EpisodicModel = field(repr=False)

    @property
    def steps(self) -> int:
        return self.params.shape[0]

    def means(self) -> torch.Tensor:
        """Mean reconstruction of every step (pixel probabilities for Bernoulli): (n, B, T, C, H, W)."""
        return self.model.likelihood.mean(self.params)


def _check_memory(model: EpisodicModel, memory: Memory) -> None:
    if not isinstance(model, EpisodicModel):
        raise TypeError(f"model: expected a pyro_kpp model (e.g. from pyro_kpp.load), got {type(model).__name__}")
    model.check_memory(memory)


def check_steps(steps, minimum: int = 1) -> int:
    """A number of iterative-reading steps, ``minimum`` .. ``MAX_READ_STEPS`` (why: see there)."""
    steps = count("steps", steps, minimum)
    if steps > MAX_READ_STEPS:
        raise ValueError(f"steps: expected at most {MAX_READ_STEPS} (every step is kept; the papers read 10), "
                         f"got {steps}")
    return steps


def feed_back(model: EpisodicModel, params: torch.Tensor, feedback: str = "sample",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The next query from likelihood parameters: a sample (default) or the Bernoulli mode."""
    if feedback == "sample":
        return model.likelihood.sample(params, generator=generator)
    if feedback == "threshold":
        if not model.likelihood.binarized:
            raise ValueError(f"feedback: 'threshold' is the mode of a Bernoulli likelihood (binary data); this "
                             f"model's likelihood is {model.likelihood.name!r}, use 'sample'")
        return (model.likelihood.mean(params) > 0.5).to(params.dtype)
    raise ValueError(f"feedback: expected one of {FEEDBACKS}, got {feedback!r}")


@torch.no_grad()
def iterative_read(model: EpisodicModel, memory: Memory, x: torch.Tensor, steps: int,
                   feedback: str = "sample", sample_z: bool = False,
                   generator: torch.Generator | None = None, tick=None) -> IterativeReading:
    """``steps`` iterations of re-inferring keys and reading the fixed memory (K++ eq. 7, KM Alg. 1).

    x: queries (B, T, C, H, W), one episode batch matching the memory's B episodes. The
    memory is only read, never written. Returns every step (see :class:`IterativeReading`);
    ``steps`` is at most ``MAX_READ_STEPS``. ``tick()``, if given, is called after each step
    (progress bars).
    """
    _check_memory(model, memory)
    steps = check_steps(steps)
    check_generator(generator)
    if feedback not in FEEDBACKS:
        raise ValueError(f"feedback: expected one of {FEEDBACKS}, got {feedback!r}")
    model.check_episode(x, "x")
    if x.shape[0] != memory.episodes:
        raise ValueError(f"x: expected {memory.episodes} episodes (the memory's), got {x.shape[0]}")
    queries, keys, params = [], [], []
    query = x
    for step in range(steps):
        k = model.infer_keys(query, memory)                      # (B, T, *key_shape)
        p = model.read(memory, query, k, sample_z=sample_z, generator=generator)  # (B, T, C', H, W)
        queries.append(query)
        keys.append(k)
        params.append(p)
        if tick is not None:
            tick()
        if step + 1 < steps:
            query = feed_back(model, p, feedback, generator)
    return IterativeReading(torch.stack(queries), torch.stack(keys), torch.stack(params), model)


@torch.no_grad()
def clean_up(model: EpisodicModel, memory: Memory, keys: torch.Tensor, steps: int = 10,
             feedback: str = "sample", sample_z: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate from ``keys`` and clean the generations up by iterative reading (K++ Fig. 6 left).

    keys: (B, N, *key_shape), e.g. ``model.prior_keys(memory, N)``. Returns likelihood
    parameters (steps + 1, B, N, C', H, W): the first generation, then each clean-up step.
    """
    _check_memory(model, memory)
    steps = check_steps(steps, minimum=0)
    first = model.generate(memory, keys, sample_z=sample_z, generator=generator)
    if steps == 0:
        return first.unsqueeze(0)
    query = feed_back(model, first, feedback, generator)
    later = iterative_read(model, memory, query, steps, feedback, sample_z, generator).params
    return torch.cat([first.unsqueeze(0), later])


def perturbed_keys(keys: torch.Tensor, n: int, std: float = PERTURBATION_STD,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` local perturbations y + eps, eps ~ N(0, std^2 I), of each key (K++ §4.1.1).

    keys: (B, N, *key_shape) -> (B, N * n, *key_shape); perturbations of key j are rows
    j * n .. j * n + n - 1.
    """
    n = count("n", n)
    if not 0 <= std < math.inf:
        raise ValueError(f"std: expected a finite, non-negative standard deviation, got {std!r}")
    base = keys.repeat_interleave(n, dim=1)
    return base + std * torch.randn(base.shape, generator=generator, device=base.device, dtype=base.dtype)


def interpolate_keys(start: torch.Tensor, end: torch.Tensor, n: int) -> torch.Tensor:
    """n points on the segment from ``start`` to ``end`` (both (B, *key_shape)): (B, n, *key_shape)."""
    if n < 2:
        raise ValueError(f"n: expected at least 2 points (the two ends), got {n!r}")
    if start.shape != end.shape:
        raise ValueError(f"end: expected the shape of start {tuple(start.shape)}, got {tuple(end.shape)}")
    w = torch.linspace(0.0, 1.0, n, device=start.device, dtype=start.dtype)
    w = w.view(1, n, *([1] * (start.dim() - 1)))                  # (1, n, 1, ...)
    return (1 - w) * start.unsqueeze(1) + w * end.unsqueeze(1)


@torch.no_grad()
def interpolate(model: EpisodicModel, memory: Memory, x: torch.Tensor, i: int, j: int, n: int = 8) -> torch.Tensor:
    """Decode n points between the keys of images i and j of each episode of x: (B, n, C', H, W)."""
    _check_memory(model, memory)
    T = x.shape[1]
    for name, idx in (("i", i), ("j", j)):
        if not 0 <= idx < T:
            raise ValueError(f"{name}: expected an image index in 0..{T - 1}, got {idx!r}")
    keys = model.infer_keys(x, memory)                            # (B, T, *key_shape)
    return model.generate(memory, interpolate_keys(keys[:, i], keys[:, j], n), sample_z=False)
