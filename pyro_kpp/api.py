"""The user-facing API: ``load``, ``write``, ``sample``, ``iterative_read``.

    model = pyro_kpp.load("runs/omniglot-kpp")
    memory = pyro_kpp.write(model, episode)          # episode: (T, C, H, W) or (B, T, C, H, W)
    images = pyro_kpp.sample(memory, n=16)           # (B, 16, C, H, W) probabilities
    images = pyro_kpp.sample(memory, keys, binary=True)          # drawn from the likelihood
    pixels = pyro_kpp.sample(memory, binary=True, as_uint8=True)  # uint8 0..255 (8-bit models)
    images = pyro_kpp.iterative_read(model, memory, episode, steps=10)  # (steps, [B,] T, C, H, W)

Dtypes: floating-point episodes and keys of any precision (numpy's float64, float16,
bfloat16) are converted to the model's dtype here; integer episodes are refused, since 0..255
and 0/1 images would be ambiguous. The model's own methods take the model's dtype only.
"""
from __future__ import annotations

import os

import torch

from pyro_kpp.models.base import EpisodicModel, Memory, check_generator, count, require_memory
from pyro_kpp.reading.iterative import IterativeReading, iterative_read as read_steps
from pyro_kpp.train.checkpoint import load_checkpoint, model_from_state
from pyro_kpp.train.device import resolve_device

#: Images decoded per ``generate`` call in ``sample``: bounds its working memory whatever ``n`` is.
SAMPLE_CHUNK = 256


def load(run_dir: str | os.PathLike, device: str = "cpu") -> EpisodicModel:
    """The trained model of a run directory (or checkpoint file), in eval mode."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir: expected a run directory or checkpoint path (str or os.PathLike), "
                        f"got {type(run_dir).__name__}")
    state = load_checkpoint(run_dir, map_location="cpu")
    return model_from_state(state, resolve_device(device)).eval()


def _as_batch(model: EpisodicModel, episode: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) or (B, T, C, H, W) -> (B, T, C, H, W), with an error that shows what came."""
    image = tuple(model.cfg.image_shape)
    if isinstance(episode, torch.Tensor) and (
            (episode.dim() == 4 and tuple(episode.shape[1:]) == image)
            or (episode.dim() == 5 and tuple(episode.shape[2:]) == image)):
        return episode if episode.dim() == 5 else episode.unsqueeze(0)
    got = tuple(episode.shape) if isinstance(episode, torch.Tensor) else type(episode).__name__
    dims = ", ".join(map(str, image))
    raise ValueError(f"episode: expected shape (T, {dims}) or (B, T, {dims}), got {got}")


def _checked_batch(model: EpisodicModel, episode: torch.Tensor, argname: str = "episode") -> torch.Tensor:
    """``episode`` as a (B, T, C, H, W) batch in the model's dtype, its values checked."""
    if not isinstance(model, EpisodicModel):
        raise TypeError(f"model: expected a pyro_kpp model (e.g. from pyro_kpp.load), got {type(model).__name__}")
    x = _as_batch(model, episode)
    if x.is_floating_point():
        x = x.to(model.dtype)
    model.check_episode(x, argname)
    return x


@torch.no_grad()
def write(model: EpisodicModel, episode: torch.Tensor) -> Memory:
    """Write episodes into memory. ``episode``: (T, C, H, W) or (B, T, C, H, W) on the model's device."""
    x = _checked_batch(model, episode)          # first: it says what ``model`` should be
    return model.write(x)


@torch.no_grad()
def sample(memory: Memory, keys: torch.Tensor | None = None, n: int = 16, binary: bool = False,
           sample_z: bool = True, generator: torch.Generator | None = None,
           as_uint8: bool = False) -> torch.Tensor:
    """Images read from a written memory: (B, N, C, H, W).

    keys: (B, N, K, 3) for K++ (the addressing variables for KM/DKM); drawn from the key
    prior when omitted (then N = ``n``). ``sample_z=False`` decodes the prior mean code.

    By default returns the likelihood's mean image in [0, 1] (Bernoulli: pixel probabilities;
    dmol: the logistic mixture's mean grey level). ``binary=True`` draws images from the
    likelihood instead, on the data's scale so they can be written back into a memory:
    0/1 pixels (Bernoulli) or 8-bit levels k/255 (dmol). ``as_uint8=True`` returns uint8
    grey levels round(255 * value), 0..255 (for dmol samples: the 8-bit image itself).
    """
    model = require_memory(memory).model
    model.check_memory(memory)
    check_generator(generator)
    if keys is None:
        keys = model.prior_keys(memory, count("n", n, noun="number of samples"), generator=generator)
    elif isinstance(keys, torch.Tensor) and keys.is_floating_point():
        keys = keys.to(model.dtype)
    if isinstance(keys, torch.Tensor) and keys.dim() >= 2:       # in chunks of images: bounded working memory
        chunks = keys.split(max(1, SAMPLE_CHUNK // memory.episodes), dim=1)
    else:                                                        # generate's check says what keys it expects
        chunks = [keys]
    parts = []
    for chunk in chunks:
        params = model.generate(memory, chunk, sample_z=sample_z, generator=generator)
        images = model.likelihood.sample(params, generator=generator) if binary else model.likelihood.mean(params)
        parts.append((images * 255).round().to(torch.uint8) if as_uint8 else images)
    return torch.cat(parts, dim=1)


@torch.no_grad()
def iterative_read(model: EpisodicModel, memory: Memory, episode: torch.Tensor, steps: int = 10,
                   feedback: str = "sample", full: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor | IterativeReading:
    """Iterative reading of ``episode`` from the fixed ``memory`` (K++ eq. 7, KM Algorithm 1).

    ``episode`` takes what ``write`` takes, (T, C, H, W) or (B, T, C, H, W). Returns each step's
    mean reconstruction (pixel probabilities for Bernoulli), (steps, T, C, H, W) or
    (steps, B, T, C, H, W) like the input; ``full=True`` returns the whole
    ``pyro_kpp.reading.iterative.IterativeReading`` (queries, keys and likelihood parameters of every step).
    """
    x = _checked_batch(model, episode)
    check_generator(generator)
    reading = read_steps(model, memory, x, steps, feedback, generator=generator)
    if full:
        return reading
    images = reading.means()
    return images if episode.dim() == 5 else images[:, 0]
