"""A VAE baseline on the episodic interface (KM §4.1: "a baseline VAE model using the exact
same encoder and decoder"), so that comparisons with K++, KM and DKM isolate the memory.

Generative program for B episodes of T images, x: (B, T, C, H, W):

    z_t ~ N(0, I_L)            the isotropic prior (KM §2)
    x_t ~ p(x | z_t)           the shared decoder

with the guide q(z_t | x_t) of ``pyro_kpp.guides.vae``. Pyro's ELBO is eq. 1 of KM summed
over the episode's images; the per-image figure is that sum divided by T in ``pyro_kpp.inference.bound``.

The images of an episode are independent, so the VAE's "memory" carries nothing. To serve
the same ``write`` / ``sample`` API as the memory models (choices, also in the README):

* ``write(x)`` returns a ``Memory`` whose value is an empty (B, 0) tensor: it records how many
  episodes were written (and their device and dtype), nothing of their content;
* the keys are the codes z themselves: ``prior_keys`` draws z ~ N(0, I), ``infer_keys`` is the
  mean of q(z | x), and ``generate`` decodes the keys, so samples come from the prior whatever
  was written; ``sample_z`` has nothing left to sample.
"""
from __future__ import annotations

import pyro
import torch

from pyro_kpp.config import Config
from pyro_kpp.guides.vae import VaeGuide
from pyro_kpp.models.base import EpisodicModel, Memory, pyro_program
from pyro_kpp.nets.build import dense_spectral_norm


class VAE(EpisodicModel):
    """The memoryless baseline: N(0, I) prior on each image's code."""

    key_name = "codes z"
    conditional_bound = False                                  # ln p(x): there is no memory

    def __init__(self, cfg: Config, name: str = "vae"):
        super().__init__(cfg, name)
        self.q = VaeGuide(cfg.embed_size, cfg.code_size, cfg.hidden, dense_spectral_norm(cfg))

    def key_shape(self) -> tuple[int, ...]:
        """The keys are the codes z."""
        return (self.cfg.code_size,)

    def code_prior(self, memory, keys: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The code is the key itself, whatever the memory: nothing is left to sample."""
        return keys, None

    # -- Pyro program and guide --------------------------------------------------------------
    @pyro_program
    def model(self, x: torch.Tensor) -> None:
        B, T = self.check_episode(x)
        with pyro.plate("episodes", B, dim=-2), pyro.plate("images", T, dim=-1):
            z = pyro.sample("z", self.key_prior(x))                            # (..., B, T, L)
            pyro.sample("x", self.likelihood.dist(self.decode(z)), obs=x)

    @pyro_program
    def guide(self, x: torch.Tensor) -> None:
        self.q(self.embed(x))

    # -- memory API ----------------------------------------------------------------------------
    def memory_from(self, x: torch.Tensor) -> torch.Tensor:
        """A memory that carries nothing but the number of episodes: (B, 0)."""
        return x.new_zeros(x.shape[0], 0)

    def posterior_keys(self, x: torch.Tensor, memory: Memory | None) -> torch.Tensor:
        """Mean of q(z | x): (B, T, L); there is no memory to read."""
        return self.q.code_head(self.embed(x))[0]

    def memory_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Nothing per episode: the (B, 0) placeholder of ``write``."""
        return ((0,),)
