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
* ``class_affinity`` (class-structured episodes, ``--episode-classes``): the same samples' nearest
  image among *all* test images; the fraction whose nearest image is of one of the episode's
  classes, against the chance that a random test image is.
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


def random_key_samples(model: EpisodicModel, memory: Memory, n: int, generator: torch.Generator | None = None):
    """Mean images (B, n, C*H*W) of ``n`` samples per episode: keys from the key prior, z from
    p(z | M, keys) (``EpisodicModel.generate``)."""
    keys = model.prior_keys(memory, n, generator=generator)                     # (B, n, *key_shape)
    return model.likelihood.mean(model.generate(memory, keys, generator=generator)).flatten(2)


#: Test images compared with the samples at once in ``class_affinity`` (bounds the distance matrix).
POOL_CHUNK = 4096


@torch.no_grad()
def class_affinity(model: EpisodicModel, x: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor,
                   pool_labels: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Do random-key samples of a class episode's memory look like its classes?

    For T random-key samples of each episode x (B, T, C, H, W) with labels (B, T), the nearest
    image (mean squared pixel distance) among ``pool`` (N, C, H, W), labelled ``pool_labels`` (N,):
    ``in_classes`` (B, T) is 1 where its label is one of the episode's, and ``chance`` (B,) the
    fraction of the pool in the episode's classes (what a sample landing on a random pool image scores).
    """
    flat = random_key_samples(model, model.write(x), x.shape[1], generator).flatten(0, 1)   # (B*T, D)
    best = torch.full((len(flat),), float("inf"), dtype=flat.dtype, device=flat.device)
    nearest = torch.zeros(len(flat), dtype=torch.int64, device=flat.device)
    for start in range(0, len(pool), POOL_CHUNK):
        chunk = pool[start:start + POOL_CHUNK].to(flat.dtype).flatten(1)              # (n, D)
        d = torch.cdist(flat, chunk).pow(2) / flat.shape[1]                           # (B*T, n)
        value, where = d.min(1)
        better = value < best
        best, nearest = torch.where(better, value, best), torch.where(better, where + start, nearest)
    labels, pool_labels = labels.to(flat.device), pool_labels.to(flat.device)
    found = pool_labels[nearest].view(x.shape[:2])                                       # (B, T)
    in_classes = (found[:, :, None] == labels[:, None, :]).any(-1)                       # (B, T)
    chance = (pool_labels[None, :, None] == labels[:, None, :]).any(-1).to(flat.dtype).mean(1)   # (B,)
    return {"in_classes": in_classes.to(flat.dtype), "chance": chance}


@torch.no_grad()
def class_diagnose(model: EpisodicModel, batches, labels: torch.Tensor, pool: torch.Tensor,
                   pool_labels: torch.Tensor, seed: int = 0) -> dict:
    """``class_affinity`` over the episode batches, whose labels are ``labels`` (E, T) in the same
    order (e.g. ``Episodes.test_labels()``): the fraction of random-key samples whose nearest pool
    image is of one of their episode's classes, and its chance level; samples drawn with ``seed``."""
    was_training = model.training
    model.eval()
    hits = chance = 0.0
    samples = episodes = 0
    generator = None
    for x in batches:
        if generator is None:
            generator = torch.Generator(x.device).manual_seed(seed)
        out = class_affinity(model, x, labels[episodes:episodes + len(x)], pool, pool_labels, generator)
        hits, chance = hits + float(out["in_classes"].sum()), chance + float(out["chance"].sum())
        samples, episodes = samples + out["in_classes"].numel(), episodes + len(x)
    model.train(was_training)
    if episodes == 0:
        raise ValueError("class_diagnose: no episodes")
    return {"sample_nearest_in_classes": hits / samples, "sample_nearest_in_classes_chance": chance / episodes}


@torch.no_grad()
def sample_affinity(model: EpisodicModel, x: torch.Tensor, memory: Memory, n: int | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Nearest-image distances of ``n`` (default T) random-key samples from each episode's memory.

    Returns (B, n) tensors: ``own`` and ``other``, the mean squared pixel distance from each
    sample's mean image to its nearest image of episode b and of episode b + 1 (needs B >= 2).
    Samples draw keys from the key prior and z from p(z | M, keys) (``EpisodicModel.generate``).
    """
    flat = random_key_samples(model, memory, x.shape[1] if n is None else n, generator)   # (B, n, D)
    data = x.to(flat.dtype).flatten(2)                                          # (B, T, D)
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
