"""What a written memory holds about its own episode, beyond the bound's memory gain.

``pyro_kpp.inference.bound.evaluate`` measures the memory gain (the bound with another episode's memory
minus the bound with the episode's own). This module adds two diagnostics that say *why*:

* ``read_nll``: the negative log-likelihood of each image under a plain memory read, the prior
  mean code of p(z | M, y) at the posterior-mean keys of the image (K++ eq. 7 with one key,
  KM/DKM: the mean read at the posterior-mean address), from the episode's own memory and from
  another episode's. When the memory holds the image, the own read decodes close to it and the
  other read does not; a memory that holds one prototype decodes the same from both.
* ``spread``: the standard deviation of the memory across the episodes of a batch (per cell,
  averaged) and within each memory (across its cells). A writer that ignores its episode has a
  spread across episodes near 0.
* ``sample_affinity``: do samples read from a memory with keys from the key prior look like the
  memory's own episode more than like another episode? For each sample, its nearest image (mean
  squared pixel distance) among the episode's own T images and episode b + 1's T images; the
  fraction whose nearest image is the own episode's is 0.5 for a memory that ignores its episode.
"""
from __future__ import annotations

import torch

from pyro_kpp.models.base import EpisodicModel, Memory, roll_episodes


def _first(value) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


@torch.no_grad()
def read_nll(model: EpisodicModel, x: torch.Tensor, memory: Memory) -> dict[str, torch.Tensor]:
    """-ln p(x_t | mean read at x_t's posterior-mean keys): (B, T) each, from the episode's own
    ``memory`` ("own") and from episode b + 1's ("other"); needs B >= 2."""
    keys = model.infer_keys(x)                                          # (B, T, ...)
    out = {}
    for name, value in (("own", memory.value), ("other", roll_episodes(memory.value))):
        params = model.generate(Memory(model, value), keys, sample_z=False)   # (B, T, C', H, W)
        out[name] = -model.likelihood.dist(params).log_prob(x)          # (B, T)
    return out


@torch.no_grad()
def spread(memory: Memory) -> dict[str, float]:
    """Standard deviation of the memory (its mean for KM/DKM) across the B >= 2 episodes, per
    cell, and within each memory, across its cells; both averaged. Empty memories (the VAE's)
    have none."""
    m = _first(memory.value).flatten(1)                                 # (B, cells)
    if m.shape[1] < 2:
        return {}
    return {"within": float(m.std(1).mean()), "across": float(m.std(0).mean())}


@torch.no_grad()
def sample_affinity(model: EpisodicModel, x: torch.Tensor, memory: Memory, n: int | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Nearest-image distances of ``n`` (default T) random-key samples from each episode's memory.

    Returns (B, n) tensors: ``own`` and ``other``, the mean squared pixel distance from each
    sample's mean image to its nearest image of episode b and of episode b + 1 (needs B >= 2).
    Samples draw keys from the key prior and z from p(z | M, keys) (``EpisodicModel.generate``).
    """
    n = x.shape[1] if n is None else n
    keys = model.prior_keys(memory, n, generator=generator)                     # (B, n, *key_shape)
    images = model.likelihood.mean(model.generate(memory, keys, generator=generator))   # (B, n, C, H, W)
    flat, data = images.flatten(2), x.to(images.dtype).flatten(2)               # (B, n, D), (B, T, D)
    out = {}
    for name, episode in (("own", data), ("other", roll_episodes(data))):
        d = (flat[:, :, None] - episode[:, None]).pow(2).mean(-1)              # (B, n, T), exact
        out[name] = d.min(-1).values
    return out


@torch.no_grad()
def diagnose(model: EpisodicModel, batches, seed: int = 0) -> dict:
    """Mean read NLLs (own / other memory, nats/image), memory spreads and the random-key samples'
    affinity to their episode (``sample_affinity``; keys and codes drawn with ``seed``) over the
    batches of two episodes or more (a lone episode has no other memory to compare with); None
    where none."""
    was_training = model.training
    model.eval()
    totals = {"own": 0.0, "other": 0.0, "within": 0.0, "across": 0.0, "near_own": 0.0, "near_other": 0.0,
              "nearest_own": 0.0}
    counts = {name: 0 for name in totals}
    generator = None
    for x in batches:
        if x.shape[0] < 2:
            continue
        if generator is None:                                   # the same samples on every call
            generator = torch.Generator(x.device).manual_seed(seed)
        memory = model.write(x)
        for name, nll in read_nll(model, x, memory).items():
            totals[name] += float(nll.sum())
            counts[name] += nll.numel()
        near = sample_affinity(model, x, memory, generator=generator)
        for name, value in (("near_own", near["own"]), ("near_other", near["other"]),
                            ("nearest_own", (near["own"] < near["other"]).to(near["own"].dtype))):
            totals[name] += float(value.sum())
            counts[name] += value.numel()
        for name, value in spread(memory).items():
            totals[name] += value * x.shape[0]
            counts[name] += x.shape[0]
    model.train(was_training)
    mean = {name: totals[name] / counts[name] if counts[name] else None for name in totals}
    return {"read_nll": mean["own"], "read_nll_other": mean["other"],
            "memory_std_within": mean["within"], "memory_std_across": mean["across"],
            "sample_distance_own": mean["near_own"], "sample_distance_other": mean["near_other"],
            "sample_nearest_own": mean["nearest_own"]}
