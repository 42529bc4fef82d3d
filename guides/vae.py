"""The VAE baseline's guide: q(z_t | x_t) = N(mu(e_t), sigma(e_t)) (KM §2 eq. 1, Appendix C Fig. 9).

e_t is the shared encoder's embedding of image t; a dense Gaussian head gives the code's
posterior, one image at a time (the VAE has no memory to condition on).
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_kpp.nets.conv import GaussianHead


class VaeGuide(PyroModule):
    """The guide's network and its sampling statement; called with E (B, T, D)."""

    def __init__(self, embed_size: int, code_size: int, hidden: int, spectral_norm: bool = False):
        super().__init__()
        self.code_head = GaussianHead(embed_size, code_size, hidden, spectral_norm=spectral_norm)

    def forward(self, E: torch.Tensor) -> None:
        B, T = E.shape[:2]
        z_loc, z_scale = self.code_head(E)                            # (B, T, L)
        with pyro.plate("episodes", B, dim=-2), pyro.plate("images", T, dim=-1):
            pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
